from cpython.buffer cimport Py_buffer
from pyverbs_kv.base cimport PyverbsObject
from pyverbs_kv.libibverbs cimport ibv_mr
from pyverbs_kv.pd cimport PD

cdef class MR(PyverbsObject):
    cdef ibv_mr *mr
    cdef readonly PD pd
    cdef Py_buffer view
    cdef bint has_view
    cdef object owner
    cdef check_open(self)
