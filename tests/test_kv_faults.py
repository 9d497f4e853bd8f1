"""Faults between real processes: bad input refused with nothing written,
peers that stall, die or restart, garbage on the listen port."""
import json
import signal
import socket
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import wait_until
from kv_peer import PeerError, PeerProcess, pattern
from kvcache import DataType, LLMException, LLMStatusCode, TransferEngine
from kvcache.transports.tcp.protocol import FRAME, MsgType, decode_frame, encode

L, N = 2, 2
BLOCKS, ELEMS = 32, 512


POOL = '{"buf_pool_size": 67108864}'


# Refusals happen before any byte moves, on every transport; the RDMA runs
# are in the Soft-RoCE VM lane.
@pytest.fixture(params=["tcp", "shm", pytest.param("rdma", marks=pytest.mark.rdma)])
def pair(request):
    options = dict(transport=request.param, buf_pool_cfg=POOL, sync_kv_timeout=2000)
    prompt = PeerProcess("prompt", 1, **options)
    decoder = PeerProcess("decoder", 2, listen="", **options)
    src = prompt.call("alloc_blocks", 2 * L, [BLOCKS, ELEMS], key_cluster=1)
    prompt.call("fill", src, seed=1)
    dst = decoder.call("alloc_blocks", 2 * L, [BLOCKS, ELEMS])
    decoder.call("fill", dst, seed=2)
    assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
    yield prompt, decoder, src, dst
    prompt.close()
    decoder.close()


def unchanged(decoder, dst):
    got = decoder.call("tensors", dst)
    for t in range(2 * L):
        np.testing.assert_array_equal(got[t], pattern(2, t, BLOCKS * ELEMS * 2).reshape(BLOCKS, -1))


BAD_BLOCK_IDS = [
    (([0, 1], [0, BLOCKS]), "dst block id 32 out of range"),
    (([BLOCKS + 5], [0]), "src block id 37 out of range"),
    (([0, 1], [0]), "2 src blocks but 1 dst blocks"),
    (([0, 1], [3, 3]), "destination block ids repeat"),
    (([-1], [0]), "out of range"),
]


def test_bad_block_ids_are_refused_and_nothing_is_written(pair):
    prompt, decoder, src, dst = pair
    for args, fragment in BAD_BLOCK_IDS:
        with pytest.raises(PeerError) as err:
            decoder.call("pull_blocks", 1, dst, *args)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID, args
        assert fragment in str(err.value)
    unchanged(decoder, dst)
    decoder.call("pull_blocks", 1, dst, [1], [1])        # the link is still fine


def test_layer_range_out_of_bounds_or_uneven_is_refused(pair):
    prompt, decoder, src, dst = pair
    for src_layers, dst_layers in ((range(0, 3), range(0, 3)), (range(0, 1), range(0, 2))):
        with pytest.raises(PeerError) as err:
            decoder.call("pull_blocks", 1, dst, [0], [0], src_layers, dst_layers)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    unchanged(decoder, dst)


