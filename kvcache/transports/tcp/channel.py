"""The control channel: one framed, bidirectional connection per link.

One reader thread reads every frame: replies wake the caller waiting on
them (their payload received straight into the caller's memory first);
requests go to the handler. The reader never sends, so two peers streaming
to each other cannot deadlock: replies that need sending are queued to a
responder thread. Callers send their requests directly, under a lock.

The reply queue is bounded per link (KVCACHE_PEER_MAX_QUEUED replies and
KVCACHE_PEER_MAX_QUEUED_BYTES of READ data and descriptor tables): a peer
that sends requests faster than it reads the replies finds the reader no
longer reading its frames; one that still has not made room after
io_timeout_ms is dropped. The reader only ever waits on the responder,
which needs nothing from the reader, so the wait is bounded and cannot
deadlock."""
import itertools
import logging
import queue
import threading
import time

import numpy as np

from kvcache.config import env_int
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.tcp.framing import FrameStream, StreamClosed, StreamTimeout
from kvcache.transports.tcp.protocol import MsgType, ProtocolError

log = logging.getLogger(__name__)

IDLE_POLL_MS = 500          # how often an idle reader checks for close
JOIN_S = 5
MAX_QUEUED = 64
MAX_QUEUED_BYTES = 64 << 20

ChannelClosed = StreamClosed


class _Pending:
    __slots__ = ("event", "reply_into", "header", "error")

    def __init__(self, reply_into):
        self.event = threading.Event()
        self.reply_into = reply_into
        self.header = None
        self.error = None


