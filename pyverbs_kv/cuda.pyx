"""The CUDA runtime: device selection, device and pinned host memory, copies
(synchronous and on streams), streams, and telling device pointers from host
ones (``pointer_attributes``, e.g. for a torch CUDA tensor's ``data_ptr()``).

``libcudart`` is opened with dlopen at first use rather than bound through
cuda-python: no build-time or install-time dependency (the package builds and
imports where CUDA is missing), whatever libcudart the process already uses
(torch's bundled copy included) is shared instead of a second one, and a test
double of the library is loaded through exactly the path a real process takes.
Where it is found: ``KVCACHE_CUDA_LIB`` (a path; nothing else is tried when it
is set), else ``libcudart.so.13``, ``.so.12`` and ``.so`` on the loader's path,
else torch's bundled copy (``site-packages/nvidia/cuda_runtime/lib``). Every
symbol is resolved up front; a missing library or symbol turns the feature off
with one message (``available()`` says why, any use raises ``CudaUnavailable``).

A failure raises ``CudaError`` with the cudaError_t code, ``cudaGetErrorName``,
``cudaGetErrorString`` and the failing call. The GIL is released around every
runtime call."""
import collections
import glob
import os
import sys
import threading
import weakref

from libc.stdint cimport uintptr_t
from libc.string cimport memset
from posix.dlfcn cimport dlopen, dlclose, RTLD_LAZY

cdef extern from "<dlfcn.h>" nogil:
    int RTLD_NOLOAD
from pyverbs_kv.accel cimport (AccelObject, Memory, PinnedMemory, Span, span,
                               open_library)
from pyverbs_kv.accel import AcceleratorError, RuntimeUnavailable

cudaSuccess = 0
cudaErrorInvalidValue = 1

# cudaMemcpyKind
cudaMemcpyHostToHost = 0
cudaMemcpyHostToDevice = 1
cudaMemcpyDeviceToHost = 2
cudaMemcpyDeviceToDevice = 3
cudaMemcpyDefault = 4
MEMCPY_KINDS = {0: "cudaMemcpyHostToHost", 1: "cudaMemcpyHostToDevice",
                2: "cudaMemcpyDeviceToHost", 3: "cudaMemcpyDeviceToDevice",
                4: "cudaMemcpyDefault"}

# cudaMemoryType
MEMORY_TYPES = {0: "unregistered", 1: "host", 2: "device", 3: "managed"}

LIBRARY_NAMES = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]


class CudaError(AcceleratorError):
    """A CUDA runtime call failed: ``call``, ``code`` (cudaError_t),
    ``code_name`` (cudaGetErrorName) and ``detail`` (cudaGetErrorString)."""
    runtime = "CUDA"


class CudaUnavailable(RuntimeUnavailable):
    """libcudart, or a symbol this binding needs, could not be loaded."""


PointerAttributes = collections.namedtuple(
    "PointerAttributes", "type device device_pointer host_pointer")
PointerAttributes.__doc__ = (
    "cudaPointerGetAttributes: ``type`` is 'unregistered' (plain host memory), "
    "'host' (pinned), 'device' or 'managed'; ``device`` the ordinal (-1 for plain "
    "host memory); the two pointers as ints (0 where none).")

SYMBOLS = ["cudaGetDeviceCount", "cudaSetDevice", "cudaGetDevice", "cudaMalloc", "cudaFree",
           "cudaMallocHost", "cudaFreeHost", "cudaMemcpy", "cudaMemcpyAsync", "cudaMemset",
           "cudaStreamCreate", "cudaStreamDestroy", "cudaStreamSynchronize",
           "cudaGetErrorString", "cudaGetErrorName", "cudaGetLastError",
           "cudaPointerGetAttributes"]

