"""Bad input and error reporting through the public API: every failure of a
public call is an LLMException with the right LLMStatusCode (never a bare
Python exception), and a bad input never damages the link it came over (a
normal transfer on the same link works afterwards).

Covers: block ids that are not integers in range (pull_blocks/push_blocks),
a transfer of more descriptors than one request may carry, notifications
bigger than the control frame, peers that describe their memory badly in
the handshake (either direction), IPv6 and host-name addresses, and a peer
frozen or killed in the middle of a transfer (LLM_TIMEOUT vs LLM_LINK_FAILED).

Only kvcache's public names are used; the few wire frames the fake peers
need are built here with ``struct`` (layout of the link protocol: magic
"KVC1", version u16, type u16, request id u64, header length u32, payload
length u64, network order, then a JSON header, then the payload)."""
import json
import os
import signal
import socket
import struct
import threading
import time

import numpy as np
import pytest

import kvcache
from helpers import wait_until, watchdog
from kv_peer import PeerError, PeerProcess
from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                     LLMDataDist, LLMException, LLMRole, LLMStatusCode, TransferEngine)
from kvcache.transports.tcp.protocol import VERSION

TRANSPORTS = ["tcp", "shm"]
SMALL_POOL = '{"buf_pool_size": 8388608}'
TEST_DEADLINE_S = 120          # a hung test fails instead of hanging the run


@pytest.fixture(autouse=True)
def _deadline():
    """Fail (not hang) a test that runs past TEST_DEADLINE_S."""
    with watchdog(TEST_DEADLINE_S):
        yield


# --- the wire, by hand ---------------------------------------------------------------

WIRE = struct.Struct("!4sHHQIQ")
MAGIC = b"KVC1"
HELLO, HELLO_ACK, READY, REPLY, CALL, BYE = 1, 2, 3, 12, 20, 30


def wire_frame(msg_type, req_id, header, payload=b""):
    body = json.dumps(header, separators=(",", ":")).encode()
    return (WIRE.pack(MAGIC, VERSION, msg_type, req_id, len(body), len(payload))
            + body + payload)


def recv_exactly(sock, size):
    """``size`` bytes, or None when the other side closed (or reset) first."""
    data = b""
    while len(data) < size:
        try:
            chunk = sock.recv(size - len(data))
        except (ConnectionResetError, BrokenPipeError):
            return None
        if not chunk:
            return None
        data += chunk
    return data


def recv_wire_frame(sock):
    """(type, request id, header dict, payload), or None once the other side
    closed the connection."""
    raw = recv_exactly(sock, WIRE.size)
    if raw is None:
        return None
    magic, _version, msg_type, req_id, header_len, payload_len = WIRE.unpack(raw)
    assert magic == MAGIC, raw
    header = recv_exactly(sock, header_len)
    payload = recv_exactly(sock, payload_len) if payload_len else b""
    if header is None or payload is None:
        return None
    return msg_type, req_id, json.loads(header), payload


def closed_by_other_side(sock, timeout_s):
    """Whether the other side closes ``sock`` within ``timeout_s`` (frames it
    sends meanwhile are read and dropped)."""
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        sock.settimeout(left)
        try:
            if not sock.recv(65536):
                return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except socket.timeout:
            return False


def hello(name, transport, regions, role="mix", cluster_id=0):
    return {"name": name, "cluster_id": cluster_id, "role": role, "regions": regions,
            "transports": [transport], "listen": ""}


def port_of(address):
    return int(str(address).rsplit(":", 1)[1])


# --- small helpers ----------------------------------------------------------------

def registered(engine, size, fill=0):
    buf = np.full(size, fill, dtype=np.uint8)
    engine.register_memory(buf.ctypes.data, buf.nbytes)
    return buf


def assert_link_works(initiator, peer, mine, theirs, fill=0x5A):
    """A normal write and read on the link: the link is healthy."""
    mine[:64] = fill
    initiator.transfer_sync(peer, "write", [mine.ctypes.data], [theirs.ctypes.data], [64],
                            timeout_ms=5000)
    assert (theirs[:64] == fill).all()
    theirs[64:128] = fill ^ 0xFF
    initiator.transfer_sync(peer, "read", [mine.ctypes.data + 64], [theirs.ctypes.data + 64],
                            [64], timeout_ms=5000)
    assert (mine[64:128] == (fill ^ 0xFF)).all()


