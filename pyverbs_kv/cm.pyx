"""rdma_cm: address and route resolution, connect / listen / accept /
disconnect over an event channel, every wait with a deadline."""
import socket
import struct
from collections import namedtuple

from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint8_t
from libc.string cimport memset
from posix.fcntl cimport fcntl, F_GETFL, F_SETFL, O_NONBLOCK
from pyverbs_kv.clock cimport now_s

from pyverbs_kv.base import VerbsError, VerbsTimeout
from pyverbs_kv.cq cimport CQ
from pyverbs_kv.device cimport Context
from pyverbs_kv.libibverbs cimport (ibv_qp_init_attr, ibv_query_device, ibv_device_attr,
                                     ibv_get_device_name)
from pyverbs_kv.libibverbs_enums cimport IBV_QPT_RC
from pyverbs_kv.librdmacm cimport *
from pyverbs_kv.pd cimport PD
from pyverbs_kv.qp cimport QP, QPCap

from pyverbs_kv.posix_poll cimport pollfd, poll, POLLIN

cdef extern from "arpa/inet.h" nogil:
    unsigned short ntohs(unsigned short)

CMEvent = namedtuple("CMEvent", "event event_str status id listen_id private_data")
CMEvent.__doc__ = "One rdma_cm event; ``id`` is the CMID it concerns."




def _sockaddr(ip, int port):
    """struct sockaddr_in / sockaddr_in6 bytes for an address and port."""
    try:
        packed = socket.inet_pton(socket.AF_INET, ip)
        return struct.pack("=H", socket.AF_INET) + struct.pack("!H", port) + packed + bytes(8)
    except OSError:
        packed = socket.inet_pton(socket.AF_INET6, ip)
        return (struct.pack("=H", socket.AF_INET6) + struct.pack("!HI", port, 0) + packed
                + bytes(4))


cdef class EventChannel(PyverbsObject):
    """An rdma_cm event channel. Events for every CMID on it arrive here;
    a CMID waiting for its own event keeps the others for their owners."""

    def __init__(self):
        self.channel = rdma_create_event_channel()
        if self.channel == NULL:
            raise VerbsError("rdma_create_event_channel", errno,
                             "is the rdma_ucm module loaded?")
        flags = fcntl(self.channel.fd, F_GETFL)
        fcntl(self.channel.fd, F_SETFL, flags | O_NONBLOCK)
        self.pending = []

    def close(self):
        if self.channel == NULL:
            return
        self.close_children()
        rdma_destroy_event_channel(self.channel)
        self.channel = NULL
        self.pending = []

    def __dealloc__(self):
        if self.channel != NULL:
            rdma_destroy_event_channel(self.channel)
            self.channel = NULL

    cdef check_open(self):
        if self.channel == NULL:
            raise VerbsError("EventChannel", 0, "the event channel is closed")

    def get_event(self, int timeout_ms):
        """The next event (kept ones first); VerbsTimeout at the deadline."""
        self.check_open()
        if self.pending:
            return self.pending.pop(0)
        cdef pollfd pfd
        cdef rdma_cm_event *event = NULL
        cdef int rc, err, remaining
        cdef double deadline = now_s() + timeout_ms / 1000.0
        pfd.fd = self.channel.fd
        pfd.events = POLLIN
        while True:
            with nogil:
                rc = rdma_get_cm_event(self.channel, &event)
                err = errno
            if rc == 0:
                break
            if err not in (EAGAIN, EINTR):
                raise VerbsError("rdma_get_cm_event", err)
            remaining = <int>((deadline - now_s()) * 1000)
            if remaining <= 0:
                raise VerbsTimeout("rdma_get_cm_event",
                                   f"no rdma_cm event within {timeout_ms} ms")
            with nogil:
                rc = poll(&pfd, 1, remaining)
        return self._take(event)

    cdef _take(self, rdma_cm_event *event):
        """Copy an event into Python and acknowledge it."""
        cdef CMID cmid, listener = None
        private = b""
        if event.param.conn.private_data != NULL and event.param.conn.private_data_len:
            private = (<const char *>event.param.conn.private_data)[
                :event.param.conn.private_data_len]
        if event.event == RDMA_CM_EVENT_CONNECT_REQUEST:
            listener = <CMID>event.listen_id.context
            cmid = CMID.__new__(CMID)
            cmid.id = event.id
            cmid.channel = self
            event.id.context = <void *>cmid
            self.add_child(cmid)
        else:
            cmid = <CMID>event.id.context
        result = CMEvent(event.event, rdma_event_str(event.event).decode(), event.status,
                         cmid, listener, private)
        rdma_ack_cm_event(event)
        return result

    def wait_for(self, CMID cmid, int expected, int timeout_ms):
        """Wait for event ``expected`` on ``cmid``. Events for other CMIDs are
        kept; a different event for this CMID raises a VerbsError naming it."""
        cdef double deadline = now_s() + timeout_ms / 1000.0
        kept = []
        try:
            while True:
                remaining = int((deadline - now_s()) * 1000)
                if remaining <= 0:
                    raise VerbsTimeout("rdma_cm",
                                       f"waiting for {rdma_event_str(expected).decode()}: "
                                       f"nothing within {timeout_ms} ms")
                ev = self.get_event(remaining)
                if ev.id is not cmid and ev.listen_id is not cmid:
                    kept.append(ev)
                    continue
                if ev.event != expected:
                    raise VerbsError("rdma_cm", -ev.status if ev.status < 0 else ev.status,
                                     f"expected {rdma_event_str(expected).decode()}, got "
                                     f"{ev.event_str} (status {ev.status})")
                return ev
        finally:
            self.pending[:0] = kept


