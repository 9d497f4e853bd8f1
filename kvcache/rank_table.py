"""The rank-table link flow of llm_datadist (``LLMDataDist.link`` /
``unlink`` / ``query_register_mem_status``) over our own links.

Every member of a comm names itself in an HCCL-style rank table (version
1.0 or 1.2: ``server_list[].device[]`` with ``device_ip`` and ``rank_id``)
and ``cluster_rank_info`` maps each member's cluster id to its rank. A
member is reachable at ``device_ip`` and a port: the device entry's
``device_port`` when it has one, else the base port plus the rank id (the
base is ``LLMConfig.rank_table_port``, option ``llm.RankTablePort``,
default 26000). Each member listens there; of every pair, the member with
the lower rank dials the other. The links come up in a background thread:
the comm is PREPARING until every other member is linked (OK), or FAILED at
the link deadline (``link_timeout``), when the links it made are closed.

A member already linked to us when ``link`` is called (by link_clusters,
either direction, or by another comm) is not dialed again: the comm uses
that live link (a comm whose members are all linked so is OK at once), and
its unlink leaves the link to whoever made it. llm_datadist documents no
status for this case; failing it would only make a caller unlink a working
link to link it again."""
import ipaddress
import json
import logging
import threading
import time
from collections import namedtuple
from enum import Enum

from kvcache import checks
from kvcache.engine.address import format_address, parse_address
from kvcache.engine.link import LinkState
from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

DEFAULT_BASE_PORT = 26000
VERSIONS = ("1.0", "1.2")
MAX_COMM_NAME = 128            # llm_datadist: shorter than 128 characters
MAX_MEMBERS = 16
RETRY_S = 0.05                 # between dials while a member is not listening yet
JOIN_MARGIN_S = 5


class RegisterMemStatus(Enum):
    """What ``query_register_mem_status`` returns (llm_datadist's values)."""
    OK = 0
    PREPARING = 1
    FAILED = 2


Member = namedtuple("Member", "cluster_id rank_id host port")


def _invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, message)


