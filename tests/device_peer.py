"""A kv_peer process whose caches may live on a device of a runtime test
double (KVCACHE_ACL_LIB / KVCACHE_CUDA_LIB in the environment it is spawned
with): device caches are filled and read back through the runtime's own
synchronous H2D / D2H copies, so what a test compares is what device memory
holds."""
import numpy as np

from kv_peer import Actions, PeerProcess, pattern
from kvcache import BlocksCacheKey, CacheDesc, CacheKey, DataType, Placement
from kvcache.device.runtime import D2H, H2D


class DeviceActions(Actions):
    def _runtime(self):
        return self.dd.cache_manager._device.runtime()

    def alloc(self, kind, num_tensors, shape, placement, key=None, model_id=0, keys=()):
        """A blocks ('blocks', keyed BlocksCacheKey(key, model_id)) or
        per-request ('cache', keyed by (cluster, req_id) pairs) cache."""
        desc = CacheDesc(num_tensors, shape, DataType.DT_UINT8, Placement[placement])
        manager = self.dd.cache_manager
        if kind == "blocks":
            cache = manager.allocate_blocks_cache(
                desc, None if key is None else BlocksCacheKey(key, model_id))
        else:
            cache = manager.allocate_cache(desc, [CacheKey(prompt_cluster_id=c, req_id=r)
                                                  for c, r in keys])
        self.caches[cache.cache_id] = cache
        return cache.cache_id

    def register_device_blocks(self, num_tensors, shape, key, model_id=0):
        """Device memory of our own (the runtime's alloc), registered."""
        desc = CacheDesc(num_tensors, shape, DataType.DT_UINT8, Placement.DEVICE)
        self._device_owned = [self._runtime().alloc(desc.tensor_bytes)
                              for _ in range(num_tensors)]
        cache = self.dd.cache_manager.register_blocks_cache(
            desc, [b.ptr for b in self._device_owned], BlocksCacheKey(key, model_id))
        self.caches[cache.cache_id] = cache
        return cache.cache_id

    def remove_blocks_key(self, cluster, model_id=0):
        self.dd.cache_manager.remove_cache_key(BlocksCacheKey(cluster, model_id))

    def fill(self, cache_id, seed):
        cache = self.caches[cache_id]
        if cache.cache_desc.placement != Placement.DEVICE:
            return super().fill(cache_id, seed)
        n = cache.cache_desc.tensor_bytes
        for i, addr in enumerate(cache.tensor_addrs):
            data = pattern(seed, i, n)          # alive until the copy returned
            self._runtime().copy(addr, data.ctypes.data, n, H2D)

    def tensors(self, cache_id):
        cache = self.caches[cache_id]
        desc = cache.cache_desc
        if desc.placement != Placement.DEVICE:
            return super().tensors(cache_id)
        out = []
        for addr in cache.tensor_addrs:
            host = np.empty(desc.tensor_bytes, dtype=np.uint8)
            self._runtime().copy(host.ctypes.data, addr, desc.tensor_bytes, D2H)
            out.append(host.reshape(desc.shape[0], -1))
        return out

    def pull_model(self, cluster, model_id, cache_id, src, dst):
        """pull_blocks from the blocks cache BlocksCacheKey(cluster, model_id)."""
        self.dd.cache_manager.pull_blocks(BlocksCacheKey(cluster, model_id),
                                          self.caches[cache_id], src, dst)

    def push_model(self, cluster, model_id, cache_id, src, dst):
        self.dd.cache_manager.push_blocks(BlocksCacheKey(cluster, model_id),
                                          self.caches[cache_id], src, dst)

    def push_layers(self, name, cache_id, dst_cluster, model_id, layers, seed, src_blocks,
                    dst_blocks, transfer_id, delay_s, raw_addrs=None):
        """transfer_cache_async of blocks to BlocksCacheKey(dst_cluster,
        model_id) (or, with ``raw_addrs``, a TransferConfig to those
        addresses), layer by layer: the synchronizer "computes" layer i
        (writes its tensors with ``seed``, through the runtime for a device
        cache) ``delay_s`` after layer i - 1. The task is kept as ``name``."""
        import time

        from kvcache import LayerSynchronizer, TransferConfig, TransferWithCacheKeyConfig
        cache = self.caches[cache_id]
        actions = self

        class Compute(LayerSynchronizer):
            def synchronize_layer(self, layer_index, timeout_in_millis):
                time.sleep(delay_s)
                actions.write_tensors(cache, seed, (2 * layer_index, 2 * layer_index + 1))
                return True

        config = (TransferWithCacheKeyConfig(BlocksCacheKey(dst_cluster, model_id),
                                             range(layers), range(layers))
                  if raw_addrs is None else TransferConfig(dst_cluster, raw_addrs))
        self.tasks = getattr(self, "tasks", {})
        self.tasks[name] = self.dd.cache_manager.transfer_cache_async(
            cache, Compute(), [config], src_blocks, dst_blocks, transfer_id=transfer_id)

    def task_code(self, name):
        task = self.tasks.pop(name)
        return int(task.synchronize(30_000)), [int(r) for r in task.get_results()]

    def write_tensors(self, cache, seed, indexes):
        n = cache.cache_desc.tensor_bytes
        for i in indexes:
            data = pattern(seed, i, n)
            if cache.cache_desc.placement == Placement.DEVICE:
                self._runtime().copy(cache.tensor_addrs[i], data.ctypes.data, n, H2D)
            else:
                cache.tensors()[i].view(np.uint8).reshape(-1)[:] = data

    def watch_layers(self, transfer_id, layers, cache_id, dst_blocks, timeout_ms):
        """At each layer's notice, what that layer's destination blocks hold
        right then (read from device memory for a device cache)."""
        snapshots = []
        for layer in range(layers):
            self.dd.cache_manager.wait_layers(transfer_id, layer, timeout_ms)
            now = self.tensors(cache_id)
            snapshots.append([now[t][dst_blocks] for t in (2 * layer, 2 * layer + 1)])
        return snapshots, self.dd.cache_manager.wait_layers(transfer_id, None,
                                                            timeout_ms).layers

    def set_copy_delay(self, us):
        """Make each copy of the double take ``us`` microseconds."""
        import ctypes
        import os
        lib = ctypes.CDLL(os.environ["KVCACHE_ACL_LIB"])
        lib.fake_acl_set_copy_delay_us(ctypes.c_long(us))

    def timed_pull(self, cluster, model_id, cache_id, src, dst):
        """pull_model's wall time in seconds."""
        import time
        start = time.monotonic()
        self.pull_model(cluster, model_id, cache_id, src, dst)
        return time.monotonic() - start

    def stage_raw(self, cluster, method, params):
        """A staging control call as a (misbehaving) peer could send it."""
        peer = self.dd.engine.find_peer(cluster)
        return self.dd.engine.call(peer, method, params, 3000)

    def transfer_path(self, cluster_id, cache_id):
        return (self.dd.cache_manager.transfer_path(cluster_id),
                self.caches[cache_id].transfer_path)


class DevicePeer(PeerProcess):
    actions = DeviceActions
