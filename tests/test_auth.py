"""Authenticated links: a shared secret proven by both ends of the handshake
(HMAC challenge-response, kvcache.engine.auth). A peer without it, or with
another, gets no link, no region table and no byte; real sockets, and peers
made by hand that speak the wire protocol."""
import logging
import socket

import numpy as np
import pytest

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                     LLMDataDist, LLMException, LLMRole, LLMStatusCode, TransferEngine)
from kvcache.engine import auth
from test_inputs import (CALL, HELLO, HELLO_ACK, READY, closed_by_other_side, hello, port_of,
                         recv_wire_frame, registered, wire_frame)

KEY = "a-shared-secret-of-32-characters"
OTHER = "another-secret-of-32-characters!"
TRANSPORTS = ["tcp", "shm", pytest.param("rdma", marks=pytest.mark.rdma)]


def engines(transport, listener_key, initiator_key):
    a = TransferEngine("listener", transport=transport, auth_key=listener_key)
    b = TransferEngine("initiator", transport=transport, listen=None, auth_key=initiator_key)
    return a, b


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_links_with_the_same_secret_link_and_move_data(transport):
    a, b = engines(transport, KEY, KEY)
    try:
        theirs, mine = registered(a, 4096), registered(b, 4096, fill=7)
        peer = b.connect(a.address, timeout_ms=5000)
        b.transfer_sync(peer, "write", [mine.ctypes.data], [theirs.ctypes.data], [4096])
        assert (theirs == 7).all()
        back = a.peers()[0]
        theirs[:] = 9
        a.transfer_sync(back, "write", [theirs.ctypes.data], [mine.ctypes.data], [4096])
        assert (mine == 9).all()
    finally:
        b.close()
        a.close()


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("initiator_key", [None, OTHER])
def test_a_peer_without_the_secret_gets_no_link(transport, initiator_key):
    a, b = engines(transport, KEY, initiator_key)
    try:
        theirs, _mine = registered(a, 4096), registered(b, 4096, fill=7)
        with pytest.raises(LLMException) as err:
            b.connect(a.address, timeout_ms=3000)
        assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED
        assert a.peers() == [] and b.peers() == []
        assert not theirs.any()
        # The right secret still links.
        with TransferEngine("good", transport=transport, listen=None, auth_key=KEY) as good:
            good.connect(a.address, timeout_ms=5000)
    finally:
        b.close()
        a.close()


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_an_initiator_with_a_secret_refuses_a_listener_that_cannot_prove_it(transport):
    a, b = engines(transport, None, KEY)
    try:
        registered(a, 4096)
        with pytest.raises(LLMException) as err:
            b.connect(a.address, timeout_ms=3000)
        assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED
        assert "did not prove the shared secret" in str(err.value)
        assert b.peers() == []
    finally:
        b.close()
        a.close()


def _raw_hello(server, name="raw", nonce="ab" * 32):
    s = socket.create_connection(("127.0.0.1", port_of(server.address)), timeout=5)
    s.sendall(wire_frame(HELLO, 0, dict(hello(name, "tcp", []), nonce=nonce)))
    frame = recv_wire_frame(s)
    assert frame is not None and frame[0] == HELLO_ACK and frame[2]["status"] == 0, frame
    return s, frame[2]


def test_a_raw_peer_learns_no_region_and_cannot_call_without_a_proof():
    with TransferEngine("listener", auth_key=KEY) as a:
        theirs = registered(a, 4096)
        s, ack = _raw_hello(a)
        assert ack["regions"] == []                    # nothing revealed before the proof
        s.sendall(wire_frame(READY, 0, {"proof": "00" * 32}))
        s.sendall(wire_frame(CALL, 1, {"method": "engine.regions", "params": {}}))
        assert closed_by_other_side(s, 5)
        assert a.peers() == [] and not theirs.any()
        s.close()


