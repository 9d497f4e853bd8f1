"""RDMA transport: one-sided RDMA WRITE/READ over RC queue pairs
(pyverbs_kv), the only kvcache module that touches verbs.

Memory is registered once per protection domain when the engine registers a
top-level region (the buffer pool, user caches), never per connection or per
transfer, for local access only; each region offered to peers (a cache, or
memory registered remote_accessible) gets a memory region of its own with
remote access, and only those keys reach a peer, so no rkey names free pool
space or memory kept local. Per link, a group of RC QPs (KVCACHE_RDMA_QPS, default 2) is set
up over the engine's control channel: the initiator sends its QPNs, PSNs,
GID and MTU; the peer creates its QPs, moves them to RTS and answers with
its own and the rkeys of its regions; that answer is the ready-ACK before
the first work request. A transfer is split across the link's QPs and is
done when every QP's last signalled WR completed. Any error completion
fails the link (re-linking creates new QPs).

Environment (FastDeploy's names where they mean the same):
KVCACHE_RDMA_NICS (comma-separated devices, default all; local device i,
the engine's device_id, uses NIC i modulo their count),
KVCACHE_RDMA_GID_INDEX (default: the RoCE v2 IPv4-mapped GID),
KVCACHE_SOCKET_IFNAME (pick the GID on this netdev), KVCACHE_IB_TIMEOUT
(ACK timeout exponent, default 14), KVCACHE_RELAX_ORDERING (1: register with
relaxed ordering), KVCACHE_RDMA_QPS (QPs per link)."""
import logging
import random
import threading
import time

import numpy as np

from kvcache.config import env_flag, env_int, env_list, env_str
from kvcache.descriptors import RegionTable
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.base import LinkData, Transport
from pyverbs_kv.pieces import distinct

log = logging.getLogger(__name__)

SEND_QUEUE = 1024
ATTACH_WAIT_S = 10
LINK_CHECK_MS = 100        # how often a waiting transfer looks at its link


def _is_str(v):
    return isinstance(v, str)


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_list(v):
    return isinstance(v, list)


def _failed(step, exc):
    return LLMException(LLMStatusCode.LLM_LINK_FAILED, f"RDMA {step}: {exc}")


class _QPGroup(LinkData):
    """The QPs of one link, their peer's memory keys, and a lock: one batch
    at a time per link (the batch path tracks each QP's send queue)."""

    def __init__(self):
        self.qps = []
        self.psns = []
        self.cqs = []
        self.remote_keys = RegionTable()
        self.rkeys = {}
        self.lock = threading.Lock()
        self.ready = threading.Event()
        self.error = None

    def close(self):
        for qp in self.qps:
            qp.close()
        for cq in self.cqs:
            cq.close()
        self.qps, self.cqs = [], []


