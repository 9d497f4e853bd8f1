"""Data lanes: TCP connections beside a link's control channel, each
carrying one transfer at a time, request then reply (the TCP transport's
data path, and the shared-memory transport's fallback).

Over the control channel a transfer costs four thread wake-ups: the
target's reader takes the request, its responder sends the reply, our
reader takes the reply, our caller wakes up. Over a lane it costs two: the
calling thread sends and then reads its own reply, and the target's lane
thread reads the request and replies itself. Replying from the thread that
reads cannot deadlock here, as it could on the channel, because a lane
strictly alternates: its initiator never sends while a reply is due. Each
calling thread holds a lane of its own, so threads move data over parallel
connections instead of taking turns on one.

A lane is opened with a control call ("engine.lane") that returns a one-time
token and the target's listen port; we connect to the host the control
channel reaches, send LANE {"token"} and wait for the target's REPLY. A
target that does not listen grants no lanes: transfers to it use the control
channel."""
import logging
import socket
import threading
import time

from kvcache.channel import ChannelClosed, FrameStream
from kvcache.protocol import FRAME, MsgType, ProtocolError, decode_frame, decode_header
from kvcache.status import LLMException, LLMStatusCode
from pyverbs_kv import sgio

log = logging.getLogger("kvcache.lane")

IDLE_POLL_MS = 500          # how often an idle lane server checks its link


class LaneTimeout(ChannelClosed):
    """The other end did not answer within the deadline."""


class Lane(FrameStream):
    """One connection, used by one thread at a time. Any thread may
    ``shutdown`` it (waking whoever blocks on it); only its user closes it,
    so the descriptor number is never reused under a running call."""

    def __init__(self, sock, io_timeout_ms):
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.io_timeout_ms = io_timeout_ms
        self.next_id = 1

    def send(self, msg_type, req_id, header, pieces=None, timeout_ms=None, prefix=()):
        """One frame, as Channel.send, without a lock (one user)."""
        addrs, lengths, buffers = self._frame(msg_type, req_id, header, pieces, prefix)
        timeout = self.io_timeout_ms if timeout_ms is None else timeout_ms
        try:
            sgio.send_pieces(self.fd, addrs, lengths, timeout, buffers)
        except TimeoutError as exc:
            raise LaneTimeout(f"send: {exc}") from None
        except OSError as exc:
            raise ChannelClosed(f"send failed: {exc}") from None

    def recv_frame(self, timeout_ms=None):
        """(msg_type, req_id, header, payload_len) of the next frame."""
        timeout = self.io_timeout_ms if timeout_ms is None else timeout_ms
        try:
            msg_type, req_id, header_len, payload_len = decode_frame(
                sgio.recv_exact(self.fd, FRAME.size, timeout))
            header = decode_header(msg_type, sgio.recv_exact(self.fd, header_len,
                                                             self.io_timeout_ms))
        except TimeoutError as exc:
            raise LaneTimeout(f"recv: {exc}") from None
        except OSError as exc:
            raise ChannelClosed(f"receive failed: {exc}") from None
        return msg_type, req_id, header, payload_len

    def recv_bytes(self, size):
        try:
            return sgio.recv_exact(self.fd, size, self.io_timeout_ms)
        except OSError as exc:
            raise ChannelClosed(f"receive failed: {exc}") from None

    def wait_readable(self, timeout_ms):
        return sgio.wait_readable(self.fd, timeout_ms)

    def shutdown(self):
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        self.shutdown()
        self.sock.close()


class LanePool:
    """The lanes of one link, initiator side: idle ones are reused, a thread
    that finds none opens one. ``take`` returns None when the peer grants
    no lanes (it does not listen)."""

    def __init__(self, engine, peer):
        self.engine = engine
        self.peer = peer
        self.idle = []
        self.busy = set()
        self.lock = threading.Lock()
        self.closed = False
        self.unavailable = False

    def take(self, timeout_ms):
        with self.lock:
            if self.closed:
                raise ChannelClosed("the link is closed")
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
                raise ChannelClosed("the link is closed")
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
        peer = self.peer
        try:
            grant = self.engine.call(peer, "engine.lane", {}, timeout_ms)
        except LLMException as exc:
            if exc.status_code != LLMStatusCode.LLM_PARAM_INVALID:
                raise
            log.info("%s grants no data lanes (%s); using the control channel", peer.name, exc)
            return None
        port = grant.get("port")
        if not port:
            log.debug("%s does not listen: no data lanes, using the control channel",
                      peer.name)
            return None
        if not isinstance(port, int) or not isinstance(grant.get("token"), str):
            raise LLMException(LLMStatusCode.LLM_FAILED, f"{peer.name} granted a lane badly")
        try:
            host = peer.channel.sock.getpeername()[0]
        except OSError as exc:                  # the link's connection just went
            raise ChannelClosed(f"the link's connection is gone: {exc}") from None
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            sock = socket.create_connection((host, port), timeout=timeout_ms / 1000)
        except OSError as exc:
            log.warning("%s: data lane to %s:%d failed (%s); using the control channel",
                        peer.name, host, port, exc)
            return None
        lane = Lane(sock, self.engine.io_timeout_ms)
        try:
            lane.send(MsgType.LANE, 0, {"token": grant["token"]}, timeout_ms=timeout_ms)
            remaining = max(1, int((deadline - time.monotonic()) * 1000))
            msg_type, _, reply, payload_len = lane.recv_frame(remaining)
            if msg_type != MsgType.REPLY or payload_len or reply["status"] != 0:
                raise ProtocolError(f"lane refused: {reply.get('message', msg_type.name)}")
        except (ChannelClosed, ProtocolError) as exc:
            lane.close()
            raise ChannelClosed(f"opening a data lane: {exc}") from None
        return lane