cdef void *_addrs[17]
cdef void *_handle = NULL
cdef cudaGetDeviceCount_t c_cudaGetDeviceCount
cdef cudaSetDevice_t c_cudaSetDevice
cdef cudaGetDevice_t c_cudaGetDevice
cdef cudaMalloc_t c_cudaMalloc
cdef cudaFree_t c_cudaFree
cdef cudaMallocHost_t c_cudaMallocHost
cdef cudaFreeHost_t c_cudaFreeHost
cdef cudaMemcpy_t c_cudaMemcpy
cdef cudaMemcpyAsync_t c_cudaMemcpyAsync
cdef cudaMemset_t c_cudaMemset
cdef cudaStreamCreate_t c_cudaStreamCreate
cdef cudaStreamDestroy_t c_cudaStreamDestroy
cdef cudaStreamSynchronize_t c_cudaStreamSynchronize
cdef cudaGetErrorString_t c_cudaGetErrorString
cdef cudaGetErrorName_t c_cudaGetErrorName
cdef cudaGetLastError_t c_cudaGetLastError
cdef cudaPointerGetAttributes_t c_cudaPointerGetAttributes

_load_lock = threading.Lock()
_library_path = None


def candidates():
    """The paths tried, in order, to find libcudart (see the module doc)."""
    explicit = os.environ.get("KVCACHE_CUDA_LIB")
    if explicit:
        return [explicit]
    found = list(LIBRARY_NAMES)
    for entry in sys.path:
        for bundled in sorted(glob.glob(os.path.join(entry or ".", "nvidia", "cuda_runtime",
                                                     "lib", "libcudart.so.*")), reverse=True):
            if bundled not in found:
                found.append(bundled)
    return found


cdef int _load() except -1:
    global _handle, _library_path
    global c_cudaGetDeviceCount, c_cudaSetDevice, c_cudaGetDevice, c_cudaMalloc, c_cudaFree
    global c_cudaMallocHost, c_cudaFreeHost, c_cudaMemcpy, c_cudaMemcpyAsync, c_cudaMemset
    global c_cudaStreamCreate, c_cudaStreamDestroy, c_cudaStreamSynchronize
    global c_cudaGetErrorString, c_cudaGetErrorName, c_cudaGetLastError
    global c_cudaPointerGetAttributes
    if _handle != NULL:
        return 0
    with _load_lock:
        if _handle != NULL:
            return 0
        loaded = []
        handle = open_library("the CUDA runtime (libcudart)", candidates(), SYMBOLS, _addrs,
                              CudaUnavailable, loaded)
        c_cudaGetDeviceCount = <cudaGetDeviceCount_t>_addrs[0]
        c_cudaSetDevice = <cudaSetDevice_t>_addrs[1]
        c_cudaGetDevice = <cudaGetDevice_t>_addrs[2]
        c_cudaMalloc = <cudaMalloc_t>_addrs[3]
        c_cudaFree = <cudaFree_t>_addrs[4]
        c_cudaMallocHost = <cudaMallocHost_t>_addrs[5]
        c_cudaFreeHost = <cudaFreeHost_t>_addrs[6]
        c_cudaMemcpy = <cudaMemcpy_t>_addrs[7]
        c_cudaMemcpyAsync = <cudaMemcpyAsync_t>_addrs[8]
        c_cudaMemset = <cudaMemset_t>_addrs[9]
        c_cudaStreamCreate = <cudaStreamCreate_t>_addrs[10]
        c_cudaStreamDestroy = <cudaStreamDestroy_t>_addrs[11]
        c_cudaStreamSynchronize = <cudaStreamSynchronize_t>_addrs[12]
        c_cudaGetErrorString = <cudaGetErrorString_t>_addrs[13]
        c_cudaGetErrorName = <cudaGetErrorName_t>_addrs[14]
        c_cudaGetLastError = <cudaGetLastError_t>_addrs[15]
        c_cudaPointerGetAttributes = <cudaPointerGetAttributes_t>_addrs[16]
        _library_path = loaded[0]
        _handle = handle
    return 0


def available():
    """``(True, "loaded <path>")`` when libcudart and every symbol this binding
    needs loaded, else ``(False, reason)``. Never raises; loads the library on
    its first call. (A loaded runtime may still find no GPU: see device_count.)"""
    try:
        _load()
    except CudaUnavailable as exc:
        return False, str(exc)
    return True, f"loaded {_library_path}"


