"""Links: the listener, the handshake, admission, the peer table, control
calls and teardown.

Handshake (initiator -> listener): HELLO (who we are, our regions, a nonce)
-> HELLO_ACK (accepted or why not, the listener's regions, its nonce and
proof) -> READY (our proof); all three within one deadline. With a shared
secret (``kvcache.engine.auth``) both proofs are checked and no region table
travels in the handshake: tables are asked for over the link once both sides
proved the secret. A connection whose first frame is not a HELLO is handed
to the transport (data lanes). A link whose connection ends leaves the peer
table: an orderly unlink goes to IDLE, anything else to FAILED, remembered
(bounded) for status queries.

Two engines may each link to the other: the peer table is keyed by (peer
name, direction), so the link we made to a peer and the link it made to us
live side by side; only a second link in the same direction is
LLM_ALREADY_LINK. Roles do not restrict links (PROMPT to PROMPT is as good
as PROMPT to DECODER, as in llm_datadist's cache-manager mode). Looking a
peer up by name or cluster prefers the link we made (see ``_preferred``)."""
import collections
import logging
import socket
import threading
import time

from kvcache.engine import auth
from kvcache.engine.address import format_address, listen_socket, parse_address
from kvcache.engine.link import LinkState
from kvcache.engine.peer import Peer
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.tcp.channel import Channel, ChannelClosed
from kvcache.transports.tcp.framing import FrameStream, StreamClosed, StreamTimeout, left_ms
from kvcache.transports.tcp.protocol import MAX_NOTIFY_BYTES, MsgType, ProtocolError

log = logging.getLogger(__name__)

JOIN_S = 5
KEPT_FAILURES = 256
MAX_HANDSHAKES = 64           # connections in their handshake at once, per listener
MAX_LINKS = 1024              # live links per engine
ACCEPT_BACKOFF_S = 0.05       # first wait after a failed accept (EMFILE, ENFILE)


class Listener:
    """A listening socket and its accept thread; ``close`` shuts the socket
    down (waking accept), joins the thread and the connection threads still
    in their handshake, so the port is free when it returns.
    ``on_connection(sock, addr, hand_over)`` runs in a connection thread;
    ``hand_over()`` says the thread now belongs to a link (a data lane),
    which ends it when the link ends."""

    def __init__(self, address, on_connection):
        host, port = parse_address(address)
        self.sock = listen_socket(host, port)
        self.address = format_address(host, self.sock.getsockname()[1])
        self.port = self.sock.getsockname()[1]
        self._on_connection = on_connection
        self._threads = {}                 # connection thread -> its socket, until handed over
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="kv-accept",
                                        daemon=True)
        self._thread.start()

    def _accept_loop(self):
        failures = 0
        while not self._closed:
            try:
                sock, addr = self.sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                # EMFILE and friends: the listener must outlive a shortage;
                # it backs off (50 ms doubling to 1 s) and logs once per one.
                if not failures:
                    log.warning("accept on %s failed: %s; retrying until it works",
                                self.address, exc)
                time.sleep(min(ACCEPT_BACKOFF_S * 2 ** min(failures, 5), 1.0))
                failures += 1
                continue
            if failures:
                log.warning("accept on %s works again after %d failures", self.address,
                            failures)
                failures = 0
            thread = threading.Thread(target=self._run, args=(sock, addr), daemon=True,
                                      name="kv-connection")
            with self._lock:
                if self._closed:
                    sock.close()
                    return
                if len(self._threads) >= MAX_HANDSHAKES:
                    # Slow or idle connections must not starve real peers;
                    # each handshake also ends at its own deadline.
                    log.warning("%d handshakes in progress on %s: dropped a connection from "
                                "%s", len(self._threads), self.address, addr)
                    sock.close()
                    continue
                self._threads[thread] = sock
            thread.start()

    def _run(self, sock, addr):
        try:
            self._on_connection(sock, addr, self._hand_over)
        finally:
            self._hand_over()

    def _hand_over(self):
        with self._lock:
            self._threads.pop(threading.current_thread(), None)

    def close(self):
        with self._lock:
            if self._closed:
                return
            self._closed = True
            threads = dict(self._threads)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(JOIN_S)
        self.sock.close()
        for thread, sock in threads.items():
            try:
                sock.shutdown(socket.SHUT_RDWR)       # a handshake in progress ends now
            except OSError:
                pass
            if thread is not threading.current_thread():
                thread.join(JOIN_S)