def datadist(role, cluster_id, transport, listen="", **options):
    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.listen_ip_info = listen
    cfg.transport = transport
    cfg.buf_pool_cfg = SMALL_POOL
    cfg.sync_kv_timeout = 3000
    for key, value in options.items():
        setattr(cfg, key, value)
    dd.init(cfg.generate_options())
    return dd


def cluster_info(cluster_id, host, port):
    info = LLMClusterInfo()
    info.remote_cluster_id = cluster_id
    info.append_remote_ip_info(host, port)
    return info


# === 5. block ids must be integers in range =======================================

BLOCKS, ROW = 8, 64


def _prompt_value(t, b):
    return 0x80 | (t << 4) | b


def _decoder_value(t, b):
    return (t << 4) | b


def _fill(cache, value):
    for t, tensor in enumerate(cache.tensors()):
        for b in range(BLOCKS):
            tensor[b] = value(t, b)


def _snapshot(cache):
    return [t.copy() for t in cache.tensors()]


@pytest.fixture(params=TRANSPORTS)
def block_pair(request):
    """A prompt (cluster 1, a blocks cache keyed BlocksCacheKey(1)) and a
    decoder (cluster 2, a blocks cache of the same layout) in this process,
    linked; 2 tensors of 8 blocks of 64 bytes, one tensor per layer."""
    prompt = datadist(LLMRole.PROMPT, 1, request.param, listen="127.0.0.1:0")
    decoder = datadist(LLMRole.DECODER, 2, request.param)
    try:
        desc = CacheDesc(2, DataType.DT_UINT8, [BLOCKS, ROW])
        remote = prompt.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(1))
        local = decoder.cache_manager.allocate_blocks_cache(desc)
        _fill(remote, _prompt_value)
        _fill(local, _decoder_value)
        ret, rets = decoder.link_clusters([cluster_info(1, "127.0.0.1",
                                                        port_of(prompt.listen_address))],
                                          timeout=3000)
        assert rets[0] == LLMStatusCode.LLM_SUCCESS
        yield decoder, local, remote
    finally:
        decoder.finalize()
        prompt.finalize()


# Each must be refused with LLM_PARAM_INVALID: the current code moves block 2
# for 2.7, block 3 for "3", block 1 for True, and raises a bare
# OverflowError for 2**64.
BAD_IDS = {
    "float": [2.7],
    "str": ["3"],
    "2**64": [2 ** 64],
    "bool": [True],
    "float-array": np.array([1.5]),
}


@pytest.mark.parametrize("bad", BAD_IDS.values(), ids=BAD_IDS.keys())
@pytest.mark.parametrize("side", ["src", "dst"])
@pytest.mark.parametrize("op", ["pull", "push"])
def test_block_ids_that_are_not_integers_in_range_are_refused(block_pair, op, side, bad):
    decoder, local, remote = block_pair
    key = BlocksCacheKey(1)
    manager = decoder.cache_manager
    move = manager.pull_blocks if op == "pull" else manager.push_blocks
    src, dst = (bad, [0]) if side == "src" else ([0], bad)
    before_local, before_remote = _snapshot(local), _snapshot(remote)
    with pytest.raises(LLMException) as err:
        move(key, local, src, dst, tensor_num_per_layer=1)
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID, err.value
    for was, now in zip(before_local + before_remote, _snapshot(local) + _snapshot(remote)):
        np.testing.assert_array_equal(was, now)       # nothing moved
    # The link is unharmed, and numpy integer ids (arrays and scalars) are
    # still accepted.
    move(key, local, np.array([2], dtype=np.int32), [np.int64(1)], tensor_num_per_layer=1)
    for t in range(2):
        if op == "pull":     # remote block 2 -> local block 1
            assert (local.tensors()[t][1] == _prompt_value(t, 2)).all()
            assert (local.tensors()[t][2] == _decoder_value(t, 2)).all()
        else:                # local block 2 -> remote block 1
            assert (remote.tensors()[t][1] == _decoder_value(t, 2)).all()
            assert (remote.tensors()[t][2] == _prompt_value(t, 2)).all()


