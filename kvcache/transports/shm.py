"""Same-host shared-memory transport: a transfer is one memcpy per piece.

The buffer pool lives in a memfd. When a link first needs a peer's memory,
the peer grants it: a control call returns a one-time token and the name of
its abstract Unix socket; over that socket the peer sends the memfds of its
shareable regions and of a pin board made for this link (SCM_RIGHTS), and
we map them. A WRITE or READ is then a copy between our memory and the
mapping, done by the initiator with the GIL released, translating and
copying each piece in one C pass (``pyverbs_kv.pieces.copy_mapped``).

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
from kvcache.descriptors import RegionTable
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.base import SLOTS
from kvcache.transports.tcp.transport import TcpLink, TcpTransport
from pyverbs_kv import pieces

log = logging.getLogger(__name__)

GRANT_TIMEOUT_S = 5
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
        self.maps = []
        self.table = RegionTable()
        self.shift = np.empty(0, dtype=np.uint64)
        self.board = None                  # the peer's board for us: address
        self.mapped = False
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
            for m in self.maps:
                try:
                    m.close()
                except BufferError:
                    pass
            self.maps, self.table, self.board = [], RegionTable(), None


class ShmTransport(TcpTransport):
    """TCP for everything a peer cannot share; memcpy for what it can."""
    name = "shm"
    owner_checks = False           # the initiator copies; the pin board guards liveness

    def __init__(self):
        super().__init__()
        self._shared = {}                   # region id -> (addr, length, fd, offset)
        self._published = set()
        self._boards = {}                   # peer -> _Board (live links)
        self._draining = []                 # boards of ended links with copies left
        self._grants = {}                   # token -> (peer, board)
        self._granting = {}                 # grant thread -> its connection
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket_name = f"kvcache-shm-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener.bind("\0" + self.socket_name)
        self._listener.listen(16)
        self._closed = False
        self._thread = threading.Thread(target=self._serve_grants, name="kv-shm-grants",
                                        daemon=True)
        self._thread.start()

    def bind(self, ctx):
        super().bind(ctx)
        ctx.serve("shm.grant", self._rpc_grant, {})

    # --- the owner's side: regions and boards ------------------------------------------

    def register_region(self, region_id, addr, length, share=None):
        if share is not None:
            with self._lock:
                self._shared[region_id] = (addr, length, share[0], share[1])

    def unregister_region(self, region_id):
        with self._lock:
            self._shared.pop(region_id, None)

    def publish_region(self, region_id):
        with self._lock:
            self._published.add(region_id)
            boards = list(self._boards.values()) + self._draining
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
                board = self._boards[peer] = _Board(self._published)
            self._grants[token] = (peer, board)
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
        """One grant connection, within GRANT_TIMEOUT_S: the token, then our
        memfds and this link's board, to a process of our own user only."""
        try:
            with conn:
                conn.settimeout(GRANT_TIMEOUT_S)
                pid, uid, _ = struct.unpack("3i", conn.getsockopt(
                    socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
                token = conn.recv(64).decode(errors="replace")
                with self._lock:
                    peer, board = self._grants.pop(token, (None, None))
                    shared = list(self._shared.items())
                if board is None or uid != os.getuid():
                    return                      # not a grant we made, or another user
                board.peer_pid = pid
                header = json.dumps([[i, a, n, off] for i, (a, n, _, off) in shared]).encode()
                socket.send_fds(conn, [len(header).to_bytes(4, "big") + header],
                                [fd for _, (_, _, fd, _) in shared] + [board.fd])
        except OSError as exc:
            log.info("shm grant failed: %s", exc)
        finally:
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

    def _mapped(self, peer, deadline):
        """The link's mappings; mapped at first use. A mapping that failed
        is tried again MAP_RETRY_S later (TCP meanwhile)."""
        link = peer.data
        with link.map_lock:
            if not link.mapped and time.monotonic() >= link.retry_at:
                link.retry_at = time.monotonic() + MAP_RETRY_S
                self._map_peer(peer, link, deadline)
        return link

    def _map_peer(self, peer, link, deadline):
        left = deadline - time.monotonic()
        if left <= 0:
            return
        grant = self.engine.call(peer, "shm.grant", {}, max(1, int(left * 1000)))
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(max(0.001, min(GRANT_TIMEOUT_S, deadline - time.monotonic())))
                conn.connect("\0" + str(grant["socket"]))
                conn.sendall(str(grant["token"]).encode())
                data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 64)
        except (OSError, KeyError) as exc:
            log.warning("%s is not reachable over shared memory (%s); using TCP", peer.name, exc)
            return
        try:
            size = int.from_bytes(data[:4], "big")
            regions = _parse_regions(data[4:4 + size])
            if len(regions) + 1 != len(fds):
                raise ValueError(f"{len(regions)} regions and a board but {len(fds)} "
                                 "descriptors")
            if not _size_sealed(fds[-1], BOARD_BYTES):
                raise ValueError("the pin board is not a memfd sealed at its size")
            board = mmap.mmap(fds[-1], BOARD_BYTES)
            link.maps.append(board)
            rows, shifts = [], {}
            for (region_id, addr, length, offset), fd in zip(regions, fds):
                if not _size_sealed(fd, offset + length):
                    log.warning("region %d of %s is not a memfd sealed at its size; using TCP "
                                "for it", region_id, peer.name)
                    continue
                m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=offset)
                link.maps.append(m)
                shifts[region_id] = np.frombuffer(m, dtype=np.uint8).ctypes.data - addr
                rows.append((region_id, addr, length))
            link.table = RegionTable(rows)
            link.shift = np.array([shifts[int(i)] for i in link.table.ids],
                                  dtype=np.int64).view(np.uint64)
            link.board = np.frombuffer(board, dtype=np.uint8).ctypes.data
            link.mapped = True
            log.info("mapped %d shared region(s) of %s", len(rows), peer.name)
        except (ValueError, OSError, LLMException) as exc:
            for m in link.maps:
                m.close()
            link.maps, link.table, link.board = [], RegionTable(), None
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"mapping {peer.name}'s shared memory: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)

    # --- transfers ----------------------------------------------------------------------------

    def _move(self, op, peer, local, remote, lengths, regions, deadline):
        link = self._mapped(peer, deadline)
        with link.map_lock:
            if link.board is None:
                table, shift, board = RegionTable(), link.shift, None
            else:
                table, shift, board = link.table, link.shift, link.board
                link.copies += 1
        missed = None
        if board is not None:
            try:
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


def _parse_regions(raw):
    """[[id, addr, length, offset], ...] sent by the granting peer."""
    value = json.loads(raw)
    if not isinstance(value, list) or not all(
            isinstance(r, list) and len(r) == 4 and all(isinstance(v, int) and v >= 0 for v in r)
            for r in value):
        raise ValueError("malformed region list")
    return value