def _uint(value, what, bits):
    """An integer (or a decimal string of one, as rank tables write them)
    in 0..2**bits-1."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    return checks.integer(value, what, 0, (1 << bits) - 1)


def _field(obj, key, where):
    if not isinstance(obj, dict):
        raise _invalid(f"{where} must be a JSON object, got {type(obj).__name__}")
    if key not in obj:
        raise _invalid(f"{where}.{key} is missing")
    return obj[key]


def check_comm_name(comm_name):
    if not isinstance(comm_name, str) or not 0 < len(comm_name) < MAX_COMM_NAME:
        raise _invalid(f"comm_name must be a string of 1..{MAX_COMM_NAME - 1} characters, "
                       f"got {comm_name!r}")
    return comm_name


def check_cluster_rank_info(cluster_rank_info):
    """{cluster id: rank id}, 2..16 members, ranks distinct and in
    ascending order (as llm_datadist requires)."""
    if not isinstance(cluster_rank_info, dict):
        raise _invalid(f"cluster_rank_info must be a dict {{cluster_id: rank_id}}, got "
                       f"{type(cluster_rank_info).__name__}")
    if not 2 <= len(cluster_rank_info) <= MAX_MEMBERS:
        raise _invalid(f"cluster_rank_info must name 2..{MAX_MEMBERS} clusters, got "
                       f"{len(cluster_rank_info)}")
    ranks = {}
    for cluster, rank in cluster_rank_info.items():
        if isinstance(cluster, str) or isinstance(rank, str):
            raise _invalid(f"cluster_rank_info entry {cluster!r}: {rank!r} must be integers")
        ranks[_uint(cluster, "cluster_rank_info cluster id", 64)] = _uint(
            rank, f"cluster_rank_info rank of cluster {cluster}", 32)
    values = list(ranks.values())
    if values != sorted(values) or len(set(values)) != len(values):
        raise _invalid(f"cluster_rank_info ranks must be distinct and in ascending order, got "
                       f"{values}")
    return ranks


def parse_rank_table(rank_table, ranks):
    """{rank id: (device_ip, device_port or None)} of the members ``ranks``
    names, from the rank table JSON text. LLM_PARAM_INVALID naming the
    field for anything else."""
    if not isinstance(rank_table, str):
        raise _invalid(f"rank_table must be a JSON string, got {type(rank_table).__name__}")
    try:
        table = json.loads(rank_table)
    except ValueError as exc:
        raise _invalid(f"rank_table is not JSON: {exc}") from None
    version = _field(table, "version", "rank_table")
    if version not in VERSIONS:
        raise _invalid(f"rank_table.version {version!r} is not supported (have {VERSIONS})")
    servers = _field(table, "server_list", "rank_table")
    if not isinstance(servers, list) or not servers:
        raise _invalid("rank_table.server_list must be a non-empty list")
    if "server_count" in table and _uint(table["server_count"], "rank_table.server_count",
                                         32) != len(servers):
        raise _invalid(f"rank_table.server_count {table['server_count']!r} but "
                       f"{len(servers)} servers in server_list")
    found = {}
    for s, server in enumerate(servers):
        devices = _field(server, "device", f"rank_table.server_list[{s}]")
        if not isinstance(devices, list) or not devices:
            raise _invalid(f"rank_table.server_list[{s}].device must be a non-empty list")
        for d, device in enumerate(devices):
            where = f"rank_table.server_list[{s}].device[{d}]"
            rank = _uint(_field(device, "rank_id", where), f"{where}.rank_id", 32)
            ip = _field(device, "device_ip", where)
            try:
                ip = str(ipaddress.ip_address(ip))
            except ValueError:
                raise _invalid(f"{where}.device_ip {ip!r} is not an IP address") from None
            port = device.get("device_port")
            if port is not None:
                port = _uint(port, f"{where}.device_port", 16)
                if port == 0:
                    raise _invalid(f"{where}.device_port must be 1..65535")
            if rank in found:
                raise _invalid(f"{where}.rank_id {rank} appears twice in the rank table")
            found[rank] = (ip, port)
    missing = [r for r in ranks.values() if r not in found]
    if missing:
        raise _invalid(f"rank_table has no device with rank_id {missing[0]} (named in "
                       "cluster_rank_info)")
    return found


def members(rank_table, cluster_rank_info, base_port):
    """Every Member of the comm, in rank order."""
    ranks = check_cluster_rank_info(cluster_rank_info)
    devices = parse_rank_table(rank_table, ranks)
    out = []
    for cluster, rank in ranks.items():
        ip, port = devices[rank]
        if port is None:
            port = base_port + rank
            if port > 65535:
                raise _invalid(f"rank {rank}: base port {base_port} + rank id is past 65535")
        out.append(Member(cluster, rank, ip, port))
    return out


class Comm:
    """One ``link`` call: its members, the links made for it (cluster id ->
    Peer), its status and the thread bringing it up."""

    def __init__(self, comm_id, name, me, others, deadline):
        self.comm_id = comm_id
        self.name = name
        self.me = me
        self.others = others
        self.deadline = deadline
        self.status = RegisterMemStatus.PREPARING
        self.reason = ""
        self.peers = {}
        self.reused = set()          # live links it found and does not own
        self.address = format_address(me.host, me.port)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.thread = None


class RankTableLinks:
    """The comms of one LLMDataDist and the listening sockets their member
    addresses need (shared between comms naming the same address)."""

    def __init__(self, engine, cluster_id):
        self._engine = engine
        self._cluster_id = cluster_id
        self._lock = threading.Lock()
        self._comms = {}
        self._next_id = 1            # llm_datadist numbers comms 1, 2, ...
        self._listeners = {}         # (host, port) -> [listener | "engine" | None, users]

    def link(self, comm_name, cluster_rank_info, rank_table, base_port, timeout_ms):
        """Start linking the comm; returns its comm id at once (status
        PREPARING)."""
        check_comm_name(comm_name)
        everyone = members(rank_table, cluster_rank_info, base_port)
        mine = [m for m in everyone if m.cluster_id == self._cluster_id]
        if not mine:
            raise _invalid(f"cluster_rank_info has no entry for this cluster "
                           f"(cluster_id {self._cluster_id})")
        me = mine[0]
        others = [m for m in everyone if m is not me]
        self._acquire_listener(me)
        with self._lock:
            comm_id = self._next_id
            self._next_id += 1
            comm = Comm(comm_id, comm_name, me, others,
                        time.monotonic() + timeout_ms / 1000)
            self._comms[comm_id] = comm
        for member in others:
            peer = self._engine.find_peer(member.cluster_id)
            if peer is not None and peer.state == LinkState.LINKED:
                comm.peers[member.cluster_id] = peer
                comm.reused.add(peer)
        if len(comm.peers) == len(others):
            comm.status = RegisterMemStatus.OK
        else:
            comm.thread = threading.Thread(target=self._bring_up, args=(comm,), daemon=True,
                                           name=f"kv-comm-{comm_id}")
            comm.thread.start()
        log.info("comm %d (%s): rank %d at %s, linking to %s", comm_id, comm_name, me.rank_id,
                 comm.address, [(m.cluster_id, m.host, m.port) for m in others])
        return comm_id

    def status(self, comm_id):
        return self._comm(comm_id).status

    def unlink(self, comm_id, timeout_ms):
        """Stop bringing the comm up and close its links (each peer is told
        when its link is healthy); the comm id is forgotten."""
        comm = self._comm(comm_id)
        with self._lock:
            if self._comms.get(comm_id) is not comm:
                raise self._unknown(comm_id)
            del self._comms[comm_id]
        self._end(comm, timeout_ms)

    def comm_ids(self):
        """The ids of the comms linked and not unlinked yet."""
        with self._lock:
            return sorted(self._comms)

    def close(self, timeout_ms):
        with self._lock:
            comms, self._comms = list(self._comms.values()), {}
        for comm in comms:
            self._end(comm, timeout_ms)

    def _end(self, comm, timeout_ms):
        comm.stop.set()
        if comm.thread is not None:
            comm.thread.join(max(0.0, comm.deadline - time.monotonic()) + JOIN_MARGIN_S)
        self._close_links(comm, timeout_ms)
        self._release_listener(comm.me)

    def _comm(self, comm_id):
        if isinstance(comm_id, bool) or not isinstance(comm_id, int):
            raise _invalid(f"comm_id must be an int (what link returned), got {comm_id!r}")
        with self._lock:
            comm = self._comms.get(comm_id)
        if comm is None:
            raise self._unknown(comm_id)
        return comm

    @staticmethod
    def _unknown(comm_id):
        return _invalid(f"comm_id {comm_id} is not a linked comm of this LLMDataDist "
                        "(never returned by link, or unlinked)")

    # --- the member address -------------------------------------------------------------

    def _acquire_listener(self, me):
        """Listen at our member address: the engine's own listener when it
        listens there, the engine's listener started there when it listens
        nowhere (its data lanes then use it), else a listener of its own."""
        key = (me.host, me.port)
        engine = self._engine
        with self._lock:
            entry = self._listeners.get(key)
            if entry is not None:
                entry[1] += 1
                return
            current = engine.address
            if current is not None and parse_address(current) == key:
                owner = None
            elif current is None:
                engine.start_listening(format_address(*key))
                owner = "engine"
            else:
                owner = engine.open_listener(format_address(*key))
            self._listeners[key] = [owner, 1]

    def _release_listener(self, me):
        key = (me.host, me.port)
        with self._lock:
            entry = self._listeners.get(key)
            if entry is None:
                return
            entry[1] -= 1
            if entry[1]:
                return
            del self._listeners[key]
        owner = entry[0]
        if owner == "engine":
            self._engine.stop_listening()
        elif owner is not None:
            owner.close()

    # --- bringing the links up ------------------------------------------------------------

    def _bring_up(self, comm):
        try:
            outcome = self._link_all(comm)
        except Exception as exc:            # a bug must end as FAILED, not as PREPARING forever
            log.exception("comm %d: bringing links up failed", comm.comm_id)
            outcome = f"{type(exc).__name__}: {exc}"
        if outcome is None:
            comm.status = RegisterMemStatus.OK
            log.info("comm %d (%s): linked to every member", comm.comm_id, comm.name)
            return
        if comm.stop.is_set():
            return
        comm.reason = outcome
        comm.status = RegisterMemStatus.FAILED
        log.warning("comm %d (%s) failed: %s", comm.comm_id, comm.name, outcome)
        self._close_links(comm, 1000)

    def _link_all(self, comm):
        """None once every member is linked; else why not (at the deadline)."""
        pending = {m.cluster_id: m for m in comm.others if m.cluster_id not in comm.peers}
        last_error = {}
        while True:
            for cluster, member in list(pending.items()):
                peer, error = (self._dial(comm, member) if comm.me.rank_id < member.rank_id
                               else (self._accepted(member), None))
                if peer is not None:
                    with comm.lock:
                        comm.peers[cluster] = peer
                    del pending[cluster]
                elif error:
                    last_error[cluster] = error
            if not pending:
                return None
            if comm.stop.is_set():
                return "unlinked"
            if time.monotonic() >= comm.deadline:
                waiting = ", ".join(
                    f"cluster {c} (rank {m.rank_id} at {format_address(m.host, m.port)}"
                    f"{': ' + last_error[c] if c in last_error else ': never linked to us'})"
                    for c, m in pending.items())
                return f"no link within the link timeout to {waiting}"
            comm.stop.wait(RETRY_S)

    def _dial(self, comm, member):
        left_ms = int((comm.deadline - time.monotonic()) * 1000)
        if left_ms <= 0:
            return None, None
        address = format_address(member.host, member.port)
        try:
            peer = self._engine.connect(address, timeout_ms=left_ms)
        except LLMException as exc:
            made = self._engine.find_peer(member.cluster_id, inbound=False)
            if (exc.status_code == LLMStatusCode.LLM_ALREADY_LINK and made is not None
                    and made.state == LinkState.LINKED):
                comm.reused.add(made)       # linked meanwhile (link_clusters): use that one
                return made, None
            return None, str(exc)
        if peer.cluster_id != member.cluster_id:
            self._engine.disconnect(peer, force=True)
            return None, f"{address} is cluster {peer.cluster_id}, not {member.cluster_id}"
        return peer, None

    def _accepted(self, member):
        peer = self._engine.find_peer(member.cluster_id, inbound=True)
        if peer is not None and peer.inbound and peer.state == LinkState.LINKED:
            return peer
        return None

    def _close_links(self, comm, timeout_ms):
        with comm.lock:
            peers, comm.peers = list(comm.peers.values()), {}
        live = set(self._engine.peers())
        for peer in peers:
            if peer not in live or peer in comm.reused:
                continue              # the member unlinked first, or not our link
            try:
                self._engine.disconnect(peer, force=True, timeout_ms=timeout_ms)
            except LLMException as exc:
                log.info("comm %d: closing the link to %s: %s", comm.comm_id, peer.name, exc)
