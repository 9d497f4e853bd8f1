"""What the accelerator runtime bindings (``pyverbs_kv.acl``, ``pyverbs_kv.cuda``)
share: loading a runtime library with dlopen, the error types, the close-ordering
base class and resolving the memory a copy reads or writes.

Kept apart from ``pyverbs_kv.base`` because that module links libibverbs, and an
accelerator binding must load on a machine without rdma-core."""
import weakref

from cpython.buffer cimport (PyObject_GetBuffer, PyBuffer_Release, PyBUF_WRITABLE,
                             PyBUF_ANY_CONTIGUOUS, PyBUF_SIMPLE)
from libc.stdint cimport uintptr_t
from posix.dlfcn cimport dlopen, dlsym, dlerror, dlclose, RTLD_NOW, RTLD_LOCAL

from pyverbs_kv.byteview cimport fill_byte_view

cdef extern from "<dlfcn.h>" nogil:
    int RTLD_NOLOAD


class RuntimeUnavailable(ImportError):
    """The runtime library, or one of the symbols the binding needs, could not be
    loaded. The message names what is missing and every place that was tried."""


class AcceleratorError(Exception):
    """A runtime call failed. ``call`` names it (e.g. ``aclrtMemcpy``), ``code``
    is the runtime's error code (0 for a failure found before calling it),
    ``code_name`` its symbolic name where known and ``detail`` the runtime's own
    text (aclGetRecentErrMsg, cudaGetErrorString) plus the arguments."""

    runtime = "accelerator"

    def __init__(self, call, code=0, code_name="", detail=""):
        self.call = call
        self.code = code
        self.code_name = code_name
        self.detail = detail
        msg = f"{call} failed"
        if code:
            msg += f": {self.runtime} error {code}"
            if code_name:
                msg += f" ({code_name})"
        if detail:
            msg += f": {detail}"
        super().__init__(msg)


cdef class AccelObject:
    """Owns a runtime resource. Parents keep weak references to the objects made
    from them and close those first (streams, which may still be copying, before
    buffers); ``close()`` is idempotent."""

    def __cinit__(self, *args, **kwargs):
        self._children = weakref.WeakValueDictionary()
        self._child_seq = 0

    cdef add_child(self, child):
        self._child_seq += 1
        self._children[self._child_seq] = child

    cdef close_children(self):
        live = [(getattr(c, "close_rank", 1), -k, c) for k, c in list(self._children.items())]
        live.sort(key=lambda item: item[:2])
        for _, _, child in live:
            child.close()
        self._children.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        raise NotImplementedError


cdef class Memory(AccelObject):
    """Memory a runtime allocated: ``ptr`` (int address, 0 once closed),
    ``nbytes`` and ``on_device`` (False for pinned host memory)."""

    @property
    def ptr(self):
        return <uintptr_t>self.addr

    @property
    def closed(self):
        return self.addr == NULL

    cdef check_open(self):
        if self.addr == NULL:
            raise ValueError(f"{type(self).__name__} is closed")

    def __len__(self):
        return self.nbytes

    def __repr__(self):
        return f"<{type(self).__name__} ptr={self.ptr:#x} nbytes={self.nbytes}>"


cdef class PinnedMemory(Memory):
    """Pinned host memory: Memory with the buffer protocol
    (``numpy.frombuffer(buf, numpy.uint8)``, ``memoryview``)."""

    def __getbuffer__(self, Py_buffer *view, int flags):
        self.check_open()
        self.exports += 1
        fill_byte_view(view, self, self.addr, self.nbytes, flags)

    def __releasebuffer__(self, Py_buffer *view):
        self.exports -= 1

    cdef check_no_views(self):
        if self.exports:
            # As mmap does: freeing under a live view would let it write
            # into memory that is no longer ours.
            raise BufferError(f"{type(self).__name__} has {self.exports} live buffer views; "
                              "release them (del the arrays/memoryviews) before closing")


cdef class Span:
    """One side of a copy: an address, the bytes available from it, and the
    buffer export that keeps a Python object's memory in place meanwhile."""

    cdef release(self):
        if self.has_view:
            PyBuffer_Release(&self.view)
            self.has_view = False
        self.owner = None

    def __dealloc__(self):
        if self.has_view:
            PyBuffer_Release(&self.view)


