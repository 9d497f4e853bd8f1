from pyverbs_kv.base cimport PyverbsObject
from pyverbs_kv.device cimport Context
from pyverbs_kv.libibverbs cimport ibv_pd

cdef class PD(PyverbsObject):
    cdef ibv_pd *pd
    cdef readonly Context ctx
    cdef check_open(self)
