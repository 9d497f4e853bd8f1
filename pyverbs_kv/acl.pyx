"""AscendCL, the Ascend NPU runtime: device selection, device and pinned host
memory, copies (synchronous and on streams) and streams.

``libascendcl.so`` is opened with dlopen at first use, never linked: the package
builds and imports where CANN is not installed, and a test double of the library
is loaded through exactly the path a real process takes. Where it is found:
``KVCACHE_ACL_LIB`` (a path; nothing else is tried when it is set), else
``$ASCEND_HOME_PATH/lib64``, ``$ASCEND_TOOLKIT_HOME/lib64``, the standard CANN
install locations, else the dynamic loader's search path. Every symbol is
resolved up front; a missing library or symbol turns the feature off with one
message (``available()`` says why, any use raises ``AclUnavailable``).

Signatures, types and codes are ACL's own (acl_base.h, acl_rt.h): ``aclError``
is an int, ``ACL_SUCCESS`` 0. A failure raises ``AclError`` with the code, its
name, the failing call and ``aclGetRecentErrMsg()``'s text. The GIL is released
around every runtime call."""
import atexit
import os
import threading
import weakref

from libc.stdint cimport int32_t, uint32_t, uintptr_t
from pyverbs_kv.accel cimport (AccelObject, Memory, PinnedMemory, Span, span,
                               open_library)
from pyverbs_kv.accel import AcceleratorError, RuntimeUnavailable

ACL_SUCCESS = 0

# aclrtMemMallocPolicy
ACL_MEM_MALLOC_HUGE_FIRST = 0
ACL_MEM_MALLOC_HUGE_ONLY = 1
ACL_MEM_MALLOC_NORMAL_ONLY = 2
ACL_MEM_MALLOC_HUGE_FIRST_P2P = 3
ACL_MEM_MALLOC_HUGE_ONLY_P2P = 4
ACL_MEM_MALLOC_NORMAL_ONLY_P2P = 5

# aclrtMemcpyKind
ACL_MEMCPY_HOST_TO_HOST = 0
ACL_MEMCPY_HOST_TO_DEVICE = 1
ACL_MEMCPY_DEVICE_TO_HOST = 2
ACL_MEMCPY_DEVICE_TO_DEVICE = 3
MEMCPY_KINDS = {0: "ACL_MEMCPY_HOST_TO_HOST", 1: "ACL_MEMCPY_HOST_TO_DEVICE",
                2: "ACL_MEMCPY_DEVICE_TO_HOST", 3: "ACL_MEMCPY_DEVICE_TO_DEVICE"}

# The aclError values this binding meets (acl_base.h; 1xxxxx caller errors,
# 2xxxxx resources, 5xxxxx internal; 107xxx/207xxx/507xxx passed from the runtime).
ERROR_NAMES = {
    100000: "ACL_ERROR_INVALID_PARAM",
    100001: "ACL_ERROR_UNINITIALIZE",
    100002: "ACL_ERROR_REPEAT_INITIALIZE",
    100037: "ACL_ERROR_REPEAT_FINALIZE",
    200000: "ACL_ERROR_BAD_ALLOC",
    200001: "ACL_ERROR_API_NOT_SUPPORT",
    200002: "ACL_ERROR_INVALID_DEVICE",
    200003: "ACL_ERROR_MEMORY_ADDRESS_UNALIGNED",
    200004: "ACL_ERROR_RESOURCE_NOT_MATCH",
    200005: "ACL_ERROR_INVALID_RESOURCE_HANDLE",
    500000: "ACL_ERROR_INTERNAL_ERROR",
    500001: "ACL_ERROR_FAILURE",
    500003: "ACL_ERROR_RT_FAILURE",
    500004: "ACL_ERROR_DRV_FAILURE",
    107000: "ACL_ERROR_RT_PARAM_INVALID",
    107001: "ACL_ERROR_RT_INVALID_DEVICEID",
    107002: "ACL_ERROR_RT_CONTEXT_NULL",
    107003: "ACL_ERROR_RT_STREAM_CONTEXT",
    107008: "ACL_ERROR_RT_ADDR_UNALIGNED",
    107016: "ACL_ERROR_RT_INVALID_MEMORY_TYPE",
    107017: "ACL_ERROR_RT_INVALID_HANDLE",
    107018: "ACL_ERROR_RT_INVALID_MALLOC_TYPE",
    207000: "ACL_ERROR_RT_FEATURE_NOT_SUPPORT",
    207001: "ACL_ERROR_RT_MEMORY_ALLOCATION",
    207002: "ACL_ERROR_RT_MEMORY_FREE",
    207004: "ACL_ERROR_RT_NO_DEVICE",
    207005: "ACL_ERROR_RT_RESOURCE_ALLOC_FAIL",
    207008: "ACL_ERROR_RT_NO_STREAM_RESOURCE",
}
ACL_ERROR_REPEAT_INITIALIZE = 100002

