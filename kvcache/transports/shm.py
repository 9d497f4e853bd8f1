"""Same-host shared-memory transport: a transfer is one memcpy per piece.

Each cache the buffer pool holds is a memfd of its own (the pool gives
every cache one while this transport is in use). When a link first needs a
region of the peer's, the peer grants it: a control call naming the regions
returns a one-time token and the name of its abstract Unix socket; over
that socket (SOCK_SEQPACKET) the peer sends the memfds of those of them it
offers to linked peers, and a pin board made for this link (SCM_RIGHTS),
and we map them. Only a process of the owner's user (or of a user
KVCACHE_SHM_ALLOWED_UIDS names), on an authenticated link, is granted
anything, and never the pool, free space or a cache not offered; regions
the owner released since the last grant are named so we unmap them. A
WRITE or READ is then a copy between our memory and the mapping, done by
the initiator with the GIL released, translating and copying each piece
in one C pass (``pyverbs_kv.pieces.copy_mapped``).

The owner keeps control of its memory through the pin board
(``pyverbs_kv.pieces.board_*``): one slot per addressable region, naming the
live region and counting copies in flight. Before copying, the initiator
enters the slots of the regions its pieces name and checks they still name
them; the owner releasing a region clears its slot in every board and waits
for the copies in flight to end. A copy that would pass its deadline stops
between chunks and fails with LLM_TIMEOUT, so nothing lands later.

Pieces in peer memory that is not shareable (user memory from register_*)
go over TCP instead. Only memfds sealed at their size are mapped (a file
shrunk under a mapping kills us with SIGBUS), and unlinking unmaps them."""
import fcntl
import json
import logging
import mmap
import os
import secrets
import socket
import struct
import threading
import time

import numpy as np

from kvcache.bufpool import SIZE_SEALS
from kvcache.config import env_list
from kvcache.descriptors import RegionTable
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.base import SLOTS
from kvcache.transports.tcp.transport import TcpLink, TcpTransport
from pyverbs_kv import pieces

log = logging.getLogger(__name__)

GRANT_TIMEOUT_S = 5
GRANT_FDS = 200                  # descriptors per grant message (the kernel takes 253)
MAX_GRANT_IDS = 1024             # regions one grant may name (the rest: the next grant)
GRANT_MESSAGE_BYTES = 1 << 18
MAX_GRANTS_AT_ONCE = 16
MAP_RETRY_S = 1.0                # after a failed mapping, TCP for this long, then try again
UNMAP_WAIT_S = 60
BOARD_BYTES = 16 * SLOTS
CHUNK_BYTES = 16 << 20           # a copy checks its deadline and link between chunks
POLL_S = 0.001


class _Board:
    """A pin board we made for one peer (the owner's side)."""

    def __init__(self, published):
        self.fd = os.memfd_create("kvcache-board", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, BOARD_BYTES)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
        self.map = mmap.mmap(self.fd, BOARD_BYTES)
        self.addr = np.frombuffer(self.map, dtype=np.uint8).ctypes.data
        self.peer_pid = None
        self.granted = set()               # region ids whose memfds the peer was sent
        for region_id in published:
            pieces.board_publish(self.addr, region_id % SLOTS, region_id)

    def busy(self, slot):
        return pieces.board_in_flight(self.addr, slot)

    def close(self):
        os.close(self.fd)
        try:
            self.map.close()
        except BufferError:          # a view still exported: the GC releases it
            pass


