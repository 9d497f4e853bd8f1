"""TransferEngine: the one-sided layer (after HIXL / Mooncake / NIXL).

Register memory once; link to peers over a versioned TCP control protocol
(HELLO with our regions -> HELLO_ACK with theirs -> READY); then read and
write numpy descriptor arrays between our registered memory and theirs.
Every piece is checked against registered memory on both sides before a
byte moves; every wait has a deadline; a dead, restarted or lying peer fails
its own link and nothing else.

    engine = TransferEngine("prefill-0", listen="127.0.0.1:26000")
    region = engine.register_memory(addr, length)
    peer = engine.connect("127.0.0.1:26001", timeout_ms=3000)
    engine.transfer_sync(peer, "write", local_addrs, remote_addrs, lengths)
"""
import base64
import itertools
import logging
import os
import secrets
import socket
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvcache.channel import Channel, ChannelClosed
from kvcache.descriptors import NO_REGION, RegionTable, as_descriptor_arrays, merge_runs
from kvcache.lane import IDLE_POLL_MS, Lane
from kvcache.link import Link, LinkState
from kvcache.protocol import (DESC_BYTES, FRAME, MsgType, ProtocolError,
                              check_descriptor_payload, decode_frame, decode_header,
                              descriptor_columns, encode)
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.tcp import TcpTransport
from pyverbs_kv.pieces import length_total

log = logging.getLogger("kvcache.engine")
if os.environ.get("KVCACHE_DEBUG"):
    logging.basicConfig(level=logging.DEBUG)

_OK = {"status": 0, "message": ""}


def _distinct(values):
    """Distinct values of a uint64 array as ints; one region (the usual case)
    without sorting."""
    first = values[0]
    if (values == first).all():
        return [int(first)]
    return np.unique(values).tolist()


def _check_host_mapped(addr, length):
    """LLM_PARAM_INVALID unless [addr, addr + length) is host memory mapped
    readable and writable here: a device pointer, a freed buffer or a wrong
    address would otherwise crash the process at the first copy into it."""
    end, covered = addr + length, addr
    with open("/proc/self/maps") as maps:        # sorted by address
        for line in maps:
            span, perms = line.split(None, 2)[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi <= covered:
                continue
            if lo > covered or perms[:2] != "rw":
                break
            covered = hi
            if covered >= end:
                return
    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                       f"[{addr:#x}, +{length}) is not host memory mapped readable and "
                       f"writable in this process (from {covered:#x} on); device memory "
                       "cannot be registered")


def _tcp_transport(device_id):
    return TcpTransport()


def _shm_transport(device_id):
    from kvcache.transports.shm import ShmTransport
    return ShmTransport()


def _rdma_transport(device_id):
    from kvcache.transports.rdma import RdmaTransport
    return RdmaTransport(device_id)


# Transport name -> factory(local device id). RDMA loads pyverbs_kv's verbs
# only when chosen.
TRANSPORTS = {"tcp": _tcp_transport, "shm": _shm_transport, "rdma": _rdma_transport}


def parse_address(text):
    """("ip", port) from "ip:port"."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"address {text!r} is not 'ip:port'")
    return host.strip("[]"), int(port)


def _roles_compatible(a, b):
    return a == "mix" or b == "mix" or a != b


class Peer:
    """A linked engine. ``regions`` is our copy of its memory table."""

    def __init__(self, name, cluster_id, role, channel, regions, inbound):
        self.name = name
        self.cluster_id = cluster_id
        self.role = role
        self.channel = channel
        self.regions = RegionTable(regions)
        self.inbound = inbound
        self.link = Link(name)
        self.closing_by_peer = False
        # For layers above the engine to keep per-link state (the cache
        # manager's lookups); it dies with the link.
        self.attachments = {}

    @property
    def state(self):
        return self.link.state

    def __repr__(self):
        return f"Peer({self.name!r}, cluster {self.cluster_id}, {self.link.state.name})"


class TransferRequest:
    """An asynchronous transfer (transfer_async)."""

    def __init__(self, future):
        self._future = future

    def status(self):
        """'pending', 'done' or 'failed'."""
        if not self._future.done():
            return "pending"
        return "failed" if self._future.exception() is not None else "done"

    def wait(self, timeout_ms=None):
        """Block until finished; re-raises the transfer's LLMException."""
        from concurrent.futures import TimeoutError as FutureTimeout
        try:
            return self._future.result(None if timeout_ms is None else timeout_ms / 1000)
        except FutureTimeout:
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"transfer not finished within {timeout_ms} ms") from None


