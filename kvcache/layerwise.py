"""Layer-wise transfer, after llm_datadist's ``transfer_cache_async``: a
prefill pushes each layer of a cache to its destinations as soon as the
user's LayerSynchronizer says the layer is computed, while later layers are
still being computed.

Everything is checked and planned when the task is submitted (remote
caches looked up, block ids and layer ranges checked, descriptor arrays
built per layer), so a bad input raises at once and the worker only waits
for layers and moves bytes. Each layer is a one-sided write into the
destination named by the config (with a DEVICE cache on either side, a
staged write through pinned host slots, kvcache.device.staging); once the
write completed (the destination holds the bytes, in device memory for a
DEVICE destination), the destination is told with a ``cache.layers`` control
call on the same link (kvcache.layer_notifications), the last layer's call
marked final. Tasks run on a bounded pool of workers, one task per worker:
a task waiting for its synchronizer holds only its own worker."""
import itertools
import logging
import threading
import time
from abc import ABC, abstractmethod
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvcache import checks
from kvcache.checks import public
from kvcache.descriptors import block_descriptors, checked_block_ids
from kvcache.layer_notifications import NOTIFY_METHOD, checked_transfer_id
from kvcache.status import LLMException, LLMStatusCode
from kvcache.values import BlocksCacheKey, CacheKeyByIdAndIndex, Placement

log = logging.getLogger(__name__)

TENSORS_PER_LAYER = 2            # llm_datadist's layer: K and V
MAX_WORKERS = 16                 # tasks running at once per cache manager; more wait
FAILURE_NOTICE_MS = 1000         # how long telling a destination of a failure may take
_ANY_BLOCK = 1 << 62             # raw destination addresses: the peer's table bounds them


class LayerSynchronizer(ABC):
    """Implemented by the user (as llm_datadist's LayerSynchronizer):
    ``synchronize_layer(layer_index, timeout_in_millis) -> bool`` returns
    True once source layer ``layer_index`` is computed and may be sent,
    False when it is not within ``timeout_in_millis`` ms (the task then
    fails with LLM_TIMEOUT). Called from the task's worker thread, for each
    layer the task sends, in increasing order."""

    @abstractmethod
    def synchronize_layer(self, layer_index, timeout_in_millis):
        """True when layer ``layer_index`` is ready; False at the timeout."""


def _layer_range(value, what, required=False):
    if value is None:
        if required:
            raise checks.invalid(f"{what} is required")
        return None
    if not isinstance(value, range) or value.step != 1:
        raise checks.invalid(f"{what} must be a range with step 1, got {value!r}")
    if len(value) == 0 or value.start < 0:
        raise checks.invalid(f"{what} {value} must be non-empty and start at 0 or later")
    return value


class TransferConfig:
    """A destination given by raw addresses (as llm_datadist's
    TransferConfig): ``dst_addrs`` is the address of each destination
    tensor of the layers in ``src_layer_range`` (2 per layer; for a
    contiguous destination already offset to its batch row), in memory the
    cluster ``dst_cluster_id`` offered to peers (registered
    remote_accessible). ``src_layer_range``: range with
    step 1 (None: every layer); ``src_batch_index``: the source row when
    the source is a contiguous cache. LLM_PARAM_INVALID for bad values."""

    @public
    def __init__(self, dst_cluster_id, dst_addrs, src_layer_range=None, src_batch_index=0):
        self.dst_cluster_id = checks.integer(dst_cluster_id, "dst_cluster_id", 0, (1 << 64) - 1)
        if isinstance(dst_addrs, (str, bytes)):
            raise checks.invalid("dst_addrs must be a list of integer addresses")
        self.dst_addrs = [checks.integer(a, "dst_addrs item", 1, (1 << 64) - 1)
                          for a in dst_addrs]
        if not self.dst_addrs:
            raise checks.invalid("dst_addrs is empty")
        self.src_layer_range = _layer_range(src_layer_range, "src_layer_range")
        self.src_batch_index = checks.integer(src_batch_index, "src_batch_index", 0,
                                              (1 << 32) - 1)

    def __repr__(self):
        return (f"TransferConfig(dst_cluster_id={self.dst_cluster_id}, "
                f"{len(self.dst_addrs)} dst_addrs, src_layer_range={self.src_layer_range}, "
                f"src_batch_index={self.src_batch_index})")