class ShmLink(TcpLink):
    """A link's lanes plus the peer's memory as mapped here."""

    def __init__(self, lanes):
        super().__init__(lanes)
        self.maps = []                     # every mapping of the peer's (board included)
        self.regions = {}                  # region id -> (addr, length, mapping, shift)
        self.unshared = set()              # ids the peer did not grant: TCP
        self.stale = []                    # mappings of released regions, to unmap
        self.table = RegionTable()
        self.shift = np.empty(0, dtype=np.uint64)
        self.board = None                  # the peer's board for us: address
        self.retry_at = 0.0
        self.map_lock = threading.Lock()
        self.copies = 0
        self.idle = threading.Condition(self.map_lock)

    def end_copy(self):
        with self.map_lock:
            self.copies -= 1
            self.idle.notify_all()

    def close(self):
        super().close()
        with self.map_lock:
            if not self.idle.wait_for(lambda: self.copies == 0, UNMAP_WAIT_S):
                log.error("%d shared-memory copies still running after %d s; the peer's "
                          "memory stays mapped", self.copies, UNMAP_WAIT_S)
                return
            for m in self.maps + self.stale:
                _unmap(m)
            self.maps, self.stale, self.regions = [], [], {}
            self.table, self.board = RegionTable(), None

    def drop(self, ids):
        """Forget the regions ``ids`` (the peer released them); their
        mappings go once no copy runs (``unmap_stale``), outside the copy
        that asked for the grant (an unmap frees the pages: milliseconds per
        100 MiB). Under map_lock."""
        for region_id in ids:
            entry = self.regions.pop(region_id, None)
            if entry is not None:
                self.maps.remove(entry[2])
                self.stale.append(entry[2])

    def unmap_stale(self):
        with self.map_lock:
            if self.copies:
                return
            stale, self.stale = self.stale, []
        for mapping in stale:
            _unmap(mapping)

    def rebuild(self):
        """The table and shifts of what is mapped (under map_lock)."""
        self.table = RegionTable((i, e[0], e[1]) for i, e in self.regions.items())
        self.shift = np.array([self.regions[int(i)][3] for i in self.table.ids],
                              dtype=np.int64).view(np.uint64)