# === 6. more descriptors than one request carries =================================

DESCRIPTOR_LIMIT = 1 << 22          # per request on the wire


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_write_of_more_pieces_than_one_request_carries_does_not_break_the_link(transport):
    # 2**22 + 1 one-byte pieces, every other byte, so none can merge (c7d4922:
    # the target dropped the connection and the link failed on both sides).
    pieces = DESCRIPTOR_LIMIT + 1
    span = 2 * pieces
    with TransferEngine("many-a", transport=transport) as a, \
            TransferEngine("many-b", transport=transport) as b:
        src = ((np.arange(span + 256) % 251) + 1).astype(np.uint8)
        dst = np.zeros(span + 256, dtype=np.uint8)
        a.register_memory(src.ctypes.data, src.nbytes)
        b.register_memory(dst.ctypes.data, dst.nbytes)
        peer = a.connect(b.address, timeout_ms=5000)
        offsets = np.arange(pieces, dtype=np.uint64) * np.uint64(2)
        # The initiator splits what a request cannot carry: every piece lands.
        a.transfer_sync(peer, "write", np.uint64(src.ctypes.data) + offsets,
                        np.uint64(dst.ctypes.data) + offsets,
                        np.ones(pieces, dtype=np.uint64), timeout_ms=15_000)
        del offsets
        np.testing.assert_array_equal(dst[:span:2], src[:span:2])
        assert not dst[1:span:2].any()
        assert [p.state.name for p in a.peers()] == ["LINKED"]
        assert [p.state.name for p in b.peers()] == ["LINKED"]
        # A normal transfer on the same link still works.
        a.transfer_sync(peer, "write", [src.ctypes.data + span], [dst.ctypes.data + span],
                        [256], timeout_ms=5000)
        np.testing.assert_array_equal(dst[span:], src[span:])


# === 7. notifications ==========================================================

def _notification(engine, name, timeout_s=10):
    found = []

    def arrived():
        found.extend(n for n in engine.get_notifications() if n[1] == name)
        return found
    return wait_until(arrived, timeout_s, f"notification {name!r}")[0]


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_one_mib_notification_is_delivered_intact(transport):
    # Today: a bare ProtocolError (the base64 text outgrows the 1 MiB header).
    with TransferEngine("note-a", transport=transport) as a, \
            TransferEngine("note-b", transport=transport) as b:
        mine, theirs = registered(a, 4096), registered(b, 4096)
        peer = a.connect(b.address, timeout_ms=5000)
        message = os.urandom(1 << 20)
        a.notify(peer, "one-mib", message, timeout_ms=10_000)
        sender, name, data = _notification(b, "one-mib")
        assert (sender, name) == ("note-a", "one-mib")
        assert bytes(data) == message
        assert_link_works(a, peer, mine, theirs)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_notification_over_the_limit_is_refused_and_the_link_stays_up(transport):
    # Today: a bare ProtocolError. Fixed: LLM_PARAM_INVALID (the limit is
    # documented, kvcache.MAX_NOTIFY_BYTES) and nothing else changes.
    with TransferEngine("big-a", transport=transport) as a, \
            TransferEngine("big-b", transport=transport) as b:
        mine, theirs = registered(a, 4096), registered(b, 4096)
        peer = a.connect(b.address, timeout_ms=5000)
        too_big = [64 << 20]
        limit = getattr(kvcache, "MAX_NOTIFY_BYTES", None)
        if limit is not None:
            assert (1 << 20) <= limit < (64 << 20), limit
            too_big.append(limit + 1)
        for size in too_big:
            with pytest.raises(LLMException) as err:
                a.notify(peer, "too-big", bytes(size), timeout_ms=10_000)
            assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID, err.value
        a.notify(peer, "small", b"after", timeout_ms=5000)
        assert bytes(_notification(b, "small")[2]) == b"after"
        assert not [n for n in b.get_notifications() if n[1] == "too-big"]
        assert_link_works(a, peer, mine, theirs)


