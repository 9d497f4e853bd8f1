"""Least privilege per link: a peer that proved the shared secret learns and
reaches only what is offered to linked peers (caches addressable by
llm_datadist's rules, registered memory marked remote_accessible), never
free pool space, freed caches or memory kept local. The owner runs in its
own process; the attacker is a raw socket in this one that speaks the wire
protocol by hand (with the secret), naming whatever descriptors it likes."""
import json
import mmap
import os
import secrets
import socket

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kv_peer import PeerError, PeerProcess, pattern
from kvcache import LLMStatusCode, TransferEngine
from kvcache.engine import auth
from kvcache.transports.tcp.protocol import VERSION, MsgType
from test_inputs import (HELLO, HELLO_ACK, MAGIC, READY, REPLY, WIRE, hello, port_of,
                         recv_wire_frame, wire_frame)

KEY = "a-shared-secret-of-32-characters"
POOL = '{"buf_pool_size": 8388608}'
SHAPE = [8, 1024]                       # 8 blocks of 2 KiB (float16) per tensor
TENSOR_BYTES = 8 * 1024 * 2
TRANSPORTS = ["tcp", "shm"]


class Attacker:
    """A raw socket linked with the secret: it sends calls and data requests
    the way a hostile process that knows the secret would."""

    def __init__(self, address, transport, name="attacker"):
        self.sock = socket.create_connection(("127.0.0.1", port_of(address)), timeout=10)
        mine = "ef" * 32
        self.sock.sendall(wire_frame(HELLO, 0, dict(hello(name, transport, []), nonce=mine)))
        frame = recv_wire_frame(self.sock)
        assert frame is not None and frame[0] == HELLO_ACK and frame[2]["status"] == 0, frame
        ack = frame[2]
        assert ack["regions"] == []
        proof = auth.proof(auth.load_key(KEY), "initiator", mine, ack["nonce"], name,
                           ack["name"])
        self.sock.sendall(wire_frame(READY, 0, {"proof": proof}))
        self.next_id = 1

    def _request(self, msg_type, header, payload=b""):
        req_id, self.next_id = self.next_id, self.next_id + 1
        self.sock.sendall(wire_frame(int(msg_type), req_id, header, payload))
        while True:
            frame = recv_wire_frame(self.sock)
            assert frame is not None, "the owner dropped the link"
            if frame[0] == REPLY and frame[1] == req_id:
                return frame[2], frame[3]

    def call(self, method, params):
        reply, _ = self._request(MsgType.CALL, {"method": method, "params": params})
        return reply

    def move(self, op, regions, addrs, lengths, data=b""):
        """A READ or WRITE naming raw descriptors: (reply header, payload)."""
        columns = np.array([regions, addrs, lengths], dtype="<u8").tobytes()
        msg = MsgType.READ if op == "read" else MsgType.WRITE
        return self._request(msg, {"count": len(lengths), "bytes": int(sum(lengths))},
                             columns + data)

    def close(self):
        self.sock.close()


@pytest.fixture(params=TRANSPORTS)
def owner(request):
    """A prompt process with the secret and caches of every kind: an offered
    keyed cache (A), an offered cache without key (D, reachable by
    CacheKeyByIdAndIndex), a freed one (B), registered memory kept local (C)
    and registered memory offered (E)."""
    transport = request.param
    peer = PeerProcess("prompt", 1, transport=transport, auth_key=KEY, buf_pool_cfg=POOL)
    try:
        caches = {
            "A": peer.call("alloc_blocks", 2, SHAPE, key_cluster=1),
            "B": peer.call("alloc_cache", 2, [1, 4096]),
            "D": peer.call("alloc_cache", 2, [1, 4096]),
            "C": peer.call("register_blocks", 2, SHAPE, None, remote_accessible=False),
            "E": peer.call("register_blocks", 2, SHAPE, None, remote_accessible=True),
        }
        for seed, cache_id in enumerate(caches.values()):
            peer.call("fill", cache_id, seed + 10)
        described = {name: peer.call("describe", cache_id) for name, cache_id in caches.items()}
        peer.call("deallocate", caches["B"])
        yield transport, peer, caches, described
    finally:
        peer.close()


def _regions_of(described, *names):
    return {r for name in names for r in described[name]["region_ids"]}