class TransferWithCacheKeyConfig:
    """A destination given by its cache key (as llm_datadist's
    TransferWithCacheKeyConfig): ``cache_key`` a BlocksCacheKey (the
    destination's blocks cache) or CacheKeyByIdAndIndex (a row of one of
    its caches); ``src_layer_range`` and ``dst_layer_range`` (required,
    step 1, equal lengths); ``src_batch_index`` (0 for a BlocksCacheKey).
    LLM_PARAM_INVALID for bad values."""

    @public
    def __init__(self, cache_key, src_layer_range=None, dst_layer_range=None,
                 src_batch_index=0):
        if not isinstance(cache_key, (BlocksCacheKey, CacheKeyByIdAndIndex)):
            raise checks.invalid(f"cache_key must be a BlocksCacheKey or CacheKeyByIdAndIndex, "
                                 f"got {cache_key!r}")
        self.cache_key = cache_key
        self.src_layer_range = _layer_range(src_layer_range, "src_layer_range", True)
        self.dst_layer_range = _layer_range(dst_layer_range, "dst_layer_range", True)
        if len(self.src_layer_range) != len(self.dst_layer_range):
            raise checks.invalid(f"src_layer_range {self.src_layer_range} and dst_layer_range "
                                 f"{self.dst_layer_range} differ in length")
        self.src_batch_index = checks.integer(src_batch_index, "src_batch_index", 0,
                                              (1 << 32) - 1)
        if isinstance(cache_key, BlocksCacheKey) and self.src_batch_index:
            raise checks.invalid("src_batch_index must be 0 with a BlocksCacheKey")

    @property
    def dst_cluster_id(self):
        key = self.cache_key
        return key.prompt_cluster_id if isinstance(key, BlocksCacheKey) else key.cluster_id

    def __repr__(self):
        return (f"TransferWithCacheKeyConfig({self.cache_key!r}, src_layer_range="
                f"{self.src_layer_range}, dst_layer_range={self.dst_layer_range}, "
                f"src_batch_index={self.src_batch_index})")


class CacheTask:
    """A running transfer_cache_async (as llm_datadist's CacheTask).
    ``transfer_id``: what the destinations' ``wait_layers`` take."""

    def __init__(self, transfer_id, num_configs):
        self.transfer_id = transfer_id
        self._results = [None] * num_configs
        self._done = threading.Event()

    def _wait(self, timeout_in_millis):
        if timeout_in_millis is None:
            self._done.wait()
            return True
        return self._done.wait(checks.timeout_ms(timeout_in_millis, "timeout_in_millis") / 1000)

    @public
    def get_results(self, timeout_in_millis=None):
        """Wait for the task (``timeout_in_millis``: ms, None: no limit) and
        return one LLMStatusCode per transfer config, in their order: None
        for a config none of whose layers was attempted; LLM_TIMEOUT for
        one still running at the timeout (the task goes on)."""
        finished = self._wait(timeout_in_millis)
        results = list(self._results)
        if not finished:
            return [LLMStatusCode.LLM_TIMEOUT if r is None else r for r in results]
        return results

    @public
    def synchronize(self, timeout_in_millis=None):
        """Wait for the task; LLM_SUCCESS, or the first failed config's
        code (LLM_TIMEOUT when still running at ``timeout_in_millis`` ms)."""
        if not self._wait(timeout_in_millis):
            return LLMStatusCode.LLM_TIMEOUT
        for result in self._results:
            if result is not None and result != LLMStatusCode.LLM_SUCCESS:
                return result
        return LLMStatusCode.LLM_SUCCESS


class _Leg:
    """One config's plan: the peer, and per source layer its destination
    layer and descriptor arrays (local, remote, lengths, remote regions).
    ``remote_device``: the destination is a DEVICE cache (its regions are
    device regions, reached through the peer's staging slots);
    ``local_cache``: the source when it is a DEVICE cache (set by the
    cache manager; else None): its pieces are staged through our slots."""

    def __init__(self, index, peer, layers, remote_device=False):
        self.index = index
        self.peer = peer
        self.layers = layers      # src layer -> (dst layer, local, remote, lengths, regions)
        self.remote_device = remote_device
        self.local_cache = None
        self.last = max(layers)
        self.active = True
        self.started = False               # a layer of it was sent