class TransferEngine:
    def __init__(self, name=None, *, listen="127.0.0.1:0", cluster_id=0, role="mix",
                 transport="tcp", timeout_ms=5000, handshake_timeout_ms=5000,
                 io_timeout_ms=30_000, device_id=0):
        if transport not in TRANSPORTS:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"transport {transport!r} not available here; have "
                               f"{sorted(TRANSPORTS)}")
        self.cluster_id = int(cluster_id)
        self.role = role
        self.timeout_ms = timeout_ms
        self.handshake_timeout_ms = handshake_timeout_ms
        self.io_timeout_ms = io_timeout_ms
        self.transport = TRANSPORTS[transport](int(device_id))
        self._lock = threading.RLock()
        self._regions = {}                       # id -> (addr, length, parent, addressable)
        self._table = RegionTable()
        self._busy = {}                          # region id -> transfers touching it
        self._busy_cond = threading.Condition(self._lock)
        self._region_ids = itertools.count(1)
        self._peers = {}
        self._handlers = {"engine.regions": self._rpc_regions,
                          "engine.notify": self._rpc_notify,
                          "engine.lane": self._rpc_lane}
        self._lane_tokens = {}                   # one-time token -> Peer
        bind = getattr(self.transport, "bind", None)
        if bind is not None:
            bind(self)             # the transport's own control calls
        self._notifications = deque()
        self._pool = None
        self._closed = False
        self._listener = None
        self.address = None
        if listen:
            self.start_listening(listen)
        self.name = name or f"engine-{os.getpid()}-{self.address or id(self)}"

    def start_listening(self, address):
        """Accept links at ``address`` ("ip:port"; port 0 picks one, see
        ``self.address``)."""
        if self._listener is not None:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"already listening on {self.address}")
        host, port = parse_address(address)
        try:
            listener = socket.create_server((host, port), backlog=64)
        except OSError as exc:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"cannot listen on {address}: {exc}") from None
        self._listener = listener
        self.address = f"{host}:{listener.getsockname()[1]}"
        threading.Thread(target=self._accept_loop, args=(listener,), name="kv-accept",
                         daemon=True).start()

    def stop_listening(self):
        """Stop accepting links (existing links stay)."""
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            self.address = None

    # --- memory ------------------------------------------------------------------

    def register_memory(self, addr, length, *, parent=None, addressable=True, share=None):
        """Make [addr, addr + length) reachable by peers; returns its region id.

        ``parent``: a logical sub-region of a registered region (a cache
        inside the buffer pool): it gets its own id, so a peer holding a
        stale description of a freed cache is refused, while the transport
        keeps using the parent's registration. ``addressable=False``: a
        container that only its sub-regions expose. ``share``: (fd, offset)
        of a mapping of this memory that a peer on this host may map (the
        shared-memory transport). Addressable regions never overlap."""
        addr, length = int(addr), int(length)
        if addr <= 0 or length <= 0:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"cannot register addr={addr:#x} length={length}")
        if parent is None:
            _check_host_mapped(addr, length)
        with self._lock:
            if parent is not None:
                if parent not in self._regions or self._regions[parent][2] is not None:
                    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                       f"parent region {parent} is not a registered top-level "
                                       "region")
                p_addr, p_len = self._regions[parent][:2]
                if addr < p_addr or addr + length > p_addr + p_len:
                    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                       f"[{addr:#x}, +{length}) is not inside region {parent}")
            region_id = next(self._region_ids)
            regions = dict(self._regions)
            regions[region_id] = (addr, length, parent, addressable)
            table = _table_of(regions)              # refuses overlaps
            if parent is None:
                self.transport.register_region(region_id, addr, length, share=share)
            self._regions, self._table = regions, table
        return region_id

    def unregister_memory(self, region_id, timeout_ms=None):
        """Withdraw a region (and its sub-regions). Waits for transfers
        touching it to finish."""
        timeout = (self.timeout_ms if timeout_ms is None else timeout_ms) / 1000
        with self._lock:
            if region_id not in self._regions:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"region {region_id} is not registered")
            gone = {region_id} | {i for i, r in self._regions.items() if r[2] == region_id}
            top_level = self._regions[region_id][2] is None
            self._regions = {i: r for i, r in self._regions.items() if i not in gone}
            self._table = _table_of(self._regions)
            if not self._busy_cond.wait_for(lambda: not any(self._busy.get(i) for i in gone),
                                            timeout):
                raise LLMException(LLMStatusCode.LLM_LINK_BUSY,
                                   f"region {region_id} still in use after {timeout} s")
            if top_level:
                self.transport.unregister_region(region_id)

    def regions(self):
        """[(region_id, addr, length)] of our registered memory."""
        return self._table.as_list()

    def _pin(self, ids):
        with self._lock:
            for i in ids:
                self._busy[i] = self._busy.get(i, 0) + 1

    def _unpin(self, ids):
        with self._lock:
            for i in ids:
                self._busy[i] -= 1
                if not self._busy[i]:
                    del self._busy[i]
            self._busy_cond.notify_all()

    # --- links -------------------------------------------------------------------

    def _hello(self):
        return {"name": self.name, "cluster_id": self.cluster_id, "role": self.role,
                "regions": [list(r) for r in self.regions()],
                "transports": [self.transport.name], "listen": self.address or ""}

    def connect(self, address, timeout_ms=None):
        """Link to the engine listening at ``address`` ("ip:port"). Returns the
        Peer. LLM_LINK_FAILED / LLM_TIMEOUT / the peer's refusal code."""
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        host, port = parse_address(address)
        try:
            sock = socket.create_connection((host, port), timeout=timeout / 1000)
        except OSError as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"connect to {address}: {exc}") from None
        try:
            sock.settimeout(timeout / 1000)
            sock.sendall(encode(MsgType.HELLO, 0, self._hello()))
            msg_type, _, header_len, payload_len = decode_frame(_recv_exact(sock, FRAME.size))
            if msg_type != MsgType.HELLO_ACK or payload_len:
                raise ProtocolError(f"expected HELLO_ACK, got {msg_type.name}")
            ack = decode_header(msg_type, _recv_exact(sock, header_len))
            if ack["status"] != LLMStatusCode.LLM_SUCCESS:
                raise LLMException(ack["status"], f"{address} refused the link: {ack['message']}")
            if ack["transport"] != self.transport.name:
                raise ProtocolError(f"peer chose transport {ack['transport']!r}")
            with self._lock:
                old = self._peers.get(ack["name"])
                if old is not None and old.state == LinkState.LINKED:
                    raise LLMException(LLMStatusCode.LLM_ALREADY_LINK,
                                       f"already linked to {ack['name']}")
            sock.sendall(encode(MsgType.READY, 0, {}))
        except socket.timeout:
            sock.close()
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"handshake with {address} took over {timeout} ms") from None
        except (OSError, ProtocolError, ConnectionError) as exc:
            sock.close()
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"handshake with {address}: {exc}") from None
        except LLMException:
            sock.close()
            raise
        peer = self._add_peer(sock, ack, inbound=False)
        # The peer marks the link LINKED once it has read READY. One round trip
        # makes sure it has, so it can use the link as soon as we return (a
        # prompt pushing to the decoder that just linked to it).
        try:
            self.refresh_regions(peer, timeout)
        except LLMException as exc:
            self.disconnect(peer, force=True)
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{address} did not confirm the link: {exc}") from None
        return peer

    def _add_peer(self, sock, info, inbound):
        peer = Peer(info["name"], info["cluster_id"], info["role"], None, info["regions"],
                    inbound)
        peer.channel = Channel(sock, peer.name, self._serve, self._channel_closed,
                               self.io_timeout_ms)
        peer.channel.peer = peer
        peer.link.transition(LinkState.CONNECTING)
        with self._lock:
            old = self._peers.get(peer.name)
            self._peers[peer.name] = peer
        if old is not None:
            old.channel.close("replaced by a new link from the same peer")
        peer.link.transition(LinkState.LINKED)
        peer.channel.start()
        try:
            # The data path may need the control channel (RDMA QP exchange).
            self.transport.attach_peer(peer, self.timeout_ms)
        except (LLMException, ChannelClosed) as exc:
            peer.link.fail(str(exc))
            peer.channel.close(str(exc))
            raise LLMException(getattr(exc, "status_code", LLMStatusCode.LLM_LINK_FAILED),
                               f"data path to {peer.name}: {exc}") from None
        log.info("%s: linked to %s (%s)", self.name, peer.name,
                 "inbound" if inbound else "outbound")
        return peer

    def _accept_loop(self, listener):
        while not self._closed:
            try:
                sock, addr = listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handshake, args=(sock, addr), daemon=True,
                             name="kv-handshake").start()

    def _handshake(self, sock, addr):
        """Listener side. Anything but a well-formed HELLO, or LANE with a
        token we granted, drops the connection."""
        try:
            sock.settimeout(self.handshake_timeout_ms / 1000)
            msg_type, _, header_len, payload_len = decode_frame(_recv_exact(sock, FRAME.size))
            if msg_type not in (MsgType.HELLO, MsgType.LANE) or payload_len:
                raise ProtocolError(f"expected HELLO, got {msg_type.name}")
            hello = decode_header(msg_type, _recv_exact(sock, header_len))
            if msg_type == MsgType.LANE:
                self._serve_lane(sock, hello)
                return
            status, message = self._admit(hello)
            ack = {"status": int(status), "message": message, "name": self.name,
                   "cluster_id": self.cluster_id, "role": self.role,
                   "regions": [list(r) for r in self.regions()],
                   "transport": self.transport.name}
            sock.sendall(encode(MsgType.HELLO_ACK, 0, ack))
            if status != LLMStatusCode.LLM_SUCCESS:
                sock.close()
                return
            msg_type, _, header_len, payload_len = decode_frame(_recv_exact(sock, FRAME.size))
            if msg_type != MsgType.READY or payload_len:
                raise ProtocolError(f"expected READY, got {msg_type.name}")
            decode_header(msg_type, _recv_exact(sock, header_len))
            self._add_peer(sock, hello, inbound=True)
        except (OSError, ProtocolError, ConnectionError, socket.timeout, LLMException) as exc:
            log.info("%s: dropped connection from %s: %s", self.name, addr, exc)
            sock.close()

    def _admit(self, hello):
        if self._closed:
            return LLMStatusCode.LLM_ENGINE_FINALIZED, "engine finalized"
        if hello["name"] == self.name:
            return LLMStatusCode.LLM_PARAM_INVALID, "peer uses this engine's own name"
        if self.transport.name not in hello["transports"]:
            return (LLMStatusCode.LLM_PARAM_INVALID,
                    f"no common transport (we have {self.transport.name}, peer "
                    f"{hello['transports']})")
        if not _roles_compatible(self.role, hello["role"]):
            return (LLMStatusCode.LLM_PARAM_INVALID,
                    f"role {hello['role']} cannot link to role {self.role}")
        with self._lock:
            for peer in self._peers.values():
                if peer.state != LinkState.LINKED:
                    continue
                if peer.name == hello["name"] and not peer.channel.closed:
                    return LLMStatusCode.LLM_ALREADY_LINK, f"{peer.name} is already linked"
                if hello["cluster_id"] and peer.cluster_id == hello["cluster_id"]:
                    return (LLMStatusCode.LLM_ALREADY_LINK,
                            f"cluster {peer.cluster_id} is already linked as {peer.name}")
        return LLMStatusCode.LLM_SUCCESS, ""

    def _channel_closed(self, channel, reason):
        peer = getattr(channel, "peer", None)
        if peer is None:
            return
        # The state first: a transfer waiting on the data path watches it,
        # and detaching the data path waits for that transfer.
        if peer.closing_by_peer or peer.state == LinkState.UNLINKING:
            peer.link.transition(LinkState.IDLE, "unlinked")
            with self._lock:
                if self._peers.get(peer.name) is peer:
                    del self._peers[peer.name]
        else:
            peer.link.fail(reason)
            log.warning("%s: link to %s failed: %s", self.name, peer.name, reason)
        with self._lock:
            self._lane_tokens = {t: p for t, p in self._lane_tokens.items() if p is not peer}
            served = list(peer.attachments.get("lanes.served", ()))
        for lane in served:
            lane.shutdown()            # its thread closes it
        self.transport.detach_peer(peer)

    def peers(self):
        with self._lock:
            return list(self._peers.values())

    def peer(self, name_or_peer):
        """The Peer by name (or the Peer itself); LLM_NOT_YET_LINK if unknown."""
        if isinstance(name_or_peer, Peer):
            return name_or_peer
        with self._lock:
            peer = self._peers.get(name_or_peer)
        if peer is None:
            raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK, f"no link to {name_or_peer!r}")
        return peer

    def find_peer(self, cluster_id):
        """The most recent Peer of a cluster id, or None."""
        with self._lock:
            found = [p for p in self._peers.values() if p.cluster_id == cluster_id]
        linked = [p for p in found if p.state == LinkState.LINKED]
        return (linked or found or [None])[-1]

    def disconnect(self, peer, force=False, timeout_ms=None):
        """Unlink: tell the peer (when the link is healthy), close, forget.
        LLM_LINK_BUSY while transfers run, unless ``force``, which aborts them."""
        peer = self.peer(peer)
        tell = peer.link.begin_unlink(force)
        if peer.link.in_flight:
            # Forced while busy: abort what is in flight (it fails with
            # LLM_LINK_FAILED); the peer sees the connection drop.
            tell = False
        if tell:
            try:
                peer.channel.call(MsgType.BYE, {}, timeout_ms=timeout_ms or self.timeout_ms)
            except (ChannelClosed, LLMException) as exc:
                log.info("%s: unlink notice to %s not delivered: %s", self.name, peer.name, exc)
        if peer.state == LinkState.FAILED:
            peer.link.transition(LinkState.IDLE, "unlinked")
        peer.channel.close("unlinked")
        self.transport.detach_peer(peer)
        with self._lock:
            if self._peers.get(peer.name) is peer:
                del self._peers[peer.name]

    # --- serving the peer (reader thread) ---------------------------------------

    def _serve(self, channel, msg_type, req_id, header, payload_len):
        peer = channel.peer
        if msg_type in (MsgType.WRITE, MsgType.READ):
            self._serve_data(channel, msg_type, req_id, header, payload_len)
        elif msg_type == MsgType.CALL:
            if payload_len:
                raise ProtocolError("CALL with a payload")
            channel.reply_later(req_id, lambda: self._run_handler(peer, header))
        elif msg_type == MsgType.BYE:
            peer.closing_by_peer = True
            if peer.link.state == LinkState.LINKED:
                peer.link.transition(LinkState.UNLINKING)
            channel.reply_later(req_id, lambda: ({"status": 0, "message": ""}, None))
        else:
            raise ProtocolError(f"unexpected {msg_type.name} on a linked channel")

    def _serve_data(self, channel, msg_type, req_id, header, payload_len):
        reply, pieces, after = self._take_data_request(channel, msg_type, header, payload_len)
        channel.reply_later(req_id, lambda: (reply, pieces), after=after)

    def _take_data_request(self, stream, msg_type, header, payload_len):
        """The target's side of a WRITE or READ from a control channel or a
        data lane: check every piece against our live regions, receive a
        WRITE's data. Returns the reply (header, pieces to send or None,
        and what to run once it is sent)."""
        writing = msg_type == MsgType.WRITE
        count, total = check_descriptor_payload(header, payload_len, writing)
        regions, addrs, lengths = descriptor_columns(stream.recv_bytes(count * DESC_BYTES),
                                                     count)
        if length_total(lengths)[0] != total:
            raise ProtocolError("descriptor lengths do not add up to the announced bytes")
        with self._lock:
            found, misses = self._table.locate(addrs, lengths)
            # A miss is NO_REGION, which a lying peer can name as well.
            bad = np.flatnonzero((found != regions) | (found == NO_REGION) if misses
                                 else found != regions)
            ids = [] if bad.size else _distinct(regions)
            self._pin(ids)
        if bad.size:
            i = int(bad[0])
            region = int(regions[i])
            message = (f"piece {i} [{int(addrs[i]):#x}, +{int(lengths[i])}) is "
                       f"not inside live region {region} of {self.name} "
                       f"({bad.size} such pieces; stale or foreign address)")
            if writing:
                stream.discard(total)
            # A region that no longer exists means the memory the peer
            # described was released (e.g. a freed cache): KV_CACHE_NOT_EXIST
            # tells it to look again. Anything else is a bad address.
            with self._lock:
                gone = region not in self._regions
            code = LLMStatusCode.LLM_KV_CACHE_NOT_EXIST if gone else LLMStatusCode.LLM_PARAM_INVALID
            return {"status": int(code), "message": message}, None, None
        if writing:
            try:
                stream.recv_payload(addrs, lengths)
            finally:
                self._unpin(ids)
            return _OK, None, None
        return _OK, (addrs, lengths), lambda: self._unpin(ids)

    # --- data lanes (the target's side; see kvcache.lane) -------------------------

    def _rpc_lane(self, peer, params):
        """Grant ``peer`` one data lane: a one-time token for our listener."""
        if self._listener is None:
            return {"port": 0}
        token = secrets.token_hex(16)
        with self._lock:
            self._lane_tokens[token] = peer
        return {"port": self._listener.getsockname()[1], "token": token}

    def _serve_lane(self, sock, header):
        """Serve the data lane whose LANE frame we just read, in this thread,
        until the link ends or the lane breaks."""
        with self._lock:
            peer = self._lane_tokens.pop(header["token"], None)
            if peer is None or peer.state != LinkState.LINKED:
                raise ProtocolError("a lane for no live link (unknown or used token)")
            lane = Lane(sock, self.io_timeout_ms)
            served = peer.attachments.setdefault("lanes.served", set())
            served.add(lane)
        try:
            lane.send(MsgType.REPLY, 0, _OK)
            while peer.state == LinkState.LINKED:
                if not lane.wait_readable(IDLE_POLL_MS):
                    continue
                msg_type, req_id, header, payload_len = lane.recv_frame()
                if msg_type not in (MsgType.WRITE, MsgType.READ):
                    raise ProtocolError(f"{msg_type.name} on a data lane")
                reply, pieces, after = self._take_data_request(lane, msg_type, header,
                                                               payload_len)
                try:
                    lane.send(MsgType.REPLY, req_id, reply, pieces)
                finally:
                    if after is not None:
                        after()
        except (ChannelClosed, ProtocolError, OSError) as exc:
            log.debug("%s: data lane from %s ended: %s", self.name, peer.name, exc)
        finally:
            with self._lock:
                served.discard(lane)
            lane.close()

    def _run_handler(self, peer, header):
        handler = self._handlers.get(header["method"])
        if handler is None:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"unknown method {header['method']!r}")
        result = handler(peer, header["params"])
        return {"status": 0, "message": "", "result": result}, None

    def add_handler(self, method, handler):
        """Serve control calls ``method``: handler(peer, params) -> dict."""
        self._handlers[method] = handler

    def call(self, peer, method, params, timeout_ms=None):
        """A control call to the peer's handler; returns its result dict.
        Not a transfer: it touches no registered memory, so a peer waiting
        for our transfers to finish (freeing a cache) does not wait for it,
        which would deadlock when our call is what made the peer free."""
        peer = self.peer(peer)
        peer.link.require_linked()
        try:
            reply = peer.channel.call(MsgType.CALL, {"method": method, "params": params},
                                      timeout_ms=timeout_ms or self.timeout_ms)
        except ChannelClosed as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"link to {peer.name} failed: {exc}") from None
        if reply["status"] != LLMStatusCode.LLM_SUCCESS:
            raise LLMException(reply["status"], reply["message"])
        result = reply.get("result")
        if not isinstance(result, dict):
            raise LLMException(LLMStatusCode.LLM_FAILED, f"{peer.name} sent a malformed reply")
        return result

    def _rpc_regions(self, peer, params):
        return {"regions": [list(r) for r in self.regions()]}

    def _rpc_notify(self, peer, params):
        name, message = params.get("name"), params.get("message")
        if not isinstance(name, str) or not isinstance(message, str):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, "malformed notification")
        try:
            data = base64.b64decode(message, validate=True)
        except ValueError:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, "notification not base64")
        self._notifications.append((peer.name, name, data))
        return {}

    # --- transfers ---------------------------------------------------------------

    def refresh_regions(self, peer, timeout_ms=None):
        """Fetch the peer's current memory table."""
        peer = self.peer(peer)
        result = self.call(peer, "engine.regions", {}, timeout_ms)
        peer.regions.set(result["regions"])

    def _remote_regions(self, peer, remote, lengths):
        ids, misses = peer.regions.locate(remote, lengths)
        if misses:
            self.refresh_regions(peer)
            ids = peer.regions.check(remote, lengths, f"remote ({peer.name})")
        return ids

    def transfer_sync(self, peer, op, local_addrs, remote_addrs, lengths, timeout_ms=None,
                      remote_regions=None):
        """Copy between our registered memory and the peer's: ``op`` 'write'
        (local -> remote) or 'read' (remote -> local), piece i being
        lengths[i] bytes at local_addrs[i] / remote_addrs[i]. Returns the
        bytes moved. ``remote_regions`` pins each piece to the region id the
        caller expects (a cache it looked up); the peer rejects the transfer
        if that region is gone."""
        if op not in ("write", "read"):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"op must be 'write' or "
                                                                f"'read', got {op!r}")
        peer = self.peer(peer)
        local, remote, lengths, total = as_descriptor_arrays(local_addrs, remote_addrs,
                                                             lengths)
        if local.size == 0:
            return 0
        local_ids = self._table.check(local, lengths, "local")
        if remote_regions is None:
            remote_ids = self._remote_regions(peer, remote, lengths)
        else:
            remote_ids = np.ascontiguousarray(remote_regions, dtype=np.uint64).ravel()
            if remote_ids.size != local.size:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   "remote_regions must name one region per piece")
        local, remote, lengths, _, remote_ids = merge_runs(local, remote, lengths, local_ids,
                                                           remote_ids)
        timeout = self.timeout_ms if timeout_ms is None else timeout_ms
        peer.link.begin_transfer()
        try:
            move = self.transport.write if op == "write" else self.transport.read
            move(peer, local, remote, lengths, remote_ids, timeout)
        except ChannelClosed as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{op} to {peer.name}: link failed: {exc}") from None
        finally:
            peer.link.end_transfer()
        return total

    def transfer_async(self, peer, op, local_addrs, remote_addrs, lengths, timeout_ms=None):
        """transfer_sync on a worker thread; returns a TransferRequest."""
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="kv-async")
        local, remote, length = (np.array(local_addrs, dtype=np.uint64),
                                 np.array(remote_addrs, dtype=np.uint64),
                                 np.array(lengths, dtype=np.uint64))
        return TransferRequest(self._pool.submit(self.transfer_sync, peer, op, local, remote,
                                                 length, timeout_ms))

    # Mooncake-style spellings.
    def transfer_sync_write(self, peer, local_addr, remote_addr, length):
        return self.transfer_sync(peer, "write", [local_addr], [remote_addr], [length])

    def transfer_sync_read(self, peer, local_addr, remote_addr, length):
        return self.transfer_sync(peer, "read", [local_addr], [remote_addr], [length])

    def batch_transfer_sync_write(self, peer, local_addrs, remote_addrs, lengths):
        return self.transfer_sync(peer, "write", local_addrs, remote_addrs, lengths)

    def batch_transfer_sync_read(self, peer, local_addrs, remote_addrs, lengths):
        return self.transfer_sync(peer, "read", local_addrs, remote_addrs, lengths)

    # --- notifications -----------------------------------------------------------

    def notify(self, peer, name, message=b"", timeout_ms=None):
        """Deliver (name, message bytes) to the peer; returns once it has it.
        Send it after the transfer it announces has completed."""
        self.call(peer, "engine.notify",
                  {"name": str(name), "message": base64.b64encode(bytes(message)).decode()},
                  timeout_ms)

    def get_notifications(self):
        """[(peer name, name, message)] received since the last call."""
        out = []
        while self._notifications:
            out.append(self._notifications.popleft())
        return out

    # --- shutdown ----------------------------------------------------------------

    def close(self):
        """Unlink every peer (forced) and stop listening. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self.stop_listening()
        for peer in self.peers():
            try:
                self.disconnect(peer, force=True, timeout_ms=1000)
            except LLMException:
                peer.channel.close("engine closed")
        if self._pool is not None:
            self._pool.shutdown(wait=False)
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _table_of(regions):
    return RegionTable((i, r[0], r[1]) for i, r in regions.items() if r[3])


def _recv_exact(sock, size):
    buf = bytearray()
    while len(buf) < size:
        chunk = sock.recv(size - len(buf))
        if not chunk:
            raise ConnectionError("peer closed the connection during the handshake")
        buf += chunk
    return bytes(buf)