class ShmTransport(TcpTransport):
    """TCP for everything a peer cannot share; memcpy for what it can."""
    name = "shm"
    owner_checks = False           # the initiator copies; the pin board guards liveness
    maps_peer_memory = True

    def __init__(self):
        super().__init__()
        self._published = set()
        self._boards = {}                   # peer -> _Board (live links)
        self._draining = []                 # boards of ended links with copies left
        self._grants = {}                   # token -> (peer, board)
        self._granting = {}                 # grant thread -> its connection
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.socket_name = f"kvcache-shm-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener.bind("\0" + self.socket_name)
        self._listener.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._serve_grants, name="kv-shm-grants",
                                        daemon=True)
        self._thread.start()

    def bind(self, ctx):
        super().bind(ctx)
        ctx.serve("shm.grant", self._rpc_grant, {"ids": _region_ids})
        self._allowed_uids = {os.getuid()} | _allowed_uids()

    # --- the owner's side: regions and boards ------------------------------------------

    def publish_region(self, region_id):
        owner = self.engine.regions.owner(region_id)
        with self._lock:
            self._published.add(region_id)
            if owner is None:
                boards = list(self._boards.values()) + self._draining
            else:                           # offered to that link only
                boards = [self._boards[owner]] if owner in self._boards else []
        for board in boards:
            pieces.board_publish(board.addr, region_id % SLOTS, region_id)

    def withdraw_region(self, region_id, deadline):
        slot = region_id % SLOTS
        with self._lock:
            self._published.discard(region_id)
            boards = list(self._boards.values()) + self._draining
        for board in boards:
            pieces.board_publish(board.addr, slot, 0)
        while True:
            for board in boards:
                if board.busy(slot) and self._copier_dead(board):
                    pieces.board_reset(board.addr, slot)
            busy = [b for b in boards if b.busy(slot)]
            if not busy:
                self._drop_drained()
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(POLL_S)

    def _copier_dead(self, board):
        """A copier that died mid-copy leaves its count behind; it writes no
        more."""
        if board.peer_pid is None or board.peer_pid == os.getpid():
            return False
        try:
            os.kill(board.peer_pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    def _drop_drained(self):
        with self._lock:
            draining, self._draining = self._draining, []
        for board in draining:
            if self._copier_dead(board) or not pieces.board_busy_slots(board.addr, SLOTS):
                board.close()
            else:
                with self._lock:
                    self._draining.append(board)

    def _rpc_grant(self, peer, params):
        token = secrets.token_hex(16)
        with self._lock:
            board = self._boards.get(peer)
            if board is None:
                board = self._boards[peer] = _Board(
                    self.engine.regions.visible(self._published, peer))
            self._grants[token] = (peer, board, params["ids"])
        return {"socket": self.socket_name, "token": token}

    def _serve_grants(self):
        while not self._closed:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                if self._closed or len(self._granting) >= MAX_GRANTS_AT_ONCE:
                    conn.close()                # a peer flooding us gets nothing
                    continue
                thread = threading.Thread(target=self._grant, args=(conn,),
                                          name="kv-shm-grant", daemon=True)
                self._granting[thread] = conn
            thread.start()

    def _grant(self, conn):
        """One grant connection, within GRANT_TIMEOUT_S: the token, then the
        memfds of the regions asked for that we offer, in messages of at
        most GRANT_FDS, the last with this link's board and the ids granted
        before that we released since; to an allowed user only."""
        shares = []
        try:
            with conn:
                conn.settimeout(GRANT_TIMEOUT_S)
                pid, uid, _ = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                token = conn.recv(64).decode(errors="replace")
                with self._lock:
                    peer, board, ids = self._grants.pop(token, (None, None, None))
                if board is None or uid not in self._allowed_uids:
                    if board is not None:
                        log.warning("shm grant to %s refused: its process runs as uid %d "
                                    "(allowed: %s, see KVCACHE_SHM_ALLOWED_UIDS)", peer.name,
                                    uid, sorted(self._allowed_uids))
                    return                      # not a grant we made, or another user
                board.peer_pid = pid
                shares = self.engine.regions.shares(ids, peer)
                gone = sorted(i for i in board.granted if i not in self.engine.regions)
                rows = [[i, a, n, off] for i, a, n, _, off in shares]
                for start in range(0, max(1, len(rows)), GRANT_FDS):
                    last = start + GRANT_FDS >= len(rows)
                    body = {"rows": rows[start:start + GRANT_FDS], "last": last,
                            "gone": gone if last else []}
                    fds = [s[3] for s in shares[start:start + GRANT_FDS]]
                    socket.send_fds(conn, [json.dumps(body).encode()],
                                    fds + ([board.fd] if last else []))
                board.granted = (board.granted - set(gone)) | {row[0] for row in rows}
        except OSError as exc:
            log.info("shm grant failed: %s", exc)
        finally:
            for share in shares:
                os.close(share[3])
            with self._lock:
                self._granting.pop(threading.current_thread(), None)

    def detach_peer(self, peer):
        super().detach_peer(peer)
        with self._lock:
            board = self._boards.pop(peer, None)
            self._grants = {t: g for t, g in self._grants.items() if g[0] is not peer}
            slots = {i % SLOTS for i in self._published}
        if board is not None:
            # The peer may still hold the mapping: nothing stays published to
            # it, and the board is kept while copies of its are in flight.
            for slot in slots:
                pieces.board_publish(board.addr, slot, 0)
            with self._lock:
                self._draining.append(board)
            self._drop_drained()

    # --- the initiator's side: mapping ----------------------------------------------------

    def attach_peer(self, peer, timeout_ms):
        lanes = super().attach_peer(peer, timeout_ms).lanes
        return ShmLink(lanes)

    def _mapped(self, peer, regions, deadline):
        """The link's mappings, with the regions ``regions`` names mapped
        when the peer grants them. After a failed grant, TCP for MAP_RETRY_S."""
        link = peer.data
        with link.map_lock:
            unknown = [int(i) for i in pieces.distinct(regions)
                       if int(i) not in link.regions and int(i) not in link.unshared]
            if unknown and time.monotonic() >= link.retry_at:
                link.retry_at = time.monotonic() + MAP_RETRY_S
                self._map_peer(peer, link, unknown[:MAX_GRANT_IDS], deadline)
                link.retry_at = 0.0
        return link

    def _map_peer(self, peer, link, ids, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        grant = self.engine.call(peer, "shm.grant", {"ids": ids}, max(1, int(left * 1000)))
        messages, fds = [], []
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
                conn.settimeout(max(0.001, min(GRANT_TIMEOUT_S, deadline - time.monotonic())))
                conn.connect("\0" + str(grant["socket"]))
                conn.sendall(str(grant["token"]).encode())
                while not messages or not messages[-1][0].get("last"):
                    data, got, _, _ = socket.recv_fds(conn, GRANT_MESSAGE_BYTES, GRANT_FDS + 1)
                    fds += got
                    if not data:
                        raise OSError("the grant ended early (refused?)")
                    messages.append((_parse_grant(data), got))
        except (OSError, KeyError, ValueError) as exc:
            for fd in fds:
                os.close(fd)
            log.warning("%s is not reachable over shared memory (%s); using TCP", peer.name, exc)
            return
        try:
            self._take_grant(peer, link, ids, messages)
        except (ValueError, OSError) as exc:
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"mapping {peer.name}'s shared memory: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def _take_grant(self, peer, link, ids, messages):
        """Map what a grant sent (under map_lock)."""
        *_, (last, last_fds) = messages
        if len(last_fds) != len(last["rows"]) + 1:
            raise ValueError("the grant's last message carries no pin board")
        if link.board is None:
            if not _size_sealed(last_fds[-1], BOARD_BYTES):
                raise ValueError("the pin board is not a memfd sealed at its size")
            board = mmap.mmap(last_fds[-1], BOARD_BYTES)
            link.maps.append(board)
            link.board = np.frombuffer(board, dtype=np.uint8).ctypes.data
        link.drop(last["gone"])
        granted = set()
        for body, got in messages:
            if len(got) < len(body["rows"]):
                raise ValueError(f"{len(body['rows'])} regions but {len(got)} descriptors")
            for (region_id, addr, length, offset), fd in zip(body["rows"], got):
                if not _size_sealed(fd, offset + length):
                    log.warning("region %d of %s is not a memfd sealed at its size; using TCP "
                                "for it", region_id, peer.name)
                    continue
                m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=offset)
                link.maps.append(m)
                # Live regions never overlap: what does is released.
                link.drop([i for i, e in link.regions.items()
                           if e[0] < addr + length and addr < e[0] + e[1]])
                shift = np.frombuffer(m, dtype=np.uint8).ctypes.data - addr
                link.regions[region_id] = (addr, length, m, shift)
                granted.add(region_id)
        if len(link.unshared) > 4 * SLOTS:           # ids are never reused: forget old ones
            link.unshared.clear()
        link.unshared.update(set(ids) - granted)
        link.rebuild()
        log.info("mapped %d shared region(s) of %s", len(granted), peer.name)

    # --- transfers ----------------------------------------------------------------------------

    def _move(self, op, peer, local, remote, lengths, regions, deadline):
        link = self._mapped(peer, regions, deadline)
        with link.map_lock:
            if link.board is None:
                table, shift, board = RegionTable(), link.shift, None
            else:
                table, shift, board = link.table, link.shift, link.board
                link.copies += 1
            # Only pieces of a region mapped under its own id are copied: a
            # mapping of a released region may still cover the same
            # addresses (it goes at the next grant).
            unmapped = [i for i in pieces.distinct(regions) if int(i) not in link.regions]
        missed = None
        if board is not None:
            try:
                if unmapped:
                    tcp_only = np.isin(regions, np.array(unmapped, dtype=np.uint64))
                    part = np.flatnonzero(~tcp_only)
                    missed = np.flatnonzero(tcp_only)
                    if part.size:
                        more = self._copy(op, peer, board, local[part], remote[part],
                                          lengths[part], regions[part], table, shift, deadline)
                        if more is not None:
                            missed = np.sort(np.concatenate([missed, part[more]]))
                else:
                    missed = self._copy(op, peer, board, local, remote, lengths, regions, table,
                                        shift, deadline)
            finally:
                link.end_copy()
        else:
            missed = np.arange(lengths.size)
        if missed is not None and missed.size:
            log.debug("%d pieces to %s are not in shared memory: TCP", missed.size, peer.name)
            tcp = TcpTransport.write if op == "write" else TcpTransport.read
            tcp(self, peer, local[missed], remote[missed], lengths[missed], regions[missed],
                deadline)
        if link.stale:
            link.unmap_stale()

    def _copy(self, op, peer, board, local, remote, lengths, regions, table, shift, deadline):
        """Copy in chunks, inside the board slots of the named regions.
        Returns the indices of pieces not in shared memory (or None)."""
        ids = np.array(pieces.distinct(regions), dtype=np.uint64)
        slots = ids % np.uint64(SLOTS)
        bad = pieces.board_enter(board, slots, ids)
        if bad >= 0 and not peer.linked:       # an ending link clears the boards
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"{op} to {peer.name}: the link ended ({peer.link.reason})")
        if bad >= 0:
            raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                               f"{peer.name} released region {int(ids[bad])} (its pin board "
                               "no longer names it)")
        try:
            total = pieces.length_total(lengths)[0]
            ends = np.cumsum(lengths) if total > CHUNK_BYTES else None
            missed, start = [], 0
            while start < lengths.size:
                if time.monotonic() >= deadline:
                    raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                                       f"{op} to {peer.name}: the deadline passed after "
                                       f"{start} of {lengths.size} pieces")
                if not peer.linked:
                    raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                       f"{op} to {peer.name}: the link ended after {start} "
                                       f"of {lengths.size} pieces ({peer.link.reason})")
                if ends is None:
                    stop = lengths.size
                else:
                    stop = max(start + 1, int(np.searchsorted(
                        ends, ends[start] - lengths[start] + CHUNK_BYTES, side="right")))
                part = slice(start, stop)
                got = pieces.copy_mapped(op == "write", local[part], remote[part],
                                         lengths[part], table.starts, table.ends, shift)
                if got is not None:
                    missed.append(got + start)
                start = stop
        finally:
            pieces.board_leave(board, slots)
        return np.concatenate(missed) if missed else None

    def write(self, peer, local, remote, lengths, regions, deadline):
        self._move("write", peer, local, remote, lengths, regions, deadline)

    def read(self, peer, local, remote, lengths, regions, deadline):
        self._move("read", peer, local, remote, lengths, regions, deadline)

    def close(self):
        self._closed = True
        try:
            self._listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._thread.join(5)
        self._listener.close()
        with self._lock:
            granting = dict(self._granting)
        for thread, conn in granting.items():
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            thread.join(5)
        with self._lock:
            boards = list(self._boards.values()) + self._draining
            self._boards, self._draining = {}, []
        for board in boards:
            board.close()


