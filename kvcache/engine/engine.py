"""TransferEngine: the one-sided layer (after HIXL / Mooncake / NIXL), a
facade over the region registry, the link manager, control calls and the
transport.

    engine = TransferEngine("prefill-0", listen="127.0.0.1:26000")
    region = engine.register_memory(addr, length)
    peer = engine.connect("127.0.0.1:26001", timeout_ms=3000)
    engine.transfer_sync(peer, "write", local_addrs, remote_addrs, lengths)

Every transfer pins the regions it touches on both sides until it ends;
every piece is checked against live regions by the side that owns the
memory before a byte moves; every wait has a deadline; a dead, restarted or
lying peer fails its own link and nothing else."""
import logging
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvcache import checks
from kvcache.checks import public
from kvcache.descriptors import as_descriptor_arrays, merge_runs, u64_column
from kvcache.engine import auth
from kvcache.engine.links import LinkManager
from kvcache.engine.regions import RegionRegistry
from kvcache.engine.requests import Notifications, TransferRequest
from kvcache.engine.rpc import Rpc, is_int, list_of
from kvcache.log import setup as setup_logging
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.tcp.framing import StreamClosed
from kvcache.transports.tcp.tls import TlsConfig
from kvcache.transports.tcp.protocol import MAX_NOTIFY_BYTES, MAX_REGIONS

log = logging.getLogger(__name__)

ASYNC_WORKERS = 4


def _tcp_transport(device_id):
    from kvcache.transports.tcp.transport import TcpTransport
    return TcpTransport()


def _shm_transport(device_id):
    from kvcache.transports.shm import ShmTransport
    return ShmTransport()


def _rdma_transport(device_id, traffic_class=0, service_level=0):
    from kvcache.transports.rdma import RdmaTransport
    return RdmaTransport(device_id, traffic_class, service_level)


# Transport name -> factory(local device id). RDMA loads pyverbs_kv's verbs
# only when chosen.
TRANSPORTS = {"tcp": _tcp_transport, "shm": _shm_transport, "rdma": _rdma_transport}


class EngineContext:
    """What an engine lends its transport (``Transport.bind``)."""

    def __init__(self, name, io_timeout_ms, regions, call, serve, listen_port, tls=None):
        self.name = name
        self.tls = tls
        self.io_timeout_ms = io_timeout_ms
        self.regions = regions
        self.call = call
        self.serve = serve
        self.listen_port = listen_port