def test_mismatched_shapes_and_types_are_refused(pair):
    prompt, decoder, src, dst = pair
    wide = decoder.call("alloc_blocks", 2 * L, [BLOCKS, 2 * ELEMS])
    with pytest.raises(PeerError) as err:
        decoder.call("pull_blocks", 1, wide, [0], [0])
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert "block sizes differ" in str(err.value)
    floats = decoder.call("alloc_blocks", 2 * L, [BLOCKS, ELEMS // 2], dtype=DataType.DT_FLOAT)
    with pytest.raises(PeerError) as err:
        decoder.call("pull_blocks", 1, floats, [0], [0])
    assert "data types differ" in str(err.value)


def test_missing_remote_cache_and_unlinked_cluster(pair):
    prompt, decoder, src, dst = pair
    with pytest.raises(PeerError) as err:
        decoder.call("pull_blocks", 1, dst, [0], [0], req_id=999)
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    with pytest.raises(PeerError) as err:
        decoder.call("pull_blocks", 7, dst, [0], [0])
    assert err.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK


def test_a_freed_remote_cache_is_never_written(pair):
    prompt, decoder, src, dst = pair
    prompt.call("deallocate", src)
    with pytest.raises(PeerError) as err:
        decoder.call("push_blocks", 1, dst, [0], [0])
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


def test_engine_refuses_unregistered_memory_on_both_sides():
    with TransferEngine("a") as a, TransferEngine("b") as b:
        mine = np.zeros(4096, dtype=np.uint8)
        theirs = np.zeros(4096, dtype=np.uint8)
        a.register_memory(mine.ctypes.data, 2048)
        b.register_memory(theirs.ctypes.data, theirs.nbytes)
        peer = a.connect(b.address)
        with pytest.raises(LLMException) as err:      # local piece runs past the region
            a.transfer_sync(peer, "write", [mine.ctypes.data + 1024], [theirs.ctypes.data],
                            [2048])
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "local piece 0" in str(err.value)
        with pytest.raises(LLMException) as err:      # remote piece outside its table
            a.transfer_sync(peer, "write", [mine.ctypes.data], [theirs.ctypes.data + 4000],
                            [1000])
        assert "remote (b) piece 0" in str(err.value)
        # A lying initiator that claims a region id: the target checks itself.
        with pytest.raises(LLMException) as err:
            a.transfer_sync(peer, "write", [mine.ctypes.data], [theirs.ctypes.data + 4000],
                            [1000], remote_regions=[1])
        assert "not inside live region 1" in str(err.value)
        assert not theirs.any()
        mine[:] = 9
        a.transfer_sync(peer, "write", [mine.ctypes.data], [theirs.ctypes.data + 100], [50])
        assert theirs[100:150].tolist() == [9] * 50 and not theirs[150:].any()


def test_a_peer_frozen_mid_transfer_times_out_on_time_and_the_survivor_serves_others():
    # Frozen by SIGSTOP once the pull is in flight (not during the lookup of a
    # fresh link): the pull misses its deadline, LLM_TIMEOUT, and the link is
    # closed so no late byte lands. Over TCP only: a frozen owner does not stop
    # a shared-memory copy or an RDMA read, which then succeed.
    prompt = PeerProcess("prompt", 1, transport="tcp")
    other = PeerProcess("prompt", 3, transport="tcp")
    decoder = PeerProcess("decoder", 2, listen="", sync_kv_timeout=1000, transport="tcp")
    try:
        for p in (prompt, other):
            p.call("alloc_blocks", 2, [256, 65536], key_cluster=p.cluster_id)
            assert decoder.call("link", p.cluster_id, p.address) == LLMStatusCode.LLM_SUCCESS
        dst = decoder.call("alloc_blocks", 2, [256, 65536])
        decoder.call("pull_blocks", 1, dst, [0], [0], per_layer=1)    # lookup and lane
        decoder.call("signal_when_in_flight", 1, prompt.process.pid, signal.SIGSTOP)
        started = time.monotonic()
        with pytest.raises(PeerError) as err:
            decoder.call("pull_blocks", 1, dst, list(range(256)), list(range(256)),
                         per_layer=1)
        elapsed = time.monotonic() - started
        assert err.value.status_code == LLMStatusCode.LLM_TIMEOUT, err.value
        assert 0.9 < elapsed < 3, elapsed
        assert decoder.call("link_state", 1) == "FAILED"
        decoder.call("pull_blocks", 3, dst, [0, 1], [0, 1], per_layer=1)
    finally:
        prompt.kill(signal.SIGKILL)
        for p in (other, decoder):
            p.close()


@pytest.mark.parametrize("transport", ["tcp", "shm", pytest.param("rdma",
                                                                  marks=pytest.mark.rdma)])
def test_peer_killed_mid_transfer_then_restarted_and_relinked(transport):
    options = dict(transport=transport, buf_pool_cfg='{"buf_pool_size": 402653184}')
    prompt = PeerProcess("prompt", 1, **options)
    decoder = PeerProcess("decoder", 2, listen="", sync_kv_timeout=10_000, **options)
    try:
        # User memory (2 x 128 MiB): served by the prompt itself on every transport (shm
        # sends what the owner cannot share over TCP), so its death stops the pull.
        prompt.call("register_blocks", 2, [512, 131072], key_cluster=1)
        assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
        dst = decoder.call("alloc_blocks", 2, [512, 131072])
        decoder.call("pull_blocks", 1, dst, [0], [0], per_layer=1)    # lookup, lane, mapping
        # The decoder kills the prompt the moment its pull is in flight.
        decoder.call("signal_when_in_flight", 1, prompt.process.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(PeerError) as err:
            decoder.call("pull_blocks", 1, dst, list(range(512)), list(range(512)),
                         per_layer=1)
        assert time.monotonic() - started < 5          # far inside the 10 s deadline
        assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED, err.value
        assert not prompt.process.is_alive() or prompt.process.join(5) is None
        assert decoder.call("link_state", 1) == "FAILED"
        # Restart on the same address; the survivor re-links and pulls.
        address = prompt.address
        prompt = PeerProcess("prompt", 1, listen=address, **options)
        src = prompt.call("alloc_blocks", 2, [512, 131072], key_cluster=1)
        prompt.call("fill", src, seed=4)
        assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
        decoder.call("pull_blocks", 1, dst, [7, 8], [0, 1], per_layer=1)
        got = decoder.call("tensors", dst)
        want = prompt.call("tensors", src)
        np.testing.assert_array_equal(got[0][[0, 1]], want[0][[7, 8]])
    finally:
        prompt.close()
        decoder.close()


def _in_flight(engine, peer, src, dst):
    pieces = np.arange(4096, dtype=np.uint64) * 65536
    request = engine.transfer_async(peer, "write", src.ctypes.data + pieces,
                                    dst.ctypes.data + pieces[::-1], [65536] * 4096)
    wait_until(lambda: peer.link.in_flight, 5, what="the transfer in flight")
    return request


def test_unlink_during_a_transfer_is_busy_unless_forced():
    with TransferEngine("a") as a, TransferEngine("b") as b:
        src = np.ones(256 << 20, dtype=np.uint8)
        dst = np.zeros(256 << 20, dtype=np.uint8)
        a.register_memory(src.ctypes.data, src.nbytes)
        b.register_memory(dst.ctypes.data, dst.nbytes)
        peer = a.connect(b.address)
        request = _in_flight(a, peer, src, dst)
        with pytest.raises(LLMException) as err:
            a.disconnect(peer)
        assert err.value.status_code == LLMStatusCode.LLM_LINK_BUSY
        request.wait(10_000)                      # unharmed by the refused unlink
        assert dst[:65536].all()
        request = _in_flight(a, peer, src, dst)
        a.disconnect(peer, force=True)
        with pytest.raises(LLMException) as err:
            request.wait(10_000)
        assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED
        assert a.peers() == []


def _healthy(server, key=None):
    with TransferEngine("probe", auth_key=key) as probe:
        buf = np.zeros(64, dtype=np.uint8)
        probe.register_memory(buf.ctypes.data, buf.nbytes)
        peer = probe.connect(server.address, timeout_ms=3000)
        probe.call(peer, "engine.regions", {})
        probe.disconnect(peer)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(garbage=st.one_of(
    st.binary(max_size=512),
    st.builds(lambda t, h: encode(MsgType.HELLO, 0, {}) if t else h, st.booleans(),
              st.binary(min_size=1, max_size=64)),
    st.builds(lambda body: b"KVC1" + body, st.binary(max_size=64))))
def test_garbage_on_the_listen_port_is_dropped_and_the_server_stays_healthy(garbage):
    for key in (None, FUZZ_KEY):               # with authentication on too
        server = _fuzz_server(key)
        with socket.create_connection(("127.0.0.1",
                                       int(server.address.rsplit(":", 1)[1]))) as s:
            s.settimeout(2)
            try:
                s.sendall(garbage)
                s.shutdown(socket.SHUT_WR)
                while s.recv(4096):
                    pass
            except OSError:
                pass
        _healthy(server, key)


_SERVERS = {}
FUZZ_KEY = "a-fuzzing-secret-of-32-characters"


def _fuzz_server(key=None):
    if key not in _SERVERS:
        server = TransferEngine("fuzz-target", handshake_timeout_ms=500, auth_key=key)
        buf = np.zeros(4096, dtype=np.uint8)
        server.register_memory(buf.ctypes.data, buf.nbytes)
        _SERVERS[key] = (server, buf)
    return _SERVERS[key][0]


def _hand_made_peer(server):
    """A socket that has linked to ``server`` as peer "liar" by the protocol's
    handshake (HELLO, the listener's HELLO_ACK, READY); what it sends next is
    up to the test."""
    s = socket.create_connection(("127.0.0.1", int(server.address.rsplit(":", 1)[1])))
    s.settimeout(5)
    s.sendall(encode(MsgType.HELLO, 0, {"name": "liar", "cluster_id": 0, "role": "mix",
                                        "regions": [], "transports": ["tcp"], "listen": ""}))
    frame = _recv_all(s, FRAME.size)
    msg_type, _, header_len, _ = decode_frame(frame)
    assert msg_type == MsgType.HELLO_ACK
    assert json.loads(_recv_all(s, header_len))["status"] == LLMStatusCode.LLM_SUCCESS
    s.sendall(encode(MsgType.READY, 0, {}))
    return s


def _recv_all(s, size):
    data = b""
    while len(data) < size:
        chunk = s.recv(size - len(data))
        assert chunk, "the server closed the connection"
        data += chunk
    return data


def test_a_linked_peer_sending_garbage_only_loses_its_own_link():
    with TransferEngine("server") as server, TransferEngine("good") as good:
        buf = np.zeros(4096, dtype=np.uint8)
        server.register_memory(buf.ctypes.data, buf.nbytes)
        good.register_memory(buf.ctypes.data, buf.nbytes)
        good_peer = good.connect(server.address)
        # A hand-made peer: valid handshake, then a WRITE announcing more
        # descriptors than its payload holds.
        s = _hand_made_peer(server)
        deadline = time.monotonic() + 5
        liar = []
        while not liar and time.monotonic() < deadline:
            liar = [p for p in server.peers() if p.name == "liar"]
            time.sleep(0.01)
        s.sendall(encode(MsgType.WRITE, 1, {"count": 1000, "bytes": 10}, payload_len=24))
        s.sendall(b"\0" * 24)
        while time.monotonic() < deadline and liar[0].state.name != "FAILED":
            time.sleep(0.05)
        assert liar[0].state.name == "FAILED"
        assert "descriptor" in liar[0].link.reason or "payload" in liar[0].link.reason
        assert liar[0] not in server.peers()          # a failed link leaves the table
        s.close()
        assert not buf.any()
        good.call(good_peer, "engine.regions", {})


def test_connect_returns_only_once_the_listener_has_the_link(monkeypatch):
    # A slow listener (it reads READY late): the side that linked must not be
    # told "linked" before the listener can use the link itself.
    from kvcache.engine.links import LinkManager
    original = LinkManager._add_peer

    def slow_inbound(self, sock, info, inbound, attach_ms, **more):
        if inbound:
            time.sleep(0.3)
        return original(self, sock, info, inbound, attach_ms, **more)

    monkeypatch.setattr(LinkManager, "_add_peer", slow_inbound)
    with TransferEngine("a") as a, TransferEngine("b") as b:
        b.connect(a.address)
        assert [p.name for p in a.peers() if p.state.name == "LINKED"] == ["b"]


def test_a_write_naming_no_region_to_unregistered_memory_is_refused():
    # The "no region" marker (2**64 - 1) as the region id of a piece outside
    # every registered region must not pass for a match.
    with TransferEngine("server") as server:
        buf = np.zeros(4096, dtype=np.uint8)
        server.register_memory(buf.ctypes.data, buf.nbytes)
        victim = np.zeros(4096, dtype=np.uint8)                  # not registered
        s = _hand_made_peer(server)
        columns = np.array([[2**64 - 1], [victim.ctypes.data], [16]], dtype="<u8")
        s.sendall(encode(MsgType.WRITE, 7, {"count": 1, "bytes": 16}, payload_len=24 + 16)
                  + columns.tobytes() + b"\xab" * 16)
        replies = b""
        deadline = time.monotonic() + 5
        while b"not inside live region" not in replies and time.monotonic() < deadline:
            replies += s.recv(65536)
        s.close()
        assert b"not inside live region" in replies
        assert not victim.any() and not buf.any()


def test_a_peer_frees_a_cache_inside_our_call_without_deadlock(pair):
    # Freeing asks us to forget the cache and finish our transfers first; our
    # own control call that triggered the free is not one of them.
    prompt, decoder, src, dst = pair
    decoder.call("pull_blocks", 1, dst, [0], [0])            # remembers the lookup
    prompt.call("free_on_call", src, "test.free")
    assert decoder.call("call_peer", 1, "test.free", 1000) == {}
    with pytest.raises(PeerError) as err:
        decoder.call("pull_blocks", 1, dst, [0], [0])
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


def test_a_replaced_remote_cache_is_looked_up_again(pair):
    prompt, decoder, src, dst = pair
    decoder.call("pull_blocks", 1, dst, [0], [0])              # remembers the lookup
    prompt.call("deallocate", src)
    new = prompt.call("alloc_blocks", 2 * L, [BLOCKS, ELEMS], key_cluster=1)
    prompt.call("fill", new, seed=9)                           # same key, new contents
    decoder.call("pull_blocks", 1, dst, [3], [4])
    got, want = decoder.call("tensors", dst), prompt.call("tensors", new)
    for t in range(2 * L):
        np.testing.assert_array_equal(got[t][4], want[t][3])
