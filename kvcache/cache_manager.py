"""CacheManager: LLM-DataDist's cache_manager over the TransferEngine.

Caches are allocated from the buffer pool (registered once) or registered
from user memory; each cache is an addressable region of its own (one per
tensor for registered memory). pull_*/push_* turn (cache layout, block ids,
layer range) into descriptor arrays and hand them to the engine. A peer's
cache is looked up by key once per link and remembered; every transfer names
the region ids the lookup returned, and the owner refuses ids it released
or renewed, so a remembered lookup is re-validated by every transfer: when
the owner says the cache is gone, the call looks it up once more.
Freeing a cache waits for the transfers on it (the engine's region pins);
moving or removing a key renews the cache's region ids.

Keys follow llm_datadist's allocate_cache: the i-th CacheKey of a cache
names its batch row i. A key is consumed (removed, as remove_cache_key) by
the first successful pull of all its layers, and a cache freed while keys
still name it is released once the last key is consumed or removed.

What a linked peer can reach follows llm_datadist's rules: a cache the
pool allocated is addressable by its keys and by CacheKeyByIdAndIndex; a
registered cache only when registered ``remote_accessible``. Nothing else
(free pool space, freed caches, the pool as a whole) is offered: the pool
itself is a container no peer sees, and a lookup of a cache not offered is
LLM_KV_CACHE_NOT_EXIST, as for one that does not exist."""
import itertools
import logging
import threading
import weakref

import numpy as np

from kvcache.bufpool import populate
from kvcache.cache import Cache, RemoteCache
from kvcache.descriptors import block_descriptors, checked_block_ids
from kvcache.device.caches import DeviceCaches, DeviceConfig
from kvcache.engine.rpc import is_int
from kvcache.local_copy import LocalCopies
from kvcache.layer_notifications import (NOTIFY_METHOD, SCHEMA, LayerNotifications,
                                         checked_transfer_id)
from kvcache.layerwise import (Geometry, LayerwiseSender, TransferConfig,
                               TransferWithCacheKeyConfig, plan_keyed, plan_raw)
from kvcache import checks
from kvcache.checks import public
from kvcache.status import LLMException, LLMStatusCode
from kvcache.values import (INVALID_ID, BlocksCacheKey, CacheKey, CacheKeyByIdAndIndex,
                            Placement)

TENSOR_ALIGN = 512
log = logging.getLogger(__name__)


def _invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, message)


def _layer_tensors(layer_range, num_tensors, per_layer, side):
    """Tensor indices of a layer range (layer i = tensors [i*N, (i+1)*N));
    no range: every tensor, whether or not they split into layers."""
    per_layer = checks.integer(per_layer, "tensor_num_per_layer", 1)
    if layer_range is None:
        return np.arange(num_tensors)
    if num_tensors % per_layer:
        raise _invalid(f"{side}: {num_tensors} tensors do not split into layers of "
                       f"{per_layer}")
    layers = num_tensors // per_layer
    if not isinstance(layer_range, range) or layer_range.step != 1:
        raise _invalid(f"{side} layer range must be a range with step 1, got {layer_range!r}")
    if len(layer_range) == 0 or layer_range.start < 0 or layer_range.stop > layers:
        raise _invalid(f"{side} layer range {layer_range} outside 0..{layers}")
    return np.arange(layer_range.start * per_layer, layer_range.stop * per_layer)


def _matching_tensors(op, local_desc, remote_desc, local_layers, remote_layers, per_layer):
    """Side names ("dst"/"src" for a read) and the tensor indices of both
    layer ranges, checked to match in data type and count."""
    here, there = ("dst", "src") if op == "read" else ("src", "dst")
    if remote_desc.data_type != local_desc.data_type:
        raise _invalid(f"data types differ: {here} {local_desc.data_type.name}, {there} "
                       f"{remote_desc.data_type.name}")
    local_t = _layer_tensors(local_layers, local_desc.num_tensors, per_layer, here)
    remote_t = _layer_tensors(remote_layers, remote_desc.num_tensors, per_layer, there)
    if local_t.size != remote_t.size:
        raise _invalid(f"{here} moves {local_t.size} tensors (layers {local_layers}), "
                       f"{there} {remote_t.size} (layers {remote_layers})")
    return here, there, local_t, remote_t