# Where CANN installs the toolkit (root, then per-user installs).
CANN_LIB_DIRS = ["/usr/local/Ascend/ascend-toolkit/latest/lib64",
                 "/usr/local/Ascend/latest/lib64",
                 "/usr/local/Ascend/cann/lib64",
                 os.path.expanduser("~/Ascend/ascend-toolkit/latest/lib64")]
LIBRARY = "libascendcl.so"


class AclError(AcceleratorError):
    """An ACL call failed: ``call``, ``code`` (aclError), ``code_name`` and
    ``detail`` (aclGetRecentErrMsg's text)."""
    runtime = "ACL"


class AclUnavailable(RuntimeUnavailable):
    """libascendcl.so, or a symbol this binding needs, could not be loaded."""


SYMBOLS = ["aclInit", "aclFinalize", "aclrtSetDevice", "aclrtResetDevice", "aclrtGetDevice",
           "aclrtGetDeviceCount", "aclrtMalloc", "aclrtFree", "aclrtMallocHost",
           "aclrtFreeHost", "aclrtMemcpy", "aclrtMemset", "aclrtCreateStream",
           "aclrtDestroyStream", "aclrtSynchronizeStream", "aclrtMemcpyAsync",
           "aclGetRecentErrMsg"]

cdef void *_addrs[17]
cdef void *_handle = NULL
cdef aclInit_t c_aclInit
cdef aclFinalize_t c_aclFinalize
cdef aclrtSetDevice_t c_aclrtSetDevice
cdef aclrtResetDevice_t c_aclrtResetDevice
cdef aclrtGetDevice_t c_aclrtGetDevice
cdef aclrtGetDeviceCount_t c_aclrtGetDeviceCount
cdef aclrtMalloc_t c_aclrtMalloc
cdef aclrtFree_t c_aclrtFree
cdef aclrtMallocHost_t c_aclrtMallocHost
cdef aclrtFreeHost_t c_aclrtFreeHost
cdef aclrtMemcpy_t c_aclrtMemcpy
cdef aclrtMemset_t c_aclrtMemset
cdef aclrtCreateStream_t c_aclrtCreateStream
cdef aclrtDestroyStream_t c_aclrtDestroyStream
cdef aclrtSynchronizeStream_t c_aclrtSynchronizeStream
cdef aclrtMemcpyAsync_t c_aclrtMemcpyAsync
cdef aclGetRecentErrMsg_t c_aclGetRecentErrMsg

_load_lock = threading.Lock()
_library_path = None
_initialized = False
_owns_init = False
_atexit_registered = False
_contexts = weakref.WeakSet()


def candidates():
    """The paths tried, in order, to find libascendcl.so (see the module doc)."""
    explicit = os.environ.get("KVCACHE_ACL_LIB")
    if explicit:
        return [explicit]
    dirs = [os.path.join(os.environ[var], "lib64")
            for var in ("ASCEND_HOME_PATH", "ASCEND_TOOLKIT_HOME") if os.environ.get(var)]
    dirs += CANN_LIB_DIRS
    return [os.path.join(d, LIBRARY) for d in dirs] + [LIBRARY]