class Geometry:
    """The source cache as layers and rows, with the block arguments of one
    transfer_cache_async call checked."""

    def __init__(self, cache, configs, src_block_indices, dst_block_indices,
                 dst_block_memory_size):
        desc = cache.cache_desc
        self.cache = cache
        self.tensors = desc.num_tensors
        if self.tensors % TENSORS_PER_LAYER == 0:
            self.per_layer = TENSORS_PER_LAYER
        elif any(c.src_layer_range is not None for c in configs):
            raise checks.invalid(f"{self.tensors} source tensors do not split into layers of "
                                 f"{TENSORS_PER_LAYER}; give no layer range to send the whole "
                                 "cache as one layer")
        else:
            self.per_layer = self.tensors          # no range: every tensor, as one layer
        self.layers = self.tensors // self.per_layer
        self.row_bytes = desc.row_bytes
        self.rows = desc.shape[0]
        self.bases = np.asarray(cache.tensor_addrs, dtype=np.uint64)
        self.data_type = desc.data_type
        self.src_ids = None
        if src_block_indices is not None and len(src_block_indices):
            self.src_ids = checked_block_ids(src_block_indices, self.rows, "src", False)
            if dst_block_indices is None or not len(dst_block_indices):
                raise checks.invalid("blocks to a contiguous cache are not supported (give "
                                     "dst_block_indices with src_block_indices)")
            if len(dst_block_indices) != self.src_ids.size:
                raise checks.invalid(f"{self.src_ids.size} src_block_indices but "
                                     f"{len(dst_block_indices)} dst_block_indices")
        self.dst_blocks = (None if dst_block_indices is None or not len(dst_block_indices)
                           else dst_block_indices)
        size = 0 if dst_block_memory_size is None else checks.integer(
            dst_block_memory_size, "dst_block_memory_size", 0, (1 << 63) - 1)
        if size and self.dst_blocks is None:
            raise checks.invalid(f"dst_block_memory_size {size} given but no dst_block_indices")
        self.dst_block_bytes = size or None

    def src_layers(self, layer_range, what):
        layers = range(self.layers) if layer_range is None else layer_range
        if layers.stop > self.layers:
            raise checks.invalid(f"{what} {layers} outside the source's layers "
                                 f"0..{self.layers - 1}")
        return layers

    def tensors_of(self, layer):
        return np.arange(layer * self.per_layer, (layer + 1) * self.per_layer)

    def pieces(self, layer, row, dst_bases, dst_ids, dst_block_bytes):
        """(local, remote, lengths, pieces per tensor) moving source layer
        ``layer`` to destination tensors at ``dst_bases``: blocks to blocks,
        a row cut into destination blocks, or a row to a row."""
        src_bases = self.bases[self.tensors_of(layer)]
        dst_bases = np.asarray(dst_bases, dtype=np.uint64)
        size = self.row_bytes
        if self.src_ids is not None:
            local, remote, lengths = block_descriptors(src_bases, size, self.src_ids, dst_bases,
                                                       dst_block_bytes, dst_ids, size)
            return local, remote, lengths, self.src_ids.size
        starts = src_bases + np.uint64(row * size)
        if dst_ids is None:
            return starts, dst_bases, np.full(starts.size, size, dtype=np.uint64), 1
        offsets = np.arange(dst_ids.size, dtype=np.uint64) * np.uint64(dst_block_bytes)
        local = (starts[:, None] + offsets[None, :]).ravel()
        remote = (dst_bases[:, None] + dst_ids.astype(np.uint64)[None, :]
                  * np.uint64(dst_block_bytes)).ravel()
        lengths = np.tile(np.minimum(np.uint64(dst_block_bytes), np.uint64(size) - offsets),
                          src_bases.size)
        return local, remote, lengths, dst_ids.size


