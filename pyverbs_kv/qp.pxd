from libc.stdint cimport uint8_t, uint32_t, uint64_t
from pyverbs_kv.base cimport PyverbsObject
from pyverbs_kv.cq cimport CQ
from pyverbs_kv.libibverbs cimport ibv_qp, ibv_wc
from pyverbs_kv.librdmacm cimport rdma_cm_id
from pyverbs_kv.pd cimport PD

cdef class QPCap:
    cdef public uint32_t max_send_wr, max_recv_wr, max_send_sge, max_recv_sge, max_inline_data

cdef class QP(PyverbsObject):
    cdef ibv_qp *qp
    cdef rdma_cm_id *cm_id
    cdef readonly PD pd
    cdef readonly CQ send_cq
    cdef readonly CQ recv_cq
    cdef readonly QPCap cap
    cdef readonly int qp_type
    cdef uint8_t port_num
    cdef uint32_t max_msg_sz
    # Send-queue tracking for the batch path: every batch WR carries its
    # ordinal; completions retire ordinals in order.
    cdef uint64_t next_ordinal
    cdef uint64_t retired
    cdef bint failed
    cdef uint64_t error_ordinal
    cdef ibv_wc error_wc
    cdef bint foreign_completion
    cdef check_open(self)
    cdef setup(self, PD pd, CQ send_cq, CQ recv_cq, QPCap cap, int qp_type)
    cdef int poll_send(self) noexcept nogil
    cdef raise_failure(self, str call)