class TransferEngine:
    """``listen``: "ip:port", "[ipv6]:port" or "host:port" to accept links on
    (port 0 picks one, see ``address``; None: do not listen). ``transport``:
    "tcp", "shm" or "rdma". ``timeout_ms``: the default deadline of links,
    control calls, transfers and releases; ``handshake_timeout_ms`` bounds a
    whole handshake, ``io_timeout_ms`` every frame once it started.
    ``auth_key`` (str or bytes, at least 16 bytes; default KVCACHE_AUTH_KEY,
    else the file KVCACHE_AUTH_KEY_FILE): the shared secret both ends of
    every link must prove (kvcache.engine.auth); None: links are not
    authenticated. ``rdma_traffic_class`` (0..255) and
    ``rdma_service_level`` (0..15): the GRH traffic class and the service
    level of the RDMA transport's QPs (ignored by the other transports).
    ``tls_cert``, ``tls_key``, ``tls_ca`` (PEM file paths; default
    KVCACHE_TLS_CERT / KVCACHE_TLS_KEY / KVCACHE_TLS_CA): TLS for the
    control channel and the TCP data lanes (kvcache.transports.tcp.tls);
    with a CA the other end must present a certificate it signed. Raises
    LLMException (LLM_PARAM_INVALID, LLM_FEATURE_NOT_ENABLED)."""

    @public
    def __init__(self, name=None, *, listen="127.0.0.1:0", cluster_id=0, role="mix",
                 transport="tcp", timeout_ms=5000, handshake_timeout_ms=5000,
                 io_timeout_ms=30_000, device_id=0, auth_key=None, rdma_traffic_class=0,
                 rdma_service_level=0, tls_cert=None, tls_key=None, tls_ca=None):
        setup_logging()
        if transport not in TRANSPORTS:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"transport {transport!r} not available here; have "
                               f"{sorted(TRANSPORTS)}")
        if name is not None and (not isinstance(name, str) or not 0 < len(name) <= 256):
            raise checks.invalid(f"engine name must be a string of 1..256 characters, "
                                 f"got {name!r}")
        self.name = name or f"engine-{os.getpid()}-{id(self):x}"
        self.cluster_id = checks.integer(cluster_id, "cluster_id", 0, (1 << 63) - 1)
        if role not in ("prompt", "decoder", "mix"):
            raise checks.invalid(f"role must be 'prompt', 'decoder' or 'mix', got {role!r}")
        self.role = role
        self.timeout_ms = checks.timeout_ms(timeout_ms, "timeout_ms")
        handshake_timeout_ms = checks.timeout_ms(handshake_timeout_ms, "handshake_timeout_ms")
        self.io_timeout_ms = io_timeout_ms = checks.timeout_ms(io_timeout_ms, "io_timeout_ms")
        tls = TlsConfig.load(tls_cert, tls_key, tls_ca)
        qos = {"traffic_class": checks.integer(rdma_traffic_class, "rdma_traffic_class", 0, 255),
               "service_level": checks.integer(rdma_service_level, "rdma_service_level", 0, 15)}
        self.transport = TRANSPORTS[transport](checks.integer(device_id, "device_id", 0),
                                               **(qos if transport == "rdma" else {}))
        self.registry = RegionRegistry(self.transport)
        self.rpc = Rpc()
        self.notifications = Notifications()
        self.links = LinkManager(self._identity, self.transport, self.rpc, self.notifications,
                                 timeout_ms, handshake_timeout_ms, io_timeout_ms,
                                 key=auth.load_key(auth_key), tls=tls)
        self.rpc.serve("engine.regions", self._rpc_regions, {})
        self.rpc.serve("engine.revoke", self._rpc_revoke,
                       {"ids": list_of(is_int, MAX_REGIONS), "timeout_ms": is_int})
        self.links.on_link_closed(self._link_ended)
        self.transport.bind(EngineContext(self.name, io_timeout_ms, self.registry,
                                          self._call, self.rpc.serve, self.links.listen_port,
                                          tls))
        self._pool = None
        self._pool_lock = threading.Lock()
        self._closed = False
        try:
            if listen:
                self.links.start_listening(listen)
        except BaseException:
            self.close()
            raise

    def _identity(self):
        return {"name": self.name, "cluster_id": self.cluster_id, "role": self.role,
                "regions": [list(r) for r in self.registry.rows()],
                "transports": [self.transport.name], "listen": self.address or ""}

    # --- listening and links ----------------------------------------------------------

    @property
    def address(self):
        """Where we listen ("ip:port", "[ipv6]:port"), or None."""
        return self.links.address

    @public
    def start_listening(self, address):
        """Accept links at ``address`` ("ip:port", "[ipv6]:port" or
        "host:port"; port 0 picks one, see ``address``)."""
        self.links.start_listening(address)

    @public
    def open_listener(self, address):
        """Accept links at a further ``address`` too (a rank table's member
        address); returns the Listener, whose ``close()`` is the caller's
        job. Links made through it are like any other."""
        return self.links.open_listener(address)

    def stop_listening(self):
        """Stop accepting links; returns once the port is closed (existing
        links stay)."""
        self.links.stop_listening()

    @public
    def connect(self, address, timeout_ms=None):
        """Link to the engine listening at ``address``; returns the Peer once
        the listener has the link too. LLM_LINK_FAILED / LLM_TIMEOUT / the
        peer's refusal code."""
        timeout = self._timeout(timeout_ms)
        peer = self.links.connect(address, timeout)
        # The listener marks the link LINKED once it has read READY; one round
        # trip makes sure it has, so it can use the link as soon as we return.
        try:
            self.refresh_regions(peer, timeout)
        except LLMException as exc:
            self.links.disconnect(peer, force=True)
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{address} did not confirm the link: {exc}") from None
        return peer

    @public
    def disconnect(self, peer, force=False, timeout_ms=None, notify=True):
        """Unlink: tell the peer (when the link is healthy and ``notify``),
        close, forget. LLM_LINK_BUSY while transfers run, unless ``force``,
        which aborts them (they fail with LLM_LINK_FAILED). Without
        ``notify`` the peer sees its end fail instead of end in order."""
        self.links.disconnect(self.peer(peer), bool(force), self._timeout(timeout_ms),
                              bool(notify))

    def peers(self):
        """Live links (a link that ended leaves the table)."""
        return self.links.peers()

    @public
    def peer(self, name_or_peer):
        """The Peer by name (or the Peer itself); LLM_NOT_YET_LINK if unknown."""
        return self.links.peer(name_or_peer)

    @public
    def find_peer(self, cluster_id, inbound=None):
        """The Peer of a cluster id, or None: a LINKED one first, then the
        link we made before the one the peer made (``inbound`` True/False:
        only links of that direction)."""
        return self.links.find_peer(cluster_id, inbound)

    # --- memory ------------------------------------------------------------------------

    @public
    def register_memory(self, addr, length, *, parent=None, addressable=True, share=None,
                        remote_accessible=True, peer=None):
        """Register [addr, addr + length) for transfers; returns its region id.

        ``remote_accessible`` (default True, as Mooncake's and NIXL's
        registration, whose purpose is to let peers reach the memory): offer
        the region to linked peers, who then see it in our region table and
        may read and write it. False: only this engine's own transfers use
        it (a destination a decoder pulls into, a staging buffer); a peer
        naming it is refused (LLM_PARAM_INVALID) and never learns of it.

        ``peer`` (a Peer or its name; with ``remote_accessible``): offer the
        region to that link only, e.g. a staging buffer lent to it. Every
        other peer is treated as for memory not offered: the region is not
        in its table, its renewals or its shared-memory grants, and pieces
        of its naming it are refused (LLM_PARAM_INVALID), on every
        transport. The region stays registered when the link ends, until
        it is unregistered.

        ``parent``: a logical sub-region of a registered region (a cache
        inside the buffer pool): it gets its own id, so a peer holding a
        stale description of a freed cache is refused, while the transport
        keeps using the parent's registration. ``addressable=False``: a
        container that only its sub-regions expose. ``share``: (fd, offset)
        of a memfd holding this memory that a peer on this host may map (the
        shared-memory transport). Addressable regions never overlap."""
        if peer is not None:
            if not remote_accessible:
                raise checks.invalid("peer names the link a region is offered to: it needs "
                                     "remote_accessible=True")
            peer = self.peer(peer)
            if not peer.linked or peer not in self.peers():
                raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK,
                                   f"{peer.name} is no live link of this engine")
        region_id = self.registry.register(addr, length, parent, addressable, share,
                                           bool(remote_accessible), peer)
        if peer is not None and not peer.linked:
            self._link_ended(peer)          # it ended meanwhile, its hook ran before
        return region_id

    @public
    def unregister_memory(self, region_ids, timeout_ms=None):
        """Withdraw a region, or a list of regions (all or none), with their
        sub-regions, once no transfer, ours or a peer's, uses them.
        LLM_LINK_BUSY when one still does after ``timeout_ms`` (default: the
        engine's): the regions then stay registered and can be released
        later."""
        timeout = self._timeout(timeout_ms)
        many = isinstance(region_ids, (list, tuple))
        ids = [checks.integer(i, "region id", 1) for i in (region_ids if many else [region_ids])]
        revoke = self._revoke if self.transport.one_sided else None
        self.registry.release(ids, time.monotonic() + timeout / 1000, revoke)

    @public
    def renew_region(self, region_id):
        """A new id for an addressable region (its cache key moved): peers
        naming the old id are refused and look it up again. Returns the id."""
        return self.renew_regions([region_id])[0]

    @public
    def renew_regions(self, region_ids, revoke=True):
        """New ids for addressable regions (a list of ids; returns the new
        ids in the same order), as renew_region for each, with one
        revocation round for all of them: on a one-sided transport every
        linked peer is told once to drop the old ids. ``revoke=False``
        renews only (local and quick, no peer is waited for): the caller
        then hands the old ids to revoke_regions, e.g. once it no longer
        holds a lock of its own. LLM_PARAM_INVALID for an id that is not a
        live addressable region (those before it stay renewed)."""
        ids = [checks.integer(i, "region id", 1) for i in region_ids]
        renewed = [self.registry.renew(i) for i in ids]
        if revoke:
            self.revoke_regions(ids)
        return renewed

    @public
    def revoke_regions(self, region_ids):
        """Earlier ids of renewed regions (a list): on a one-sided transport
        every linked peer drops them and finishes its transfers on them,
        one control call per peer; a peer that does not confirm within the
        engine's timeout_ms is cut off. Nothing to do on other transports
        (the owner checks every piece itself). Afterwards no transfer runs
        under those ids any more (each peer confirmed or was cut off), so
        the transport releases what it kept for them (an RDMA MR each)."""
        # An id released since (with its region) was revoked by that release.
        ids = [i for i in (checks.integer(i, "region id", 1) for i in region_ids)
               if self.registry.known(i)]
        if ids and self.transport.one_sided:
            bound = {i: p for i in ids if (p := self.registry.owner(i)) is not None}
            self._revoke(ids, time.monotonic() + self.timeout_ms / 1000, bound)
            for i in ids:
                if i not in self.registry:          # an earlier generation, not a live id
                    self.transport.retire_region(i)

    def regions(self, peer=None):
        """[(region_id, addr, length)] of the memory we offer to ``peer`` (a
        Peer or its name: what its region table lists; None: what every
        peer's lists, without regions offered to one link only)."""
        return self.registry.rows(None if peer is None else self.peer(peer))

    def _revoke(self, ids, deadline, bound=None):
        """Every linked peer drops those of ``ids`` it may know of (``bound``:
        {id: Peer} of those offered to that link only) and finishes its
        transfers on them; a peer that does not confirm in time is cut off."""
        bound = bound or {}
        for peer in self.peers():
            theirs = [i for i in ids if bound.get(i, peer) is peer]
            if not peer.linked or not theirs:
                continue
            left = max(1, int((deadline - time.monotonic()) * 1000))
            try:
                self._call(peer, "engine.revoke", {"ids": theirs, "timeout_ms": left}, left)
            except LLMException as exc:
                log.warning("%s did not confirm releasing regions %s (%s): cutting it off",
                            peer.name, theirs, exc)
                self.transport.cut(peer)
        return True

    def _link_ended(self, peer):
        """Regions offered to that link alone are offered to no one now: the
        transport drops what lets a peer reach them (an RDMA MR's rkey), so
        a process that learnt one cannot use it over a later link."""
        for region_id in self.registry.bound_to(peer):
            self.transport.retire_region(region_id)

    def on_link_closed(self, hook):
        """Call ``hook(peer)`` once each link has ended, in whichever thread
        closed it (the layers above drop their per-link state there)."""
        self.links.on_link_closed(hook)

    # --- control calls -----------------------------------------------------------------

    @public
    def add_handler(self, method, handler):
        """Serve control calls ``method`` (not a reserved name, see
        kvcache.engine.rpc): handler(peer, params dict) -> dict."""
        self.rpc.serve(method, handler, reserved=False)

    @public
    def call(self, peer, method, params, timeout_ms=None):
        """A control call to the peer's handler; returns its result dict.
        Not a transfer: it touches no registered memory, so a peer waiting
        for our transfers to finish (freeing a cache) does not wait for it."""
        return self._call(self.peer(peer), method, params, timeout_ms)

    def _call(self, peer, method, params, timeout_ms=None):
        if not isinstance(method, str) or not 0 < len(method) <= 4096:
            raise checks.invalid(f"method must be a string of 1..4096 characters, got "
                                 f"{method!r}")
        if not isinstance(params, dict):
            raise checks.invalid("params must be a dict")
        return self.links.call(peer, method, params, self._timeout(timeout_ms))

    def _timeout(self, timeout_ms):
        """A caller's deadline in ms (None: the engine's), checked."""
        return self.timeout_ms if timeout_ms is None else checks.timeout_ms(timeout_ms)

    def _rpc_regions(self, peer, params):
        return {"regions": [list(r) for r in self.registry.rows(peer)]}

    def _rpc_revoke(self, peer, params):
        timeout_s = min(params["timeout_ms"], checks.MAX_TIMEOUT_MS) / 1000
        if not peer.revoke(params["ids"], timeout_s):
            raise LLMException(LLMStatusCode.LLM_LINK_BUSY,
                               f"transfers on regions {params['ids']} still running")
        return {}

    @public
    def refresh_regions(self, peer, timeout_ms=None):
        """Fetch the peer's current memory table."""
        peer = self.peer(peer)
        peer.set_regions(self._call(peer, "engine.regions", {}, timeout_ms)["regions"])

    # --- transfers -----------------------------------------------------------------------

    @public
    def transfer_sync(self, peer, op, local_addrs, remote_addrs, lengths, timeout_ms=None,
                      remote_regions=None):
        """Copy between our registered memory and the peer's: ``op`` 'write'
        (local -> remote) or 'read' (remote -> local), piece i being
        lengths[i] bytes at local_addrs[i] / remote_addrs[i] (integer
        arrays of equal length). Returns the bytes moved.
        ``remote_regions``: the peer's region id of every piece, as the
        caller looked it up; the peer refuses pieces outside it, or whose
        region it released (LLM_KV_CACHE_NOT_EXIST). Fails with
        LLM_PARAM_INVALID (bad input; nothing moved, the link unharmed),
        LLM_TIMEOUT (the deadline passed; the link is closed so nothing lands
        later), LLM_LINK_FAILED (the connection broke)."""
        if op not in ("write", "read"):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"op must be 'write' or 'read', got {op!r}")
        peer = self.peer(peer)
        local, remote, lengths, total = as_descriptor_arrays(local_addrs, remote_addrs,
                                                             lengths)
        named = None
        if remote_regions is not None:
            named = u64_column(remote_regions, "remote_regions")
            if named.size != local.size:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   "remote_regions must name one region per piece")
        timeout = self._timeout(timeout_ms)
        if local.size == 0:
            return 0
        started = time.monotonic()
        deadline = started + timeout / 1000
        peer.link.begin_transfer()
        local_pins = remote_pins = None
        try:
            if not peer.attached.wait(timeout / 1000) or peer.data is None:
                peer.link.require_linked()
                raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK,
                                   f"the data path to {peer.name} is not set up")
            local_ids, local_pins = self.registry.pin_local(local, lengths)
            remote_ids, remote_pins = self._pin_remote(peer, remote, lengths, named, timeout)
            pieces = local.size
            local, remote, lengths, _, remote_ids = merge_runs(local, remote, lengths,
                                                               local_ids, remote_ids)
            move = self.transport.write if op == "write" else self.transport.read
            move(peer, local, remote, lengths, remote_ids, deadline)
            log.debug("%s %s: %d bytes, %d pieces in %d descriptors, %.3f ms", op, peer.name,
                      total, pieces, local.size, (time.monotonic() - started) * 1e3)
        except StreamClosed as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{op} to {peer.name}: link failed: {exc}") from None
        except LLMException:
            raise
        except Exception as exc:
            log.exception("%s to %s failed", op, peer.name)
            raise LLMException(LLMStatusCode.LLM_FAILED,
                               f"{op} to {peer.name} failed: {exc!r}") from None
        finally:
            if local_pins is not None:
                self.registry.unpin(local_pins)
            if remote_pins is not None:
                peer.unpin_remote(remote_pins)
            peer.link.end_transfer()
        return total

    def _pin_remote(self, peer, remote, lengths, named, timeout_ms):
        """Pin the peer's regions in our copy of its table (refreshed once
        when it does not cover the pieces). Where the peer's CPU does not
        check pieces (shared memory, RDMA), each must lie in the region it
        names here."""
        strict = not self.transport.owner_checks
        pinned = peer.pin_remote(remote, lengths, named, strict)
        if pinned is None:
            self.refresh_regions(peer, timeout_ms)
            pinned = peer.pin_remote(remote, lengths, named, strict)
        if pinned is not None:
            return pinned
        if named is not None and not peer.knows(named):
            raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                               f"{peer.name} no longer has the regions the pieces name")
        ids = peer.regions.check(remote, lengths, f"remote ({peer.name})")   # names the piece
        i = int(np.flatnonzero(ids != named)[0])
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"remote ({peer.name}) piece {i} [{int(remote[i]):#x}, "
                           f"+{int(lengths[i])}) is not inside region {int(named[i])} it names")

    @public
    def transfer_async(self, peer, op, local_addrs, remote_addrs, lengths, timeout_ms=None):
        """transfer_sync on a worker thread; returns a TransferRequest. Bad
        arrays are refused here (LLM_PARAM_INVALID)."""
        local, remote, lengths, _ = as_descriptor_arrays(local_addrs, remote_addrs, lengths)
        self._timeout(timeout_ms)
        with self._pool_lock:
            if self._closed:
                raise LLMException(LLMStatusCode.LLM_ENGINE_FINALIZED, "engine closed")
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=ASYNC_WORKERS,
                                                thread_name_prefix="kv-async")
            future = self._pool.submit(self.transfer_sync, peer, op, local.copy(),
                                       remote.copy(), lengths.copy(), timeout_ms)
        return TransferRequest(future)

    # --- notifications -------------------------------------------------------------------

    @public
    def notify(self, peer, name, message=b"", timeout_ms=None):
        """Deliver (name, message bytes) to the peer; returns once it has it.
        ``message``: bytes-like, at most MAX_NOTIFY_BYTES (4 MiB); ``name``:
        a string of at most 4096 characters. Send it after the transfer it
        announces has completed."""
        if not isinstance(name, str) or len(name) > 4096:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               "notification name must be a string of at most 4096 characters")
        try:
            body = memoryview(bytes(message) if not isinstance(message, bytes) else message)
        except TypeError:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"notification message must be bytes-like, got "
                               f"{type(message).__name__}") from None
        if body.nbytes > MAX_NOTIFY_BYTES:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"notification message of {body.nbytes} bytes exceeds "
                               f"MAX_NOTIFY_BYTES ({MAX_NOTIFY_BYTES})")
        self.links.notify(self.peer(peer), name, body, self._timeout(timeout_ms))

    def get_notifications(self):
        """[(peer name, name, message bytes)] received since the last call."""
        return self.notifications.take()

    # --- shutdown ------------------------------------------------------------------------

    def close(self):
        """Stop listening, unlink every peer (forced), stop the workers and
        the transport; every thread it started is joined. Idempotent."""
        with self._pool_lock:
            if self._closed:
                return
            self._closed = True
            pool = self._pool
        self.links.close()
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        self.transport.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

