"""One accelerator runtime as the device layer uses it: ``npu`` (ACL, through
pyverbs_kv.acl) or ``cuda`` (pyverbs_kv.cuda). Opened at first use, so a
process that never places a cache on a device never loads a runtime library;
every runtime failure becomes an LLMException whose message carries the
runtime's code and the failing call (``device_code`` holds the code)."""
import contextlib
import threading

from kvcache.config import env_str
from kvcache.engine.regions import check_host_mapped
from kvcache.status import LLMException, LLMStatusCode

DEVICE_TYPES = ("npu", "cuda")
# aclrtMemcpyKind and cudaMemcpyKind number these three alike.
H2D, D2H, D2D = 1, 2, 3


def _module(device_type):
    if device_type == "npu":
        from pyverbs_kv import acl
        return acl
    from pyverbs_kv import cuda
    return cuda


@contextlib.contextmanager
def device_errors(what):
    """Runtime exceptions inside the block -> LLMException: a missing library
    or symbol LLM_FEATURE_NOT_ENABLED, an out-of-memory allocation
    LLM_DEVICE_OUT_OF_MEMORY, any other failed call LLM_DEVICE_MEM_ERROR,
    a bad range LLM_PARAM_INVALID."""
    from pyverbs_kv.accel import AcceleratorError, RuntimeUnavailable
    try:
        yield
    except RuntimeUnavailable as exc:
        raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                           f"{what}: {exc}") from None
    except AcceleratorError as exc:
        oom = exc.call.endswith(("Malloc", "MallocHost")) and exc.code in (2, 207001)
        err = LLMException(LLMStatusCode.LLM_DEVICE_OUT_OF_MEMORY if oom
                           else LLMStatusCode.LLM_DEVICE_MEM_ERROR, f"{what}: {exc}")
        err.device_code, err.device_call = exc.code, exc.call
        raise err from None
    except (ValueError, TypeError, BufferError) as exc:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"{what}: {exc}") from None


def locate_memory(addr, length):
    """Where [addr, addr + length) lies, as Mooncake's wildcard location
    finds it: 'cuda:N' for CUDA device (or managed) memory, None for host
    memory. cudaPointerGetAttributes is asked first when this process puts
    its memory on CUDA (KVCACHE_DEVICE_TYPE=cuda), and for a range that is
    no host memory when the CUDA driver is loaded here already; so a process
    that never touched CUDA never loads a runtime. NPU memory cannot be
    found so (ACL has no such query): name it. LLM_PARAM_INVALID when the
    range is neither."""
    from pyverbs_kv import cuda
    from pyverbs_kv.accel import AcceleratorError
    if env_str("KVCACHE_DEVICE_TYPE").lower() != "cuda":
        try:
            check_host_mapped(addr, length)
            return None
        except LLMException:
            if not cuda.driver_loaded():
                raise
    if cuda.available()[0]:
        try:
            attrs = cuda.pointer_attributes(addr)
        except AcceleratorError:
            attrs = None                    # a runtime without a GPU: no device memory here
        if attrs is not None and attrs.type in ("device", "managed"):
            return f"cuda:{attrs.device}"
    check_host_mapped(addr, length)
    return None


class DeviceRuntime:
    """``device_type`` 'npu' or 'cuda', ``device_id`` the device of this
    process's caches. Thread-safe opening; the context is closed by
    ``close()`` (streams, then buffers)."""

    def __init__(self, device_type, device_id):
        if device_type not in DEVICE_TYPES:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"device type must be one of {DEVICE_TYPES}, got {device_type!r}")
        self.device_type = device_type
        self.device_id = device_id
        self._lock = threading.Lock()
        self._ctx = None

    @property
    def context(self):
        """The runtime's Context (opened here at first use)."""
        with self._lock:
            if self._ctx is None:
                with device_errors(f"opening {self.device_type} device {self.device_id}"):
                    self._ctx = _module(self.device_type).Context(self.device_id)
            return self._ctx

    def alloc(self, nbytes):
        """Device memory -> the runtime's DeviceBuffer."""
        with device_errors(f"allocating {nbytes} bytes on {self.device_type}:{self.device_id}"):
            return self.context.alloc(nbytes)

    def alloc_host(self, nbytes):
        """Pinned host memory (a staging buffer) -> the runtime's HostBuffer."""
        with device_errors(f"allocating {nbytes} bytes of pinned host memory"):
            return self.context.alloc_host(nbytes)

    def stream(self):
        with device_errors(f"creating a {self.device_type} stream"):
            return self.context.create_stream()

    def copy(self, dst, src, nbytes, kind, stream=None):
        """One copy between int addresses; on ``stream``: queued, done once
        ``synchronize(stream)`` returned."""
        with device_errors("device copy"):
            self.context.memcpy(dst, src, nbytes, kind, stream=stream)

    def synchronize(self, stream):
        with device_errors("device stream synchronize"):
            stream.synchronize()

    def check_device_pointer(self, addr, nbytes):
        """LLM_PARAM_INVALID when the runtime knows the first or the last
        byte of [addr, addr + nbytes) is no device memory (CUDA's
        cudaPointerGetAttributes; ACL has no such query, so an NPU address
        is checked by the runtime at its first copy). The CUDA runtime does
        not tell an allocation's size (the driver's cuMemGetAddressRange
        does, in a library we do not load), so a range over two adjacent
        allocations passes."""
        if self.device_type != "cuda":
            return
        for at in (addr, addr + nbytes - 1):
            with device_errors(f"address {at:#x}"):
                kind = _module("cuda").pointer_attributes(at).type
            if kind not in ("device", "managed"):
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"[{addr:#x}, +{nbytes}) is not CUDA device memory "
                                   f"(cudaPointerGetAttributes says {kind} at {at:#x})")

    def close(self):
        with self._lock:
            ctx, self._ctx = self._ctx, None
        if ctx is not None:
            with device_errors(f"closing {self.device_type} device {self.device_id}"):
                ctx.close()
