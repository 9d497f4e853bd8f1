"""A kvcache process driven over a pipe, for multi-process tests: each
PeerProcess runs its own LLMDataDist in a spawned interpreter and executes
the commands the test sends (real sockets between real processes)."""
import ctypes
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback

import numpy as np

from kvcache import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType,
                     LLMClusterInfo, LLMConfig, LLMDataDist, LLMException, LLMRole)

REPLY_TIMEOUT_S = 60
DEFAULT_POOL = '{"memory_size": 1073741824}'


def pattern(seed, tensor_index, nbytes):
    """The deterministic bytes a test writes into a tensor."""
    return np.random.default_rng([seed, tensor_index]).integers(0, 256, nbytes, dtype=np.uint8)


class Actions:
    """What a peer process can be asked to do (cache ids name caches)."""

    def __init__(self, role, cluster_id, listen, options):
        self.dd = LLMDataDist(LLMRole(role), cluster_id)
        cfg = LLMConfig()
        cfg.listen_ip_info = listen
        cfg.mem_pool_cfg = DEFAULT_POOL        # allocations need a pool, as in llm_datadist
        for key, value in options.items():
            setattr(cfg, key, value)
        self.dd.init(cfg.generate_options())
        self.caches = {}

    def address(self):
        return self.dd.listen_address

    def alloc_blocks(self, num_tensors, shape, dtype=DataType.DT_FLOAT16, key_cluster=None):
        key = BlocksCacheKey(prompt_cluster_id=key_cluster) if key_cluster is not None else None
        cache = self.dd.cache_manager.allocate_blocks_cache(
            CacheDesc(num_tensors, dtype, shape), key)
        self.caches[cache.cache_id] = cache
        return cache.cache_id

    def alloc_cache(self, num_tensors, shape, keys=(), dtype=DataType.DT_FLOAT16):
        cache = self.dd.cache_manager.allocate_cache(
            CacheDesc(num_tensors, dtype, shape),
            [CacheKey(prompt_cluster_id=c, req_id=r) for c, r in keys])
        self.caches[cache.cache_id] = cache
        return cache.cache_id

    def register_blocks(self, num_tensors, shape, key_cluster, remote_accessible=None):
        # Memory the "user" owns (numpy), registered instead of allocated.
        desc = CacheDesc(num_tensors, DataType.DT_FLOAT16, shape)
        owned = [np.zeros(shape, dtype=np.float16) for _ in range(num_tensors)]
        self._owned = getattr(self, "_owned", []) + owned
        key = BlocksCacheKey(key_cluster) if key_cluster is not None else None
        cache = self.dd.cache_manager.register_blocks_cache(
            desc, [a.ctypes.data for a in owned], key, remote_accessible=remote_accessible)
        self.caches[cache.cache_id] = cache
        return cache.cache_id

    def register_cache(self, num_tensors, shape, keys, remote_accessible=None):
        """User-owned memory as a per-request cache named by CacheKeys."""
        desc = CacheDesc(num_tensors, DataType.DT_FLOAT16, shape)
        owned = [np.zeros(shape, dtype=np.float16) for _ in range(num_tensors)]
        self._owned = getattr(self, "_owned", []) + owned
        cache = self.dd.cache_manager.register_cache(
            desc, [a.ctypes.data for a in owned],
            [CacheKey(prompt_cluster_id=c, req_id=r) for c, r in keys],
            remote_accessible=remote_accessible)
        self.caches[cache.cache_id] = cache
        return cache.cache_id

    def has_key(self, cluster, req_id):
        """Whether CacheKey(cluster, req_id) still names a cache here."""
        return CacheKey(prompt_cluster_id=cluster, req_id=req_id) in \
            self.dd.cache_manager._by_key

    def describe(self, cache_id):
        """What a lookup of the cache returns (addresses, region ids)."""
        return self.caches[cache_id].describe()

    def pool(self):
        """(base address, size) of the buffer pool."""
        pool = self.dd._pool
        return pool.base, pool.size

    def pool_bytes(self, offset, size):
        """Bytes of the buffer pool at ``offset`` (free space included)."""
        base = self.dd._pool.base
        return bytes((ctypes.c_uint8 * size).from_address(base + offset))

    def fill(self, cache_id, seed):
        for i, tensor in enumerate(self.caches[cache_id].tensors()):
            tensor.view(np.uint8).reshape(-1)[:] = pattern(seed, i, tensor.nbytes)

    def tensors(self, cache_id):
        return [t.view(np.uint8).reshape(t.shape[0], -1).copy()
                for t in self.caches[cache_id].tensors()]

    def deallocate(self, cache_id):
        self.dd.cache_manager.deallocate_cache(self.caches.pop(cache_id))

    def link(self, remote_cluster_id, address, timeout=3000):
        info = LLMClusterInfo()
        info.remote_cluster_id = remote_cluster_id
        if address:              # None: the cluster is found by id (a metadata server)
            host, port = address.rsplit(":", 1)
            info.append_remote_ip_info(host, int(port))
        ret, rets = self.dd.link_clusters([info], timeout=timeout)
        return int(rets[0])

    def unlink(self, remote_cluster_id, force=False):
        info = LLMClusterInfo()
        info.remote_cluster_id = remote_cluster_id
        ret, rets = self.dd.unlink_clusters([info], force=force)
        return int(rets[0])

    def pull_blocks(self, cluster, cache_id, src, dst, src_layers=None, dst_layers=None,
                    per_layer=2, req_id=None):
        key = (CacheKey(prompt_cluster_id=cluster, req_id=req_id) if req_id is not None
               else BlocksCacheKey(prompt_cluster_id=cluster))
        self.dd.cache_manager.pull_blocks(key, self.caches[cache_id], src, dst,
                                          src_layers, dst_layers, per_layer)

    def push_blocks(self, cluster, cache_id, src, dst, src_layers=None, dst_layers=None,
                    per_layer=2):
        self.dd.cache_manager.push_blocks(BlocksCacheKey(cluster_id=cluster),
                                          self.caches[cache_id], src, dst, src_layers,
                                          dst_layers, per_layer)

    def pull_cache(self, cluster, remote_cache_id, cache_id, remote_row=0, row=0, size=-1,
                   src_layers=None, dst_layers=None, req_id=None):
        key = (CacheKey(prompt_cluster_id=cluster, req_id=req_id) if req_id is not None
               else CacheKeyByIdAndIndex(cluster, remote_cache_id, remote_row))
        self.dd.cache_manager.pull_cache(key, self.caches[cache_id], row, size, src_layers,
                                         dst_layers)

    def push_cache(self, cluster, remote_cache_id, cache_id, remote_row=0, row=0, size=-1,
                   src_layers=None, dst_layers=None):
        self.dd.cache_manager.push_cache(CacheKeyByIdAndIndex(cluster, remote_cache_id,
                                                              remote_row),
                                         self.caches[cache_id], row, size, src_layers,
                                         dst_layers)

    def switch_role(self, role, listen=""):
        self.dd.switch_role(LLMRole(role), {"llm.listenIpInfo": listen} if listen else None)
        return self.dd.listen_address

    def free_on_call(self, cache_id, method):
        """Serve control calls ``method`` by freeing a cache: the caller's
        call is what makes us free memory it looked up."""
        def free(peer, params):
            self.deallocate(cache_id)
            return {}
        self.dd.engine.add_handler(method, free)

    def call_peer(self, cluster, method, timeout_ms):
        return self.dd.engine.call(self.dd.engine.find_peer(cluster), method, {}, timeout_ms)

    def signal_when_in_flight(self, cluster, pid, sig, timeout_s=10):
        """From a thread: as soon as a transfer on the link to ``cluster`` is
        in flight, send ``sig`` to process ``pid`` (a peer that dies or
        freezes mid-transfer, for certain)."""
        link = self.dd.engine.find_peer(cluster).link

        def watch():
            deadline = time.monotonic() + timeout_s
            while not link.in_flight and time.monotonic() < deadline:
                time.sleep(0.0002)
            if link.in_flight:
                os.kill(pid, sig)
        threading.Thread(target=watch, daemon=True).start()

    def link_state(self, remote_cluster_id):
        return self.dd.check_link_status(remote_cluster_id).name

    def finalize(self):
        self.dd.finalize()