cdef int _load() except -1:
    global _handle, _library_path
    global c_aclInit, c_aclFinalize, c_aclrtSetDevice, c_aclrtResetDevice, c_aclrtGetDevice
    global c_aclrtGetDeviceCount, c_aclrtMalloc, c_aclrtFree, c_aclrtMallocHost
    global c_aclrtFreeHost, c_aclrtMemcpy, c_aclrtMemset, c_aclrtCreateStream
    global c_aclrtDestroyStream, c_aclrtSynchronizeStream, c_aclrtMemcpyAsync
    global c_aclGetRecentErrMsg
    if _handle != NULL:
        return 0
    with _load_lock:
        if _handle != NULL:
            return 0
        loaded = []
        handle = open_library("AscendCL (libascendcl.so)", candidates(), SYMBOLS, _addrs,
                              AclUnavailable, loaded)
        c_aclInit = <aclInit_t>_addrs[0]
        c_aclFinalize = <aclFinalize_t>_addrs[1]
        c_aclrtSetDevice = <aclrtSetDevice_t>_addrs[2]
        c_aclrtResetDevice = <aclrtResetDevice_t>_addrs[3]
        c_aclrtGetDevice = <aclrtGetDevice_t>_addrs[4]
        c_aclrtGetDeviceCount = <aclrtGetDeviceCount_t>_addrs[5]
        c_aclrtMalloc = <aclrtMalloc_t>_addrs[6]
        c_aclrtFree = <aclrtFree_t>_addrs[7]
        c_aclrtMallocHost = <aclrtMallocHost_t>_addrs[8]
        c_aclrtFreeHost = <aclrtFreeHost_t>_addrs[9]
        c_aclrtMemcpy = <aclrtMemcpy_t>_addrs[10]
        c_aclrtMemset = <aclrtMemset_t>_addrs[11]
        c_aclrtCreateStream = <aclrtCreateStream_t>_addrs[12]
        c_aclrtDestroyStream = <aclrtDestroyStream_t>_addrs[13]
        c_aclrtSynchronizeStream = <aclrtSynchronizeStream_t>_addrs[14]
        c_aclrtMemcpyAsync = <aclrtMemcpyAsync_t>_addrs[15]
        c_aclGetRecentErrMsg = <aclGetRecentErrMsg_t>_addrs[16]
        _library_path = loaded[0]
        _handle = handle
    return 0


def available():
    """``(True, "loaded <path>")`` when libascendcl.so and every symbol this
    binding needs loaded, else ``(False, reason)``. Never raises; loads the
    library on its first call."""
    try:
        _load()
    except AclUnavailable as exc:
        return False, str(exc)
    return True, f"loaded {_library_path}"


def library_path():
    """The libascendcl.so in use, or None before it loaded."""
    return _library_path


cdef int _check(str call, aclError rc, str args="") except -1:
    if rc == 0:
        return 0
    cdef const char *msg = c_aclGetRecentErrMsg()
    text = msg.decode(errors="replace") if msg != NULL else "(no message from aclGetRecentErrMsg)"
    if args:
        text = f"{text} [{args}]"
    raise AclError(call, rc, ERROR_NAMES.get(rc, ""), text)


def init(config_path=None):
    """``aclInit`` once per process (``config_path``: an acl.json, or None).
    Idempotent; where another component (torch_npu, a framework) already
    initialised ACL in this process, its ACL_ERROR_REPEAT_INITIALIZE is taken as
    success and ``finalize()`` leaves the finalising to that owner.
    Raises AclUnavailable, AclError."""
    global _initialized, _owns_init, _atexit_registered
    _load()
    if _initialized:
        return
    cdef bytes path = os.fsencode(config_path) if config_path is not None else None
    cdef const char *c_path = NULL
    if path is not None:
        c_path = path
    cdef aclError rc
    with nogil:
        rc = c_aclInit(c_path)
    if rc == ACL_ERROR_REPEAT_INITIALIZE:
        _initialized, _owns_init = True, False
        return
    _check("aclInit", rc, f"configPath={config_path!r}")
    _initialized, _owns_init = True, True
    if not _atexit_registered:
        atexit.register(_finalize_at_exit)
        _atexit_registered = True


