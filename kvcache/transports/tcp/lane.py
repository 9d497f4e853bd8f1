"""Data lanes: TCP connections beside a link's control channel, each
carrying one transfer at a time, request then reply.

Over the control channel a transfer costs four thread wake-ups: the
target's reader takes the request, its responder sends the reply, our
reader takes the reply, our caller wakes up. Over a lane it costs two: the
calling thread sends and then reads its own reply, and the target's lane
thread reads the request and replies itself. Replying from the thread that
reads cannot deadlock here, as it could on the channel, because a lane
strictly alternates: its initiator never sends while a reply is due. Each
calling thread holds a lane of its own, so threads move data over parallel
connections instead of taking turns on one.

A lane is opened with a control call ("tcp.lane") that returns a one-time
token and the target's listen port; we connect to the host the control
channel reaches, send LANE {"token"} and wait for the target's REPLY. A
target that does not listen grants no lanes: transfers to it use the control
channel."""
import logging
import socket
import threading
import time

from kvcache.transports.tcp.framing import FrameStream, StreamClosed
from kvcache.transports.tcp.protocol import MsgType, ProtocolError

log = logging.getLogger(__name__)


class Lane(FrameStream):
    """One connection, used by one thread at a time. Any thread may
    ``shutdown`` it (waking whoever blocks on it); only its user closes it,
    so the descriptor number is never reused under a running call."""

    def __init__(self, sock, io_timeout_ms):
        super().__init__(sock, io_timeout_ms)
        self.next_id = 1


class LanePool:
    """The lanes of one link, initiator side: idle ones are reused, a thread
    that finds none opens one. ``take`` returns None when the peer grants
    no lanes (it does not listen). ``grant(timeout_ms)`` is the control call
    that returns {"port", "token"} (port 0: no lanes). ``tls``: a TlsConfig
when lanes, like the link, run over TLS."""

    def __init__(self, peer_name, grant, host, io_timeout_ms, tls=None):
        self.peer_name = peer_name
        self.tls = tls
        self.grant = grant
        self.host = host
        self.io_timeout_ms = io_timeout_ms
        self.idle = []
        self.busy = set()
        self.lock = threading.Lock()
        self.closed = False
        self.unavailable = False

    def take(self, timeout_ms):
        with self.lock:
            if self.closed:
                raise StreamClosed("the link is closed")
            if self.idle:
                lane = self.idle.pop()
                self.busy.add(lane)
                return lane
            if self.unavailable:
                return None
        lane = self._open(timeout_ms)
        with self.lock:
            if lane is None:
                self.unavailable = True
                return None
            if self.closed:
                lane.close()
                raise StreamClosed("the link is closed")
            self.busy.add(lane)
        return lane

    def give_back(self, lane):
        with self.lock:
            self.busy.discard(lane)
            if not self.closed:
                self.idle.append(lane)
                return
        lane.close()

    def drop(self, lane):
        with self.lock:
            self.busy.discard(lane)
        lane.close()

    def close(self):
        """Close idle lanes; wake the threads using busy ones (they close
        their own)."""
        with self.lock:
            self.closed = True
            idle, self.idle = self.idle, []
            busy = list(self.busy)
        for lane in idle:
            lane.close()
        for lane in busy:
            lane.shutdown()

    def _open(self, timeout_ms):
        deadline = time.monotonic() + timeout_ms / 1000
        grant = self.grant(timeout_ms)
        port, token = grant.get("port"), grant.get("token")
        if not port:
            log.debug("%s does not listen: no data lanes, using the control channel",
                      self.peer_name)
            return None
        if not isinstance(port, int) or not 0 < port < 65536 or not isinstance(token, str):
            raise StreamClosed(f"{self.peer_name} granted a lane badly: {grant!r}")
        try:
            sock = socket.create_connection((self.host, port), timeout=timeout_ms / 1000)
            if self.tls is not None:
                sock = self.tls.connect(sock, deadline - time.monotonic())
        except OSError as exc:
            log.warning("%s: data lane to %s port %d failed (%s); using the control channel",
                        self.peer_name, self.host, port, exc)
            return None
        lane = Lane(sock, self.io_timeout_ms)
        try:
            lane.send_frame(MsgType.LANE, 0, {"token": token}, timeout_ms=timeout_ms)
            msg_type, _, reply, payload_len = lane.recv_frame(_left_ms(deadline))
            if msg_type != MsgType.REPLY or payload_len or reply["status"] != 0:
                raise ProtocolError(f"lane refused: {reply.get('message', msg_type.name)}")
        except (StreamClosed, ProtocolError) as exc:
            lane.close()
            raise StreamClosed(f"opening a data lane: {exc}") from None
        return lane


def _left_ms(deadline):
    return max(1, int((deadline - time.monotonic()) * 1000))
