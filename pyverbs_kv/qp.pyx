"""Queue pairs: creation, RC bring-up (INIT/RTR/RTS), single work requests,
and the vectorised batch path that posts thousands of RDMA WRITE/READ work
requests from numpy arrays in one GIL-free call."""
import numpy as np

from libc.errno cimport errno
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t, uintptr_t
from libc.string cimport memset, memcpy
from pyverbs_kv.clock cimport now_s

from pyverbs_kv.base import VerbsError, VerbsTimeout, CompletionError
from pyverbs_kv.device import gid_from_str
from pyverbs_kv.libibverbs cimport *
from pyverbs_kv.libibverbs_enums cimport *

cdef extern from "arpa/inet.h" nogil:
    uint32_t htonl(uint32_t)

cdef extern from "sched.h" nogil:
    int sched_yield()

# Batch WRs are tagged so a completion from anything else is recognised.
cdef uint64_t BATCH_TAG = 1ULL << 63
cdef int MAX_CHAIN = 64
DEF CHAIN_CAPACITY = 64



cdef class QPCap:
    """Queue sizes requested at creation; after creation ``QP.cap`` holds what
    the device granted."""

    def __init__(self, max_send_wr=1024, max_recv_wr=64, max_send_sge=1, max_recv_sge=1,
                 max_inline_data=0):
        self.max_send_wr = max_send_wr
        self.max_recv_wr = max_recv_wr
        self.max_send_sge = max_send_sge
        self.max_recv_sge = max_recv_sge
        self.max_inline_data = max_inline_data

    def __repr__(self):
        return (f"QPCap(max_send_wr={self.max_send_wr}, max_recv_wr={self.max_recv_wr}, "
                f"max_send_sge={self.max_send_sge}, max_recv_sge={self.max_recv_sge}, "
                f"max_inline_data={self.max_inline_data})")


cdef class Batch:
    """The work requests of one post_*_batch call. ``wait`` returns when the
    last of them has completed and raises CompletionError on any error."""
    cdef readonly QP qp
    cdef readonly uint64_t first_ordinal, end_ordinal
    cdef readonly Py_ssize_t num_descriptors, num_wrs
    cdef readonly uint64_t total_bytes
    cdef readonly str op
    # Wall time of the posting loop, and the part of it spent inside the
    # provider (ibv_post_send, polling for credits): the rest is our cost.
    cdef readonly double post_seconds, provider_seconds

    def wait(self, int timeout_ms=5000):
        self.qp.wait_batch(self, timeout_ms)

    @property
    def done(self):
        return self.qp.retired >= self.end_ordinal

    def __repr__(self):
        return (f"Batch({self.op}, descriptors={self.num_descriptors}, wrs={self.num_wrs}, "
                f"bytes={self.total_bytes})")


