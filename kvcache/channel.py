"""A framed, bidirectional connection between two engines.

One reader thread reads every frame: replies wake the caller waiting on
them (their payload received straight into the caller's memory first);
requests go to the engine's handler. The reader never sends, so two peers
streaming to each other cannot deadlock: replies that need sending are
queued to a responder thread. Callers send their requests directly."""
import itertools
import logging
import queue
import socket
import threading

import numpy as np

from kvcache.protocol import FRAME, MsgType, ProtocolError, decode_frame, decode_header, encode
from kvcache.status import LLMException, LLMStatusCode
from pyverbs_kv import sgio
from pyverbs_kv.pieces import length_total

log = logging.getLogger("kvcache.channel")

IDLE_POLL_S = 0.5          # how often an idle reader checks for close


class ChannelClosed(Exception):
    pass


class _Pending:
    __slots__ = ("event", "reply_into", "header", "error")

    def __init__(self, reply_into):
        self.event = threading.Event()
        self.reply_into = reply_into
        self.header = None
        self.error = None


class FrameStream:
    """Framing and payload reads shared by the control channel and data
    lanes (needs ``fd`` and ``io_timeout_ms``)."""
    NO_PIECES = np.empty(0, dtype=np.uint64)

    def _frame(self, msg_type, req_id, header, pieces, prefix):
        """What ``sgio.send_pieces`` writes for one frame: (addrs, lengths,
        buffers before them: the encoded header, then ``prefix``)."""
        addrs, lengths = pieces if pieces is not None else (self.NO_PIECES, self.NO_PIECES)
        payload = length_total(lengths)[0] + sum(memoryview(b).nbytes for b in prefix)
        return addrs, lengths, (encode(msg_type, req_id, header, payload),) + tuple(prefix)

    def recv_payload(self, addrs, lengths, timeout_ms=None):
        """Receive payload bytes straight into memory."""
        timeout = self.io_timeout_ms if timeout_ms is None else timeout_ms
        try:
            sgio.recv_pieces(self.fd, addrs, lengths, timeout)
        except (OSError, TimeoutError, ConnectionError) as exc:
            raise ChannelClosed(f"payload receive failed: {exc}") from None

    def discard(self, size):
        """Read and drop ``size`` payload bytes (a rejected request's data)."""
        scratch = np.empty(min(size, 1 << 20) or 1, dtype=np.uint8)
        while size:
            chunk = min(size, scratch.size)
            self.recv_payload([scratch.ctypes.data], [chunk])
            size -= chunk


class Channel(FrameStream):
    """``handler(channel, msg_type, req_id, header, payload_len)`` serves
    requests from the peer in the reader thread and must consume exactly
    ``payload_len`` bytes (``recv_payload`` / ``discard``). ``io_timeout_ms``
    bounds every frame once it has started."""

    def __init__(self, sock, name, handler, on_close, io_timeout_ms=30_000):
        self.sock = sock
        self.name = name
        self.handler = handler
        self.on_close = on_close
        self.io_timeout_ms = io_timeout_ms
        sock.settimeout(IDLE_POLL_S)            # non-blocking fd; our waits use poll()
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.fd = sock.fileno()
        self._send_lock = threading.RLock()    # close() may run inside send()
        self._pending = {}
        self._pending_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._replies = queue.SimpleQueue()
        self._closed = threading.Event()
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
        """One frame: header, then the payload: the contiguous buffers in
        ``prefix`` (e.g. descriptor columns), then the bytes gathered from
        ``pieces`` (addresses, lengths). The whole frame goes out under one
        lock, in writev calls straight from memory."""
        addrs, lengths, buffers = self._frame(msg_type, req_id, header, pieces, prefix)
        timeout = self.io_timeout_ms if timeout_ms is None else timeout_ms
        with self._send_lock:
            if self.closed:
                raise ChannelClosed(self.close_reason)
            try:
                sgio.send_pieces(self.fd, addrs, lengths, timeout, buffers)
            except (OSError, TimeoutError) as exc:
                # A frame cut in the middle leaves the stream unusable.
                self.close(f"send failed: {exc}")
                raise ChannelClosed(self.close_reason) from None

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
        except ChannelClosed:
            with self._pending_lock:
                self._pending.pop(req_id, None)
            raise
        if not pending.event.wait(timeout / 1000):
            self.close(f"no reply to {msg_type.name} within {timeout} ms")
            self._reader.join(5)
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"{msg_type.name} to {self.name}: no reply within {timeout} ms")
        if pending.error is not None:
            raise ChannelClosed(pending.error)
        return pending.header

    def reply_later(self, req_id, produce, after=None):
        """Queue a reply: ``produce()`` runs in the responder thread and returns
        (header, pieces or None); ``after()`` runs once it was sent (or not)."""
        self._replies.put((req_id, produce, after))

    # --- receiving (reader thread) ----------------------------------------------

    def _recv_exact(self, size, first_wait_forever=False):
        buf = bytearray(size)
        view = memoryview(buf)
        got = 0
        while got < size:
            try:
                n = self.sock.recv_into(view[got:])
            except socket.timeout:
                if self.closed:
                    raise ChannelClosed(self.close_reason) from None
                if got == 0 and first_wait_forever:
                    continue
                raise ChannelClosed("peer stalled in the middle of a frame") from None
            except OSError as exc:
                raise ChannelClosed(f"receive failed: {exc}") from None
            if n == 0:
                raise ChannelClosed("peer closed the connection")
            got += n
            first_wait_forever = False
        return bytes(buf)

    def recv_bytes(self, size):
        return self._recv_exact(size) if size else b""

    def _read_loop(self):
        reason = "reader stopped"
        try:
            while not self.closed:
                raw = self._recv_exact(FRAME.size, first_wait_forever=True)
                msg_type, req_id, header_len, payload_len = decode_frame(raw)
                header = decode_header(msg_type, self._recv_exact(header_len))
                if msg_type == MsgType.REPLY:
                    self._take_reply(req_id, header, payload_len)
                else:
                    self.handler(self, msg_type, req_id, header, payload_len)
        except ChannelClosed as exc:
            reason = str(exc)
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
                return
            req_id, produce, after = item
            try:
                if self.closed:
                    continue        # nobody to answer; still run ``after``
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
            finally:
                if after is not None:
                    after()

    # --- closing --------------------------------------------------------------

    def close(self, reason="closed"):
        with self._pending_lock:
            if self._closed.is_set():
                return
            self.close_reason = reason
            self._closed.set()
            pending, self._pending = self._pending, {}
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        for p in pending.values():
            p.error = reason
            p.event.set()
        self._replies.put(None)
        if threading.current_thread() is not self._reader and self._reader.is_alive():
            self._reader.join(5)
        # Only now, with the reader gone, can the descriptor be released.
        with self._send_lock:
            self.sock.close()
        if self.on_close is not None:
            self.on_close(self, reason)
