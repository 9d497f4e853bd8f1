cdef class PyverbsObject:
    cdef object __weakref__
    cdef object _children
    cdef int _child_seq
    cdef add_child(self, child)
    cdef close_children(self)

cdef raise_errno(str call, int err, str detail=*)