cdef class QP(PyverbsObject):
    """A queue pair (RC by default). Its send CQ must serve this QP only when
    the batch path is used, since batch completions are matched in order."""

    close_rank = 0      # parents close QPs before MRs and CQs

    def __init__(self, PD pd not None, CQ send_cq not None, CQ recv_cq not None,
                 int qp_type=IBV_QPT_RC, QPCap cap=None, bint sq_sig_all=False):
        pd.check_open()
        send_cq.check_open()
        recv_cq.check_open()
        if cap is None:
            cap = QPCap()
        cdef ibv_qp_init_attr attr
        memset(&attr, 0, sizeof(attr))
        attr.send_cq = send_cq.cq
        attr.recv_cq = recv_cq.cq
        attr.qp_type = qp_type
        attr.sq_sig_all = sq_sig_all
        attr.cap.max_send_wr = cap.max_send_wr
        attr.cap.max_recv_wr = cap.max_recv_wr
        attr.cap.max_send_sge = cap.max_send_sge
        attr.cap.max_recv_sge = cap.max_recv_sge
        attr.cap.max_inline_data = cap.max_inline_data
        with nogil:
            self.qp = ibv_create_qp(pd.pd, &attr)
        if self.qp == NULL:
            raise VerbsError("ibv_create_qp", errno,
                             f"{cap!r}; the device allows max_qp_wr="
                             f"{pd.ctx.query_device()['max_qp_wr']}")
        self.setup(pd, send_cq, recv_cq,
                   QPCap(attr.cap.max_send_wr, attr.cap.max_recv_wr, attr.cap.max_send_sge,
                         attr.cap.max_recv_sge, attr.cap.max_inline_data), qp_type)

    cdef setup(self, PD pd, CQ send_cq, CQ recv_cq, QPCap cap, int qp_type):
        self.pd = pd
        self.send_cq = send_cq
        self.recv_cq = recv_cq
        self.cap = cap
        self.qp_type = qp_type
        self.port_num = 1
        self.max_msg_sz = 1 << 30
        send_cq.send_users += 1
        pd.add_child(self)
        send_cq.add_child(self)
        if recv_cq is not send_cq:
            recv_cq.add_child(self)

    def close(self):
        if self.qp == NULL:
            return
        cdef double deadline
        if self.next_ordinal > self.retired:
            # Two-phase destroy: flush what is in flight so no completion of
            # ours is left in a CQ that outlives this QP.
            self._modify_state(IBV_QPS_ERR, "ERR")
            deadline = now_s() + 0.5
            with nogil:
                while self.retired < self.next_ordinal and now_s() < deadline:
                    if self.poll_send() == 0:
                        sched_yield()
        rc = ibv_destroy_qp(self.qp)
        if self.cm_id != NULL:
            self.cm_id.qp = NULL       # what rdma_destroy_qp does
            self.cm_id = NULL
        self.qp = NULL
        self.send_cq.send_users -= 1
        if rc != 0:
            raise VerbsError("ibv_destroy_qp", rc)

    def __dealloc__(self):
        if self.qp != NULL:
            ibv_destroy_qp(self.qp)
            if self.cm_id != NULL:
                self.cm_id.qp = NULL
            self.qp = NULL

    cdef check_open(self):
        if self.qp == NULL:
            raise VerbsError("QP", 0, "the queue pair is closed")

    @property
    def qp_num(self):
        self.check_open()
        return self.qp.qp_num

    # --- state transitions -------------------------------------------------

    def _modify_state(self, int state, str step):
        cdef ibv_qp_attr attr
        memset(&attr, 0, sizeof(attr))
        attr.qp_state = state
        rc = ibv_modify_qp(self.qp, &attr, IBV_QP_STATE)
        if rc != 0:
            raise VerbsError(f"ibv_modify_qp({step})", rc, f"QP {self.qp.qp_num:#x}")

    def to_init(self, int port_num=1, int pkey_index=0, int access=-1):
        """RESET -> INIT on ``port_num``. ``access`` defaults to local write,
        remote write and remote read."""
        self.check_open()
        port = self.pd.ctx.query_port(port_num)
        cdef ibv_qp_attr attr
        memset(&attr, 0, sizeof(attr))
        attr.qp_state = IBV_QPS_INIT
        attr.pkey_index = pkey_index
        attr.port_num = port_num
        attr.qp_access_flags = (IBV_ACCESS_LOCAL_WRITE | IBV_ACCESS_REMOTE_WRITE
                                | IBV_ACCESS_REMOTE_READ) if access < 0 else access
        cdef int rc
        with nogil:
            rc = ibv_modify_qp(self.qp, &attr, IBV_QP_STATE | IBV_QP_PKEY_INDEX
                               | IBV_QP_PORT | IBV_QP_ACCESS_FLAGS)
        if rc != 0:
            raise VerbsError("ibv_modify_qp(INIT)", rc,
                             f"QP {self.qp.qp_num:#x} port {port_num} pkey_index {pkey_index}")
        self.port_num = port_num
        self.max_msg_sz = port["max_msg_sz"]

    def to_rtr(self, uint32_t remote_qpn, uint32_t remote_psn, remote_gid, int sgid_index,
               int path_mtu=IBV_MTU_1024, int max_dest_rd_atomic=16, int min_rnr_timer=12,
               int hop_limit=64, int traffic_class=0, int sl=0, int dlid=0):
        """INIT -> RTR towards the peer's QP. ``remote_gid`` is its GID (text or
        16 bytes), ``sgid_index`` our GID index, ``path_mtu`` the smaller of
        both ends' active MTU."""
        self.check_open()
        gid = gid_from_str(remote_gid)
        cdef ibv_qp_attr attr
        memset(&attr, 0, sizeof(attr))
        attr.qp_state = IBV_QPS_RTR
        attr.path_mtu = path_mtu
        attr.dest_qp_num = remote_qpn
        attr.rq_psn = remote_psn
        attr.max_dest_rd_atomic = max_dest_rd_atomic
        attr.min_rnr_timer = min_rnr_timer
        attr.ah_attr.is_global = 1
        attr.ah_attr.dlid = dlid
        attr.ah_attr.sl = sl
        attr.ah_attr.port_num = self.port_num
        memcpy(attr.ah_attr.grh.dgid.raw, <const char *>gid, 16)
        attr.ah_attr.grh.sgid_index = sgid_index
        attr.ah_attr.grh.hop_limit = hop_limit
        attr.ah_attr.grh.traffic_class = traffic_class
        cdef int rc
        with nogil:
            rc = ibv_modify_qp(self.qp, &attr, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU
                               | IBV_QP_DEST_QPN | IBV_QP_RQ_PSN | IBV_QP_MAX_DEST_RD_ATOMIC
                               | IBV_QP_MIN_RNR_TIMER)
        if rc != 0:
            raise VerbsError("ibv_modify_qp(RTR)", rc,
                             f"QP {self.qp.qp_num:#x} -> remote QPN {remote_qpn:#x} psn "
                             f"{remote_psn:#x} gid {remote_gid!s} sgid_index {sgid_index} "
                             f"path_mtu {path_mtu} port {self.port_num}")

    def query_path(self):
        """The QP's state and the path RTR gave it, as ibv_query_qp reports
        them: a dict of state, path_mtu, sl, traffic_class, hop_limit,
        sgid_index."""
        self.check_open()
        cdef ibv_qp_attr attr
        cdef ibv_qp_init_attr init_attr
        memset(&attr, 0, sizeof(attr))
        memset(&init_attr, 0, sizeof(init_attr))
        rc = ibv_query_qp(self.qp, &attr, IBV_QP_STATE | IBV_QP_AV | IBV_QP_PATH_MTU,
                          &init_attr)
        if rc != 0:
            raise VerbsError("ibv_query_qp", rc, f"QP {self.qp.qp_num:#x}")
        return {"state": attr.qp_state, "path_mtu": attr.path_mtu, "sl": attr.ah_attr.sl,
                "traffic_class": attr.ah_attr.grh.traffic_class,
                "hop_limit": attr.ah_attr.grh.hop_limit,
                "sgid_index": attr.ah_attr.grh.sgid_index}

    def to_rts(self, uint32_t sq_psn, int timeout=14, int retry_cnt=7, int rnr_retry=7,
               int max_rd_atomic=16):
        """RTR -> RTS. ``timeout`` is the ACK timeout exponent (4.096 us * 2**timeout)."""
        self.check_open()
        cdef ibv_qp_attr attr
        memset(&attr, 0, sizeof(attr))
        attr.qp_state = IBV_QPS_RTS
        attr.sq_psn = sq_psn
        attr.timeout = timeout
        attr.retry_cnt = retry_cnt
        attr.rnr_retry = rnr_retry
        attr.max_rd_atomic = max_rd_atomic
        cdef int rc
        with nogil:
            rc = ibv_modify_qp(self.qp, &attr, IBV_QP_STATE | IBV_QP_SQ_PSN | IBV_QP_TIMEOUT
                               | IBV_QP_RETRY_CNT | IBV_QP_RNR_RETRY | IBV_QP_MAX_QP_RD_ATOMIC)
        if rc != 0:
            raise VerbsError("ibv_modify_qp(RTS)", rc,
                             f"QP {self.qp.qp_num:#x} sq_psn {sq_psn:#x} timeout {timeout} "
                             f"retry_cnt {retry_cnt} rnr_retry {rnr_retry}")

    def to_error(self):
        """Move to ERR: outstanding work requests complete with flush errors."""
        self.check_open()
        self._modify_state(IBV_QPS_ERR, "ERR")

    def to_reset(self):
        """Move to RESET (ready for to_init again); clears the batch tracking."""
        self.check_open()
        self._modify_state(IBV_QPS_RESET, "RESET")
        with nogil:
            while self.poll_send() > 0:
                pass
        self.next_ordinal = self.retired = 0
        self.failed = self.foreign_completion = False

    def query(self):
        """The QP's current attributes as a dict."""
        self.check_open()
        cdef ibv_qp_attr attr
        cdef ibv_qp_init_attr init
        rc = ibv_query_qp(self.qp, &attr, IBV_QP_STATE | IBV_QP_PATH_MTU | IBV_QP_DEST_QPN
                          | IBV_QP_RQ_PSN | IBV_QP_SQ_PSN | IBV_QP_PORT | IBV_QP_CAP,
                          &init)
        if rc != 0:
            raise VerbsError("ibv_query_qp", rc)
        return dict(state=attr.qp_state, path_mtu=attr.path_mtu, dest_qp_num=attr.dest_qp_num,
                    rq_psn=attr.rq_psn, sq_psn=attr.sq_psn, port_num=attr.port_num,
                    max_send_wr=attr.cap.max_send_wr, max_recv_wr=attr.cap.max_recv_wr)

    # --- single work requests ---------------------------------------------

    def post_send(self, int opcode, uintptr_t local_addr, uint32_t length, uint32_t lkey,
                  uintptr_t remote_addr=0, uint32_t rkey=0, uint32_t imm_data=0,
                  uint64_t wr_id=0, bint signaled=True, bint inline=False):
        """Post one SEND / SEND_WITH_IMM / RDMA_WRITE / RDMA_WRITE_WITH_IMM /
        RDMA_READ. Its completion is for the caller to poll; do not mix with
        the batch path on one QP while a batch is in flight."""
        self.check_open()
        if wr_id & BATCH_TAG:
            raise ValueError("wr_id bit 63 is reserved for batch work requests")
        cdef ibv_sge sge
        cdef ibv_send_wr wr
        cdef ibv_send_wr *bad = NULL
        memset(&wr, 0, sizeof(wr))
        sge.addr = local_addr
        sge.length = length
        sge.lkey = lkey
        wr.wr_id = wr_id
        wr.sg_list = &sge
        wr.num_sge = 1 if length else 0
        wr.opcode = opcode
        wr.send_flags = (IBV_SEND_SIGNALED if signaled else 0) | (IBV_SEND_INLINE if inline else 0)
        wr.imm_data = htonl(imm_data)
        wr.wr.rdma.remote_addr = remote_addr
        wr.wr.rdma.rkey = rkey
        cdef int rc
        with nogil:
            rc = ibv_post_send(self.qp, &wr, &bad)
        if rc != 0:
            raise VerbsError("ibv_post_send", rc, f"QP {self.qp.qp_num:#x} opcode {opcode}")

    def post_recv(self, uintptr_t addr, uint32_t length, uint32_t lkey, uint64_t wr_id=0):
        """Post one receive buffer."""
        self.check_open()
        cdef ibv_sge sge
        cdef ibv_recv_wr wr
        cdef ibv_recv_wr *bad = NULL
        memset(&wr, 0, sizeof(wr))
        sge.addr = addr
        sge.length = length
        sge.lkey = lkey
        wr.wr_id = wr_id
        wr.sg_list = &sge
        wr.num_sge = 1 if length else 0
        cdef int rc
        with nogil:
            rc = ibv_post_recv(self.qp, &wr, &bad)
        if rc != 0:
            raise VerbsError("ibv_post_recv", rc, f"QP {self.qp.qp_num:#x}")

    # --- the batch path ---------------------------------------------------

    cdef int poll_send(self) noexcept nogil:
        """Retire batch completions from the send CQ; returns how many were
        polled (-1 when polling itself failed)."""
        cdef ibv_wc wcs[32]
        cdef int n = ibv_poll_cq(self.send_cq.cq, 32, wcs)
        cdef int i
        cdef uint64_t ordinal
        if n < 0:
            if not self.failed:
                self.failed = True
                self.error_ordinal = self.retired
                memset(&self.error_wc, 0, sizeof(ibv_wc))
                self.error_wc.status = IBV_WC_GENERAL_ERR
            return -1
        for i in range(n):
            if not (wcs[i].wr_id & BATCH_TAG):
                if not self.failed:
                    self.failed = self.foreign_completion = True
                    self.error_ordinal = self.retired
                    self.error_wc = wcs[i]
                continue
            ordinal = wcs[i].wr_id & ~BATCH_TAG
            if ordinal + 1 > self.retired:
                self.retired = ordinal + 1
            if wcs[i].status != IBV_WC_SUCCESS and not self.failed:
                self.failed = True
                self.error_ordinal = ordinal
                self.error_wc = wcs[i]
        return n

    cdef raise_failure(self, str call):
        cdef ibv_wc wc = self.error_wc
        if self.foreign_completion:
            raise VerbsError(call, 0,
                             f"the send CQ of QP {self.qp.qp_num:#x} returned a completion "
                             f"(wr_id {wc.wr_id:#x}) that no batch posted; give batch QPs a "
                             "send CQ of their own and do not mix post_send with batches")
        raise CompletionError(call, wc.status, ibv_wc_status_str(<ibv_wc_status>wc.status).decode(),
                              wc.wr_id, wc.opcode, wc.vendor_err, wc.qp_num,
                              f"work request #{self.error_ordinal} of this QP failed; the QP "
                              "is now in error and must be reset or re-created")

    def wait_batch(self, Batch batch not None, int timeout_ms=5000):
        """Poll until every WR of ``batch`` completed. Raises CompletionError
        if any WR up to the batch's last failed, VerbsTimeout at the deadline."""
        self.check_open()
        cdef uint64_t end = batch.end_ordinal
        cdef double deadline = now_s() + timeout_ms / 1000.0
        cdef int idle = 0
        cdef bint timed_out = False
        with nogil:
            while self.retired < end and not (self.failed and self.error_ordinal < end):
                if self.poll_send() > 0:
                    idle = 0
                    continue
                idle += 1
                if idle % 64 == 0:
                    if now_s() > deadline:
                        timed_out = True
                        break
                    sched_yield()
        if self.failed and self.error_ordinal < end:
            self.raise_failure(f"{batch.op} batch")
        if timed_out:
            raise VerbsTimeout(f"{batch.op} batch",
                               f"{end - self.retired} of {batch.num_wrs} work requests not "
                               f"completed within {timeout_ms} ms on QP {self.qp.qp_num:#x}")

    def _post_batch(self, int opcode, str op, local_addrs, remote_addrs, lengths,
                    uint32_t lkey, uint32_t rkey, int signal_every, int chain,
                    notify_imm, int timeout_ms):
        self.check_open()
        if self.failed:
            self.raise_failure(f"{op} batch")
        if self.send_cq.send_users != 1:
            raise VerbsError(f"{op} batch", 0, "the batch path needs a send CQ used by "
                             "this QP alone")
        cdef const uint64_t[::1] la = np.ascontiguousarray(local_addrs, dtype=np.uint64)
        cdef const uint64_t[::1] ra = np.ascontiguousarray(remote_addrs, dtype=np.uint64)
        cdef const uint64_t[::1] ln = np.ascontiguousarray(lengths, dtype=np.uint64)
        cdef Py_ssize_t n = la.shape[0]
        if ra.shape[0] != n or ln.shape[0] != n:
            raise ValueError(f"descriptor arrays differ in length: local {n}, remote "
                             f"{ra.shape[0]}, lengths {ln.shape[0]}")
        if n == 0:
            raise ValueError("empty batch")
        cdef uint32_t sq_depth = self.cap.max_send_wr
        # Every WR between two signalled ones holds a send-queue slot until
        # the later completes; half the queue keeps credits flowing.
        signal_every = max(1, min(signal_every, sq_depth // 2))
        chain = max(1, min(chain, CHAIN_CAPACITY, signal_every))
        cdef uint64_t max_len = self.max_msg_sz
        cdef Py_ssize_t i, bad_index = -1
        cdef uint64_t total = 0
        with nogil:
            for i in range(n):
                if ln[i] == 0 or ln[i] > max_len:
                    bad_index = i
                    break
                total += ln[i]
        if bad_index >= 0:
            raise VerbsError(f"{op} batch", 0,
                             f"descriptor {bad_index} has length {ln[bad_index]}; lengths "
                             f"must be 1..{max_len} (the port's max_msg_sz)")

        cdef bint use_imm = notify_imm is not None
        cdef uint32_t imm = htonl(<uint32_t>(notify_imm or 0))
        cdef ibv_send_wr wrs[CHAIN_CAPACITY]
        cdef ibv_sge sges[CHAIN_CAPACITY]
        cdef ibv_send_wr *bad_wr = NULL
        cdef uint64_t first = self.next_ordinal
        cdef double deadline = now_s() + timeout_ms / 1000.0
        cdef Py_ssize_t k = 0, since_signal = 0, num_wrs = 0
        cdef uint64_t l_addr, r_addr, length
        cdef bint last, signalled
        cdef int rc = 0, post_err = 0
        cdef bint timed_out = False
        cdef double started, mark, provider = 0
        memset(wrs, 0, sizeof(wrs))
        i = 0
        with nogil:
            started = now_s()
            while i < n:
                if self.next_ordinal + k - self.retired >= sq_depth:
                    # Out of send-queue credits: post what is chained, then
                    # retire completions until a slot frees up.
                    mark = now_s()
                    if k > 0:
                        rc = ibv_post_send(self.qp, wrs, &bad_wr)
                        if rc != 0:
                            post_err = rc
                            break
                        self.next_ordinal += k
                        k = 0
                    rc = self.poll_send()
                    provider += now_s() - mark
                    if rc < 0 or self.failed:
                        break
                    if now_s() > deadline:
                        timed_out = True
                        break
                    continue
                l_addr = la[i]
                r_addr = ra[i]
                length = ln[i]
                i += 1
                # Merge runs contiguous on both sides into one WR.
                while (i < n and la[i] == l_addr + length and ra[i] == r_addr + length
                       and length + ln[i] <= max_len):
                    length += ln[i]
                    i += 1
                last = i == n
                since_signal += 1
                signalled = last or since_signal >= signal_every
                if signalled:
                    since_signal = 0
                sges[k].addr = l_addr
                sges[k].length = <uint32_t>length
                sges[k].lkey = lkey
                wrs[k].wr_id = BATCH_TAG | (self.next_ordinal + k)
                wrs[k].sg_list = &sges[k]
                wrs[k].num_sge = 1
                wrs[k].opcode = opcode
                wrs[k].send_flags = IBV_SEND_SIGNALED if signalled else 0
                wrs[k].wr.rdma.remote_addr = r_addr
                wrs[k].wr.rdma.rkey = rkey
                if last and use_imm:
                    wrs[k].opcode = IBV_WR_RDMA_WRITE_WITH_IMM
                    wrs[k].imm_data = imm
                wrs[k].next = NULL
                if k > 0:
                    wrs[k - 1].next = &wrs[k]
                k += 1
                num_wrs += 1
                if k == chain or last:
                    mark = now_s()
                    rc = ibv_post_send(self.qp, wrs, &bad_wr)
                    provider += now_s() - mark
                    if rc != 0:
                        post_err = rc
                        break
                    self.next_ordinal += k
                    k = 0
        if post_err:
            self.failed = True
            self.error_ordinal = self.next_ordinal
            memset(&self.error_wc, 0, sizeof(ibv_wc))
            self.error_wc.status = IBV_WC_GENERAL_ERR
            raise VerbsError("ibv_post_send", post_err,
                             f"{op} batch on QP {self.qp.qp_num:#x} after {num_wrs} WRs; "
                             "the QP is unusable until reset or re-created")
        if self.failed:
            self.raise_failure(f"{op} batch")
        if timed_out:
            raise VerbsTimeout(f"{op} batch", f"no send-queue credit within {timeout_ms} ms "
                               f"on QP {self.qp.qp_num:#x}")
        cdef Batch batch = Batch.__new__(Batch)
        batch.qp = self
        batch.first_ordinal = first
        batch.end_ordinal = self.next_ordinal
        batch.num_descriptors = n
        batch.num_wrs = num_wrs
        batch.total_bytes = total
        batch.op = op
        batch.post_seconds = now_s() - started
        batch.provider_seconds = provider
        return batch

    def post_write_batch(self, local_addrs, lengths, uint32_t lkey, remote_addrs,
                         uint32_t rkey, *, int signal_every=256, int chain=32,
                         notify_imm=None, int timeout_ms=5000):
        """RDMA WRITE ``lengths[i]`` bytes from ``local_addrs[i]`` to
        ``remote_addrs[i]`` for every i (numpy uint64 arrays; lengths may be
        uint32). Runs contiguous on both sides become one WR; WRs go out in
        chains of ``chain``, every ``signal_every``-th and the last signalled.
        With ``notify_imm`` the last WR is a WRITE_WITH_IMM carrying it, so the
        peer learns of the data only after all of it landed. Returns a Batch
        to wait on. ``timeout_ms`` bounds the wait for send-queue credits."""
        return self._post_batch(IBV_WR_RDMA_WRITE, "RDMA WRITE", local_addrs, remote_addrs,
                                lengths, lkey, rkey, signal_every, chain, notify_imm, timeout_ms)

    def post_read_batch(self, local_addrs, lengths, uint32_t lkey, remote_addrs,
                        uint32_t rkey, *, int signal_every=256, int chain=32,
                        int timeout_ms=5000):
        """RDMA READ ``lengths[i]`` bytes from ``remote_addrs[i]`` into
        ``local_addrs[i]``; otherwise as post_write_batch."""
        return self._post_batch(IBV_WR_RDMA_READ, "RDMA READ", local_addrs, remote_addrs,
                                lengths, lkey, rkey, signal_every, chain, None, timeout_ms)

    def post_write_blocks(self, uint64_t local_base, uint64_t local_stride, local_ids,
                          uint64_t remote_base, uint64_t remote_stride, remote_ids,
                          uint64_t block_len, uint32_t lkey, uint32_t rkey, **kwargs):
        """post_write_batch with addresses computed in C as base + id * stride."""
        la, ra, ln = block_descriptors(local_base, local_stride, local_ids, remote_base,
                                       remote_stride, remote_ids, block_len)
        return self.post_write_batch(la, ln, lkey, ra, rkey, **kwargs)

    def post_read_blocks(self, uint64_t local_base, uint64_t local_stride, local_ids,
                         uint64_t remote_base, uint64_t remote_stride, remote_ids,
                         uint64_t block_len, uint32_t lkey, uint32_t rkey, **kwargs):
        """post_read_batch with addresses computed in C as base + id * stride."""
        la, ra, ln = block_descriptors(local_base, local_stride, local_ids, remote_base,
                                       remote_stride, remote_ids, block_len)
        return self.post_read_batch(la, ln, lkey, ra, rkey, **kwargs)


def block_descriptors(uint64_t local_base, uint64_t local_stride, local_ids,
                      uint64_t remote_base, uint64_t remote_stride, remote_ids,
                      uint64_t block_len):
    """(local_addrs, remote_addrs, lengths) for blocks addressed as
    base + id * stride on each side."""
    cdef const int64_t[::1] lid = np.ascontiguousarray(local_ids, dtype=np.int64)
    cdef const int64_t[::1] rid = np.ascontiguousarray(remote_ids, dtype=np.int64)
    cdef Py_ssize_t n = lid.shape[0], i
    if rid.shape[0] != n:
        raise ValueError(f"{n} local ids but {rid.shape[0]} remote ids")
    la_arr = np.empty(n, dtype=np.uint64)
    ra_arr = np.empty(n, dtype=np.uint64)
    cdef uint64_t[::1] la = la_arr
    cdef uint64_t[::1] ra = ra_arr
    cdef Py_ssize_t bad = -1
    with nogil:
        for i in range(n):
            if lid[i] < 0 or rid[i] < 0:
                bad = i
                break
            la[i] = local_base + <uint64_t>lid[i] * local_stride
            ra[i] = remote_base + <uint64_t>rid[i] * remote_stride
    if bad >= 0:
        raise ValueError(f"negative block id at position {bad}")
    return la_arr, ra_arr, np.full(n, block_len, dtype=np.uint64)


def wait_batches(batches, int timeout_ms=5000):
    """Wait for batches spread over several QPs (a transfer split across a
    link's QPs): done when each QP's last signalled WR has completed."""
    cdef double deadline = now_s() + timeout_ms / 1000.0
    cdef Batch batch
    for batch in batches:
        remaining = max(0, int((deadline - now_s()) * 1000))
        batch.qp.wait_batch(batch, remaining)