def library_path():
    """The libcudart in use, or None before it loaded."""
    return _library_path


def driver_loaded():
    """Whether this process has the CUDA driver library (libcuda.so.1)
    loaded already: whoever made CUDA memory here (torch, cupy, ...) did.
    Loads nothing."""
    cdef void *handle = dlopen(b"libcuda.so.1", RTLD_LAZY | RTLD_NOLOAD)
    if handle == NULL:
        return False
    dlclose(handle)
    return True


cdef int _check(str call, cudaError_t rc, str args="") except -1:
    if rc == 0:
        return 0
    # Reset the runtime's last error so that a later, unrelated call (ours or
    # torch's) does not report this one again.
    c_cudaGetLastError()
    cdef const char *name = c_cudaGetErrorName(rc)
    cdef const char *text = c_cudaGetErrorString(rc)
    detail = text.decode(errors="replace") if text != NULL else ""
    if args:
        detail = f"{detail} [{args}]"
    raise CudaError(call, rc, name.decode(errors="replace") if name != NULL else "", detail)


def device_count():
    """``cudaGetDeviceCount``: GPUs visible to this process. Raises CudaError
    (e.g. cudaErrorNoDevice, cudaErrorInsufficientDriver)."""
    _load()
    cdef int count = 0
    cdef cudaError_t rc
    with nogil:
        rc = c_cudaGetDeviceCount(&count)
    _check("cudaGetDeviceCount", rc)
    return count


def get_device():
    """``cudaGetDevice``: the calling thread's current device."""
    _load()
    cdef int dev = -1
    cdef cudaError_t rc
    with nogil:
        rc = c_cudaGetDevice(&dev)
    _check("cudaGetDevice", rc)
    return dev


def pointer_attributes(uintptr_t ptr):
    """``cudaPointerGetAttributes`` on an int address -> PointerAttributes.
    A torch CUDA tensor's ``data_ptr()`` gives type 'device'; numpy memory
    'unregistered'; ``torch.empty(..., pin_memory=True)`` 'host'."""
    _load()
    cdef cudaPointerAttributes attrs
    memset(&attrs, 0, sizeof(attrs))
    cdef cudaError_t rc
    with nogil:
        rc = c_cudaPointerGetAttributes(&attrs, <const void *>ptr)
    if rc == cudaErrorInvalidValue:
        # Runtimes before CUDA 11 answer this for memory they never saw.
        c_cudaGetLastError()
        return PointerAttributes("unregistered", -1, 0, 0)
    _check("cudaPointerGetAttributes", rc, f"ptr={ptr:#x}")
    kind = MEMORY_TYPES.get(attrs.type, f"unknown ({attrs.type})")
    return PointerAttributes(kind, attrs.device if kind != "unregistered" else -1,
                             <uintptr_t>attrs.devicePointer, <uintptr_t>attrs.hostPointer)


cdef int _kind(int kind) except -1:
    if kind not in MEMCPY_KINDS:
        raise ValueError(f"copy kind {kind} is not a cudaMemcpyKind "
                         f"(0-4: {', '.join(MEMCPY_KINDS.values())})")
    return kind