def finalize():
    """Close every open Context (its streams and memory first), then
    ``aclFinalize`` if this module initialised ACL. Idempotent; ``init()`` may
    follow again (ACL allows aclInit -> aclFinalize -> aclInit). Raises AclError."""
    global _initialized, _owns_init
    for ctx in list(_contexts):
        ctx.close()
    if not _initialized:
        return
    owned = _owns_init
    _initialized, _owns_init = False, False
    cdef aclError rc
    if owned:
        with nogil:
            rc = c_aclFinalize()
        _check("aclFinalize", rc)


def _finalize_at_exit():
    try:
        finalize()
    except AclError:
        pass    # the process is ending; the runtime releases the rest


def initialized():
    """True between ``init()`` (or the first Context) and ``finalize()``."""
    return _initialized


def device_count():
    """``aclrtGetDeviceCount``: the number of NPUs. ACL must be initialised
    (``init()`` or a Context); otherwise the runtime's ACL_ERROR_UNINITIALIZE
    surfaces as AclError."""
    _load()
    cdef uint32_t count = 0
    cdef aclError rc
    with nogil:
        rc = c_aclrtGetDeviceCount(&count)
    _check("aclrtGetDeviceCount", rc)
    return count


def get_device():
    """``aclrtGetDevice``: the device the calling thread uses (AclError with
    ACL_ERROR_RT_CONTEXT_NULL where the thread set none)."""
    _load()
    cdef int32_t dev = -1
    cdef aclError rc
    with nogil:
        rc = c_aclrtGetDevice(&dev)
    _check("aclrtGetDevice", rc)
    return dev


cdef int _kind(int kind) except -1:
    if kind not in MEMCPY_KINDS:
        raise ValueError(f"copy kind {kind} is not an aclrtMemcpyKind "
                         f"(0-3: {', '.join(MEMCPY_KINDS.values())})")
    return kind