# === 8. a peer that describes its memory badly in the handshake ==================

BAD_TABLES = {
    "ends-past-2**64": [[1, 2 ** 64 - 4096, 8192]],
    "ends-at-2**64": [[1, 2 ** 64 - 4096, 4096]],
    "zero-length": [[1, 1 << 20, 0]],
    "overlapping": [[1, 1 << 20, 8192], [2, (1 << 20) + 4096, 8192]],
}


class FakeListener:
    """A listener that speaks the handshake by hand: it accepts one link,
    answers HELLO with a HELLO_ACK carrying ``regions`` (and answers every
    control call, "engine.regions" with the same table), and records when
    the other side closes the connection."""

    def __init__(self, regions, transport, cluster_id=7):
        self.regions = regions
        self.transport = transport
        self.cluster_id = cluster_id
        self.server = socket.create_server(("127.0.0.1", 0))
        self.server.settimeout(10)
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"
        self.closed_by_peer = threading.Event()
        self.conn = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        try:
            conn, _ = self.server.accept()
        except OSError:
            return
        self.conn = conn
        conn.settimeout(15)
        try:
            frame = recv_wire_frame(conn)
            if frame is None or frame[0] != HELLO:
                return
            conn.sendall(wire_frame(HELLO_ACK, 0, {
                "status": 0, "message": "", "name": "fake-listener",
                "cluster_id": self.cluster_id, "role": "prompt", "regions": self.regions,
                "transport": self.transport}))
            while True:
                frame = recv_wire_frame(conn)
                if frame is None:
                    self.closed_by_peer.set()
                    return
                msg_type, req_id, header, _ = frame
                if msg_type == CALL:
                    method = header.get("method")
                    result = ({"regions": self.regions} if method == "engine.regions"
                              else {"port": 0} if method == "engine.lane" else {})
                    conn.sendall(wire_frame(REPLY, req_id, {"status": 0, "message": "",
                                                            "result": result}))
                elif msg_type == BYE:
                    conn.sendall(wire_frame(REPLY, req_id, {"status": 0, "message": ""}))
        except OSError:
            self.closed_by_peer.set()

    def close(self):
        try:
            self.server.shutdown(socket.SHUT_RDWR)        # wakes a pending accept()
        except OSError:
            pass
        self.server.close()
        if self.conn is not None:
            try:
                self.conn.shutdown(socket.SHUT_RDWR)      # wakes the serving thread
            except OSError:
                pass
            self.conn.close()
        self.thread.join(5)


@pytest.mark.parametrize("table", BAD_TABLES.values(), ids=BAD_TABLES.keys())
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_connect_to_a_listener_with_a_bad_region_table_fails_cleanly(transport, table):
    # Today: OverflowError (ends at/past 2**64, the socket left open),
    # LLM_PARAM_INVALID (overlap) or a link (zero length).
    fake = FakeListener(table, transport)
    try:
        with TransferEngine("connector", transport=transport, listen=None) as engine:
            with pytest.raises(LLMException) as err:
                engine.connect(fake.address, timeout_ms=3000)
            assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED, err.value
            assert engine.peers() == []
            assert fake.closed_by_peer.wait(5), "the failed link's socket was left open"
            # The engine still links to a well-behaved peer.
            with TransferEngine("good", transport=transport) as good:
                theirs = registered(good, 4096)
                mine = registered(engine, 4096)
                peer = engine.connect(good.address, timeout_ms=3000)
                assert_link_works(engine, peer, mine, theirs)
    finally:
        fake.close()


@pytest.mark.parametrize("table", BAD_TABLES.values(), ids=BAD_TABLES.keys())
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_link_clusters_to_a_listener_with_a_bad_region_table_reports_link_failed(transport,
                                                                               table):
    fake = FakeListener(table, transport, cluster_id=7)
    decoder = datadist(LLMRole.DECODER, 2, transport)
    try:
        ret, rets = decoder.link_clusters([cluster_info(7, "127.0.0.1", port_of(fake.address))],
                                          timeout=3000)
        assert rets == [LLMStatusCode.LLM_LINK_FAILED], rets
        assert ret != LLMStatusCode.LLM_SUCCESS
        assert decoder.engine.peers() == []
        assert decoder.check_link_status(7).name in ("IDLE", "FAILED")
        assert fake.closed_by_peer.wait(5), "the failed link's socket was left open"
    finally:
        decoder.finalize()
        fake.close()


