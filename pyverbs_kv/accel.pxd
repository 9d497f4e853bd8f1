from cpython.buffer cimport Py_buffer

cdef class AccelObject:
    cdef object __weakref__
    cdef object _children
    cdef int _child_seq
    cdef add_child(self, child)
    cdef close_children(self)

cdef class Memory(AccelObject):
    cdef void *addr
    cdef readonly size_t nbytes
    cdef readonly bint on_device
    cdef check_open(self)

cdef class PinnedMemory(Memory):
    cdef int exports
    cdef check_no_views(self)

cdef class Span:
    cdef void *addr
    cdef size_t avail
    cdef Py_buffer view
    cdef bint has_view
    cdef object owner
    cdef release(self)

cdef Span span(object mem, size_t offset, size_t nbytes, bint writable, bint async_ok, str what)
cdef void *open_library(str runtime, list candidates, list symbols, void **out,
                        object unavailable, list loaded) except NULL