def _size_sealed(fd, end):
    """Whether ``fd`` is at least ``end`` bytes and sealed against shrinking
    (and growing): only then can a mapping of it never fault with SIGBUS."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:                        # not a memfd, or sealing not allowed
        return False
    return seals & SIZE_SEALS == SIZE_SEALS and os.fstat(fd).st_size >= end


def _parse_grant(raw):
    """One grant message: {"rows": [[id, addr, length, offset], ...], "last",
    "gone": [id, ...]}."""
    value = json.loads(raw)
    if not isinstance(value, dict):
        raise ValueError("malformed grant")
    rows, gone = value.get("rows"), value.get("gone")
    if not isinstance(rows, list) or not isinstance(gone, list) or not all(
            isinstance(r, list) and len(r) == 4 and all(_is_uint(v) for v in r)
            for r in rows) or not all(_is_uint(v) for v in gone):
        raise ValueError("malformed grant")
    return value


def _is_uint(value):
    return type(value) is int and value >= 0


def _region_ids(value):
    return (isinstance(value, list) and len(value) <= MAX_GRANT_IDS
            and all(type(v) is int and v > 0 for v in value))


def _allowed_uids():
    """Users besides our own whose processes may map our caches
    (KVCACHE_SHM_ALLOWED_UIDS, comma-separated uids)."""
    try:
        return {int(uid) for uid in env_list("KVCACHE_SHM_ALLOWED_UIDS")}
    except ValueError:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           "KVCACHE_SHM_ALLOWED_UIDS must be comma-separated numeric uids") \
            from None


def _unmap(mapping):
    try:
        mapping.close()
    except BufferError:          # a view still exported: the GC releases it
        pass