def test_the_region_table_lists_only_offered_caches(owner):
    transport, peer, caches, described = owner
    attacker = Attacker(peer.address, transport)
    try:
        reply = attacker.call("engine.regions", {})
        assert reply["status"] == 0
        listed = {row[0] for row in reply["result"]["regions"]}
        assert listed == _regions_of(described, "A", "D", "E")
        base, size = peer.call("pool")
        assert all(row[2] < size for row in reply["result"]["regions"])   # never the pool
    finally:
        attacker.close()


def test_lookups_find_offered_caches_only(owner):
    transport, peer, caches, described = owner
    attacker = Attacker(peer.address, transport)
    try:
        for name, found in (("A", True), ("D", True), ("E", True), ("B", False),
                            ("C", False)):
            reply = attacker.call("cache.lookup", {"by": "id", "cache_id": caches[name]})
            if found:
                assert reply["status"] == 0, (name, reply)
                assert reply["result"]["region_ids"] == described[name]["region_ids"]
            else:
                assert reply["status"] == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, (name, reply)
                assert "tensor_addrs" not in str(reply)
    finally:
        attacker.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_peer_cannot_consume_the_key_of_a_cache_kept_local(transport):
    # A key is consumed on its owner when a peer reports a whole-row pull;
    # a peer must not use that report to drop a key it could never look up.
    peer = PeerProcess("prompt", 1, transport=transport, auth_key=KEY, buf_pool_cfg=POOL)
    try:
        peer.call("register_cache", 2, [1, 4096], [(1, 7)], remote_accessible=False)
        peer.call("register_cache", 2, [1, 4096], [(1, 8)])
        attacker = Attacker(peer.address, transport)
        try:
            kept = attacker.call("cache.consume", {"by": "key", "cluster_id": 1, "req_id": 7})
            assert kept["status"] == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
            unknown = attacker.call("cache.consume", {"by": "key", "cluster_id": 1,
                                                      "req_id": 9})
            assert unknown["status"] == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
            offered = attacker.call("cache.consume", {"by": "key", "cluster_id": 1,
                                                      "req_id": 8})
            assert offered["status"] == 0
        finally:
            attacker.close()
        assert peer.call("has_key", 1, 7) and not peer.call("has_key", 1, 8)
    finally:
        peer.close()


def test_raw_descriptors_outside_offered_caches_are_refused(owner):
    transport, peer, caches, described = owner
    base, size = peer.call("pool")
    a = described["A"]
    attacker = Attacker(peer.address, transport)
    try:
        # What is offered is read byte-exact: the attack channel itself works.
        reply, data = attacker.move("read", [a["region_ids"][1]], [a["tensor_addrs"][1]],
                                    [TENSOR_BYTES])
        assert reply["status"] == 0
        assert data == pattern(10, 1, TENSOR_BYTES).tobytes()

        free = base + size - 65536                 # the pool's last 64 KiB are free
        before = peer.call("pool_bytes", size - 65536, 65536)
        refused = {
            "free space named as region A": ([a["region_ids"][0]], [free], [4096]),
            "free space without a region": ([0], [free], [4096]),
            "A and the bytes after it": ([a["region_ids"][1]], [a["tensor_addrs"][1]],
                                         [TENSOR_BYTES + 4096]),
            "the freed cache B": ([described["B"]["region_ids"][0]],
                                  [described["B"]["tensor_addrs"][0]], [4096]),
            "the local cache C": ([described["C"]["region_ids"][0]],
                                  [described["C"]["tensor_addrs"][0]], [TENSOR_BYTES]),
            "C named as region A": ([a["region_ids"][0]], [described["C"]["tensor_addrs"][0]],
                                    [TENSOR_BYTES]),
        }
        for what, (regions, addrs, lengths) in refused.items():
            for op in ("read", "write"):
                payload = b"\xAA" * sum(lengths) if op == "write" else b""
                reply, data = attacker.move(op, regions, addrs, lengths, payload)
                assert reply["status"] in (LLMStatusCode.LLM_PARAM_INVALID,
                                           LLMStatusCode.LLM_KV_CACHE_NOT_EXIST), (what, op)
                assert data == b"", (what, op)
        assert peer.call("pool_bytes", size - 65536, 65536) == before
        c = peer.call("tensors", caches["C"])
        assert all((t.reshape(-1) == pattern(13, i, TENSOR_BYTES)).all()
                   for i, t in enumerate(c))
    finally:
        attacker.close()


