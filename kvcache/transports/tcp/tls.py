"""Optional TLS for the control channel and the TCP data lanes, with
Python's ``ssl``.

An SSL object must not be driven by two threads at once, and a link's
channel has a reader and senders working at the same time. So each TLS
connection gets a relay thread that alone owns its SSL socket and moves
bytes between it and one end of a socket pair; the framing path
(``framing.FrameStream``, its scatter/gather system calls and deadlines)
works on the other end unchanged. The relay reads from one side only while
the other has taken what it read before, so its memory stays within one
record each way.

Configuration: a certificate and its key (PEM files) identify this end; a
CA file makes the other end prove a certificate it signed (mutual
authentication when both ends have one). Without a CA an initiator
encrypts but does not verify the listener."""
import logging
import select
import socket
import ssl
import threading
import time

from kvcache.config import env_str
from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

CHUNK = 1 << 16
POLL_S = 0.5


class TlsConfig:
    """Server and client contexts from PEM files; LLM_PARAM_INVALID naming
    the file or setting that is wrong."""

    def __init__(self, cert=None, key=None, ca=None):
        self.cert, self.key, self.ca = cert, key, ca
        if bool(cert) != bool(key):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               "TLS needs a certificate and its key together "
                               f"(cert={cert!r}, key={key!r})")
        try:
            self.server = None
            if cert:
                self.server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
                self.server.minimum_version = ssl.TLSVersion.TLSv1_2
                self.server.load_cert_chain(cert, key)
                self.server.num_tickets = 0           # nothing to send after the handshake
                if ca:
                    self.server.load_verify_locations(ca)
                    self.server.verify_mode = ssl.CERT_REQUIRED
            self.client = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            self.client.minimum_version = ssl.TLSVersion.TLSv1_2
            self.client.check_hostname = False        # peers are named by address
            if ca:
                self.client.load_verify_locations(ca)
                self.client.verify_mode = ssl.CERT_REQUIRED
            else:
                self.client.verify_mode = ssl.CERT_NONE
            if cert:
                self.client.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"TLS configuration (cert={cert!r}, key={key!r}, ca={ca!r}): "
                               f"{exc}") from None

    @classmethod
    def load(cls, cert=None, key=None, ca=None):
        """From the arguments, else KVCACHE_TLS_CERT / KVCACHE_TLS_KEY /
        KVCACHE_TLS_CA; None when no certificate and no CA is configured."""
        cert = cert or env_str("KVCACHE_TLS_CERT") or None
        key = key or env_str("KVCACHE_TLS_KEY") or None
        ca = ca or env_str("KVCACHE_TLS_CA") or None
        if not (cert or key or ca):
            return None
        return cls(cert, key, ca)

    def accept(self, sock, timeout_s):
        """The listener's side of a connection: TLS handshake within
        ``timeout_s``; returns the socket the framing path uses (ssl.SSLError
        or OSError when the handshake fails)."""
        if self.server is None:
            raise ssl.SSLError("this end has no certificate to serve TLS with")
        return _relay(self.server.wrap_socket(sock, server_side=True,
                                              do_handshake_on_connect=False), timeout_s)

    def connect(self, sock, timeout_s):
        """The initiator's side, as ``accept``."""
        return _relay(self.client.wrap_socket(sock, server_side=False,
                                              do_handshake_on_connect=False), timeout_s)


def _relay(tls, timeout_s):
    try:
        _handshake(tls, time.monotonic() + timeout_s)
        inner, outer = socket.socketpair()
    except BaseException:
        tls.close()
        raise
    threading.Thread(target=_pump, args=(tls, outer), name="kv-tls", daemon=True).start()
    return inner


def _handshake(tls, deadline):
    """The TLS handshake by the deadline (time.monotonic()) as a whole, so a
    peer trickling it byte by byte is cut off (TimeoutError)."""
    tls.setblocking(False)
    while True:
        try:
            tls.do_handshake()
            return
        except ssl.SSLWantReadError:
            waits = [tls], []
        except ssl.SSLWantWriteError:
            waits = [], [tls]
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("TLS handshake not finished by its deadline")
        select.select(*waits, [], left)


def _pump(tls, plain):
    """Move bytes between the TLS socket and the plain end until either side
    ends; then both are closed (the other end of the pair sees EOF)."""
    to_peer, to_app = b"", b""
    plain.setblocking(False)
    try:
        while True:
            readers = ([] if to_app else [tls]) + ([] if to_peer else [plain])
            writers = ([tls] if to_peer else []) + ([plain] if to_app else [])
            if not to_app and tls.pending():
                readable, writable = [tls], []
            else:
                readable, writable, _ = select.select(readers, writers, [], POLL_S)
            if tls in readable:
                try:
                    to_app = tls.recv(CHUNK)
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    to_app = b""
                else:
                    if not to_app:
                        return
            if plain in readable:
                to_peer = plain.recv(CHUNK)
                if not to_peer:
                    return
            if tls in writable and to_peer:
                try:
                    to_peer = to_peer[tls.send(to_peer):]
                except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
                    pass
            if plain in writable and to_app:
                to_app = to_app[plain.send(to_app):]
    except (OSError, ValueError) as exc:
        log.debug("TLS relay ended: %s", exc)
    finally:
        for s in (plain, tls):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