cdef class Context(AccelObject):
    """One NPU in this process: ``aclInit`` (once per process) and
    ``aclrtSetDevice(device_id)``. ACL binds a device to a thread: a thread other
    than the opening one is bound on its first use of this context (every method
    below calls ``make_current()``). ``close()`` closes streams, then memory,
    then resets the device once per bound thread; idempotent.
    Raises AclUnavailable, AclError."""

    def __init__(self, int device_id=0, config_path=None):
        init(config_path)
        cdef aclError rc
        with nogil:
            rc = c_aclrtSetDevice(device_id)
        _check("aclrtSetDevice", rc, f"deviceId={device_id}")
        self.device_id = device_id
        self.opened = True
        self._threads = {threading.get_ident()}
        _contexts.add(self)

    cdef check_open(self):
        if not self.opened:
            raise ValueError(f"ACL Context of device {self.device_id} is closed")

    @property
    def closed(self):
        return not self.opened

    def make_current(self):
        """``aclrtSetDevice`` in the calling thread, once per thread."""
        self.check_open()
        ident = threading.get_ident()
        if ident in self._threads:
            return
        cdef aclError rc
        cdef int32_t dev = self.device_id
        with nogil:
            rc = c_aclrtSetDevice(dev)
        _check("aclrtSetDevice", rc, f"deviceId={dev}")
        self._threads.add(ident)

    def alloc(self, size_t nbytes, int policy=ACL_MEM_MALLOC_HUGE_FIRST):
        """``aclrtMalloc``: ``nbytes`` (> 0) of device memory with an
        aclrtMemMallocPolicy (default ACL_MEM_MALLOC_HUGE_FIRST) -> DeviceBuffer."""
        self.make_current()
        if nbytes == 0:
            raise ValueError("alloc: nbytes must be positive")
        cdef DeviceBuffer buf = DeviceBuffer.__new__(DeviceBuffer)
        cdef void *ptr = NULL
        cdef aclError rc
        with nogil:
            rc = c_aclrtMalloc(&ptr, nbytes, policy)
        _check("aclrtMalloc", rc, f"size={nbytes} policy={policy}")
        buf.addr, buf.nbytes, buf.on_device, buf.ctx = ptr, nbytes, True, self
        self.add_child(buf)
        return buf

    def alloc_host(self, size_t nbytes):
        """``aclrtMallocHost``: ``nbytes`` (> 0) of pinned host memory, the
        staging area for device copies -> HostBuffer (a writable buffer)."""
        self.make_current()
        if nbytes == 0:
            raise ValueError("alloc_host: nbytes must be positive")
        cdef HostBuffer buf = HostBuffer.__new__(HostBuffer)
        cdef void *ptr = NULL
        cdef aclError rc
        with nogil:
            rc = c_aclrtMallocHost(&ptr, nbytes)
        _check("aclrtMallocHost", rc, f"size={nbytes}")
        buf.addr, buf.nbytes, buf.on_device, buf.ctx = ptr, nbytes, False, self
        self.add_child(buf)
        return buf

    def create_stream(self):
        """``aclrtCreateStream`` -> Stream."""
        self.make_current()
        cdef Stream s = Stream.__new__(Stream)
        cdef aclrtStream handle = NULL
        cdef aclError rc
        with nogil:
            rc = c_aclrtCreateStream(&handle)
        _check("aclrtCreateStream", rc)
        s.stream, s.ctx = handle, self
        self.add_child(s)
        return s

    def memcpy(self, dst, src, size_t nbytes, int kind, *, size_t dst_offset=0,
               size_t src_offset=0, Stream stream=None):
        """Copy ``nbytes`` from ``src`` to ``dst`` with an aclrtMemcpyKind
        (ACL_MEMCPY_HOST_TO_HOST .. DEVICE_TO_DEVICE, 0-3): ``aclrtMemcpy``, or
        ``aclrtMemcpyAsync`` on ``stream`` (done after ``stream.synchronize()``).
        ``dst``/``src``: a DeviceBuffer or HostBuffer (range-checked with the
        offsets), an int address (checked by the runtime only) or, for a
        synchronous copy, a contiguous Python buffer (numpy array, bytearray;
        bytes as a source). destMax is the bytes from ``dst_offset`` to the end
        of ``dst``. The runtime checks ``kind`` against the pointers.
        Raises ValueError/TypeError (bad ranges, objects), AclError."""
        self.make_current()
        _kind(kind)
        cdef bint is_async = stream is not None
        if is_async:
            stream.check_open()
        cdef Span d = span(dst, dst_offset, nbytes, True, is_async, "memcpy dst")
        cdef Span s = span(src, src_offset, nbytes, False, is_async, "memcpy src")
        cdef aclError rc
        cdef aclrtStream c_stream = stream.stream if is_async else NULL
        try:
            if is_async:
                with nogil:
                    rc = c_aclrtMemcpyAsync(d.addr, d.avail, s.addr, nbytes, kind, c_stream)
            else:
                with nogil:
                    rc = c_aclrtMemcpy(d.addr, d.avail, s.addr, nbytes, kind)
        finally:
            d.release()
            s.release()
        _check("aclrtMemcpyAsync" if is_async else "aclrtMemcpy", rc,
               f"dst={<uintptr_t>d.addr:#x} destMax={d.avail} src={<uintptr_t>s.addr:#x} "
               f"count={nbytes} kind={MEMCPY_KINDS[kind]}")

    def memset(self, dst, int value, size_t nbytes, *, size_t offset=0):
        """``aclrtMemset``: set ``nbytes`` of device memory (a DeviceBuffer from
        ``offset``, or an int address) to the byte ``value``. Raises AclError."""
        self.make_current()
        cdef Span d = span(dst, offset, nbytes, True, True, "memset dst")
        cdef aclError rc
        with nogil:
            rc = c_aclrtMemset(d.addr, d.avail, value, nbytes)
        d.release()
        _check("aclrtMemset", rc, f"devPtr={<uintptr_t>d.addr:#x} maxCount={d.avail} "
               f"value={value} count={nbytes}")

    def synchronize(self):
        """``aclrtSynchronizeStream`` on every open stream of this context."""
        for child in list(self._children.values()):
            if isinstance(child, Stream) and not child.closed:
                child.synchronize()

    def close(self):
        if not self.opened:
            return
        self.close_children()
        self.opened = False
        _contexts.discard(self)
        cdef aclError rc = 0, first = 0
        cdef int32_t dev = self.device_id
        for _ in range(len(self._threads)):
            with nogil:
                rc = c_aclrtResetDevice(dev)
            if rc != 0 and first == 0:
                first = rc
        self._threads.clear()
        _check("aclrtResetDevice", first, f"deviceId={dev}")

    def __dealloc__(self):
        if self.opened:
            for _ in range(len(self._threads)):
                c_aclrtResetDevice(self.device_id)

    def __repr__(self):
        return f"<acl.Context device={self.device_id}{' closed' if not self.opened else ''}>"