cdef class Context(AccelObject):
    """One GPU in this process: ``cudaSetDevice(device_id)`` in the calling
    thread, and again before each call that allocates (CUDA's current device is
    per thread and other code, torch, may change it). The device is never reset:
    other users of the runtime in this process keep their state. ``close()``
    closes streams, then memory; idempotent. Raises CudaUnavailable, CudaError."""

    def __init__(self, int device_id=0):
        _load()
        self.device_id = device_id
        self.opened = True
        self.bind()

    cdef check_open(self):
        if not self.opened:
            raise ValueError(f"CUDA Context of device {self.device_id} is closed")

    cdef int bind(self) except -1:
        self.check_open()
        cdef int dev = self.device_id
        cdef cudaError_t rc
        with nogil:
            rc = c_cudaSetDevice(dev)
        _check("cudaSetDevice", rc, f"device={dev}")
        return 0

    @property
    def closed(self):
        return not self.opened

    def make_current(self):
        """``cudaSetDevice`` in the calling thread."""
        self.bind()

    def alloc(self, size_t nbytes):
        """``cudaMalloc``: ``nbytes`` (> 0) of device memory -> DeviceBuffer."""
        self.bind()
        if nbytes == 0:
            raise ValueError("alloc: nbytes must be positive")
        cdef DeviceBuffer buf = DeviceBuffer.__new__(DeviceBuffer)
        cdef void *ptr = NULL
        cdef cudaError_t rc
        with nogil:
            rc = c_cudaMalloc(&ptr, nbytes)
        _check("cudaMalloc", rc, f"size={nbytes}")
        buf.addr, buf.nbytes, buf.on_device, buf.ctx = ptr, nbytes, True, self
        self.add_child(buf)
        return buf

    def alloc_host(self, size_t nbytes):
        """``cudaMallocHost``: ``nbytes`` (> 0) of pinned host memory, the
        staging area for device copies -> HostBuffer (a writable buffer)."""
        self.bind()
        if nbytes == 0:
            raise ValueError("alloc_host: nbytes must be positive")
        cdef HostBuffer buf = HostBuffer.__new__(HostBuffer)
        cdef void *ptr = NULL
        cdef cudaError_t rc
        with nogil:
            rc = c_cudaMallocHost(&ptr, nbytes)
        _check("cudaMallocHost", rc, f"size={nbytes}")
        buf.addr, buf.nbytes, buf.on_device, buf.ctx = ptr, nbytes, False, self
        self.add_child(buf)
        return buf

    def create_stream(self):
        """``cudaStreamCreate`` on this device -> Stream."""
        self.bind()
        cdef Stream s = Stream.__new__(Stream)
        cdef cudaStream_t handle = NULL
        cdef cudaError_t rc
        with nogil:
            rc = c_cudaStreamCreate(&handle)
        _check("cudaStreamCreate", rc)
        s.stream, s.ctx = handle, self
        self.add_child(s)
        return s

    def memcpy(self, dst, src, size_t nbytes, int kind, *, size_t dst_offset=0,
               size_t src_offset=0, Stream stream=None):
        """Copy ``nbytes`` from ``src`` to ``dst`` with a cudaMemcpyKind
        (cudaMemcpyHostToHost .. cudaMemcpyDefault, 0-4): ``cudaMemcpy``, or
        ``cudaMemcpyAsync`` on ``stream`` (done after ``stream.synchronize()``).
        ``dst``/``src``: a DeviceBuffer or HostBuffer (range-checked with the
        offsets), an int address (a torch tensor's ``data_ptr()``; checked by
        the runtime only) or, for a synchronous copy, a contiguous Python buffer
        (numpy array, bytearray; bytes as a source). The runtime checks ``kind``
        against the pointers. Raises ValueError/TypeError, CudaError."""
        self.check_open()
        _kind(kind)
        cdef bint is_async = stream is not None
        if is_async:
            stream.check_open()
        cdef Span d = span(dst, dst_offset, nbytes, True, is_async, "memcpy dst")
        cdef Span s = span(src, src_offset, nbytes, False, is_async, "memcpy src")
        cdef cudaError_t rc
        cdef cudaStream_t c_stream = stream.stream if is_async else NULL
        try:
            if is_async:
                with nogil:
                    rc = c_cudaMemcpyAsync(d.addr, s.addr, nbytes, kind, c_stream)
            else:
                with nogil:
                    rc = c_cudaMemcpy(d.addr, s.addr, nbytes, kind)
        finally:
            d.release()
            s.release()
        _check("cudaMemcpyAsync" if is_async else "cudaMemcpy", rc,
               f"dst={<uintptr_t>d.addr:#x} src={<uintptr_t>s.addr:#x} count={nbytes} "
               f"kind={MEMCPY_KINDS[kind]}")

    def memset(self, dst, int value, size_t nbytes, *, size_t offset=0):
        """``cudaMemset``: set ``nbytes`` of device memory (a DeviceBuffer from
        ``offset``, or an int address) to the byte ``value``. Raises CudaError."""
        self.bind()
        cdef Span d = span(dst, offset, nbytes, True, True, "memset dst")
        cdef cudaError_t rc
        with nogil:
            rc = c_cudaMemset(d.addr, value, nbytes)
        d.release()
        _check("cudaMemset", rc, f"devPtr={<uintptr_t>d.addr:#x} value={value} count={nbytes}")

    def synchronize(self):
        """``cudaStreamSynchronize`` on every open stream of this context."""
        for child in list(self._children.values()):
            if isinstance(child, Stream) and not child.closed:
                child.synchronize()

    def close(self):
        if not self.opened:
            return
        self.close_children()
        self.opened = False

    def __repr__(self):
        return f"<cuda.Context device={self.device_id}{' closed' if not self.opened else ''}>"


