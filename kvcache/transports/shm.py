"""Same-host shared-memory transport: a transfer is one memcpy per piece.

The buffer pool lives in a memfd. When a link first needs a peer's memory,
the peer grants it: a control call returns a one-time token and the name of
its abstract Unix socket; over that socket the peer sends the memfds of its
shareable regions (SCM_RIGHTS), and we map them. A WRITE or READ is then a
copy between our memory and the mapping, done by the initiator with the GIL
released, translating and copying each piece in one C pass
(pyverbs_kv.pieces.copy_mapped), no per-block Python loop. Pieces in
peer memory that is not shareable (user memory from register_*) go over TCP
instead, and the log says so. Only regions the peer granted are mapped, only
memfds sealed at their size (a file shrunk under a mapping kills us with
SIGBUS), and unlinking unmaps them."""
import fcntl
import json
import logging
import mmap
import os
import secrets
import socket
import threading

import numpy as np

from kvcache.bufpool import SIZE_SEALS
from kvcache.descriptors import RegionTable
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.tcp import TcpTransport
from pyverbs_kv import pieces

log = logging.getLogger("kvcache.shm")

GRANT_TIMEOUT_S = 5
UNMAP_WAIT_S = 60


class _Mappings:
    """The peer's granted regions as mapped here. Copies run outside the
    lock, so threads copy at once; unmapping waits for them."""

    def __init__(self):
        self.maps = []                      # mmap objects, kept to unmap on unlink
        self.table = RegionTable()
        # For each row of the table: local address - peer address, mod 2**64.
        self.shift = np.empty(0, dtype=np.uint64)
        self.lock = threading.Lock()
        self.copies = 0
        self.idle = threading.Condition(self.lock)

    def end_copy(self):
        with self.lock:
            self.copies -= 1
            self.idle.notify_all()

    def close(self):
        """Unmap (the lock held). A copy still running past UNMAP_WAIT_S keeps
        the mappings alive rather than fault on them."""
        if not self.idle.wait_for(lambda: self.copies == 0, UNMAP_WAIT_S):
            log.error("%d shared-memory copies still running after %d s; the peer's "
                      "memory stays mapped", self.copies, UNMAP_WAIT_S)
        else:
            for m in self.maps:
                m.close()
        self.maps = []
        self.table = RegionTable()
        self.shift = np.empty(0, dtype=np.uint64)


class ShmTransport(TcpTransport):
    """TCP for everything a peer cannot share; memcpy for what it can."""
    name = "shm"

    def __init__(self):
        self._shared = {}                   # region id -> (addr, length, fd, offset)
        self._grants = {}                   # token -> peer name
        self._lock = threading.Lock()
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.socket_name = f"kvcache-shm-{os.getpid()}-{secrets.token_hex(8)}"
        self._listener.bind("\0" + self.socket_name)
        self._listener.listen(16)
        threading.Thread(target=self._serve_grants, name="kv-shm-grants", daemon=True).start()

    def bind(self, engine):
        super().bind(engine)
        engine.add_handler("shm.grant", self._rpc_grant)

    def register_region(self, region_id, addr, length, share=None):
        if share is not None:
            with self._lock:
                self._shared[region_id] = (addr, length, share[0], share[1])

    def unregister_region(self, region_id):
        with self._lock:
            self._shared.pop(region_id, None)

    # --- granting (the side that owns the memory) ------------------------------

    def _rpc_grant(self, peer, params):
        token = secrets.token_hex(16)
        with self._lock:
            self._grants[token] = peer.name
            regions = [[i, a, n] for i, (a, n, _, _) in self._shared.items()]
        return {"socket": self.socket_name, "token": token, "regions": regions}

    def _serve_grants(self):
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(GRANT_TIMEOUT_S)
                    token = conn.recv(64).decode(errors="replace")
                    with self._lock:
                        if self._grants.pop(token, None) is None:
                            continue                # not a grant we made: drop it
                        shared = list(self._shared.items())
                    header = json.dumps([[i, a, n, off] for i, (a, n, _, off) in shared]).encode()
                    socket.send_fds(conn, [len(header).to_bytes(4, "big") + header],
                                    [fd for _, (_, _, fd, _) in shared])
                except OSError as exc:
                    log.info("shm grant failed: %s", exc)

    # --- mapping (the side that initiates) -----------------------------------

    def _mappings(self, peer):
        mappings = peer.attachments.get("shm")
        if mappings is not None:
            return mappings
        mappings = peer.attachments.setdefault("shm", _Mappings())
        with mappings.lock:
            if not mappings.maps:
                self._map_peer(peer, mappings)
        return mappings

    def _map_peer(self, peer, mappings):
        grant = self.engine.call(peer, "shm.grant", {})
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
                conn.settimeout(GRANT_TIMEOUT_S)
                conn.connect("\0" + grant["socket"])
                conn.sendall(grant["token"].encode())
                data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 64)
        except OSError as exc:
            log.warning("%s is not reachable over shared memory (%s); using TCP", peer.name, exc)
            return
        try:
            size = int.from_bytes(data[:4], "big")
            regions = _parse_regions(data[4:4 + size])
            if len(regions) != len(fds):
                raise ValueError(f"{len(regions)} regions but {len(fds)} descriptors")
            rows, shifts = [], {}
            for (region_id, addr, length, offset), fd in zip(regions, fds):
                if not _size_sealed(fd, offset + length):
                    log.warning("%s: region %d of %s is not a memfd sealed at its size; "
                                "using TCP for it", self.engine.name, region_id, peer.name)
                    continue
                m = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                              offset=offset)
                mappings.maps.append(m)
                shifts[region_id] = np.frombuffer(m, dtype=np.uint8).ctypes.data - addr
                rows.append((region_id, addr, length))
            mappings.table = RegionTable(rows)
            mappings.shift = np.array([shifts[int(i)] for i in mappings.table.ids],
                                      dtype=np.int64).view(np.uint64)
            log.info("%s: mapped %d shared region(s) of %s", self.engine.name, len(rows),
                     peer.name)
        except (ValueError, OSError) as exc:
            mappings.close()                # the lock is held by _mappings
            raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                               f"mapping {peer.name}'s shared memory: {exc}") from None
        finally:
            for fd in fds:
                os.close(fd)

    def detach_peer(self, peer):
        super().detach_peer(peer)
        mappings = peer.attachments.pop("shm", None)
        if mappings is not None:
            with mappings.lock:
                mappings.close()

    # --- transfers ---------------------------------------------------------------

    def _move(self, op, peer, local, remote, lengths, regions, timeout_ms):
        mappings = self._mappings(peer)
        with mappings.lock:
            table, shift = mappings.table, mappings.shift
            mappings.copies += 1
        try:
            missed = pieces.copy_mapped(op == "write", local, remote, lengths, table.starts,
                                        table.ends, shift)
        finally:
            mappings.end_copy()
        if missed is not None:
            log.debug("%d pieces to %s are not in shared memory: TCP", missed.size, peer.name)
            tcp = TcpTransport.write if op == "write" else TcpTransport.read
            tcp(self, peer, local[missed], remote[missed], lengths[missed], regions[missed],
                timeout_ms)

    def write(self, peer, local, remote, lengths, regions, timeout_ms):
        self._move("write", peer, local, remote, lengths, regions, timeout_ms)

    def read(self, peer, local, remote, lengths, regions, timeout_ms):
        self._move("read", peer, local, remote, lengths, regions, timeout_ms)

    def close(self):
        self._listener.close()


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
