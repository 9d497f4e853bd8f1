"""Least privilege per link: a peer that proved the shared secret learns and
reaches only what is offered to linked peers (caches addressable by
llm_datadist's rules, registered memory marked remote_accessible), never
free pool space, freed caches or memory kept local. The owner runs in its
own process; the attacker is a raw socket in this one that speaks the wire
protocol by hand (with the secret), naming whatever descriptors it likes."""
import socket

import numpy as np
import pytest

from kv_peer import PeerError, PeerProcess, pattern
from kvcache import LLMStatusCode
from kvcache.engine import auth
from kvcache.transports.tcp.protocol import MsgType
from test_inputs import HELLO, HELLO_ACK, READY, REPLY, hello, port_of, recv_wire_frame, wire_frame

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
