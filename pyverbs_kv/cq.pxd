from pyverbs_kv.base cimport PyverbsObject
from pyverbs_kv.device cimport Context
from pyverbs_kv.libibverbs cimport ibv_comp_channel, ibv_cq

cdef class CompChannel(PyverbsObject):
    cdef ibv_comp_channel *channel
    cdef readonly Context ctx
    cdef check_open(self)

cdef class CQ(PyverbsObject):
    cdef ibv_cq *cq
    cdef readonly Context ctx
    cdef readonly CompChannel channel
    cdef readonly int cqe
    cdef int send_users
    cdef check_open(self)