def test_a_decoder_with_the_secret_pulls_offered_caches_and_not_local_ones(owner):
    transport, peer, caches, described = owner
    decoder = PeerProcess("decoder", 2, listen="", transport=transport, auth_key=KEY,
                          buf_pool_cfg=POOL)
    try:
        assert decoder.call("link", 1, peer.address) == 0
        dst = decoder.call("alloc_blocks", 2, SHAPE)
        decoder.call("pull_blocks", 1, dst, list(range(8)), list(range(8)))
        got = decoder.call("tensors", dst)
        assert all((t.reshape(-1) == pattern(10, i, TENSOR_BYTES)).all()
                   for i, t in enumerate(got))
        row = decoder.call("alloc_cache", 2, [1, 4096])
        with pytest.raises(PeerError) as err:
            decoder.call("pull_cache", 1, caches["C"], row)
        assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
        decoder.call("pull_cache", 1, caches["D"], row)
        got = decoder.call("tensors", row)
        assert all((t.reshape(-1) == pattern(12, i, 8192)).all() for i, t in enumerate(got))
    finally:
        decoder.close()


def _grant(attacker, ids):
    """What an shm grant of ``ids`` hands over: [(row, fd)], the board fd."""
    reply = attacker.call("shm.grant", {"ids": ids})
    assert reply["status"] == 0, reply
    got = []
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as conn:
        conn.settimeout(10)
        conn.connect("\0" + reply["result"]["socket"])
        conn.sendall(reply["result"]["token"].encode())
        while True:
            data, fds, _, _ = socket.recv_fds(conn, 1 << 18, 256)
            body = json.loads(data)
            got += list(zip(body["rows"], fds))
            if body["last"]:
                return got, fds[len(body["rows"]):]