@pytest.mark.parametrize("table", BAD_TABLES.values(), ids=BAD_TABLES.keys())
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_hello_with_a_bad_region_table_is_dropped_and_the_listener_serves_on(transport,
                                                                             table):
    # Today the listener's handshake thread dies with OverflowError and the
    # socket stays open (ends at/past 2**64), or the link is accepted (zero
    # length).
    with TransferEngine("listener", transport=transport) as server:
        theirs = registered(server, 4096)
        with socket.create_connection(("127.0.0.1", port_of(server.address)), timeout=5) as s:
            s.sendall(wire_frame(HELLO, 0, hello("liar", transport, table)))
            s.settimeout(5)
            frame = recv_wire_frame(s)
            if frame is not None and frame[0] == HELLO_ACK and frame[2].get("status") == 0:
                s.sendall(wire_frame(READY, 0, {}))
            if frame is not None:
                assert closed_by_other_side(s, 3), "the listener kept the liar's socket open"
        wait_until(lambda: not [p for p in server.peers()
                                if p.name == "liar" and p.state.name == "LINKED"],
                   3, "the liar's link gone")
        # The listener keeps serving real peers.
        with TransferEngine("honest", transport=transport) as honest:
            mine = registered(honest, 4096)
            peer = honest.connect(server.address, timeout_ms=3000)
            assert_link_works(honest, peer, mine, theirs)


# === 12. IPv6 literals and host names ============================================

def _ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback(),
                                reason="this host has no IPv6 loopback (::1)")


@needs_ipv6
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_engines_link_and_transfer_over_ipv6_loopback(transport):
    # Today: TransferEngine(listen="[::1]:0") is refused (IPv4-only bind).
    with TransferEngine("v6-a", listen="[::1]:0", transport=transport) as a, \
            TransferEngine("v6-b", listen="[::1]:0", transport=transport) as b, \
            TransferEngine("v6-c", listen=None, transport=transport) as c:
        assert "::1" in a.address, a.address
        theirs, mine = registered(a, 4096), registered(b, 4096)
        # To the address the engine reports; b listens too, so a can use the
        # link the other way (b's data lanes reach a, a's reach b).
        peer = b.connect(a.address, timeout_ms=3000)
        assert_link_works(b, peer, mine, theirs)
        back = wait_until(lambda: a.peers(), 5, "the inbound link")[0]
        assert_link_works(a, back, theirs, mine, fill=0x33)
        # To a literal written by hand.
        other = registered(c, 4096)
        peer = c.connect(f"[::1]:{port_of(a.address)}", timeout_ms=3000)
        assert_link_works(c, peer, other, theirs, fill=0x44)


def _datadist_pull_over(transport, listen, host):
    """A prompt listening on ``listen``; a decoder links to ``host`` at its
    port and pulls one block, byte-exact."""
    prompt = datadist(LLMRole.PROMPT, 1, transport, listen=listen)
    decoder = datadist(LLMRole.DECODER, 2, transport)
    try:
        desc = CacheDesc(2, DataType.DT_UINT8, [BLOCKS, ROW])
        remote = prompt.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(1))
        local = decoder.cache_manager.allocate_blocks_cache(desc)
        _fill(remote, _prompt_value)
        _fill(local, _decoder_value)
        ret, rets = decoder.link_clusters(
            [cluster_info(1, host, port_of(prompt.listen_address))], timeout=3000)
        assert rets == [LLMStatusCode.LLM_SUCCESS], rets
        decoder.cache_manager.pull_blocks(BlocksCacheKey(1), local, [3], [0],
                                          tensor_num_per_layer=1)
        for t in range(2):
            assert (local.tensors()[t][0] == _prompt_value(t, 3)).all()
    finally:
        decoder.finalize()
        prompt.finalize()