def _check_row(geometry, config):
    if geometry.src_ids is None and config.src_batch_index >= geometry.rows:
        raise checks.invalid(f"src_batch_index {config.src_batch_index} out of range "
                             f"0..{geometry.rows - 1}")


def _dst_block_ids(geometry, limit, block_bytes):
    """The destination block ids checked (no repeats, within ``limit``;
    None: raw addresses, which the peer's region table bounds), and, for a
    contiguous source, as many as its row has blocks."""
    if limit is None:
        # No bitmap as large as the id space: repeats found by sorting.
        ids = checked_block_ids(geometry.dst_blocks, _ANY_BLOCK, "dst", False)
        values, counts = np.unique(ids, return_counts=True)
        if (counts > 1).any():
            raise checks.invalid(f"destination block ids repeat: dst block "
                                 f"{int(values[counts > 1][0])}")
    else:
        ids = checked_block_ids(geometry.dst_blocks, limit, "dst", True)
    if geometry.src_ids is None:
        chunks = -(-geometry.row_bytes // block_bytes)
        if ids.size != chunks:
            raise checks.invalid(f"a source row of {geometry.row_bytes} bytes fills {chunks} "
                                 f"destination blocks of {block_bytes} bytes; "
                                 f"{ids.size} dst_block_indices given")
    elif block_bytes < geometry.row_bytes:
        raise checks.invalid(f"destination blocks of {block_bytes} bytes cannot hold source "
                             f"blocks of {geometry.row_bytes} bytes")
    return ids


def plan_raw(geometry, index, config, peer):
    """A TransferConfig's leg: destinations are raw addresses, which the
    engine checks against the peer's registered memory."""
    _check_row(geometry, config)
    layers = geometry.src_layers(config.src_layer_range, "src_layer_range")
    need = len(layers) * geometry.per_layer
    if len(config.dst_addrs) != need:
        raise checks.invalid(f"{len(config.dst_addrs)} dst_addrs for {len(layers)} layers; "
                             f"expected {need} ({geometry.per_layer} per layer)")
    ids = block_bytes = None
    if geometry.dst_blocks is not None:
        block_bytes = geometry.dst_block_bytes
        if block_bytes is None:
            if geometry.src_ids is None:
                raise checks.invalid("dst_block_memory_size is required to send a contiguous "
                                     "cache into blocks")
            block_bytes = geometry.row_bytes
        ids = _dst_block_ids(geometry, None, block_bytes)
    addrs = np.asarray(config.dst_addrs, dtype=np.uint64)
    plan = {}
    for i, layer in enumerate(layers):
        dst = addrs[i * geometry.per_layer:(i + 1) * geometry.per_layer]
        local, remote, lengths, _ = geometry.pieces(layer, config.src_batch_index, dst, ids,
                                                    block_bytes)
        plan[layer] = (layer, local, remote, lengths, None)
    return _Leg(index, peer, plan)


def plan_keyed(geometry, index, config, peer, remote):
    """A TransferWithCacheKeyConfig's leg against the destination cache
    its key named (``remote``: a RemoteCache); every piece names the
    destination region it must land in."""
    _check_row(geometry, config)
    desc = remote.cache_desc
    if desc.data_type != geometry.data_type:
        raise checks.invalid(f"data types differ: src {geometry.data_type.name}, dst "
                             f"{desc.data_type.name}")
    layers = geometry.src_layers(config.src_layer_range, "src_layer_range")
    if desc.num_tensors % geometry.per_layer:
        raise checks.invalid(f"the destination's {desc.num_tensors} tensors do not split into "
                             f"layers of {geometry.per_layer}")
    dst_layers = config.dst_layer_range
    remote_layers = desc.num_tensors // geometry.per_layer
    if dst_layers.stop > remote_layers:
        raise checks.invalid(f"dst_layer_range {dst_layers} outside the destination's layers "
                             f"0..{remote_layers - 1}")
    bases = np.asarray(remote.tensor_addrs, dtype=np.uint64)
    regions = np.asarray(remote.region_ids, dtype=np.uint64)
    ids = block_bytes = None
    if isinstance(config.cache_key, BlocksCacheKey):
        if geometry.dst_blocks is None:
            raise checks.invalid("a BlocksCacheKey destination needs dst_block_indices")
        block_bytes = desc.row_bytes
        if geometry.dst_block_bytes not in (None, block_bytes):
            raise checks.invalid(f"dst_block_memory_size {geometry.dst_block_bytes} but the "
                                 f"destination's blocks are {block_bytes} bytes")
        ids = _dst_block_ids(geometry, desc.shape[0], block_bytes)
    else:
        if geometry.dst_blocks is not None:
            raise checks.invalid("dst_block_indices given for a CacheKeyByIdAndIndex "
                                 "destination (a contiguous cache)")
        row = config.cache_key.batch_index
        if not 0 <= row < desc.shape[0]:
            raise checks.invalid(f"dst batch index {row} out of range 0..{desc.shape[0] - 1}")
        if desc.row_bytes != geometry.row_bytes:
            raise checks.invalid(f"row sizes differ: src {geometry.row_bytes} bytes, dst "
                                 f"{desc.row_bytes} bytes")
        bases = bases + np.uint64(row * desc.row_bytes)
    plan = {}
    for layer, dst_layer in zip(layers, dst_layers):
        dst_t = np.arange(dst_layer * geometry.per_layer, (dst_layer + 1) * geometry.per_layer)
        local, remote_addrs, lengths, per_tensor = geometry.pieces(
            layer, config.src_batch_index, bases[dst_t], ids, block_bytes)
        plan[layer] = (dst_layer, local, remote_addrs, lengths,
                       np.repeat(regions[dst_t], per_tensor))
    return _Leg(index, peer, plan, desc.placement == Placement.DEVICE)


class LayerwiseSender:
    """Runs a cache manager's layer-wise tasks on at most MAX_WORKERS
    workers. ``engine``: the TransferEngine; ``timeout_ms``: the deadline
    of each layer's write and notification, and the timeout handed to the
    synchronizer per layer; ``stager``: the device Stager, which moves a
    layer with a DEVICE cache on either side."""

    def __init__(self, engine, cluster_id, timeout_ms, stager):
        self._engine = engine
        self._stager = stager
        self._cluster_id = cluster_id
        self.timeout_ms = timeout_ms
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._pool = None
        self._running = set()              # CacheTasks not finished
        self._closing = threading.Event()

    def start(self, geometry, legs, synchronizer, transfer_id, unpin):
        """Submit a planned task; returns its CacheTask. ``unpin``: releases
        the source cache's pins, held from here until the task ends so the
        cache cannot be freed (and its memory reused) between layers."""
        try:
            if not isinstance(synchronizer, LayerSynchronizer):
                raise checks.invalid(f"layer_synchronizer must be a LayerSynchronizer, got "
                                     f"{type(synchronizer).__name__}")
            transfer_id = (f"{self._cluster_id}:{next(self._ids)}" if transfer_id is None
                           else checked_transfer_id(transfer_id))
            task = CacheTask(transfer_id, len(legs))
            with self._lock:
                if self._closing.is_set():
                    raise LLMException(LLMStatusCode.LLM_ENGINE_FINALIZED,
                                       "cache manager closed")
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(max_workers=MAX_WORKERS,
                                                    thread_name_prefix="kv-layerwise")
                self._running.add(task)
                self._pool.submit(self._run, task, legs, synchronizer, unpin)
        except BaseException:
            unpin()
            raise
        return task

    def _run(self, task, legs, synchronizer, unpin):
        try:
            self._send_layers(task, legs, synchronizer)
        except Exception as exc:                 # a bug must not leave waiters waiting
            log.exception("layer-wise transfer %s failed", task.transfer_id)
            for leg in legs:
                if leg.active:
                    self._fail(task, leg, LLMStatusCode.LLM_FAILED, repr(exc))
        finally:
            unpin()
            with self._lock:
                self._running.discard(task)
            task._done.set()

    def _send_layers(self, task, legs, synchronizer):
        for layer in sorted(set().union(*(leg.layers for leg in legs))):
            waiting = [leg for leg in legs if leg.active and layer in leg.layers]
            if not waiting:
                continue
            code, why = self._synchronize(synchronizer, layer)
            if code != LLMStatusCode.LLM_SUCCESS:
                # Configs whose layers were never attempted stay None (as
                # llm_datadist's get_results).
                for leg in legs:
                    if leg.active and (layer in leg.layers or leg.started):
                        self._fail(task, leg, code, why)
                    leg.active = False
                return
            for leg in waiting:
                self._send(task, legs, leg, layer)

    def _synchronize(self, synchronizer, layer):
        if self._closing.is_set():
            return LLMStatusCode.LLM_ENGINE_FINALIZED, "the cache manager closed"
        try:
            ready = synchronizer.synchronize_layer(layer, self.timeout_ms)
        except Exception as exc:
            log.warning("synchronize_layer(%d) raised %r", layer, exc)
            return LLMStatusCode.LLM_FAILED, f"synchronize_layer({layer}) raised {exc!r}"
        if ready is not True:
            return (LLMStatusCode.LLM_TIMEOUT,
                    f"layer {layer} not ready within {self.timeout_ms} ms")
        return LLMStatusCode.LLM_SUCCESS, ""

    def _send(self, task, legs, leg, layer):
        dst_layer, local, remote, lengths, regions = leg.layers[layer]
        last = layer == leg.last
        # Configs to one destination share the transfer id there: the final
        # notice goes with the last layer of the last of them.
        final = last and not any(other.active and other.peer is leg.peer
                                 for other in legs if other is not leg)
        try:
            if leg.local_cache is None and not leg.remote_device:
                self._engine.transfer_sync(leg.peer, "write", local, remote, lengths,
                                           self.timeout_ms, remote_regions=regions)
            else:
                # Staged: D2H into our slots, the move, and on a DEVICE
                # destination its H2D, synchronised before its stage_in
                # answered; so this returns with the layer in device memory.
                self._stager.transfer(
                    leg.peer, "write", local, remote, lengths, self.timeout_ms,
                    local_cache=leg.local_cache,
                    remote_regions=None if leg.remote_device else regions,
                    remote_device_regions=regions if leg.remote_device else None)
            # Only now, the write complete, may the destination hear of it.
            self._engine.call(leg.peer, NOTIFY_METHOD,
                              {"transfer_id": task.transfer_id, "layer": dst_layer,
                               "final": final, "status": 0, "message": ""}, self.timeout_ms)
        except LLMException as exc:
            self._fail(task, leg, exc.status_code, str(exc))
            return
        leg.started = True
        if last:
            task._results[leg.index] = LLMStatusCode.LLM_SUCCESS
            leg.active = False

    def _fail(self, task, leg, code, why):
        """The leg ends with ``code``; its destination is told when the
        link still works, so a waiter there need not run into its deadline."""
        task._results[leg.index] = code
        leg.active = False
        log.warning("layer-wise transfer %s to %s failed: %s", task.transfer_id,
                    leg.peer.name, why)
        if not leg.peer.linked:
            return
        try:
            self._engine.call(leg.peer, NOTIFY_METHOD,
                              {"transfer_id": task.transfer_id, "layer": -1, "final": True,
                               "status": int(code), "message": why[:4096]},
                              min(self.timeout_ms, FAILURE_NOTICE_MS))
        except LLMException as exc:
            log.info("could not tell %s that transfer %s failed: %s", leg.peer.name,
                     task.transfer_id, exc)

    def close(self):
        """Stop taking tasks; running ones stop before their next layer
        (LLM_ENGINE_FINALIZED), queued ones at once. Waits for them as long
        as a synchronizer may take for one layer and a layer's write, then
        returns anyway (a synchronizer that ignores its timeout keeps its
        worker)."""
        with self._lock:
            self._closing.set()
            pool, self._pool = self._pool, None
            running = list(self._running)
        if pool is None:
            return
        pool.shutdown(wait=False)
        deadline = time.monotonic() + 2 * self.timeout_ms / 1000 + 1
        for task in running:
            if not task._done.wait(max(0.0, deadline - time.monotonic())):
                log.warning("layer-wise transfer %s still running at close", task.transfer_id)
                break
