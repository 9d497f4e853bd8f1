from pyverbs_kv.base cimport PyverbsObject
from pyverbs_kv.libibverbs cimport ibv_context

cdef class Context(PyverbsObject):
    cdef ibv_context *ctx
    cdef readonly str name
    # Set for a context librdmacm opened: we use it but never close it.
    cdef bint borrowed
    cdef object owner
    cdef check_open(self)