cdef class DeviceBuffer(Memory):
    """Device memory from ``Context.alloc``: ``ptr``, ``nbytes``. ``close()``
    waits for the context's streams (an async copy may still use it), then
    ``aclrtFree``; idempotent."""

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
            c_aclrtFree(self.addr)


cdef class HostBuffer(PinnedMemory):
    """Pinned host memory from ``Context.alloc_host``: ``ptr``, ``nbytes``, and
    the buffer protocol (``numpy.frombuffer(buf, numpy.uint8)``, ``memoryview``).
    ``close()`` refuses (BufferError) while views are alive, waits for the
    context's streams, then ``aclrtFreeHost``; idempotent."""

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
            c_aclrtFreeHost(self.addr)


cdef int _free(void *ptr, bint host) except -1:
    cdef aclError rc
    with nogil:
        rc = c_aclrtFreeHost(ptr) if host else c_aclrtFree(ptr)
    _check("aclrtFreeHost" if host else "aclrtFree", rc,
           f"{'hostPtr' if host else 'devPtr'}={<uintptr_t>ptr:#x}")
    return 0


cdef class Stream(AccelObject):
    """An ACL stream from ``Context.create_stream``; async copies on it are
    done once ``synchronize()`` returns. ``close()`` synchronises, then
    ``aclrtDestroyStream``; idempotent."""
    close_rank = 0

    cdef check_open(self):
        if self.stream == NULL:
            raise ValueError("ACL Stream is closed")

    @property
    def closed(self):
        return self.stream == NULL

    @property
    def handle(self):
        return <uintptr_t>self.stream

    def synchronize(self):
        """``aclrtSynchronizeStream``: wait until every task on the stream ran.
        Raises AclError (e.g. a copy that failed on the device)."""
        self.check_open()
        self.ctx.make_current()
        cdef aclrtStream s = self.stream
        cdef aclError rc
        with nogil:
            rc = c_aclrtSynchronizeStream(s)
        _check("aclrtSynchronizeStream", rc, f"stream={<uintptr_t>s:#x}")

    def close(self):
        if self.stream == NULL:
            return
        cdef aclrtStream s = self.stream
        cdef aclError rc_sync, rc
        with nogil:
            rc_sync = c_aclrtSynchronizeStream(s)
            rc = c_aclrtDestroyStream(s)
        self.stream = NULL
        _check("aclrtSynchronizeStream", rc_sync, f"stream={<uintptr_t>s:#x}")
        _check("aclrtDestroyStream", rc, f"stream={<uintptr_t>s:#x}")

    def __dealloc__(self):
        if self.stream != NULL:
            c_aclrtSynchronizeStream(self.stream)
            c_aclrtDestroyStream(self.stream)
