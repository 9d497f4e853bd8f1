"""Completion channels and completion queues."""
import numpy as np
cimport numpy as cnp

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from posix.fcntl cimport fcntl, F_GETFL, F_SETFL, O_NONBLOCK

from pyverbs_kv.base import VerbsError, VerbsTimeout
from pyverbs_kv.libibverbs cimport *

cnp.import_array()

cdef extern from "arpa/inet.h" nogil:
    uint32_t ntohl(uint32_t)

from pyverbs_kv.posix_poll cimport pollfd, poll, POLLIN

# One polled completion, as returned by CQ.poll. Field order follows C
# alignment so the numpy dtype and WCRecord share one layout.
ctypedef struct WCRecord:
    uint64_t wr_id
    uint32_t status
    uint32_t opcode
    uint32_t byte_len
    uint32_t vendor_err
    uint32_t imm_data
    uint32_t qp_num
    uint32_t wc_flags

WC_DTYPE = np.dtype([("wr_id", np.uint64), ("status", np.uint32), ("opcode", np.uint32),
                     ("byte_len", np.uint32), ("vendor_err", np.uint32),
                     ("imm_data", np.uint32), ("qp_num", np.uint32),
                     ("wc_flags", np.uint32)], align=True)
assert WC_DTYPE.itemsize == sizeof(WCRecord)


cdef class CompChannel(PyverbsObject):
    """A completion event channel; CQs created on it report events here."""

    def __init__(self, Context ctx not None):
        ctx.check_open()
        self.channel = ibv_create_comp_channel(ctx.ctx)
        if self.channel == NULL:
            raise VerbsError("ibv_create_comp_channel", errno, ctx.name)
        # Non-blocking so that a wait is a poll() with a deadline.
        flags = fcntl(self.channel.fd, F_GETFL)
        fcntl(self.channel.fd, F_SETFL, flags | O_NONBLOCK)
        self.ctx = ctx
        ctx.add_child(self)

    def close(self):
        if self.channel == NULL:
            return
        self.close_children()
        rc = ibv_destroy_comp_channel(self.channel)
        self.channel = NULL
        if rc != 0:
            raise VerbsError("ibv_destroy_comp_channel", rc)

    def __dealloc__(self):
        if self.channel != NULL:
            ibv_destroy_comp_channel(self.channel)
            self.channel = NULL

    cdef check_open(self):
        if self.channel == NULL:
            raise VerbsError("CompChannel", 0, "the completion channel is closed")

    @property
    def fd(self):
        self.check_open()
        return self.channel.fd

    def get_event(self, int timeout_ms):
        """Wait up to ``timeout_ms`` for a completion event and acknowledge it.
        Returns the CQ that had the event; raises VerbsTimeout at the deadline.
        Re-arm the CQ with ``req_notify`` to get the next event."""
        self.check_open()
        cdef pollfd pfd
        cdef ibv_cq *cq = NULL
        cdef void *cq_context = NULL
        cdef int rc, err
        pfd.fd = self.channel.fd
        pfd.events = POLLIN
        while True:
            with nogil:
                rc = poll(&pfd, 1, timeout_ms)
                err = errno
            if rc == 0:
                raise VerbsTimeout("ibv_get_cq_event", f"no completion event within {timeout_ms} ms")
            if rc < 0:
                if err == EINTR:
                    continue
                raise VerbsError("poll(comp_channel)", err)
            with nogil:
                rc = ibv_get_cq_event(self.channel, &cq, &cq_context)
                err = errno
            if rc == 0:
                break
            if err != EAGAIN:
                raise VerbsError("ibv_get_cq_event", err)
        ibv_ack_cq_events(cq, 1)
        return <object>cq_context


cdef class CQ(PyverbsObject):
    """A completion queue of at least ``cqe`` entries."""

    def __init__(self, Context ctx not None, int cqe, CompChannel channel=None,
                 int comp_vector=0):
        ctx.check_open()
        cdef ibv_comp_channel *c_channel = NULL
        if channel is not None:
            channel.check_open()
            c_channel = channel.channel
        with nogil:
            self.cq = ibv_create_cq(ctx.ctx, cqe, <void *>self, c_channel, comp_vector)
        if self.cq == NULL:
            raise VerbsError("ibv_create_cq", errno, f"cqe={cqe} on {ctx.name}")
        self.cqe = self.cq.cqe
        self.ctx = ctx
        self.channel = channel
        ctx.add_child(self)
        if channel is not None:
            channel.add_child(self)

    def close(self):
        if self.cq == NULL:
            return
        self.close_children()
        rc = ibv_destroy_cq(self.cq)
        self.cq = NULL
        if rc != 0:
            raise VerbsError("ibv_destroy_cq", rc)

    def __dealloc__(self):
        if self.cq != NULL:
            ibv_destroy_cq(self.cq)
            self.cq = NULL

    cdef check_open(self):
        if self.cq == NULL:
            raise VerbsError("CQ", 0, "the completion queue is closed")

    def poll(self, int num_entries=16):
        """Poll up to ``num_entries`` completions; returns a numpy array of
        WC_DTYPE records (possibly empty), imm_data in host byte order."""
        self.check_open()
        if num_entries <= 0:
            raise ValueError("num_entries must be positive")
        cdef ibv_wc *wcs = <ibv_wc *>malloc(num_entries * sizeof(ibv_wc))
        if wcs == NULL:
            raise MemoryError()
        cdef int n, i
        cdef cnp.ndarray out
        cdef WCRecord *rec
        try:
            with nogil:
                n = ibv_poll_cq(self.cq, num_entries, wcs)
            if n < 0:
                raise VerbsError("ibv_poll_cq", -n if n != -1 else errno)
            out = np.empty(n, dtype=WC_DTYPE)
            rec = <WCRecord *>cnp.PyArray_DATA(out)
            with nogil:
                for i in range(n):
                    rec[i].wr_id = wcs[i].wr_id
                    rec[i].status = wcs[i].status
                    rec[i].opcode = wcs[i].opcode
                    rec[i].byte_len = wcs[i].byte_len
                    rec[i].vendor_err = wcs[i].vendor_err
                    rec[i].imm_data = ntohl(wcs[i].imm_data)
                    rec[i].qp_num = wcs[i].qp_num
                    rec[i].wc_flags = wcs[i].wc_flags
            return out
        finally:
            free(wcs)

    def req_notify(self, bint solicited_only=False):
        """Arm the CQ so the next completion raises an event on its channel."""
        self.check_open()
        rc = ibv_req_notify_cq(self.cq, solicited_only)
        if rc != 0:
            raise VerbsError("ibv_req_notify_cq", rc)

    def wait(self, int timeout_ms, int num_entries=16):
        """Block until at least one completion is available or the deadline;
        returns what poll() returns. Needs a completion channel."""
        if self.channel is None:
            raise VerbsError("CQ.wait", 0, "this CQ was created without a completion channel")
        wcs = self.poll(num_entries)
        if len(wcs):
            return wcs
        self.req_notify()
        # A completion may have landed between the poll and the arming.
        wcs = self.poll(num_entries)
        if len(wcs):
            return wcs
        self.channel.get_event(timeout_ms)
        return self.poll(num_entries)
