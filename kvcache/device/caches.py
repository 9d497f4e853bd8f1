"""Caches with Placement.DEVICE, for the cache manager: allocation from a
device memory pool, registration of caller-owned device memory, release, key
renewal and the transfers of a device cache, which go through the stager.

The device type and pool come from DeviceConfig (LLMConfig.device_type /
device_mem_pool_size / device_chunk_size, else KVCACHE_DEVICE_TYPE,
KVCACHE_DEVICE_POOL_SIZE, KVCACHE_DEVICE_CHUNK_BYTES). Nothing here opens
the runtime before a device cache is made or a peer asks for staging."""
import logging
import threading

from kvcache.bufpool import BufPoolConfig, BufferPool
from kvcache.config import env_int, env_str
from kvcache.device.regions import DeviceRegions
from kvcache.device.runtime import DEVICE_TYPES, DeviceRuntime
from kvcache.device.staging import DEFAULT_CHUNK_BYTES, Stager
from kvcache.status import LLMException, LLMStatusCode
from kvcache.values import Placement

DEFAULT_POOL_BYTES = 256 << 20

log = logging.getLogger(__name__)


def _invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, message)


class DeviceConfig:
    """``device_type``: 'npu', 'cuda' or '' (no device caches);
    ``device_id``; ``pool_bytes``: the device memory pool caches are
    allocated from (allocated at the first device allocation);
    ``chunk_bytes``: the size of each pinned staging slot."""

    def __init__(self, device_type="", device_id=0, pool_bytes=None, chunk_bytes=None):
        device_type = (device_type or env_str("KVCACHE_DEVICE_TYPE")).lower()
        if device_type not in ("",) + DEVICE_TYPES:
            raise _invalid(f"device type must be one of {DEVICE_TYPES} or empty, got "
                           f"{device_type!r}")
        self.device_type = device_type
        self.device_id = device_id
        self.pool_bytes = pool_bytes or env_int("KVCACHE_DEVICE_POOL_SIZE", DEFAULT_POOL_BYTES)
        self.chunk_bytes = chunk_bytes or env_int("KVCACHE_DEVICE_CHUNK_BYTES",
                                                  DEFAULT_CHUNK_BYTES)
        for name, value in (("device pool size", self.pool_bytes),
                            ("device chunk size", self.chunk_bytes)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise _invalid(f"{name} must be a positive number of bytes, got {value!r}")


class _DeviceMemory:
    """The device pool's memory as BufferPool takes it (addr, close)."""

    def __init__(self, buffer):
        self.buffer, self.addr = buffer, buffer.ptr

    def close(self):
        self.buffer.close()


class DeviceCaches:
    """``move``: the engine's transfer of host bytes, for the stager."""

    def __init__(self, engine, config, move=None):
        self.config = config
        self._runtime = None
        self._pool = None
        self._lock = threading.Lock()
        self.regions = DeviceRegions()
        self._timeout_ms = engine.timeout_ms
        self.stager = Stager(engine, self.regions, self.runtime, config.chunk_bytes, move)

    def use(self, device_type, device_id):
        """Make ``device_type``:``device_id`` this process's device, unless
        the runtime is open on another (LLM_PARAM_INVALID: one device per
        engine, as one cache manager)."""
        with self._lock:
            if self._runtime is not None and (self.config.device_type,
                                              self.config.device_id) != (device_type, device_id):
                raise _invalid(f"device memory of {device_type}:{device_id} given, but this "
                               f"engine's device is {self.config.device_type}:"
                               f"{self.config.device_id}")
            self.config.device_type, self.config.device_id = device_type, device_id

    def runtime(self):
        """The configured DeviceRuntime; LLM_FEATURE_NOT_ENABLED without one."""
        with self._lock:
            if self._runtime is None:
                if not self.config.device_type:
                    raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                                       "no device type is configured: set LLMConfig."
                                       "device_type ('npu' or 'cuda') or KVCACHE_DEVICE_TYPE "
                                       "for DEVICE placement")
                self._runtime = DeviceRuntime(self.config.device_type, self.config.device_id)
            return self._runtime

    def _device_pool(self):
        runtime = self.runtime()
        with self._lock:
            if self._pool is None:
                memory = _DeviceMemory(runtime.alloc(self.config.pool_bytes))
                self._pool = BufferPool(BufPoolConfig(pool_size=self.config.pool_bytes),
                                        memory)
            return self._pool

    def allocate(self, nbytes):
        """(base address, region id) of ``nbytes`` from the device pool;
        LLM_OUT_OF_MEMORY when it is full. Device memory is not zeroed."""
        pool = self._device_pool()
        base = pool.alloc(nbytes)
        return base, self.regions.register(base, nbytes, True)

    def free(self, base):
        self._pool.free(base)

    def register(self, addrs, nbytes, remote):
        """One device region per tensor of caller-owned device memory
        (CUDA: each range checked to be device memory); LLM_PARAM_INVALID
        for tensors overlapping each other or memory registered already,
        nothing registered then."""
        runtime = self.runtime()
        for addr in addrs:
            runtime.check_device_pointer(addr, nbytes)
        regions = []
        try:
            for addr in addrs:
                regions.append(self.regions.register(addr, nbytes, remote))
        except LLMException:
            self.regions.release(regions, 0)
            raise
        return regions

    def release(self, region_ids, timeout_ms, then=None):
        """Forget device regions once unused (see DeviceRegions.release)."""
        self.regions.release(sorted(set(region_ids)), timeout_ms / 1000, then)

    def renew(self, region_id):
        return self.regions.renew(region_id)

    def transfer(self, peer, op, local_cache, remote_cache, local, remote, lengths, timeout_ms,
                 remote_region_ids):
        """A transfer the cache manager planned between ``local_cache`` and
        the peer's ``remote_cache`` (a RemoteCache); ``remote_region_ids``:
        the peer's region of each piece. Returns the path taken."""
        local_device = local_cache.cache_desc.placement == Placement.DEVICE
        remote_device = remote_cache.cache_desc.placement == Placement.DEVICE
        return self.stager.transfer(
            peer, op, local, remote, lengths, timeout_ms,
            local_cache=local_cache if local_device else None,
            remote_regions=None if remote_device else remote_region_ids,
            remote_device_regions=remote_region_ids if remote_device else None)

    def close(self, in_use=False):
        """Stop staging, then free the pool and close the runtime, unless
        ``in_use`` (a cache could not be freed) or a staging call or slot
        outlived the wait: then they stay, as memory a transfer may use."""
        freed = self.stager.close(self._timeout_ms)
        if in_use or not freed:
            log.warning("device memory stays allocated: a transfer may still use it")
            return
        with self._lock:
            pool, self._pool = self._pool, None
            runtime, self._runtime = self._runtime, None
        if pool is not None:
            pool.close()
        if runtime is not None:
            runtime.close()