def test_a_proof_from_one_handshake_does_not_open_another():
    with TransferEngine("listener", auth_key=KEY) as a:
        registered(a, 4096)
        key = auth.load_key(KEY)
        # A peer that knows the secret, by hand: its proof opens its link...
        s, ack = _raw_hello(a, nonce="cd" * 32)
        good = auth.proof(key, "initiator", "cd" * 32, ack["nonce"], "raw", "listener")
        s.sendall(wire_frame(READY, 0, {"proof": good}))
        s.sendall(wire_frame(CALL, 1, {"method": "engine.regions", "params": {}}))
        reply = recv_wire_frame(s)
        assert reply is not None and reply[2]["status"] == 0 and reply[2]["result"]["regions"]
        s.close()
        # ...and replayed on the next handshake (same nonce of ours, a new one
        # of the listener's) it opens nothing.
        t, ack2 = _raw_hello(a, name="raw2", nonce="cd" * 32)
        assert ack2["nonce"] != ack["nonce"]
        t.sendall(wire_frame(READY, 0, {"proof": good}))
        assert closed_by_other_side(t, 5)
        t.close()


def test_the_secret_comes_from_the_environment_or_a_file(tmp_path, monkeypatch):
    monkeypatch.setenv("KVCACHE_AUTH_KEY", KEY)
    assert auth.load_key() == KEY.encode()
    monkeypatch.delenv("KVCACHE_AUTH_KEY")
    path = tmp_path / "key"
    path.write_text(KEY + "\n")
    monkeypatch.setenv("KVCACHE_AUTH_KEY_FILE", str(path))
    assert auth.load_key() == KEY.encode()
    with TransferEngine("listener") as a, TransferEngine("b", listen=None, auth_key=OTHER) as b:
        with pytest.raises(LLMException):           # a took its key from the file
            b.connect(a.address, timeout_ms=3000)
    monkeypatch.setenv("KVCACHE_AUTH_KEY_FILE", str(tmp_path / "missing"))
    with pytest.raises(LLMException) as err:
        TransferEngine("c", listen=None)
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID


def test_a_short_secret_is_refused():
    with pytest.raises(LLMException) as err:
        TransferEngine("short", listen=None, auth_key="secret")
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert "at least 16" in str(err.value)


def test_llm_datadist_links_with_the_config_secret_and_refuses_without():
    def started(role, cluster_id, listen, key):
        dd = LLMDataDist(role, cluster_id)
        cfg = LLMConfig()
        cfg.listen_ip_info = listen
        cfg.transport = "tcp"
        cfg.auth_key = key
        cfg.buf_pool_cfg = '{"buf_pool_size": 8388608}'
        dd.init(cfg.generate_options())
        return dd

    prompt = started(LLMRole.PROMPT, 1, "127.0.0.1:0", KEY)
    good, bad = started(LLMRole.DECODER, 2, "", KEY), started(LLMRole.DECODER, 3, "", "")
    try:
        desc = CacheDesc(1, DataType.DT_UINT8, [4, 256])
        src = prompt.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(1))
        src.tensors()[0][...] = 5
        info = LLMClusterInfo()
        info.remote_cluster_id = 1
        info.append_remote_ip_info("127.0.0.1", port_of(prompt.listen_address))
        assert bad.link_clusters([info])[1] == [LLMStatusCode.LLM_LINK_FAILED]
        assert good.link_clusters([info])[1] == [LLMStatusCode.LLM_SUCCESS]
        dst = good.cache_manager.allocate_blocks_cache(desc)
        good.cache_manager.pull_blocks(BlocksCacheKey(1), dst, [2], [0], tensor_num_per_layer=1)
        assert (dst.tensors()[0][0] == 5).all()
    finally:
        for dd in (bad, good, prompt):
            dd.finalize()


def test_listening_beyond_loopback_without_a_secret_warns_once(caplog):
    with caplog.at_level(logging.WARNING, logger="kvcache.engine.auth"):
        auth.warn_if_exposed("127.0.0.1", None)
        auth.warn_if_exposed("::1", None)
        auth.warn_if_exposed("0.0.0.0", auth.load_key(KEY))
        assert caplog.records == []
        auth.warn_if_exposed("0.0.0.0", None)
    assert len(caplog.records) == 1 and "auth_key" in caplog.records[0].message


def test_registered_memory_is_untouched_by_refused_peers():
    with TransferEngine("listener", auth_key=KEY) as a:
        theirs = registered(a, 1 << 16)
        for key in (None, OTHER):
            with TransferEngine("x", listen=None, auth_key=key) as x:
                with pytest.raises(LLMException):
                    x.connect(a.address, timeout_ms=2000)
        assert not np.asarray(theirs).any()