@needs_ipv6
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_llm_datadist_links_and_pulls_over_ipv6_loopback(transport):
    _datadist_pull_over(transport, "[::1]:0", "::1")


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_host_names_are_accepted_wherever_an_address_is(transport):
    with TransferEngine("named-a", listen="localhost:0", transport=transport) as a, \
            TransferEngine("named-b", listen=None, transport=transport) as b:
        mine, theirs = registered(b, 4096), registered(a, 4096)
        peer = b.connect(f"localhost:{port_of(a.address)}", timeout_ms=3000)
        assert_link_works(b, peer, mine, theirs)
    _datadist_pull_over(transport, "localhost:0", "localhost")


# === 13. a peer frozen or killed in the middle of a transfer ======================

BIG_TENSORS, BIG_BLOCKS, BIG_ELEMS = 2, 512, 131072      # 2 x 128 MiB of fp16
BIG_POOL = '{"buf_pool_size": 335544320}'                 # 320 MiB


def _bytes_sent(pid):
    """Bytes process ``pid`` has written so far (None if /proc does not say)."""
    try:
        with open(f"/proc/{pid}/io") as io:
            for line in io:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _pull_then_signal(prompt, decoder, dst, sig):
    """Start a 256 MiB pull from ``prompt`` (user memory, which every
    transport moves over TCP) and send ``sig`` to the prompt once it is
    streaming the data. Returns the time the signal was sent."""
    start = _bytes_sent(prompt.process.pid)
    decoder.send("pull_blocks", 1, dst, list(range(BIG_BLOCKS)), list(range(BIG_BLOCKS)),
                 per_layer=1)
    deadline = time.monotonic() + 10
    if start is None:
        time.sleep(0.3)
    else:
        while _bytes_sent(prompt.process.pid) - start < (8 << 20):
            assert not decoder.conn.poll(), "the pull ended before the peer was stopped"
            assert time.monotonic() < deadline, "the pull never started streaming"
            time.sleep(0.0005)
    os.kill(prompt.process.pid, sig)
    return time.monotonic()


@pytest.fixture(params=TRANSPORTS)
def big_pair(request):
    transport = request.param
    prompt = PeerProcess("prompt", 1, transport=transport, buf_pool_cfg=SMALL_POOL)
    decoder = None
    try:
        prompt.call("register_blocks", BIG_TENSORS, [BIG_BLOCKS, BIG_ELEMS], key_cluster=1)
        decoder = PeerProcess("decoder", 2, listen="", transport=transport,
                              buf_pool_cfg=BIG_POOL, sync_kv_timeout=2000)
        dst = decoder.call("alloc_blocks", BIG_TENSORS, [BIG_BLOCKS, BIG_ELEMS])
        assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
        decoder.call("pull_blocks", 1, dst, [0], [0], per_layer=1)   # lookup, lane, mapping
        yield prompt, decoder, dst
    finally:
        if prompt.process.is_alive():
            prompt.kill(signal.SIGKILL)
        if decoder is not None:
            decoder.close()


def test_a_peer_frozen_mid_transfer_fails_it_with_llm_timeout_on_time(big_pair):
    # Today: LLM_LINK_FAILED (on time). The README's rule: a missed deadline
    # is LLM_TIMEOUT. The deadline is sync_kv_timeout = 2000 ms.
    prompt, decoder, dst = big_pair
    started = time.monotonic()
    _pull_then_signal(prompt, decoder, dst, signal.SIGSTOP)
    with pytest.raises(PeerError) as err:
        decoder.result(timeout=15)
    elapsed = time.monotonic() - started
    assert elapsed < 2.0 + 2.0, f"failed after {elapsed:.1f} s, deadline 2 s"
    assert err.value.status_code == LLMStatusCode.LLM_TIMEOUT, err.value


def test_a_peer_killed_mid_transfer_fails_it_with_llm_link_failed_at_once(big_pair):
    prompt, decoder, dst = big_pair
    killed = _pull_then_signal(prompt, decoder, dst, signal.SIGKILL)
    with pytest.raises(PeerError) as err:
        decoder.result(timeout=15)
    assert time.monotonic() - killed < 1.5, "a dead peer must fail the transfer at once"
    assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED, err.value