def _memfd_inode(pid, addr):
    """The inode of the memfd mapped at ``addr`` in process ``pid``."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            span, _perms, _offset, _dev, inode = line.split()[:5]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if lo <= addr < hi:
                return int(inode)
    raise AssertionError(f"nothing mapped at {addr:#x} in {pid}")


def test_an_shm_grant_hands_over_only_offered_caches():
    peer = PeerProcess("prompt", 1, transport="shm", auth_key=KEY, buf_pool_cfg=POOL)
    attacker = None
    try:
        a = peer.call("alloc_blocks", 2, SHAPE, key_cluster=1)
        d = peer.call("alloc_cache", 2, [1, 4096])
        b = peer.call("alloc_cache", 2, [1, 4096])
        c = peer.call("register_blocks", 2, SHAPE, None, remote_accessible=False)
        for seed, cache_id in enumerate((a, d, b, c)):
            peer.call("fill", cache_id, seed + 20)
        offered = {cache_id: peer.call("describe", cache_id) for cache_id in (a, d)}
        freed = peer.call("describe", b)["region_ids"][0]
        peer.call("deallocate", b)
        attacker = Attacker(peer.address, "shm")
        # Ask for every region id there ever was (pool, containers, caches).
        top = max(r for info in offered.values() for r in info["region_ids"]) + 8
        granted, board = _grant(attacker, list(range(1, top)))
        assert len(board) == 1
        ids = {row[0] for row, _ in granted}
        assert ids == {info["region_ids"][0] for info in offered.values()}
        assert freed not in ids
        base, pool_size = peer.call("pool")
        for (region_id, _addr, length, offset), fd in granted:
            # Each descriptor holds one cache and nothing around it.
            assert offset == 0 and os.fstat(fd).st_size < pool_size
            info = next(i for i in offered.values() if i["region_ids"][0] == region_id)
            tensor = TENSOR_BYTES if info["kind"] == "blocks" else 8192
            assert os.fstat(fd).st_size == -(-length // mmap.PAGESIZE) * mmap.PAGESIZE
            view = mmap.mmap(fd, length, mmap.MAP_SHARED, mmap.PROT_READ)
            seed = 20 if region_id == offered[a]["region_ids"][0] else 21
            assert view[:tensor] == pattern(seed, 0, tensor).tobytes()
            view.close()
        for _, fd in granted:
            os.close(fd)
        os.close(board[0])

        # A decoder pulling over shm maps the cache it pulls, never the pool.
        decoder = PeerProcess("decoder", 2, listen="", transport="shm", auth_key=KEY,
                              buf_pool_cfg=POOL)
        try:
            assert decoder.call("link", 1, peer.address) == 0
            dst = decoder.call("alloc_blocks", 2, SHAPE)
            decoder.call("pull_blocks", 1, dst, list(range(8)), list(range(8)))
            got = decoder.call("tensors", dst)
            assert all((t.reshape(-1) == pattern(20, i, TENSOR_BYTES)).all()
                       for i, t in enumerate(got))
            pool_inode = _memfd_inode(peer.process.pid, base + pool_size - 4096)
            cache_inode = _memfd_inode(peer.process.pid, offered[a]["tensor_addrs"][0])
            with open(f"/proc/{decoder.process.pid}/maps") as maps:
                inodes = {int(line.split()[4]) for line in maps}
            assert cache_inode in inodes                    # pulled through the mapping
            assert pool_inode not in inodes
        finally:
            decoder.close()
    finally:
        if attacker is not None:
            attacker.close()
        peer.close()


_FUZZ = {}


def _fuzz_owner():
    if not _FUZZ:
        owner = TransferEngine("fuzz-owner", auth_key=KEY, handshake_timeout_ms=1000,
                               io_timeout_ms=1000)
        memory = np.full(1 << 16, 0x3C, dtype=np.uint8)
        owner.register_memory(memory.ctypes.data, memory.nbytes)
        _FUZZ.update(owner=owner, memory=memory)
    return _FUZZ["owner"], _FUZZ["memory"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(msg_type=st.integers(0, 40), header=st.one_of(
           st.dictionaries(st.sampled_from(["count", "bytes", "method", "params", "name",
                                            "token"]),
                           st.one_of(st.integers(-2, 1 << 33), st.text(max_size=8),
                                     st.just({}))),
           st.just({"count": 1, "bytes": 4096})),
       payload=st.binary(max_size=96))
def test_fuzzed_frames_from_an_authenticated_peer_cost_it_its_link_only(msg_type, header,
                                                                        payload):
    owner, memory = _fuzz_owner()
    attacker = Attacker(owner.address, "tcp", name=f"fuzz-{secrets.token_hex(4)}")
    try:
        body = json.dumps(header).encode()
        attacker.sock.sendall(WIRE.pack(MAGIC, VERSION, msg_type, 7, len(body), len(payload))
                              + body + payload)
        attacker.sock.settimeout(3)
        try:
            while attacker.sock.recv(65536):
                pass
        except OSError:
            pass
    finally:
        attacker.close()
    assert (memory == 0x3C).all()                   # nothing it sent landed
    with TransferEngine("probe", listen=None, auth_key=KEY) as probe:
        mine = np.zeros(4096, dtype=np.uint8)
        probe.register_memory(mine.ctypes.data, mine.nbytes, remote_accessible=False)
        peer = probe.connect(owner.address, timeout_ms=5000)
        probe.transfer_sync(peer, "read", [mine.ctypes.data], [memory.ctypes.data], [4096])
        assert (mine == 0x3C).all()
        probe.disconnect(peer)


@pytest.mark.rdma
def test_rdma_keys_cover_only_offered_regions():
    peer = PeerProcess("prompt", 1, transport="rdma", auth_key=KEY, buf_pool_cfg=POOL)
    attacker = decoder = None
    try:
        a = peer.call("alloc_blocks", 2, SHAPE, key_cluster=1)
        b = peer.call("alloc_cache", 2, [1, 4096])
        c = peer.call("register_blocks", 2, SHAPE, None, remote_accessible=False)
        for seed, cache_id in enumerate((a, b, c)):
            peer.call("fill", cache_id, seed + 30)
        offered = peer.call("describe", a)
        peer.call("deallocate", b)
        attacker = Attacker(peer.address, "rdma")
        reply = attacker.call("rdma.keys", {})
        assert reply["status"] == 0, reply
        # No rkey for the pool, the freed cache or the local one: only A's.
        keys = reply["result"]["keys"]
        assert {k[0] for k in keys} == set(offered["region_ids"])
        _base, pool_size = peer.call("pool")
        assert all(k[2] < pool_size for k in keys)
        decoder = PeerProcess("decoder", 2, listen="", transport="rdma", auth_key=KEY,
                              buf_pool_cfg=POOL)
        assert decoder.call("link", 1, peer.address) == 0
        dst = decoder.call("alloc_blocks", 2, SHAPE)
        decoder.call("pull_blocks", 1, dst, list(range(8)), list(range(8)))
        got = decoder.call("tensors", dst)
        assert all((t.reshape(-1) == pattern(30, i, TENSOR_BYTES)).all()
                   for i, t in enumerate(got))
        with pytest.raises(PeerError) as err:
            decoder.call("pull_cache", 1, c, decoder.call("alloc_cache", 2, [1, 4096]))
        assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    finally:
        for process in (decoder, peer):
            if process is not None:
                process.close()
        if attacker is not None:
            attacker.close()