cdef Span span(object mem, size_t offset, size_t nbytes, bint writable, bint async_ok,
               str what):
    """``mem`` is a Memory of this runtime, an int address (raw: only the runtime
    checks it) or, for synchronous copies, a contiguous Python buffer (numpy
    array, bytearray, bytes for a source). Ranges are checked for the first and
    the last."""
    cdef Span s = Span()
    cdef Memory m
    if isinstance(mem, Memory):
        m = <Memory>mem
        m.check_open()
        if offset > m.nbytes or nbytes > m.nbytes - offset:
            raise ValueError(f"{what}: {nbytes} bytes at offset {offset} pass the end of "
                             f"a {m.nbytes}-byte {type(m).__name__}")
        s.addr = <char *>m.addr + offset
        s.avail = m.nbytes - offset
        s.owner = m
        return s
    if isinstance(mem, int):
        if mem <= 0:
            raise ValueError(f"{what}: address {mem:#x} is not a valid address")
        s.addr = <void *><uintptr_t>(mem + offset)
        s.avail = nbytes
        return s
    if async_ok:
        raise TypeError(f"{what}: an asynchronous copy needs runtime memory (alloc, "
                        f"alloc_host) or an int address, not {type(mem).__name__}: a "
                        "Python buffer may move or be freed before the copy runs")
    try:
        PyObject_GetBuffer(mem, &s.view,
                           (PyBUF_WRITABLE | PyBUF_ANY_CONTIGUOUS) if writable
                           else (PyBUF_SIMPLE | PyBUF_ANY_CONTIGUOUS))
    except (TypeError, BufferError) as exc:
        raise TypeError(f"{what}: {type(mem).__name__} is not runtime memory, an address "
                        f"or a {'writable ' if writable else ''}contiguous buffer ({exc})")
    s.has_view = True
    if offset > <size_t>s.view.len or nbytes > <size_t>s.view.len - offset:
        size = s.view.len
        s.release()
        raise ValueError(f"{what}: {nbytes} bytes at offset {offset} pass the end of a "
                         f"{size}-byte {type(mem).__name__}")
    s.addr = <char *>s.view.buf + offset
    s.avail = s.view.len - offset
    s.owner = mem
    return s


cdef void *open_library(str runtime, list candidates, list symbols, void **out,
                        object unavailable, list loaded) except NULL:
    """dlopen the first candidate already loaded in the process, else the first
    that loads, and dlsym every name in ``symbols`` into ``out`` (same order);
    the path that loaded is appended to ``loaded``.
    Raises ``unavailable`` (a RuntimeUnavailable) naming the tries, or the
    missing symbols of the library that loaded."""
    cdef void *handle = NULL
    cdef bytes name
    tried = []
    # A copy the process already loaded (torch's libcudart, say) comes first:
    # two copies of one runtime in a process keep two sets of state.
    for path in candidates:
        name = path.encode()
        handle = dlopen(name, RTLD_NOW | RTLD_LOCAL | RTLD_NOLOAD)
        if handle != NULL:
            break
    for path in candidates if handle == NULL else ():
        name = path.encode()
        handle = dlopen(name, RTLD_NOW | RTLD_LOCAL)
        if handle != NULL:
            break
        err = dlerror()
        text = err.decode(errors="replace") if err != NULL else ""
        # dlerror names the file already ("<path>: cannot open shared object file")
        tried.append(text if path in text else f"{path}: {text or 'not loadable'}")
    if handle == NULL:
        raise unavailable(f"{runtime} is not available: no library loaded; tried "
                          + "; ".join(tried))
    missing = []
    for i, sym in enumerate(symbols):
        out[i] = dlsym(handle, sym.encode())
        if out[i] == NULL:
            missing.append(sym)
    if missing:
        dlclose(handle)
        raise unavailable(f"{runtime} is not available: {path} lacks the symbol"
                          f"{'s' if len(missing) > 1 else ''} {', '.join(missing)}")
    loaded.append(path)
    return handle
