from pyverbs_kv.base cimport PyverbsObject
from pyverbs_kv.device cimport Context
from pyverbs_kv.librdmacm cimport rdma_event_channel, rdma_cm_id, rdma_cm_event, rdma_conn_param
from pyverbs_kv.qp cimport QP

cdef class EventChannel(PyverbsObject):
    cdef rdma_event_channel *channel
    cdef object pending
    cdef check_open(self)
    cdef _take(self, rdma_cm_event *event)

cdef class CMID(PyverbsObject):
    cdef rdma_cm_id *id
    cdef readonly EventChannel channel
    cdef readonly QP qp
    cdef Context verbs_context
    cdef check_open(self)
    cdef fill_conn_param(self, rdma_conn_param *param, bytes private_data)