class Channel(FrameStream):
    """``handler(channel, msg_type, req_id, header, payload_len)`` serves
    requests from the peer in the reader thread and must consume exactly
    ``payload_len`` bytes (``recv_payload`` / ``discard`` / ``recv_bytes``).
    ``io_timeout_ms`` bounds every frame once it has started.
    ``on_close(channel, reason)`` runs once, in whichever thread closed it."""

    def __init__(self, sock, name, handler, on_close, io_timeout_ms=30_000):
        super().__init__(sock, io_timeout_ms)
        self.name = name
        self.handler = handler
        self.on_close = on_close
        self.peer = None
        self._send_lock = threading.RLock()    # close() may run inside send()
        self._pending = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._replies = queue.SimpleQueue()
        self._room = threading.Condition()
        self._queued = self._queued_bytes = 0
        self.max_queued = max(1, env_int("KVCACHE_PEER_MAX_QUEUED", MAX_QUEUED))
        self.max_queued_bytes = max(1, env_int("KVCACHE_PEER_MAX_QUEUED_BYTES",
                                               MAX_QUEUED_BYTES))
        self._closed = threading.Event()
        self._done = threading.Event()          # close() finished, on_close included
        self.close_reason = None
        self._reader = threading.Thread(target=self._read_loop, name=f"kv-reader-{name}",
                                        daemon=True)
        self._responder = threading.Thread(target=self._respond_loop,
                                           name=f"kv-responder-{name}", daemon=True)

    def start(self):
        self._reader.start()
        self._responder.start()

    @property
    def closed(self):
        return self._closed.is_set()

    # --- sending ------------------------------------------------------------

    def send(self, msg_type, req_id, header, pieces=None, timeout_ms=None, prefix=()):
        """One frame under the send lock. A frame cut in the middle leaves
        the stream unusable, so a failed send closes the channel."""
        with self._send_lock:
            if self.closed:
                raise ChannelClosed(self.close_reason)
            try:
                self.send_frame(msg_type, req_id, header, pieces, timeout_ms, prefix)
                return
            except StreamClosed as exc:
                failure = f"send failed: {exc}"
        # Closed outside the send lock: a reader closing at the same time
        # takes it to release the socket, and this close waits for that one.
        self.close(failure)
        raise ChannelClosed(self.close_reason)

    def call(self, msg_type, header, pieces=None, reply_into=None, timeout_ms=None,
             prefix=()):
        """Send a request and wait for its reply; the reply's payload lands in
        ``reply_into`` (addresses, lengths). Returns the reply header;
        LLMException(LLM_TIMEOUT) at the deadline (the channel is then closed:
        a late reply must not land in memory the caller took back)."""
        req_id = next(self._ids)
        pending = _Pending(reply_into)
        with self._pending_lock:
            if self.closed:
                raise ChannelClosed(self.close_reason)
            self._pending[req_id] = pending
        timeout = self.io_timeout_ms if timeout_ms is None else timeout_ms
        try:
            self.send(msg_type, req_id, header, pieces, timeout, prefix)
        except BaseException:          # closed, or a header that does not encode
            with self._pending_lock:
                self._pending.pop(req_id, None)
            raise
        if not pending.event.wait(timeout / 1000):
            self.close(f"no reply to {msg_type.name} within {timeout} ms")
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"{msg_type.name} to {self.name}: no reply within {timeout} ms")
        if pending.error is not None:
            raise ChannelClosed(pending.error)
        return pending.header

    def reserve(self, cost):
        """Room in the reply queue for one reply holding ``cost`` bytes (a
        READ's data and descriptor table), taken before the request's body
        is read; waits while the queue is full (one reply always fits).
        ProtocolError when the peer has not read enough replies to make room
        within io_timeout_ms: it is dropped."""
        deadline = time.monotonic() + self.io_timeout_ms / 1000
        with self._room:
            while self._queued and (self._queued >= self.max_queued
                                    or self._queued_bytes + cost > self.max_queued_bytes):
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    raise ProtocolError(
                        f"the peer does not read its replies: {self._queued} queued "
                        f"({self._queued_bytes} bytes) for {self.io_timeout_ms} ms")
                self._room.wait(min(left, IDLE_POLL_MS / 1000))
            self._queued += 1
            self._queued_bytes += cost

    def reply_later(self, req_id, produce, after=None, reserved=None):
        """Queue a reply: ``produce()`` runs in the responder thread and returns
        (header, pieces or None); ``after()`` runs once it was sent (or not).
        ``reserved``: the cost ``reserve`` took for it (None: reserve none now)."""
        if reserved is None:
            self.reserve(0)
        self._replies.put((req_id, produce, after, reserved or 0))

    def _release(self, cost):
        with self._room:
            self._queued -= 1
            self._queued_bytes -= cost
            self._room.notify_all()

    # --- receiving (reader thread) ----------------------------------------------

    def _read_loop(self):
        reason = "reader stopped"
        try:
            while not self.closed:
                if not self.wait_readable(IDLE_POLL_MS):
                    continue
                msg_type, req_id, header, payload_len = self.recv_frame()
                if msg_type == MsgType.REPLY:
                    self._take_reply(req_id, header, payload_len)
                else:
                    self.handler(self, msg_type, req_id, header, payload_len)
        except StreamTimeout as exc:
            reason = f"peer stalled in the middle of a frame ({exc})"
        except ChannelClosed as exc:
            reason = self.close_reason or str(exc) or "peer closed the connection"
        except ProtocolError as exc:
            reason = f"protocol error from peer: {exc}"
            log.warning("%s: %s", self.name, reason)
        except Exception as exc:          # a bug must not leave callers waiting
            reason = f"reader failed: {exc!r}"
            log.exception("%s: reader failed", self.name)
        self.close(reason)

    def _take_reply(self, req_id, header, payload_len):
        with self._pending_lock:
            pending = self._pending.pop(req_id, None)
        if pending is None:
            raise ProtocolError(f"reply to unknown request {req_id}")
        if payload_len:
            if pending.reply_into is None:
                raise ProtocolError(f"unexpected {payload_len}-byte reply payload")
            addrs, lengths = pending.reply_into
            expected = int(np.asarray(lengths, dtype=np.uint64).sum())
            if payload_len != expected:
                raise ProtocolError(f"reply payload of {payload_len} bytes, expected {expected}")
            self.recv_payload(addrs, lengths)
        pending.header = header
        pending.event.set()

    def _respond_loop(self):
        while True:
            item = self._replies.get()
            if item is None:
                break
            req_id, produce, after, cost = item
            try:
                if not self.closed:
                    self._reply(req_id, produce)
            finally:
                self._release(cost)
                if after is not None:
                    after()
        # Requests queued behind the close still release what they hold.
        while True:
            try:
                item = self._replies.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[2] is not None:
                item[2]()

    def _reply(self, req_id, produce):
        try:
            header, pieces = produce()
        except LLMException as exc:
            header, pieces = {"status": int(exc.status_code), "message": str(exc)}, None
        except Exception as exc:
            log.exception("%s: reply to %d failed", self.name, req_id)
            header, pieces = {"status": int(LLMStatusCode.LLM_FAILED),
                              "message": f"peer failed: {exc!r}"}, None
        try:
            self.send(MsgType.REPLY, req_id, header, pieces)
        except ChannelClosed:
            pass
        except Exception as exc:           # a handler's result that is no JSON frame
            log.warning("%s: reply to %d does not encode: %s", self.name, req_id, exc)
            try:
                self.send(MsgType.REPLY, req_id, {
                    "status": int(LLMStatusCode.LLM_FAILED),
                    "message": f"the peer's handler returned what cannot be sent: {exc}"})
            except ChannelClosed:
                pass

    # --- closing --------------------------------------------------------------

    def close(self, reason="closed"):
        """Close once: fail waiting callers, stop both threads (joined unless
        called from one of them), release the socket, then ``on_close``. A
        second caller returns once the first has finished (unless it is one of
        the channel's own threads, which the first may be joining)."""
        with self._pending_lock:
            if self._closed.is_set():
                if threading.current_thread() not in (self._reader, self._responder):
                    self._done.wait(2 * JOIN_S + 1)
                return
            self.close_reason = reason
            self._closed.set()
            pending, self._pending = self._pending, {}
        self.shutdown()
        for p in pending.values():
            p.error = reason
            p.event.set()
        self._replies.put(None)
        with self._room:
            self._room.notify_all()          # a reader waiting for room sees the close
        me = threading.current_thread()
        for thread in (self._reader, self._responder):
            if thread is not me and thread.is_alive():
                thread.join(JOIN_S)
        # Only now, with the reader gone, can the descriptor be released.
        with self._send_lock:
            self.sock.close()
        try:
            if self.on_close is not None:
                self.on_close(self, reason)
        finally:
            self._done.set()