cdef class CMID(PyverbsObject):
    """An rdma_cm identifier (RC, port space TCP by default)."""

    def __init__(self, EventChannel channel not None, int port_space=RDMA_PS_TCP):
        channel.check_open()
        rc = rdma_create_id(channel.channel, &self.id, <void *>self, port_space)
        if rc != 0:
            raise VerbsError("rdma_create_id", errno)
        self.channel = channel
        channel.add_child(self)

    def close(self):
        if self.id == NULL:
            return
        self.close_children()
        self.verbs_context = None
        self.qp = None
        rc = rdma_destroy_id(self.id)
        self.id = NULL
        if rc != 0:
            raise VerbsError("rdma_destroy_id", errno)

    def __dealloc__(self):
        if self.id != NULL:
            rdma_destroy_id(self.id)
            self.id = NULL

    cdef check_open(self):
        if self.id == NULL:
            raise VerbsError("CMID", 0, "the CM id is closed")

    @property
    def context(self):
        """The device this id is bound to, as a Context (owned by rdma_cm)."""
        self.check_open()
        if self.id.verbs == NULL:
            raise VerbsError("CMID.context", 0, "the id is not bound to a device yet")
        if self.verbs_context is None:
            ctx: Context = Context.__new__(Context)
            ctx.ctx = self.id.verbs
            ctx.borrowed = True
            ctx.owner = self
            ctx.name = ibv_get_device_name(self.id.verbs.device).decode()
            self.verbs_context = ctx
            self.add_child(ctx)
        return self.verbs_context

    @property
    def port_num(self):
        self.check_open()
        return self.id.port_num

    @property
    def local_port(self):
        self.check_open()
        return ntohs(rdma_get_src_port(self.id))

    def bind(self, ip, int port=0):
        """Bind to a local address (and port; 0 picks one, see local_port)."""
        self.check_open()
        addr = _sockaddr(ip, port)
        cdef const char *c_addr = addr
        if rdma_bind_addr(self.id, <sockaddr *>c_addr) != 0:
            raise VerbsError("rdma_bind_addr", errno, f"{ip}:{port}")

    def listen(self, int backlog=16):
        self.check_open()
        if rdma_listen(self.id, backlog) != 0:
            raise VerbsError("rdma_listen", errno)

    def resolve_addr(self, dst_ip, int dst_port, src_ip=None, int timeout_ms=2000):
        """Resolve the destination to a local device and wait for the result."""
        self.check_open()
        dst = _sockaddr(dst_ip, dst_port)
        src = _sockaddr(src_ip, 0) if src_ip else None
        cdef const char *c_dst = dst
        cdef const char *c_src = NULL
        if src is not None:
            c_src = src
        if rdma_resolve_addr(self.id, <sockaddr *>c_src, <sockaddr *>c_dst, timeout_ms) != 0:
            raise VerbsError("rdma_resolve_addr", errno, f"{dst_ip}:{dst_port}")
        self.channel.wait_for(self, RDMA_CM_EVENT_ADDR_RESOLVED, timeout_ms + 1000)

    def resolve_route(self, int timeout_ms=2000):
        self.check_open()
        if rdma_resolve_route(self.id, timeout_ms) != 0:
            raise VerbsError("rdma_resolve_route", errno)
        self.channel.wait_for(self, RDMA_CM_EVENT_ROUTE_RESOLVED, timeout_ms + 1000)

    def create_qp(self, PD pd not None, CQ send_cq not None, CQ recv_cq not None,
                  QPCap cap=None):
        """Create the RC QP of this connection; rdma_cm moves it through
        INIT/RTR/RTS on connect/accept."""
        self.check_open()
        if cap is None:
            cap = QPCap()
        cdef ibv_qp_init_attr attr
        memset(&attr, 0, sizeof(attr))
        attr.send_cq = send_cq.cq
        attr.recv_cq = recv_cq.cq
        attr.qp_type = IBV_QPT_RC
        attr.cap.max_send_wr = cap.max_send_wr
        attr.cap.max_recv_wr = cap.max_recv_wr
        attr.cap.max_send_sge = cap.max_send_sge
        attr.cap.max_recv_sge = cap.max_recv_sge
        attr.cap.max_inline_data = cap.max_inline_data
        if rdma_create_qp(self.id, pd.pd, &attr) != 0:
            raise VerbsError("rdma_create_qp", errno, repr(cap))
        cdef QP qp = QP.__new__(QP)
        qp.qp = self.id.qp
        qp.cm_id = self.id
        qp.setup(pd, send_cq, recv_cq,
                 QPCap(attr.cap.max_send_wr, attr.cap.max_recv_wr, attr.cap.max_send_sge,
                       attr.cap.max_recv_sge, attr.cap.max_inline_data), IBV_QPT_RC)
        qp.port_num = self.id.port_num
        qp.max_msg_sz = pd.ctx.query_port(self.id.port_num)["max_msg_sz"]
        self.qp = qp
        self.add_child(qp)
        return qp

    cdef fill_conn_param(self, rdma_conn_param *param, bytes private_data):
        cdef ibv_device_attr attr
        memset(param, 0, sizeof(rdma_conn_param))
        if len(private_data) > 56:
            raise ValueError("rdma_cm private data is at most 56 bytes on RC")
        if ibv_query_device(self.id.verbs, &attr) != 0:
            raise VerbsError("ibv_query_device", errno)
        param.private_data = <const char *>private_data
        param.private_data_len = len(private_data)
        param.responder_resources = min(attr.max_qp_rd_atom, 16)
        param.initiator_depth = min(attr.max_qp_init_rd_atom, 16)
        param.retry_count = 7
        param.rnr_retry_count = 7

    def connect(self, bytes private_data=b"", int timeout_ms=5000):
        """Connect (after resolve_route and create_qp) and wait until
        established. Returns the private data the server accepted with."""
        self.check_open()
        cdef rdma_conn_param param
        self.fill_conn_param(&param, private_data)
        if rdma_connect(self.id, &param) != 0:
            raise VerbsError("rdma_connect", errno)
        return self.channel.wait_for(self, RDMA_CM_EVENT_ESTABLISHED, timeout_ms).private_data

    def get_request(self, int timeout_ms=5000):
        """On a listening id: wait for a connection request. Returns
        (new CMID, the client's private data)."""
        self.check_open()
        ev = self.channel.wait_for(self, RDMA_CM_EVENT_CONNECT_REQUEST, timeout_ms)
        return ev.id, ev.private_data

    def accept(self, bytes private_data=b"", int timeout_ms=5000):
        """Accept a request (after create_qp) and wait until established."""
        self.check_open()
        cdef rdma_conn_param param
        self.fill_conn_param(&param, private_data)
        if rdma_accept(self.id, &param) != 0:
            raise VerbsError("rdma_accept", errno)
        self.channel.wait_for(self, RDMA_CM_EVENT_ESTABLISHED, timeout_ms)

    def reject(self, bytes private_data=b""):
        self.check_open()
        if rdma_reject(self.id, <const char *>private_data, len(private_data)) != 0:
            raise VerbsError("rdma_reject", errno)

    def disconnect(self, int timeout_ms=2000, bint wait=True):
        """Disconnect; with ``wait`` also wait for the DISCONNECTED event."""
        self.check_open()
        if rdma_disconnect(self.id) != 0:
            raise VerbsError("rdma_disconnect", errno)
        if wait:
            self.channel.wait_for(self, RDMA_CM_EVENT_DISCONNECTED, timeout_ms)