cdef int _free(void *ptr, bint host) except -1:
    cdef cudaError_t rc
    with nogil:
        rc = c_cudaFreeHost(ptr) if host else c_cudaFree(ptr)
    _check("cudaFreeHost" if host else "cudaFree", rc, f"ptr={<uintptr_t>ptr:#x}")
    return 0


cdef class DeviceBuffer(Memory):
    """Device memory from ``Context.alloc``: ``ptr``, ``nbytes``. ``close()``
    waits for the context's streams (an async copy may still use it), then
    ``cudaFree``; idempotent."""

    def close(self):
        if self.addr == NULL:
            return
        try:
            self.ctx.synchronize()
        finally:
            ptr, self.addr = <uintptr_t>self.addr, NULL
            _free(<void *><uintptr_t>ptr, False)

    def __dealloc__(self):
        if self.addr != NULL:
            c_cudaFree(self.addr)


cdef class HostBuffer(PinnedMemory):
    """Pinned host memory from ``Context.alloc_host``: ``ptr``, ``nbytes``, and
    the buffer protocol (``numpy.frombuffer(buf, numpy.uint8)``, ``memoryview``).
    ``close()`` refuses (BufferError) while views are alive, waits for the
    context's streams, then ``cudaFreeHost``; idempotent."""

    def close(self):
        if self.addr == NULL:
            return
        self.check_no_views()
        try:
            self.ctx.synchronize()
        finally:
            ptr, self.addr = <uintptr_t>self.addr, NULL
            _free(<void *><uintptr_t>ptr, True)

    def __dealloc__(self):
        if self.addr != NULL:
            c_cudaFreeHost(self.addr)


cdef class Stream(AccelObject):
    """A CUDA stream from ``Context.create_stream``; async copies on it are
    done once ``synchronize()`` returns. ``close()`` synchronises, then
    ``cudaStreamDestroy``; idempotent."""
    close_rank = 0

    cdef check_open(self):
        if self.stream == NULL:
            raise ValueError("CUDA Stream is closed")

    @property
    def closed(self):
        return self.stream == NULL

    @property
    def handle(self):
        return <uintptr_t>self.stream

    def synchronize(self):
        """``cudaStreamSynchronize``. Raises CudaError (e.g. a failed copy)."""
        self.check_open()
        cdef cudaStream_t s = self.stream
        cdef cudaError_t rc
        with nogil:
            rc = c_cudaStreamSynchronize(s)
        _check("cudaStreamSynchronize", rc, f"stream={<uintptr_t>s:#x}")

    def close(self):
        if self.stream == NULL:
            return
        cdef cudaStream_t s = self.stream
        cdef cudaError_t rc_sync, rc
        with nogil:
            rc_sync = c_cudaStreamSynchronize(s)
            rc = c_cudaStreamDestroy(s)
        self.stream = NULL
        _check("cudaStreamSynchronize", rc_sync, f"stream={<uintptr_t>s:#x}")
        _check("cudaStreamDestroy", rc, f"stream={<uintptr_t>s:#x}")

    def __dealloc__(self):
        if self.stream != NULL:
            c_cudaStreamSynchronize(self.stream)
            c_cudaStreamDestroy(self.stream)