def _main(conn, actions_class, role, cluster_id, listen, options):
    """The peer process: build ``actions_class`` (Actions or a subclass),
    then run the commands the pipe brings until finalize or EOF."""
    try:
        actions = actions_class(role, cluster_id, listen, options)
    except BaseException as exc:
        conn.send(("err", getattr(exc, "status_code", None), traceback.format_exc()))
        return
    conn.send(("ok", actions.address()))
    while True:
        try:
            name, args, kwargs = conn.recv()
        except EOFError:
            return
        try:
            result = getattr(actions, name)(*args, **kwargs)
            conn.send(("ok", result))
        except LLMException as exc:
            conn.send(("err", int(exc.status_code), str(exc)))
        except BaseException:
            conn.send(("err", None, traceback.format_exc()))
        if name == "finalize":
            return


class PeerError(Exception):
    def __init__(self, status_code, message):
        self.status_code = status_code
        super().__init__(message)


class PeerProcess:
    """A spawned kvcache process; ``peer.call("pull_blocks", ...)`` runs
    that method of its ``actions`` class (a subclass may name another)."""
    actions = Actions

    def __init__(self, role, cluster_id, listen="127.0.0.1:0", **options):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_main, args=(child, self.actions, role, cluster_id,
                                                       listen, options), daemon=True)
        self.process.start()
        self.cluster_id = cluster_id
        self.address = self._reply()

    def _reply(self, timeout=REPLY_TIMEOUT_S):
        if not self.conn.poll(timeout):
            raise TimeoutError(f"peer {self.cluster_id} did not answer in {timeout} s")
        kind, *rest = self.conn.recv()
        if kind == "err":
            raise PeerError(rest[0], rest[1])
        return rest[0]

    def call(self, name, *args, timeout=REPLY_TIMEOUT_S, **kwargs):
        self.conn.send((name, args, kwargs))
        return self._reply(timeout)

    def send(self, name, *args, **kwargs):
        """Start a command without waiting (collect with result())."""
        self.conn.send((name, args, kwargs))

    def result(self, timeout=REPLY_TIMEOUT_S):
        return self._reply(timeout)

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.process.pid, sig)
        if sig == signal.SIGKILL:
            self.process.join(10)

    def close(self):
        if self.process.is_alive():
            try:
                self.call("finalize", timeout=10)
            except (PeerError, TimeoutError, EOFError, OSError, BrokenPipeError):
                pass
            self.process.join(5)
            if self.process.is_alive():
                self.process.kill()
                self.process.join(5)
