"""Frames on a TCP connection: the one framing path the handshake, the
control channel and the data lanes all use.

A frame is the fixed header of ``protocol.FRAME``, a JSON header and a
binary payload. Sends gather the header, contiguous prefix buffers
(descriptor columns) and pieces of registered memory in writev calls;
receives read a frame head within one deadline and payloads straight into
memory. The socket is non-blocking; every wait is a poll() with a deadline,
with the GIL released (``pyverbs_kv.sgio``)."""
import socket
import time

import numpy as np

from kvcache.transports.tcp.protocol import FRAME, decode_frame, decode_header, encode
from pyverbs_kv import sgio
from pyverbs_kv.pieces import length_total


class StreamClosed(Exception):
    """The connection is unusable: closed by either side, broken, or cut in
    the middle of a frame."""


class StreamTimeout(StreamClosed):
    """The other end did not send or take a frame within the deadline."""


NO_PIECES = np.empty(0, dtype=np.uint64)


def left_ms(deadline):
    """Milliseconds left until ``deadline`` (time.monotonic()); StreamTimeout
    once it has passed."""
    left = int((deadline - time.monotonic()) * 1000)
    if left <= 0:
        raise StreamTimeout("the deadline passed")
    return left


class FrameStream:
    """One TCP connection carrying frames. Not locked: the channel adds a
    send lock; a lane has one user at a time."""

    def __init__(self, sock, io_timeout_ms):
        sock.setblocking(False)
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock = sock
        self.fd = sock.fileno()
        self.io_timeout_ms = io_timeout_ms

    def send_frame(self, msg_type, req_id, header, pieces=None, timeout_ms=None, prefix=()):
        """Header, then the ``prefix`` buffers, then the bytes of ``pieces``
        (addresses, lengths), within ``timeout_ms`` (default io_timeout_ms)."""
        addrs, lengths = pieces if pieces is not None else (NO_PIECES, NO_PIECES)
        payload = length_total(lengths)[0] + sum(memoryview(b).nbytes for b in prefix)
        buffers = (encode(msg_type, req_id, header, payload),) + tuple(prefix)
        timeout = self.io_timeout_ms if timeout_ms is None else timeout_ms
        try:
            sgio.send_pieces(self.fd, addrs, lengths, max(1, int(timeout)), buffers)
        except TimeoutError as exc:
            raise StreamTimeout(f"send: {exc}") from None
        except OSError as exc:
            raise StreamClosed(f"send failed: {exc}") from None

    def recv_frame(self, timeout_ms=None):
        """(msg_type, req_id, header, payload_len) of the next frame, its
        head and JSON header read within one deadline. ProtocolError for
        anything that is not a frame of this protocol."""
        timeout = max(1, int(self.io_timeout_ms if timeout_ms is None else timeout_ms))
        try:
            msg_type, req_id, header_len, payload_len = decode_frame(
                sgio.recv_exact(self.fd, FRAME.size, timeout))
            header = decode_header(msg_type, sgio.recv_exact(self.fd, header_len, timeout))
        except TimeoutError as exc:
            raise StreamTimeout(f"recv: {exc}") from None
        except OSError as exc:
            raise StreamClosed(f"receive failed: {exc}") from None
        return msg_type, req_id, header, payload_len

    def recv_bytes(self, size, timeout_ms=None):
        """Exactly ``size`` payload bytes."""
        timeout = self.io_timeout_ms if timeout_ms is None else timeout_ms
        try:
            return sgio.recv_exact(self.fd, size, max(1, int(timeout)))
        except TimeoutError as exc:
            raise StreamTimeout(f"recv: {exc}") from None
        except OSError as exc:
            raise StreamClosed(f"receive failed: {exc}") from None

    def recv_payload(self, addrs, lengths, timeout_ms=None):
        """Payload bytes straight into memory (addresses, lengths)."""
        timeout = self.io_timeout_ms if timeout_ms is None else timeout_ms
        try:
            sgio.recv_pieces(self.fd, addrs, lengths, max(1, int(timeout)))
        except TimeoutError as exc:
            raise StreamTimeout(f"payload receive: {exc}") from None
        except OSError as exc:
            raise StreamClosed(f"payload receive failed: {exc}") from None

    def discard(self, size):
        """Read and drop ``size`` payload bytes (a refused request's data)."""
        scratch = np.empty(min(size, 1 << 20) or 1, dtype=np.uint8)
        while size:
            chunk = min(size, scratch.size)
            self.recv_payload([scratch.ctypes.data], [chunk])
            size -= chunk

    def wait_readable(self, timeout_ms):
        try:
            return sgio.wait_readable(self.fd, int(timeout_ms))
        except OSError as exc:
            raise StreamClosed(f"poll failed: {exc}") from None

    def shutdown(self):
        """Wake whoever blocks on the connection; any thread may call it."""
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self):
        self.shutdown()
        self.sock.close()