def _pool_hint(need, pool_size):
    """A pool size (bytes, whole MiB) that holds what the pool holds now plus
    ``need`` more."""
    return -(-(pool_size + need) // (1 << 20)) * (1 << 20)


def _on_device(cache):
    return cache.cache_desc.placement == Placement.DEVICE


_LOOKUPS = ("id", "blocks", "key")


def _lookup_key(params):
    """How a remembered lookup of the cache named by ``params`` is filed."""
    return tuple(sorted(params.items()))


def _key_params(key):
    if isinstance(key, BlocksCacheKey):
        return {"by": "blocks", "cluster_id": key.prompt_cluster_id, "model_id": key.model_id}
    if isinstance(key, CacheKey):
        return {"by": "key", "cluster_id": key.prompt_cluster_id, "req_id": key.req_id,
                "model_id": key.model_id, "prefix_id": key.prefix_id}
    if isinstance(key, CacheKeyByIdAndIndex):
        return {"by": "id", "cache_id": key.cache_id}
    raise _invalid(f"unsupported cache key {key!r}")


class CacheManager:
    """llm_datadist's cache_manager. ``pool_configured``: a memory pool was
    configured (allocations need one, as in llm_datadist);
    ``remote_cache_accessible``: pull_cache takes CacheKeyByIdAndIndex only
    (llm_datadist's enable_remote_cache_accessible); ``device``: the
    DeviceConfig of Placement.DEVICE caches (None: from KVCACHE_DEVICE_*)."""

    @public
    def __init__(self, engine, pool, cluster_id, sync_timeout_ms, pool_configured=True,
                 remote_cache_accessible=False, device=None):
        self._engine = engine
        self._pool = pool
        self._cluster_id = cluster_id
        self.sync_timeout_ms = sync_timeout_ms
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._caches = {}
        self._by_key = {}                       # key -> (cache id, batch row)
        self._link_failures = {}                # cluster id -> why its last link failed
        self._releasing = set()                 # cache ids being freed
        self._free_when_unkeyed = set()         # freed by the user while keys name them
        self.pool_configured = pool_configured
        self.remote_cache_accessible = remote_cache_accessible
        self._lookups = weakref.WeakKeyDictionary()     # Peer -> {lookup key: RemoteCache}
        # The pool is registered once; each cache in it is a sub-region with
        # an id of its own.
        self._pool_region = engine.register_memory(pool.base, pool.size, addressable=False)
        # A transport that maps peer memory gets one memfd per cache, so a
        # peer maps what it may reach and never the pool.
        self._segments = (engine.transport.maps_peer_memory
                          and hasattr(pool.memory, "segment"))
        engine.rpc.serve("cache.lookup", self._rpc_lookup, {"by": lambda v: v in _LOOKUPS})
        self._device = DeviceCaches(engine, device or DeviceConfig())
        self._local = LocalCopies(self.get_cache, engine.registry, self._device)
        self._layerwise = LayerwiseSender(engine, cluster_id, sync_timeout_ms,
                                          self._device.stager)
        self.layer_notifications = LayerNotifications()
        engine.rpc.serve(NOTIFY_METHOD, self.layer_notifications.serve, SCHEMA)
        engine.rpc.serve("cache.consume", self._rpc_consume, {"by": lambda v: v == "key"})

    # --- local caches ----------------------------------------------------------

    def _add(self, cache, keys):
        """File ``cache`` under its keys: key i names batch row i (placeholder
        keys hold a row's place and name nothing)."""
        named = [(key, row) for row, key in enumerate(keys)
                 if not (isinstance(key, CacheKey) and key.placeholder)]
        if len({key for key, _ in named}) != len(named):
            raise _invalid("the same cache key is given twice")
        with self._lock:
            for key, _ in named:
                if key in self._by_key:
                    raise LLMException(LLMStatusCode.LLM_REPEAT_REQUEST,
                                       f"cache key {key} is already in use")
            cache.keys = [key for key, _ in named]
            self._caches[cache.cache_id] = cache
            for key, row in named:
                self._by_key[key] = (cache.cache_id, row)
        return cache

    def _allocate(self, desc, kind, keys):
        if desc.placement == Placement.DEVICE:
            return self._allocate_device(desc, kind, keys)
        if not self.pool_configured:
            # llm_datadist allocates from a pool the options configured only.
            raise _invalid("no memory pool is configured: set LLMConfig.mem_pool_cfg (or "
                           "host_mem_pool_cfg / buf_pool_cfg) to allocate caches, or register "
                           "memory you own with register_cache / register_blocks_cache")
        stride = -(-desc.tensor_bytes // TENSOR_ALIGN) * TENSOR_ALIGN
        try:
            base = self._pool.alloc(stride * desc.num_tensors)
        except LLMException as exc:
            if exc.status_code != LLMStatusCode.LLM_OUT_OF_MEMORY:
                raise
            need = stride * desc.num_tensors
            # The pool knows sizes only; this layer knows which option sized it.
            raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                               f"{exc.message}; this cache ({desc.num_tensors} tensors of "
                               f"{desc.tensor_bytes} bytes) needs {need} bytes: raise the pool "
                               "size (LLMConfig.mem_pool_cfg = '{\"memory_size\": "
                               f"{_pool_hint(need, self._pool.size)}}}', or buf_pool_cfg's "
                               "buf_pool_size) or deallocate caches first") from None
        segment = None
        try:
            if self._segments:
                segment = self._pool.memory.segment(base, self._pool.allocation_size(base))
            populate(base, stride * desc.num_tensors)
            addrs = [base + i * stride for i in range(desc.num_tensors)]
            region = self._engine.register_memory(
                base, stride * desc.num_tensors, parent=self._pool_region,
                share=None if segment is None else (segment, 0))
        except BaseException:
            self._free_pool(base, segment)
            raise
        cache = Cache(next(self._ids), desc, addrs, kind, [region] * len(addrs), owned=True,
                      keys=keys)
        cache.segment = segment
        try:
            return self._add(cache, keys)
        except LLMException:
            self._engine.unregister_memory(region)
            self._free_pool(base, segment)
            raise

    def link_failed(self, cluster_id, cause):
        """LLMDataDist's word on its last link_clusters to ``cluster_id``: why
        it failed, or None when it linked."""
        with self._lock:
            if cause is None:
                self._link_failures.pop(cluster_id, None)
            else:
                self._link_failures[cluster_id] = cause

    def _not_linked(self, cluster_id):
        with self._lock:
            cause = self._link_failures.get(cluster_id)
        why = (f"the last link_clusters to it failed: {cause}" if cause
               else "link it with link_clusters first")
        return LLMException(LLMStatusCode.LLM_NOT_YET_LINK,
                            f"cluster {cluster_id} is not linked ({why})")

    def _allocate_device(self, desc, kind, keys):
        stride = -(-desc.tensor_bytes // TENSOR_ALIGN) * TENSOR_ALIGN
        base, region = self._device.allocate(stride * desc.num_tensors)
        cache = Cache(next(self._ids), desc, [base + i * stride for i in range(desc.num_tensors)],
                      kind, [region] * desc.num_tensors, owned=True, keys=keys)
        try:
            return self._add(cache, keys)
        except LLMException:
            self._device.release([region], 0)
            self._device.free(base)
            raise

    def _free_pool(self, base, segment):
        if segment is not None:
            self._pool.memory.unsegment(base, self._pool.allocation_size(base), segment)
        self._pool.free(base)

    @public
    def allocate_cache(self, cache_desc, cache_keys=()):
        """A per-request cache (shape[0] = batch) from the pool, as
        llm_datadist's: the i-th CacheKey in ``cache_keys`` names batch row
        i (at most one key per row; unused rows at the end need none, one in
        between takes a placeholder key with req_id 2**64-1). Each key is
        consumed by the first successful pull of its row.
        LLM_PARAM_INVALID without a configured pool; LLM_REPEAT_REQUEST for
        a key already in use."""
        keys = list(cache_keys)
        for key in keys:
            if not isinstance(key, CacheKey):
                raise _invalid(f"allocate_cache takes CacheKey keys, got {key!r}")
        if len(keys) > cache_desc.shape[0]:
            raise _invalid(f"{len(keys)} cache keys for a batch of {cache_desc.shape[0]} rows")
        return self._allocate(cache_desc, "cache", keys)

    @public
    def allocate_blocks_cache(self, cache_desc, blocks_cache_key=None):
        """A blocks cache (shape[0] = number of blocks) from the pool."""
        keys = [blocks_cache_key] if blocks_cache_key is not None else []
        return self._allocate(cache_desc, "blocks", keys)

    def _register(self, desc, addrs, kind, keys, remote_accessible):
        if remote_accessible not in (None, True, False):
            raise _invalid(f"remote_accessible must be None, True or False, got "
                           f"{remote_accessible!r}")
        # llm_datadist's default is True for device memory and False for host
        # memory, which its HCCS transports cannot serve as a remote cache;
        # ours move host memory only, so host memory is offered unless the
        # caller says otherwise.
        remote = remote_accessible is not False
        try:
            addrs = [int(a) for a in addrs]
        except (TypeError, ValueError):
            raise _invalid("addrs must be integer addresses, one per tensor") from None
        if len(addrs) != desc.num_tensors:
            raise _invalid(f"{len(addrs)} addresses for {desc.num_tensors} tensors")
        if desc.placement == Placement.DEVICE:
            regions = self._device.register(addrs, desc.tensor_bytes, remote)
            cache = Cache(next(self._ids), desc, addrs, kind, regions, owned=False, keys=keys)
            cache.remote = remote
            try:
                return self._add(cache, keys)
            except LLMException:
                self._device.release(regions, 0)
                raise
        # Each tensor: a top-level container (what transports register) and
        # an addressable region inside it, whose id can be renewed.
        tops, regions = [], []
        try:
            for addr in addrs:
                tops.append(self._engine.register_memory(addr, desc.tensor_bytes,
                                                         addressable=False))
                regions.append(self._engine.register_memory(addr, desc.tensor_bytes,
                                                            parent=tops[-1],
                                                            remote_accessible=remote))
        except LLMException:
            for top in tops:
                self._engine.unregister_memory(top)
            raise
        cache = Cache(next(self._ids), desc, addrs, kind, regions, owned=False, keys=keys)
        cache.containers = tops
        cache.remote = remote
        try:
            return self._add(cache, keys)
        except LLMException:
            for top in tops:
                self._engine.unregister_memory(top)
            raise

    @public
    def register_blocks_cache(self, cache_desc, addrs, blocks_cache_key=None,
                              remote_accessible=None):
        """Use caller-owned memory (one address per tensor) as a blocks cache.
        ``remote_accessible`` (as llm_datadist's): False keeps it for this
        process's own pulls and pushes (linked peers can neither look it up
        nor reach it); None or True offers it to linked peers."""
        keys = [blocks_cache_key] if blocks_cache_key is not None else []
        return self._register(cache_desc, addrs, "blocks", keys, remote_accessible)

    @public
    def register_cache(self, cache_desc, addrs, cache_keys=(), remote_accessible=None):
        """Use caller-owned memory as a per-request cache (keys as
        allocate_cache's: key i names batch row i; ``remote_accessible`` as
        in register_blocks_cache)."""
        keys = list(cache_keys)
        if len(keys) > cache_desc.shape[0]:
            raise _invalid(f"{len(keys)} cache keys for a batch of {cache_desc.shape[0]} rows")
        return self._register(cache_desc, addrs, "cache", keys, remote_accessible)

    @public
    def get_cache(self, cache_id):
        with self._lock:
            cache = self._caches.get(cache_id)
        if cache is None:
            raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, f"no cache {cache_id}")
        return cache

    def _release(self, cache):
        """Release the regions of ``cache`` once no transfer uses them, then
        forget the cache. LLM_LINK_BUSY leaves the cache as it was (a later
        call can free it); peers cannot look it up meanwhile."""
        with self._lock:
            if self._caches.get(cache.cache_id) is not cache:
                raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                   f"cache {cache.cache_id} is not allocated or registered")
            if cache.cache_id in self._releasing:
                raise LLMException(LLMStatusCode.LLM_REPEAT_REQUEST,
                                   f"cache {cache.cache_id} is already being freed")
            self._releasing.add(cache.cache_id)
            # Read under the lock: from here on remove_cache_key renews none
            # of them. A device cache's current ids (their earlier ones go
            # with them); registered host memory's top-level containers
            # (every sub-region and generation goes with them); a pool
            # cache's one region.
            if _on_device(cache):
                regions = list(cache.region_ids)
            else:
                regions = cache.containers if not cache.owned else cache.region_ids[:1]
        try:
            if _on_device(cache):
                self._device.release(regions, self.release_timeout_ms)
            else:
                self._engine.unregister_memory(list(regions), self.release_timeout_ms)
            with self._lock:
                del self._caches[cache.cache_id]
                for key in cache.keys:
                    self._by_key.pop(key, None)
                self._free_when_unkeyed.discard(cache.cache_id)
        finally:
            with self._lock:
                self._releasing.discard(cache.cache_id)

    @property
    def release_timeout_ms(self):
        """How long freeing a cache waits for the transfers using it."""
        return max(self.sync_timeout_ms, self._engine.timeout_ms)

    @public
    def deallocate_cache(self, cache):
        """Free a pool cache (or unregister a registered one), as
        llm_datadist's: while CacheKeys still name the cache, the release
        waits until the last of them is consumed by a pull or removed
        (remove_cache_key), and this call returns at once; a cache that is
        not allocated (any more) is left alone. The release itself waits
        until no transfer, ours or a peer's, uses the cache: LLM_LINK_BUSY
        when one still does after the release deadline (max of
        sync_kv_timeout and link_timeout), the cache left intact and
        freeable later."""
        if not isinstance(cache, Cache):
            raise _invalid(f"deallocate_cache takes a Cache, got {type(cache).__name__}")
        with self._lock:
            if self._caches.get(cache.cache_id) is not cache:
                return
            if cache.owned and _request_keys(cache):
                self._free_when_unkeyed.add(cache.cache_id)
                return
        self._free(cache)

    def _free(self, cache):
        self._release(cache)
        if not cache.owned:
            return
        # A pool cache starts at its first tensor.
        if _on_device(cache):
            self._device.free(cache.tensor_addrs[0])
        else:
            self._free_pool(cache.tensor_addrs[0], cache.segment)

    @public
    def unregister_cache(self, cache_id):
        """Stop exposing a registered cache (as llm_datadist's
        unregister_cache; the memory stays the caller's). Waits for
        transfers as deallocate_cache does."""
        cache = self.get_cache(cache_id)
        if cache.owned:
            return self.deallocate_cache(cache)
        self._free(cache)

    @public
    def remove_cache_key(self, cache_key):
        """The key no longer names its cache (as llm_datadist's
        remove_cache_key; an unknown key is left alone): the cache's region
        ids are renewed, so a peer's remembered lookup by that key is
        refused and looked up again. ``cache_key``: a key, or a list of
        keys removed together. Peers (one-sided transports) are told once
        for all the regions renewed, after this manager's lock is released,
        so a slow peer delays only this call. A cache freed while keyed is
        released with its last key; a cache being released keeps its ids
        (they are going). Should a renewal fail part-way, the keys before
        it stay removed, their old ids are revoked and their caches freed
        all the same, and the failure is raised."""
        keys = list(cache_key) if isinstance(cache_key, (list, tuple)) else [cache_key]
        old, free = [], []
        try:
            with self._lock:
                for key in keys:
                    found = self._by_key.pop(key, None)
                    if found is None:
                        continue
                    cache = self._caches[found[0]]
                    cache.keys.remove(key)
                    if not _request_keys(cache) and cache.cache_id in self._free_when_unkeyed:
                        free.append(cache)
                    if cache.cache_id in self._releasing:
                        continue            # its regions are going: nothing reaches them
                    old += self._renew(cache)
        finally:
            # Whatever was renewed before a failure is revoked, and what was
            # unkeyed freed, all the same.
            try:
                self._engine.revoke_regions(old)
            finally:
                self._free_all(free)

    def _renew(self, cache):
        """New ids for the regions of ``cache`` (under the lock), one at a
        time, so a failure leaves it naming ids that exist. Returns the
        earlier host ids, for peers to revoke."""
        old = []
        for region in dict.fromkeys(cache.region_ids):
            if _on_device(cache):
                # Peers reach device regions only through staging calls that
                # look the id up each time: nothing to revoke.
                new = self._device.renew(region)
            else:
                new = self._engine.renew_regions([region], revoke=False)[0]
                old.append(region)
            cache.region_ids = [new if r == region else r for r in cache.region_ids]
        return old

    def _free_all(self, caches):
        """Free each of ``caches``; the first failure is raised once every
        one was tried."""
        failure = None
        for cache in caches:
            try:
                self._free(cache)
            except LLMException as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    def _rpc_lookup(self, peer, params):
        by = params.get("by")
        with self._lock:
            row = 0
            if by == "id":
                cache_id = params.get("cache_id")
                cache = self._caches.get(cache_id) if is_int(cache_id) else None
            else:
                key = (BlocksCacheKey(params.get("cluster_id"), params.get("model_id", 0))
                       if by == "blocks" else _cache_key(params))
                cache_id, row = self._by_key.get(key, (None, 0))
                cache = self._caches.get(cache_id)
            if cache is not None and (cache.cache_id in self._releasing or not cache.remote):
                cache = None
            if cache is None:
                raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                   f"cluster {self._cluster_id} has no cache for {params}")
            return dict(cache.describe(), batch_index=row)

    def _rpc_consume(self, peer, params):
        """A peer pulled every layer of the row a CacheKey names: the key is
        used up (llm_datadist releases a key on a successful pull). Only a
        key the peer could look up: one naming a cache offered to peers."""
        key = _cache_key(params)
        with self._lock:
            cache_id, _ = self._by_key.get(key, (None, 0))
            cache = self._caches.get(cache_id)
            if cache is None or cache.cache_id in self._releasing or not cache.remote:
                raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                   f"cluster {self._cluster_id} has no cache for {params}")
        self.remove_cache_key(key)
        return {}

    # --- transfers ---------------------------------------------------------------

    def _peer_and_remote(self, cluster_id, key, fresh=False):
        """The linked peer of a cluster and its cache named by ``key``. The
        description is remembered per link; it is safe to reuse because
        every transfer names the cache's region id, which the peer checks."""
        peer = self._engine.find_peer(cluster_id)
        if peer is None:
            raise self._not_linked(cluster_id)
        params = _key_params(key)
        known = self._lookups.setdefault(peer, {})
        cache_key = _lookup_key(params)
        if not fresh and cache_key in known:
            return peer, known[cache_key]
        info = self._engine.call(peer, "cache.lookup", params, self.sync_timeout_ms)
        try:
            remote = RemoteCache(info)
        except (KeyError, TypeError, ValueError) as exc:
            raise LLMException(LLMStatusCode.LLM_FAILED,
                               f"cluster {cluster_id} described its cache badly: {exc}") from None
        known[cache_key] = remote
        return peer, remote

    def _forget(self, peer, key):
        self._lookups.get(peer, {}).pop(_lookup_key(_key_params(key)), None)

    def _with_retry(self, plan, cluster_id, remote_key, local_cache, *args):
        """Run ``plan(remote, local_cache, *args)`` -> (op, local, remote
        addrs, lengths, remote region per tensor, pieces per tensor) and
        move the bytes (device caches through kvcache.device); when the peer
        says the cache we remembered is gone, look it up once more and retry
        (nothing was moved). Returns (peer, remote cache)."""
        for fresh in (False, True):
            peer, remote = self._peer_and_remote(cluster_id, remote_key, fresh)
            op, local, remote_addrs, lengths, regions, pieces = plan(remote, local_cache, *args)
            if local.size == 0:
                return peer, remote
            try:
                self._device.transfer(
                    peer, op, local_cache, remote, local, remote_addrs, lengths,
                    self.sync_timeout_ms,
                    np.repeat(np.asarray(regions, dtype=np.uint64), pieces))
                return peer, remote
            except LLMException as exc:
                if exc.status_code != LLMStatusCode.LLM_KV_CACHE_NOT_EXIST or fresh:
                    raise
                self._forget(peer, remote_key)

    def _blocks(self, op, remote_key, cluster_id, local_cache, local_blocks, remote_blocks,
                local_layers, remote_layers, per_layer):
        return self._with_retry(self._plan_blocks, cluster_id, remote_key, local_cache, op,
                                local_blocks, remote_blocks, local_layers, remote_layers,
                                per_layer, getattr(remote_key, "batch_index", None))

    def _plan_blocks(self, remote, local_cache, op, local_blocks, remote_blocks, local_layers,
                     remote_layers, per_layer, source_row=None):
        local_desc, remote_desc = local_cache.cache_desc, remote.cache_desc
        here, there, local_t, remote_t = _matching_tensors(op, local_desc, remote_desc,
                                                           local_layers, remote_layers,
                                                           per_layer)
        local_ids = checked_block_ids(local_blocks, local_desc.shape[0], here, op == "read")
        block = local_desc.row_bytes
        if remote.kind == "blocks":
            remote_ids = checked_block_ids(remote_blocks, remote_desc.shape[0], there,
                                           op == "write")
            if remote_desc.row_bytes != block:
                raise _invalid(f"block sizes differ: {here} {block} bytes, {there} "
                               f"{remote_desc.row_bytes} bytes")
            if remote_ids.size != local_ids.size:
                raise _invalid(f"{remote_ids.size} {there} blocks but {local_ids.size} "
                               f"{here} blocks")
            local, remote_addrs, lengths = block_descriptors(
                np.asarray(local_cache.tensor_addrs)[local_t], block, local_ids,
                np.asarray(remote.tensor_addrs)[remote_t], block, remote_ids)
            pieces = local_ids.size
        else:
            # The batch row a key names in a contiguous (per-request) cache,
            # cut into blocks of our size.
            if op != "read" or len(remote_blocks):
                raise _invalid("a contiguous cache is a source for pull_blocks only, "
                               "without src_blocks")
            row = remote.row if source_row is None else source_row
            if not 0 <= row < remote_desc.shape[0]:
                raise _invalid(f"{there} batch index {row} out of range "
                               f"0..{remote_desc.shape[0] - 1}")
            tensor = remote_desc.row_bytes
            chunks = -(-tensor // block)
            if local_ids.size != chunks:
                raise _invalid(f"the source row holds {chunks} blocks of {block} bytes per "
                               f"tensor; {local_ids.size} destination blocks given")
            offsets = np.arange(chunks, dtype=np.uint64) * np.uint64(block)
            lengths_one = np.minimum(np.uint64(block), np.uint64(tensor) - offsets)
            local_bases = np.asarray(local_cache.tensor_addrs, dtype=np.uint64)[local_t]
            remote_bases = (np.asarray(remote.tensor_addrs, dtype=np.uint64)[remote_t]
                            + np.uint64(row * tensor))
            local = (local_bases[:, None] + local_ids.astype(np.uint64)[None, :]
                     * np.uint64(block)).ravel()
            remote_addrs = (remote_bases[:, None] + offsets[None, :]).ravel()
            lengths = np.tile(lengths_one, local_t.size)
            pieces = chunks
        return (op, local, remote_addrs, lengths, np.asarray(remote.region_ids)[remote_t],
                pieces)

    @public
    def pull_blocks(self, src_cache_key, dst_cache, src_blocks=(), dst_blocks=(),
                    src_layer_range=None, dst_layer_range=None, tensor_num_per_layer=2):
        """Read blocks ``src_blocks`` of the remote cache named by
        ``src_cache_key`` into ``dst_blocks`` of ``dst_cache``, for the layers
        in the ranges (layer i = tensors [i*N, (i+1)*N)). ``src_cache_key``:
        a BlocksCacheKey, or (without src_blocks) the CacheKey or
        CacheKeyByIdAndIndex of one batch row of a contiguous cache, cut into
        blocks of ours; a CacheKey is consumed once all its layers moved."""
        if isinstance(src_cache_key, CacheKey):
            src_cache_key.check_pullable()
        cluster = (src_cache_key.prompt_cluster_id
                   if isinstance(src_cache_key, (BlocksCacheKey, CacheKey))
                   else src_cache_key.cluster_id
                   if isinstance(src_cache_key, CacheKeyByIdAndIndex)
                   else _invalid_key(src_cache_key))
        peer, remote = self._blocks("read", src_cache_key, cluster, dst_cache, dst_blocks,
                                    src_blocks, dst_layer_range, src_layer_range,
                                    tensor_num_per_layer)
        self._consume(peer, src_cache_key, remote, src_layer_range, tensor_num_per_layer)

    def _consume(self, peer, key, remote, layers, per_layer):
        """After a successful pull by CacheKey of every layer: the owner
        drops the key (as llm_datadist does), and so does our memory of it."""
        if not isinstance(key, CacheKey):
            return
        if layers is not None and (layers.start != 0
                                   or len(layers) * per_layer != remote.cache_desc.num_tensors):
            return
        self._forget(peer, key)
        try:
            self._engine.call(peer, "cache.consume", _key_params(key), self.sync_timeout_ms)
        except LLMException as exc:
            # The bytes are here; the owner keeps the key until it removes it.
            log.warning("pulled %s but could not tell cluster %s it is used up: %s", key,
                        peer.cluster_id, exc)

    @public
    def push_blocks(self, dst_cache_key, src_cache, src_blocks=(), dst_blocks=(),
                    src_layer_range=None, dst_layer_range=None, tensor_num_per_layer=2):
        """Write ``src_blocks`` of the local ``src_cache`` into ``dst_blocks``
        of the remote blocks cache named by ``dst_cache_key``."""
        if not isinstance(dst_cache_key, BlocksCacheKey):
            _invalid_key(dst_cache_key)
        self._blocks("write", dst_cache_key, dst_cache_key.prompt_cluster_id, src_cache,
                     src_blocks, dst_blocks, src_layer_range, dst_layer_range,
                     tensor_num_per_layer)

    def _rows(self, op, remote_key, local_cache, local_row, remote_row, size, local_layers,
              remote_layers, per_layer):
        if isinstance(remote_key, CacheKeyByIdAndIndex):
            cluster = remote_key.cluster_id
        elif isinstance(remote_key, CacheKey):
            cluster = remote_key.prompt_cluster_id
        else:
            _invalid_key(remote_key)
        return self._with_retry(self._plan_rows, cluster, remote_key, local_cache, op,
                                local_row, remote_row, size, local_layers, remote_layers,
                                per_layer)

    def _plan_rows(self, remote, local_cache, op, local_row, remote_row, size, local_layers,
                   remote_layers, per_layer):
        local_desc, remote_desc = local_cache.cache_desc, remote.cache_desc
        here, there, local_t, remote_t = _matching_tensors(op, local_desc, remote_desc,
                                                           local_layers, remote_layers,
                                                           per_layer)
        if remote_row is None:
            remote_row = remote.row
        for row, desc, side in ((local_row, local_desc, here), (remote_row, remote_desc, there)):
            if not 0 <= row < desc.shape[0]:
                raise _invalid(f"{side} batch index {row} out of range 0..{desc.shape[0] - 1}")
        if size is None or size < 0:
            if local_desc.row_bytes != remote_desc.row_bytes:
                raise _invalid(f"row sizes differ ({here} {local_desc.row_bytes}, {there} "
                               f"{remote_desc.row_bytes} bytes); pass size")
            size = local_desc.row_bytes
        largest = min(local_desc.row_bytes, remote_desc.row_bytes)
        if size == 0 or size > largest:
            raise _invalid(f"size {size} outside 1..{largest}")
        local = (np.asarray(local_cache.tensor_addrs, dtype=np.uint64)[local_t]
                 + np.uint64(local_row * local_desc.row_bytes))
        remote_addrs = (np.asarray(remote.tensor_addrs, dtype=np.uint64)[remote_t]
                        + np.uint64(remote_row * remote_desc.row_bytes))
        lengths = np.full(local.size, size, dtype=np.uint64)
        return op, local, remote_addrs, lengths, np.asarray(remote.region_ids)[remote_t], 1

    @public
    def pull_cache(self, src_cache_key, dst_cache, batch_index=0, size=-1,
                   src_layer_range=None, dst_layer_range=None, tensor_num_per_layer=2):
        """Read one batch row of a remote cache into row ``batch_index`` of
        ``dst_cache``, as llm_datadist's: a CacheKey names the row it was the
        i-th key of (and is consumed once all its layers moved); a
        CacheKeyByIdAndIndex names its batch_index (the only kind taken with
        enable_remote_cache_accessible). ``size``: bytes per tensor (-1: the
        whole row)."""
        if isinstance(src_cache_key, CacheKey):
            if self.remote_cache_accessible:
                raise _invalid("with enable_remote_cache_accessible, pull_cache takes "
                               "CacheKeyByIdAndIndex keys only (as llm_datadist)")
            src_cache_key.check_pullable()
        remote_row = getattr(src_cache_key, "batch_index", None)
        peer, remote = self._rows("read", src_cache_key, dst_cache, batch_index, remote_row,
                                  size, dst_layer_range, src_layer_range,
                                  tensor_num_per_layer)
        self._consume(peer, src_cache_key, remote, src_layer_range, tensor_num_per_layer)

    @public
    def push_cache(self, dst_cache_key, src_cache, src_batch_index=0, size=-1,
                   src_layer_range=None, dst_layer_range=None, tensor_num_per_layer=2):
        """Write row ``src_batch_index`` of ``src_cache`` into the remote row
        named by ``dst_cache_key`` (a CacheKey names the row it was the i-th
        key of)."""
        remote_row = getattr(dst_cache_key, "batch_index", None)
        self._rows("write", dst_cache_key, src_cache, src_batch_index, remote_row, size,
                   src_layer_range, dst_layer_range, tensor_num_per_layer)

    # --- local copies (kvcache.local_copy) -----------------------------------------------

    @public
    def swap_blocks(self, src_cache, dst_cache, src_to_dst):
        """Copy blocks between two blocks caches, {src block: dst block} (as
        llm_datadist's swap_blocks: a CPU cache and a DEVICE cache swap
        through the device runtime, D2H / H2D)."""
        self._local.swap_blocks(src_cache, dst_cache, src_to_dst)

    @public
    def copy_blocks(self, cache, copy_block_info):
        """Copy blocks within a blocks cache, {src block: [dst blocks]} (as
        llm_datadist's copy_blocks)."""
        self._local.copy_blocks(cache, copy_block_info)

    @public
    def copy_cache(self, dst, src, dst_batch_index=0, src_batch_index=0, offset=0, size=-1,
                   req_id=None):
        """Copy a batch row between per-request caches (as llm_datadist's
        copy_cache; ``offset`` and ``size`` in bytes per tensor row)."""
        self._local.copy_cache(dst, src, dst_batch_index, src_batch_index, offset, size, req_id)

    @public
    def deallocate_blocks_cache(self, cache):
        """deallocate_cache for a blocks cache (as llm_datadist's);
        LLM_PARAM_INVALID for a per-request cache."""
        if not isinstance(cache, Cache) or cache.kind != "blocks":
            raise _invalid(f"deallocate_blocks_cache takes a blocks cache, got {cache!r}")
        self.deallocate_cache(cache)

    # --- layer-wise transfer ------------------------------------------------------

    @public
    def transfer_cache_async(self, src_cache, layer_synchronizer, transfer_configs,
                             src_block_indices=None, dst_block_indices=None,
                             dst_block_memory_size=None, *, transfer_id=None):
        """Push ``src_cache`` layer by layer (as llm_datadist's
        transfer_cache_async): each source layer (tensors 2i, 2i+1; a cache
        of an odd tensor count, with no layer range, is one layer of all
        its tensors) is written to every config's destination once
        ``layer_synchronizer.synchronize_layer(i, sync_kv_timeout)`` returned
        True. ``transfer_configs``: a list or tuple of TransferConfig /
        TransferWithCacheKeyConfig. ``src_block_indices`` /
        ``dst_block_indices``: block ids (equal counts) when the source /
        destination is a blocks cache; a contiguous source sends row
        ``src_batch_index`` (cut into ``dst_block_memory_size``-byte blocks
        for a blocks destination). ``transfer_id`` (our extension; int or
        str, default "<cluster>:<n>"): the id the destinations' wait_layers
        take. A DEVICE cache on either side moves staged (each layer D2H
        into pinned slots, written, H2D on a DEVICE destination), the layer
        announced once it is in device memory. Returns a CacheTask at
        once. Raises LLM_PARAM_INVALID (bad
        ranges, ids, sizes, counts), LLM_NOT_YET_LINK (a destination not
        linked), LLM_KV_CACHE_NOT_EXIST (src_cache not ours, or a key the
        destination does not know); failures while sending are the task's
        results (LLM_TIMEOUT for a layer not ready in time,
        LLM_LINK_FAILED, ...)."""
        if not isinstance(src_cache, Cache):
            raise _invalid(f"src_cache must be a Cache, got {type(src_cache).__name__}")
        with self._lock:
            if self._caches.get(src_cache.cache_id) is not src_cache:
                raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                   f"src_cache {src_cache!r} is not a cache of this manager")
        if not isinstance(transfer_configs, (list, tuple)) or not transfer_configs:
            raise _invalid("transfer_configs must be a non-empty list or tuple")
        for config in transfer_configs:
            if not isinstance(config, (TransferConfig, TransferWithCacheKeyConfig)):
                raise _invalid(f"transfer config {config!r} is not a TransferConfig or "
                               "TransferWithCacheKeyConfig")
        geometry = Geometry(src_cache, transfer_configs, src_block_indices, dst_block_indices,
                            dst_block_memory_size)
        legs = []
        for index, config in enumerate(transfer_configs):
            if isinstance(config, TransferConfig):
                peer = self._engine.find_peer(config.dst_cluster_id)
                if peer is None:
                    raise self._not_linked(config.dst_cluster_id)
                legs.append(plan_raw(geometry, index, config, peer))
            else:
                peer, remote = self._peer_and_remote(config.dst_cluster_id, config.cache_key,
                                                     fresh=True)
                legs.append(plan_keyed(geometry, index, config, peer, remote))
        desc = src_cache.cache_desc
        addrs = np.asarray(src_cache.tensor_addrs, dtype=np.uint64)
        lengths = np.full(addrs.size, desc.tensor_bytes, dtype=np.uint64)
        try:
            if _on_device(src_cache):
                for leg in legs:
                    leg.local_cache = src_cache
                table = self._device.regions
                pinned = table.pin(addrs, lengths, own=src_cache)
            else:
                table = self._engine.registry
                pinned = table.pin_local(addrs, lengths)[1]
        except LLMException:
            raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                               f"src_cache {src_cache!r} is being freed") from None
        return self._layerwise.start(geometry, legs, layer_synchronizer, transfer_id,
                                     lambda: table.unpin(pinned))

    @public
    def wait_layers(self, transfer_id, layer_index=None, timeout_in_millis=None):
        """The receiving side of transfer_cache_async (our extension):
        block until destination layer ``layer_index`` of ``transfer_id``
        has landed here (the source layer for a TransferConfig, whose raw
        addresses have no layers; None: until its last layer has, which
        also forgets the transfer). The sender announces each layer after its write
        completed, so the bytes are in place when this returns. Returns a
        LayerArrivals (layers, arrived_at, final, status). Raises
        LLM_TIMEOUT after ``timeout_in_millis`` ms (default
        sync_kv_timeout), the sender's code when it reported the transfer
        failed, LLM_LINK_FAILED when the sender's link ended first."""
        if layer_index is not None:
            layer_index = checks.integer(layer_index, "layer_index", 0)
        timeout = (self.sync_timeout_ms if timeout_in_millis is None
                   else checks.timeout_ms(timeout_in_millis, "timeout_in_millis"))
        return self.layer_notifications.wait(checked_transfer_id(transfer_id), layer_index,
                                             timeout)

    @public
    def transfer_path(self, cluster_id):
        """The path the last transfer on the link to ``cluster_id`` took:
        'host' (host memory both sides, the transport moves it), 'staged'
        (a device cache on either side, copied through pinned host slots);
        None before the first. A cache's own is ``Cache.transfer_path``.
        LLM_NOT_YET_LINK when the cluster is not linked."""
        peer = self._engine.find_peer(checks.integer(cluster_id, "cluster_id", 0))
        if peer is None:
            raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK, f"cluster {cluster_id} is not "
                               "linked")
        return self._device.stager.path(peer.name)

    @public
    def close(self):
        self._layerwise.close()
        with self._lock:
            caches = list(self._caches.values())
        in_use = False
        for cache in caches:
            try:
                self._free(cache)          # keys or not: the manager is going away
            except LLMException:
                in_use = in_use or _on_device(cache)
        self._device.close(in_use)


def _request_keys(cache):
    """The CacheKeys naming rows of ``cache`` (a blocks cache's key does not
    hold its release back)."""
    return [key for key in cache.keys if isinstance(key, CacheKey)]


def _cache_key(params):
    return CacheKey(params.get("cluster_id"), params.get("req_id"), params.get("model_id", 0),
                    params.get("prefix_id", INVALID_ID))


def _invalid_key(key):
    raise _invalid(f"unsupported cache key {key!r}")