def _split_long(local, remote, lengths, limit):
    """Cut pieces longer than the port's max message size."""
    if not (lengths > limit).any():
        return local, remote, lengths
    counts = ((lengths + np.uint64(limit - 1)) // np.uint64(limit)).astype(np.int64)
    index = np.repeat(np.arange(lengths.size), counts)
    first = np.cumsum(counts) - counts
    offset = ((np.arange(index.size) - np.repeat(first, counts)).astype(np.uint64)
              * np.uint64(limit))
    size = np.minimum(np.uint64(limit), lengths[index] - offset)
    return local[index] + offset, remote[index] + offset, size


def _key_groups(local_ids, remote_ids):
    """(local region, remote region, selection) for each pair of memory keys
    the pieces use; one pair (one pool, one remote cache) is the usual case
    and costs no sorting."""
    if local_ids.min() == local_ids.max() and remote_ids.min() == remote_ids.max():
        return [(int(local_ids[0]), int(remote_ids[0]), slice(None))]
    pairs = np.unique(np.stack([local_ids, remote_ids], axis=1), axis=0)
    return [(int(lid), int(rid), np.flatnonzero((local_ids == lid) & (remote_ids == rid)))
            for lid, rid in pairs]


class RdmaTransport(Transport):
    """One-sided: the peer's CPU takes no part in a transfer; the initiator
    checks every piece against the peer's memory keys (and the hardware
    enforces the registered bounds)."""
    name = "rdma"
    owner_checks = False
    one_sided = True

    def __init__(self, device_id=0, traffic_class=0, service_level=0):
        try:
            import pyverbs_kv as pv
            from pyverbs_kv.enums import IBV_ACCESS_LOCAL_WRITE, IBV_ACCESS_RELAXED_ORDERING
        except (ImportError, OSError) as exc:
            raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                               f"RDMA transport: pyverbs_kv cannot be loaded: {exc}") from None
        self.pv = pv
        self.ack_timeout = env_int("KVCACHE_IB_TIMEOUT", 14)
        if not 0 <= self.ack_timeout <= 31:          # a 5-bit field of the QP attributes
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"KVCACHE_IB_TIMEOUT={self.ack_timeout} is outside 0..31")
        devices = pv.get_device_list()
        wanted = env_list("KVCACHE_RDMA_NICS")
        if wanted:
            missing = [d for d in wanted if d not in devices]
            if missing:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"KVCACHE_RDMA_NICS names {missing}, not present "
                                   f"(have {devices})")
            devices = wanted
        if not devices:
            raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                               "RDMA transport: no RDMA device found")
        device = devices[device_id % len(devices)]
        try:
            self.ctx = pv.Context(device)
            self.pd = pv.PD(self.ctx)
            port = self.ctx.query_port(1)
        except pv.VerbsError as exc:
            raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                               f"RDMA transport: opening {device}: {exc}") from None
        if port["state_str"] != "active":
            raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                               f"RDMA transport: {device} port 1 is {port['state_str']}")
        self.device = device
        self.mtu = port["active_mtu"]
        self.max_msg = min(int(port["max_msg_sz"]), 1 << 30)
        try:
            self.gid_index = env_int("KVCACHE_RDMA_GID_INDEX", -1)
            if self.gid_index < 0:
                self.gid_index = self.ctx.pick_gid(
                    1, netdev=env_str("KVCACHE_SOCKET_IFNAME") or None)
            self.gid = self.ctx.query_gid(1, self.gid_index)
        except pv.VerbsError as exc:
            raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                               f"RDMA transport: GID on {device}: {exc}") from None
        self.traffic_class = traffic_class      # GRH traffic class (DSCP << 2 on RoCE v2)
        self.service_level = service_level
        self.num_qps = max(1, env_int("KVCACHE_RDMA_QPS", 2))
        self.access = pv.DEFAULT_ACCESS
        self.local_access = int(IBV_ACCESS_LOCAL_WRITE)
        if env_flag("KVCACHE_RELAX_ORDERING"):
            self.access |= int(IBV_ACCESS_RELAXED_ORDERING)
            self.local_access |= int(IBV_ACCESS_RELAXED_ORDERING)
        self.mrs = {}                       # top-level region id -> MR (local access)
        self.remote_mrs = {}                # offered region id -> MR (remote access)
        self.local_keys = RegionTable()
        self._lock = threading.Lock()
        log.info("RDMA transport on %s, GID[%d] %s, %d QPs per link", device, self.gid_index,
                 self.gid, self.num_qps)

    def bind(self, ctx):
        super().bind(ctx)
        ctx.serve("rdma.connect", self._rpc_connect, {"gid": _is_str, "mtu": _is_int,
                                                      "qps": _is_list, "keys": _is_list})
        ctx.serve("rdma.keys", self._rpc_keys, {})

    # --- memory ----------------------------------------------------------------

    def _register(self, addr, length, access):
        try:
            return self.pv.MR.from_address(self.pd, addr, length, access)
        except self.pv.VerbsError as exc:
            raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                               f"RDMA registration of {length} bytes: {exc}") from None

    def register_region(self, region_id, addr, length, share=None):
        mr = self._register(addr, length, self.local_access)
        with self._lock:
            self.mrs[region_id] = mr
            self._rebuild_keys()

    def publish_region(self, region_id):
        span = self.engine.regions.span(region_id)
        with self._lock:
            if span is None or region_id in self.remote_mrs:
                return                          # released meanwhile, or restored
        mr = self._register(span[0], span[1], self.access)
        with self._lock:
            self.remote_mrs[region_id] = mr

    def retire_region(self, region_id):
        with self._lock:
            mr = self.remote_mrs.pop(region_id, None)
        if mr is not None:
            mr.close()

    def unregister_region(self, region_id):
        with self._lock:
            mr = self.mrs.pop(region_id, None)
            self._rebuild_keys()
        if mr is not None:
            mr.close()

    def _rebuild_keys(self):
        self.local_keys = RegionTable((i, mr.addr, mr.length) for i, mr in self.mrs.items())

    def _key_list(self, peer):
        # A renewed region keeps its old generation's MR until every peer
        # confirmed no transfer runs under it (retire_region); peers get the
        # keys of live generations only (two generations of one region span
        # the same bytes). ``peer`` gets only the keys of regions offered to
        # it: each offered region has an MR of its own, so a region offered
        # to one link only (a staging slot) has an rkey no other peer is ever
        # sent. The NIC would honour that rkey from any QP on our PD; what
        # keeps another peer out is not knowing it (a guess that misses fails
        # that peer's QP, and only it); a PD per link or memory windows would
        # have the NIC enforce it.
        live = {row[0] for row in self.engine.regions.rows(peer)}
        with self._lock:
            return [[i, mr.addr, mr.length, mr.rkey] for i, mr in self.remote_mrs.items()
                    if i in live]

    # --- link set-up -------------------------------------------------------------

    def _new_group(self):
        group = _QPGroup()
        for _ in range(self.num_qps):
            cq = self.pv.CQ(self.ctx, 2 * SEND_QUEUE)
            qp = self.pv.QP(self.pd, cq, cq, cap=self.pv.QPCap(max_send_wr=SEND_QUEUE,
                                                               max_recv_wr=16))
            qp.to_init(1)
            group.cqs.append(cq)
            group.qps.append(qp)
            group.psns.append(random.randrange(1 << 24))
        return group

    def _describe(self, group, peer):
        return {"gid": self.gid, "mtu": int(self.mtu),
                "qps": [[qp.qp_num, psn] for qp, psn in zip(group.qps, group.psns)],
                "keys": self._key_list(peer)}

    def _connect_group(self, group, remote):
        """Our QPs to RTS towards the peer's, and its memory keys. Anything
        malformed in ``remote`` is LLM_LINK_FAILED naming it."""
        try:
            qps = [(int(qpn), int(psn)) for qpn, psn in remote["qps"]]
            keys = [tuple(int(v) for v in k) for k in remote["keys"]]
            if not all(len(k) == 4 for k in keys):
                raise ValueError("a memory key entry is not [id, addr, length, rkey]")
            gid, peer_mtu = str(remote["gid"]), int(remote["mtu"])
        except (KeyError, TypeError, ValueError) as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"malformed RDMA connection data from the peer: {exc!r}") from None
        if len(qps) != len(group.qps):
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"peer has {len(qps)} QPs per link, we have "
                               f"{len(group.qps)} (KVCACHE_RDMA_QPS must match)")
        mtu = min(int(self.mtu), peer_mtu)
        for qp, my_psn, (qpn, psn) in zip(group.qps, group.psns, qps):
            try:
                qp.to_rtr(qpn, psn, gid, self.gid_index, path_mtu=mtu,
                          traffic_class=self.traffic_class, sl=self.service_level)
                qp.to_rts(my_psn, timeout=self.ack_timeout)
            except self.pv.VerbsError as exc:
                raise _failed(f"bring-up of QP {qp.qp_num:#x} (step {exc.call})", exc) from None
        self._set_keys(group, keys)

    def _set_keys(self, group, keys):
        group.remote_keys = RegionTable((k[0], k[1], k[2]) for k in keys)
        group.rkeys = {int(k[0]): int(k[3]) for k in keys}

    def _rpc_connect(self, peer, params):
        """The peer's half of set-up: our QPs to RTS, then answer (the
        ready-ACK: nothing of theirs can reach a QP that is not ready)."""
        group = self._group(peer)
        if group.ready.is_set():
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, "RDMA link already set up")
        with group.lock:
            fresh = self._new_group()
            group.qps, group.cqs, group.psns = fresh.qps, fresh.cqs, fresh.psns
            try:
                self._connect_group(group, params)
            except LLMException:
                group.close()
                raise
        group.ready.set()
        return self._describe(group, peer)

    def _rpc_keys(self, peer, params):
        return {"keys": self._key_list(peer)}

    def attach_peer(self, peer, timeout_ms):
        if peer.inbound:
            return _QPGroup()            # the initiator drives set-up (rdma.connect)
        group = self._new_group()
        try:
            remote = self.engine.call(peer, "rdma.connect", self._describe(group, peer),
                                      timeout_ms)
            self._connect_group(group, remote)
        except BaseException:
            group.close()
            raise
        group.ready.set()
        return group

    def detach_peer(self, peer):
        self._close_group(peer.data)

    def _close_group(self, group):
        # After the group's transfer (group.lock); never beside another close
        # of the same verbs objects (a reader thread unlinking while the
        # engine closes): self._lock.
        if group is not None:
            with group.lock, self._lock:
                group.close()

    # --- transfers ---------------------------------------------------------------

    def _group(self, peer):
        # An inbound link's set-up call can come before the link is attached.
        peer.attached.wait(ATTACH_WAIT_S)
        group = peer.data
        if group is None:
            raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK,
                               f"RDMA queue pairs to {peer.name} are not set up")
        return group

    def _check_keys(self, peer, group, regions):
        """Every region the pieces name has a memory key of the peer's; the
        keys are fetched again once when one does not (a cache allocated, or
        released and replaced at the same address, since they were), and
        LLM_KV_CACHE_NOT_EXIST when it still has none."""
        named = [int(i) for i in distinct(regions)]
        if all(i in group.rkeys for i in named):
            return
        self._set_keys(group, self.engine.call(peer, "rdma.keys", {})["keys"])
        missing = [i for i in named if i not in group.rkeys]
        if missing:
            raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                               f"{peer.name} offers no memory key for region {missing[0]} "
                               "(released?)")

    def _remote_keys(self, peer, group, remote, lengths):
        ids, misses = group.remote_keys.locate(remote, lengths)
        if misses:
            self._set_keys(group, self.engine.call(peer, "rdma.keys", {})["keys"])
            ids = group.remote_keys.check(remote, lengths, f"remote ({peer.name}, RDMA)")
        return ids

    def _move(self, op, peer, local, remote, lengths, regions, deadline):
        timeout_ms = max(1, int((deadline - time.monotonic()) * 1000))
        group = self._group(peer)
        if not group.ready.wait(timeout_ms / 1000):
            raise LLMException(LLMStatusCode.LLM_NOT_YET_LINK,
                               f"RDMA queue pairs to {peer.name} are not set up")
        self._check_keys(peer, group, regions)
        local, remote, lengths = _split_long(local, remote, lengths, self.max_msg)
        local_ids = self.local_keys.check(local, lengths, "local (RDMA)")
        remote_ids = self._remote_keys(peer, group, remote, lengths)
        failure = None
        with group.lock:
            if not group.qps:
                raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                   f"RDMA link to {peer.name} is closed")
            batches = []
            try:
                for lid, rid, chosen in _key_groups(local_ids, remote_ids):
                    lkey, rkey = self.mrs[lid].lkey, group.rkeys[rid]
                    l_part, r_part, n_part = local[chosen], remote[chosen], lengths[chosen]
                    # Contiguous shares, one per QP (views, no copies).
                    share = -(-l_part.size // len(group.qps))
                    for start in range(0, l_part.size, share):
                        part = slice(start, start + share)
                        qp = group.qps[len(batches) % len(group.qps)]
                        post = qp.post_write_batch if op == "write" else qp.post_read_batch
                        batches.append(post(l_part[part], n_part[part], lkey, r_part[part],
                                            rkey, timeout_ms=timeout_ms))
                self._wait(peer, op, batches, timeout_ms)
            except self.pv.VerbsTimeout as exc:
                failure = LLMException(LLMStatusCode.LLM_TIMEOUT,
                                       f"RDMA {op} to {peer.name}: {exc}")
            except self.pv.VerbsError as exc:
                failure = LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                       f"RDMA {op} to {peer.name} failed: {exc}")
        if failure is not None:
            # Closing the link destroys its QPs (outside the group's lock, which
            # closing takes): work requests still queued can land nothing later.
            peer.channel.close(str(failure))
            raise failure

    def _wait(self, peer, op, batches, timeout_ms):
        """Wait for every batch, watching the link: when the peer's control
        connection drops (it died), fail now instead of when the NIC gives
        up retrying."""
        deadline = time.monotonic() + timeout_ms / 1000
        for batch in batches:
            while True:
                remaining = int((deadline - time.monotonic()) * 1000)
                try:
                    batch.wait(max(1, min(LINK_CHECK_MS, remaining)))
                    break
                except self.pv.VerbsTimeout:
                    if not peer.linked:
                        raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                           f"RDMA {op} to {peer.name}: the link failed "
                                           f"during the transfer ({peer.link.reason})") from None
                    if remaining <= LINK_CHECK_MS:
                        raise

    def write(self, peer, local, remote, lengths, regions, deadline):
        self._move("write", peer, local, remote, lengths, regions, deadline)

    def read(self, peer, local, remote, lengths, regions, deadline):
        self._move("read", peer, local, remote, lengths, regions, deadline)

    def cut(self, peer):
        """Close the link: its QPs are destroyed, so no RDMA of the peer's
        reaches our memory any more."""
        peer.channel.close("did not confirm a released region")

    def close(self):
        with self._lock:
            self.ctx.close()