class LinkManager:
    """Owns the listener, every Peer and its channel. ``identity()`` gives
    our HELLO fields; ``rpc``, ``notifications`` and ``transport`` serve
    what peers send."""

    def __init__(self, identity, transport, rpc, notifications, timeout_ms,
                 handshake_timeout_ms, io_timeout_ms, key=None, tls=None):
        self.identity = identity
        self.key = key
        self.tls = tls                      # kvcache.transports.tcp.tls.TlsConfig or None
        self.transport = transport
        self.rpc = rpc
        self.notifications = notifications
        self.timeout_ms = timeout_ms
        self.handshake_timeout_ms = handshake_timeout_ms
        self.io_timeout_ms = io_timeout_ms
        self._lock = threading.RLock()
        self._peers = {}
        self._failures = collections.OrderedDict()     # cluster id -> reason
        self.listener = None
        self.closed = False
        self._closed_hooks = []

    # --- listening ------------------------------------------------------------------

    def start_listening(self, address):
        if self.listener is not None:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"already listening on {self.listener.address}")
        self.listener = Listener(address, self._handshake)
        auth.warn_if_exposed(parse_address(address)[0], self.key)

    def open_listener(self, address):
        """Another listening socket whose connections are handled as the
        main listener's are; the caller closes it."""
        listener = Listener(address, self._handshake)
        auth.warn_if_exposed(parse_address(address)[0], self.key)
        return listener

    def stop_listening(self):
        listener, self.listener = self.listener, None
        if listener is not None:
            listener.close()

    @property
    def address(self):
        return self.listener.address if self.listener is not None else None

    def listen_port(self):
        listener = self.listener
        return listener.port if listener is not None else 0

    # --- the handshake ----------------------------------------------------------------

    def connect(self, address, timeout_ms):
        """The initiator's side: returns the LINKED Peer."""
        host, port = parse_address(address)
        deadline = time.monotonic() + timeout_ms / 1000
        try:
            sock = socket.create_connection((host, port), timeout=timeout_ms / 1000)
        except socket.timeout:
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"connect to {address}: no answer within {timeout_ms} ms") from None
        except OSError as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"connect to {address}: {exc}") from None
        peername = sock.getpeername()
        if self.tls is not None:
            try:
                sock = self.tls.connect(sock, deadline - time.monotonic())
            except OSError as exc:
                raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                   f"TLS with {address}: {exc}") from None
        stream = FrameStream(sock, self.io_timeout_ms)
        hello = self._hello()
        try:
            stream.send_frame(MsgType.HELLO, 0, hello, timeout_ms=left_ms(deadline))
            msg_type, _, ack, payload_len = stream.recv_frame(left_ms(deadline))
            if msg_type != MsgType.HELLO_ACK or payload_len:
                raise ProtocolError(f"expected HELLO_ACK, got {msg_type.name}")
            if ack["status"] != LLMStatusCode.LLM_SUCCESS:
                raise LLMException(_status(ack["status"]),
                                   f"{address} refused the link: {ack['message']}")
            if ack["transport"] != self.transport.name:
                raise ProtocolError(f"peer chose transport {ack['transport']!r}")
            ready = {}
            if self.key is not None:
                sides = (hello["nonce"], ack.get("nonce", ""), hello["name"], ack["name"])
                if not auth.verify(self.key, ack.get("proof"), "listener", *sides):
                    raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                       f"{address} did not prove the shared secret "
                                       "(no auth_key there, or another one)")
                ready["proof"] = auth.proof(self.key, "initiator", *sides)
            with self._lock:
                old = self._peers.get((ack["name"], False))
                if old is not None and old.linked:
                    raise LLMException(LLMStatusCode.LLM_ALREADY_LINK,
                                       f"already linked to {ack['name']}")
            stream.send_frame(MsgType.READY, 0, ready, timeout_ms=left_ms(deadline))
        except StreamTimeout:
            stream.close()
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"handshake with {address} took over {timeout_ms} ms") from None
        except (StreamClosed, ProtocolError) as exc:
            stream.close()
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"handshake with {address}: {exc}") from None
        except LLMException:
            stream.close()
            raise
        return self._add_peer(sock, ack, inbound=False, attach_ms=timeout_ms, peername=peername)

    def _handshake(self, sock, addr, hand_over):
        """The listener's side, in a connection thread. Anything but a
        well-formed HELLO (or a first frame the transport takes) drops the
        connection."""
        deadline = time.monotonic() + self.handshake_timeout_ms / 1000
        stream = None
        try:
            if self.tls is not None:
                sock = self.tls.accept(sock, deadline - time.monotonic())
            stream = FrameStream(sock, self.io_timeout_ms)
            msg_type, _, hello, payload_len = stream.recv_frame(left_ms(deadline))
            if payload_len:
                raise ProtocolError(f"{msg_type.name} with a payload as first frame")
            if msg_type != MsgType.HELLO:
                hand_over()
                self.transport.accept(stream, msg_type, hello)
                return
            status, message = self._admit(hello)
            ack = dict(self._hello(), status=int(status), message=message,
                       transport=self.transport.name)
            del ack["transports"], ack["listen"]
            if self.key is not None:
                sides = (hello.get("nonce", ""), ack["nonce"], hello["name"], ack["name"])
                ack["proof"] = auth.proof(self.key, "listener", *sides)
            stream.send_frame(MsgType.HELLO_ACK, 0, ack, timeout_ms=left_ms(deadline))
            if status != LLMStatusCode.LLM_SUCCESS:
                log.info("refused a link from %s (%s): %s %s", hello.get("name"), addr,
                         status.name, message)
                stream.close()
                return
            msg_type, _, ready, payload_len = stream.recv_frame(left_ms(deadline))
            if msg_type != MsgType.READY or payload_len:
                raise ProtocolError(f"expected READY, got {msg_type.name}")
            if self.key is not None and not auth.verify(self.key, ready.get("proof"),
                                                        "initiator", *sides):
                raise ProtocolError(f"{hello['name']} did not prove the shared secret")
            self._add_peer(sock, hello, inbound=True, attach_ms=self.timeout_ms, peername=addr)
        except (StreamClosed, ProtocolError, LLMException, OSError) as exc:
            log.info("dropped connection from %s: %s", addr, exc)
            (stream or sock).close()
        except Exception:                  # a bug must not leave the socket open
            log.exception("dropped connection from %s", addr)
            (stream or sock).close()

    def _hello(self):
        """Our HELLO fields with a fresh nonce; with a secret, no region table
        (it is asked for over the link, once both sides proved the secret)."""
        hello = dict(self.identity(), nonce=auth.nonce())
        if self.key is not None:
            hello["regions"] = []
        return hello

    def _admit(self, hello):
        if self.closed:
            return LLMStatusCode.LLM_ENGINE_FINALIZED, "engine finalized"
        me = self.identity()
        if hello["name"] == me["name"]:
            return LLMStatusCode.LLM_PARAM_INVALID, "peer uses this engine's own name"
        if self.transport.name not in hello["transports"]:
            return (LLMStatusCode.LLM_PARAM_INVALID,
                    f"no common transport (we have {self.transport.name}, peer "
                    f"{hello['transports']})")
        with self._lock:
            if len(self._peers) >= MAX_LINKS:
                return (LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT,
                        f"{len(self._peers)} links already (at most {MAX_LINKS})")
            for peer in self._peers.values():
                if not peer.linked or not peer.inbound:       # links we made do not count
                    continue
                if peer.name == hello["name"]:
                    return LLMStatusCode.LLM_ALREADY_LINK, f"{peer.name} is already linked"
                if hello["cluster_id"] and peer.cluster_id == hello["cluster_id"]:
                    return (LLMStatusCode.LLM_ALREADY_LINK,
                            f"cluster {peer.cluster_id} is already linked as {peer.name}")
        return LLMStatusCode.LLM_SUCCESS, ""

    def _add_peer(self, sock, info, inbound, attach_ms, peername=None):
        """Make the link live: peer table, channel, the transport's data path
        (set up within ``attach_ms``: RDMA brings QPs up over the channel).
        Any failure on the way fails this link (with a status) and nothing
        else."""
        peer = Peer(info["name"], info["cluster_id"], info["role"], info["regions"], inbound)
        peer.channel = Channel(sock, peer.name, self._serve, self._channel_closed,
                               self.io_timeout_ms)
        peer.channel.peer = peer
        # The peer's (host, port): with TLS the socket is one end of a local pair.
        peer.channel.peer_address = peername or sock.getpeername()
        peer.link.transition(LinkState.CONNECTING)
        with self._lock:
            old = self._peers.get(_key(peer))
            self._peers[_key(peer)] = peer
        if old is not None:
            old.channel.close("replaced by a new link from the same peer")
        peer.link.transition(LinkState.LINKED)
        with self._lock:
            self._failures.pop(peer.cluster_id, None)
        peer.channel.start()
        try:
            # The data path may need the control channel (RDMA QP exchange).
            peer.data = self.transport.attach_peer(peer, attach_ms)
        except Exception as exc:
            code = getattr(exc, "status_code", LLMStatusCode.LLM_LINK_FAILED)
            peer.channel.close(f"data path set-up failed: {exc}")
            raise LLMException(code, f"data path to {peer.name}: {exc}") from None
        finally:
            peer.attached.set()
        if peer.channel.closed:              # ended while being set up: detach what came late
            self.transport.detach_peer(peer)
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"link to {peer.name} ended while being set up: "
                               f"{peer.channel.close_reason}")
        log.info("linked to %s (%s)", peer.name, "inbound" if inbound else "outbound")
        return peer

    # --- serving the peer (reader thread) ---------------------------------------------

    def _serve(self, channel, msg_type, req_id, header, payload_len):
        peer = channel.peer
        if msg_type == MsgType.CALL:
            if payload_len:
                raise ProtocolError("CALL with a payload")
            channel.reply_later(req_id, lambda: self._run_call(peer, header))
        elif msg_type == MsgType.NOTIFY:
            if payload_len > MAX_NOTIFY_BYTES:
                raise ProtocolError(f"a {payload_len}-byte notification (at most "
                                    f"{MAX_NOTIFY_BYTES})")
            refused = self.notifications.add(peer.name, header["name"],
                                             channel.recv_bytes(payload_len))
            reply = ({"status": 0, "message": ""} if refused is None else
                     {"status": int(LLMStatusCode.LLM_OUT_OF_MEMORY), "message": refused})
            channel.reply_later(req_id, lambda: (reply, None))
        elif msg_type == MsgType.BYE:
            peer.closing_by_peer = True
            if peer.link.state == LinkState.LINKED:
                peer.link.transition(LinkState.UNLINKING)
            channel.reply_later(req_id, lambda: ({"status": 0, "message": ""}, None))
        else:
            self.transport.serve(channel, msg_type, req_id, header, payload_len)

    def _run_call(self, peer, header):
        result = self.rpc.dispatch(peer, header["method"], header["params"])
        return {"status": 0, "message": "", "result": result}, None

    # --- calls -----------------------------------------------------------------------

    def call(self, peer, method, params, timeout_ms=None):
        """A control call to the peer's handler; returns its result dict."""
        peer.link.require_linked()
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        try:
            reply = peer.channel.call(MsgType.CALL, {"method": method, "params": params},
                                      timeout_ms=timeout)
        except ChannelClosed as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"link to {peer.name} failed: {exc}") from None
        except (ProtocolError, TypeError, ValueError) as exc:   # params that are no frame
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"call {method!r}: parameters cannot be sent: {exc}") from None
        if reply["status"] != LLMStatusCode.LLM_SUCCESS:
            raise LLMException(_status(reply["status"]), reply["message"])
        result = reply.get("result")
        if not isinstance(result, dict):
            raise LLMException(LLMStatusCode.LLM_FAILED, f"{peer.name} sent a malformed reply")
        return result

    def notify(self, peer, name, message, timeout_ms=None):
        peer.link.require_linked()
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        buffer = memoryview(message).cast("B")
        try:
            reply = peer.channel.call(MsgType.NOTIFY, {"name": name}, timeout_ms=timeout,
                                      prefix=(buffer,) if buffer.nbytes else ())
        except ChannelClosed as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"link to {peer.name} failed: {exc}") from None
        if reply["status"] != LLMStatusCode.LLM_SUCCESS:
            raise LLMException(_status(reply["status"]), reply["message"])

    # --- the peer table ----------------------------------------------------------------

    def peers(self):
        with self._lock:
            return list(self._peers.values())

    def peer(self, name_or_peer):
        """The Peer by name (``_preferred`` of its links), or the Peer itself."""
        if isinstance(name_or_peer, Peer):
            return name_or_peer
        with self._lock:
            peer = _preferred(p for p in self._peers.values() if p.name == name_or_peer)
        if peer is None:
            raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK, f"no link to {name_or_peer!r}")
        return peer

    def find_peer(self, cluster_id, inbound=None):
        """The ``_preferred`` Peer of a cluster id (of one direction when
        ``inbound`` is True/False), or None."""
        with self._lock:
            return _preferred(p for p in self._peers.values() if p.cluster_id == cluster_id
                              and (inbound is None or p.inbound == inbound))

    def forget_failure(self, cluster_id):
        """The user unlinked a cluster whose link already failed: its status
        is IDLE from now on."""
        with self._lock:
            self._failures.pop(cluster_id, None)

    def failure(self, cluster_id):
        """Why the last link to ``cluster_id`` failed, if it did and no link
        to it has been made since; else None."""
        with self._lock:
            return self._failures.get(cluster_id)

    # --- teardown -----------------------------------------------------------------------

    def disconnect(self, peer, force=False, timeout_ms=None, notify=True):
        """Unlink: tell the peer (when the link is healthy and ``notify``),
        close, forget. LLM_LINK_BUSY while transfers run, unless ``force``,
        which aborts them."""
        tell = peer.link.begin_unlink(force) and notify
        if peer.link.in_flight:
            tell = False              # forced while busy: the peer sees the connection drop
        try:
            if tell:
                peer.channel.call(MsgType.BYE, {}, timeout_ms=timeout_ms or self.timeout_ms)
        except (ChannelClosed, LLMException) as exc:
            log.info("unlink notice to %s not delivered: %s", peer.name, exc)
        finally:
            if peer.state == LinkState.FAILED:
                peer.link.transition(LinkState.IDLE, "unlinked")
            peer.channel.close("unlinked")

    def on_link_closed(self, hook):
        """Call ``hook(peer)`` once each link has ended (after the peer
        table forgot it), in whichever thread closed it: a layer above
        drops what it keeps per link there."""
        self._closed_hooks.append(hook)

    def _channel_closed(self, channel, reason):
        """The link's connection ended (any thread): the state first (a
        transfer waiting on the data path watches it), then the data path,
        then the table."""
        peer = channel.peer
        if peer is None:
            return
        orderly = peer.closing_by_peer or peer.state in (LinkState.UNLINKING, LinkState.IDLE)
        if orderly:
            if peer.state != LinkState.IDLE:
                peer.link.transition(LinkState.IDLE, "unlinked")
            log.info("link to %s closed: %s", peer.name, reason)
        else:
            peer.link.fail(reason)
            log.warning("link to %s failed: %s", peer.name, reason)
        try:
            self.transport.detach_peer(peer)
        except Exception:
            log.exception("releasing the data path to %s", peer.name)
        with self._lock:
            if self._peers.get(_key(peer)) is peer:
                del self._peers[_key(peer)]
            if orderly:
                self._failures.pop(peer.cluster_id, None)
            else:
                self._failures[peer.cluster_id] = reason
                while len(self._failures) > KEPT_FAILURES:
                    self._failures.popitem(last=False)
        for hook in self._closed_hooks:
            try:
                hook(peer)
            except Exception:
                log.exception("dropping what was kept for the link to %s", peer.name)

    def close(self):
        """Refuse new links, close every link (forced), stop listening."""
        self.closed = True
        for peer in self.peers():
            try:
                self.disconnect(peer, force=True, timeout_ms=1000)
            except LLMException:
                peer.channel.close("engine closed")
        self.stop_listening()


def _key(peer):
    return peer.name, peer.inbound


def _preferred(peers):
    """Of several links to one peer (or cluster): a LINKED one before any
    other, and the link we made (outbound) before the one the peer made; the
    newest of equals. None when there is none."""
    ranked = sorted(enumerate(peers), key=lambda item: (item[1].state == LinkState.LINKED,
                                                        not item[1].inbound, item[0]))
    return ranked[-1][1] if ranked else None


def _status(code):
    """A status code from a peer, as an LLMStatusCode (unknown: LLM_FAILED)."""
    try:
        return LLMStatusCode(code)
    except ValueError:
        return LLMStatusCode.LLM_FAILED
