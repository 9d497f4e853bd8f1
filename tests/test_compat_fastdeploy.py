"""FastDeploy's RDMACommunicator (kvcache.compat.fastdeploy) across real
processes: a decode process listening with its caches, this process as the
prefill writing layers into them; bytes checked exactly, on tcp and shm here
and rdma in the VM lane."""
import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest

from helpers import end_process, wait_until
from kvcache.compat.fastdeploy import ConnStatus, RDMACommunicator, WriteStatus
from kvcache.status import LLMException, LLMStatusCode

HOST = "127.0.0.1"
TRANSPORTS = ["tcp", "shm", pytest.param("rdma", marks=pytest.mark.rdma)]
REPLY_S = 60


def _pattern(seed, layer, kind, nbytes):
    return np.random.default_rng([seed, layer, kind]).integers(0, 256, nbytes, dtype=np.uint8)


def _decoder_main(conn, transport, layers, blocks, block_bytes, key_only):
    from kvcache.compat.fastdeploy import RDMACommunicator
    keys = [np.zeros(blocks * block_bytes, np.uint8) for _ in range(layers)]
    values = [] if key_only else [np.zeros(blocks * block_bytes, np.uint8)
                                  for _ in range(layers)]
    try:
        comm = RDMACommunicator("decode", 0, "0", [a.ctypes.data for a in keys],
                                [a.ctypes.data for a in values], blocks, block_bytes,
                                transport=transport, host=HOST)
    except Exception as exc:                  # noqa: BLE001 - reported to the test
        conn.send(("error", repr(exc)))
        return
    conn.send(("ready", comm.port))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message == "dump":
            conn.send(([k.copy() for k in keys], [v.copy() for v in values]))
        else:
            break
    comm.close()


class Decoder:
    """A decode process (spawned) with zeroed caches of ``layers`` x
    (key[, value]) x ``blocks`` blocks of ``block_bytes``."""

    def __init__(self, transport, layers, blocks, block_bytes, key_only=False):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_decoder_main, daemon=True,
                                   args=(child, transport, layers, blocks, block_bytes,
                                         key_only))
        self.process.start()
        kind, value = self._reply()
        if kind != "ready":
            self.close()
            raise RuntimeError(f"decoder failed to start: {value}")
        self.port = value

    def _reply(self):
        if not self.conn.poll(REPLY_S):
            raise TimeoutError(f"the decoder did not answer in {REPLY_S} s")
        return self.conn.recv()

    def dump(self):
        """(key arrays, value arrays) as the decoder holds them now."""
        self.conn.send("dump")
        return self._reply()

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.process.pid, sig)

    def close(self):
        end_process(self.process, self.conn, "close")


class Prefill:
    """Our prefill side: caches filled with a pattern of ``seed``."""

    def __init__(self, transport, layers, blocks, block_bytes, key_only=False, seed=1,
                 **kwargs):
        size = blocks * block_bytes
        self.keys = [_pattern(seed, layer, 0, size) for layer in range(layers)]
        self.values = [] if key_only else [_pattern(seed, layer, 1, size)
                                           for layer in range(layers)]
        self.block_bytes = block_bytes
        self.comm = RDMACommunicator("prefill", 0, "0", [a.ctypes.data for a in self.keys],
                                     [a.ctypes.data for a in self.values], blocks,
                                     block_bytes, transport=transport, **kwargs)

    def block(self, array, block):
        return array[block * self.block_bytes:(block + 1) * self.block_bytes]

    def close(self):
        self.comm.close()


@pytest.fixture
def cleanup():
    items = []
    yield items.append
    for item in reversed(items):
        item.close()


def _expect(decoder_shape, prefill, writes):
    """The decoder's caches after ``writes`` [(layer, local ids, remote ids)]
    into zeroed memory."""
    layers, blocks, block_bytes, key_only = decoder_shape
    keys = [np.zeros(blocks * block_bytes, np.uint8) for _ in range(layers)]
    values = [] if key_only else [np.zeros(blocks * block_bytes, np.uint8)
                                  for _ in range(layers)]
    for layer, local, remote in writes:
        for src, dst in zip(local, remote):
            span = slice(dst * block_bytes, (dst + 1) * block_bytes)
            keys[layer][span] = prefill.block(prefill.keys[layer], src)
            if not key_only:
                values[layer][span] = prefill.block(prefill.values[layer], src)
    return keys, values


def _assert_same(got, expected):
    for kind, (have, want) in enumerate(zip(got, expected)):
        assert len(have) == len(want)
        for layer, (a, b) in enumerate(zip(have, want)):
            assert np.array_equal(a, b), (f"{'key' if kind == 0 else 'value'} layer {layer}: "
                                          f"{int(np.count_nonzero(a != b))} bytes differ")


def _writes(layers, local_blocks, remote_blocks, count, seed):
    """Per layer: ``count`` distinct local ids to distinct remote ids, one
    layer with a run that is contiguous on both sides (merged into one
    piece) and one with ids in descending order."""
    rng = np.random.default_rng(seed)
    writes = []
    for layer in range(layers):
        local = rng.choice(local_blocks, count, replace=False).tolist()
        remote = rng.choice(remote_blocks, count, replace=False).tolist()
        if layer == 0:
            local, remote = list(range(3, 3 + count)), list(range(1, 1 + count))
        elif layer == 1:
            remote = sorted(remote, reverse=True)
        writes.append((layer, local, remote))
    return writes


def _write_layers_and_check(transport, key_only, cleanup):
    # Odd block size (stride bugs show), and fewer decoder blocks than ours.
    layers, block_bytes = 4, 3000
    decoder = Decoder(transport, layers, 20, block_bytes, key_only)
    cleanup(decoder)
    prefill = Prefill(transport, layers, 32, block_bytes, key_only)
    cleanup(prefill)
    assert not prefill.comm.is_connected(HOST, decoder.port)
    status = prefill.comm.connect(HOST, str(decoder.port))
    assert status == 0 and status is ConnStatus.CONNECTED and status
    assert prefill.comm.is_connected(HOST, str(decoder.port))
    writes = _writes(layers, 32, 20, 6, seed=7)
    for layer, local, remote in writes:
        assert prefill.comm.write_cache(HOST, decoder.port, local, remote, layer) == 0
    # numpy id arrays are taken too, and no blocks is success with nothing moved.
    extra = (2, np.array([31], dtype=np.int64), np.array([19], dtype=np.uint32))
    assert prefill.comm.write_cache(HOST, decoder.port, *extra[1:], extra[0]) == 0
    assert prefill.comm.write_cache(HOST, decoder.port, [], [], 3) == 0
    expected = _expect((layers, 20, block_bytes, key_only), prefill,
                       writes + [(2, [31], [19])])
    _assert_same(decoder.dump(), expected)


@pytest.mark.parametrize("transport", ["tcp", "shm"])
@pytest.mark.parametrize("key_only", [False, True], ids=["key+value", "key-only"])
def test_prefill_writes_each_layer_into_the_decoder_byte_exact(transport, key_only, cleanup):
    _write_layers_and_check(transport, key_only, cleanup)


@pytest.mark.parametrize("decoder_layout", [(4, True), (3, False)],
                         ids=["key-only-decoder", "fewer-layers"])
def test_a_decoder_with_another_layout_is_refused_at_connect(decoder_layout, cleanup):
    layers, key_only = decoder_layout
    decoder = Decoder("tcp", layers, 8, 1024, key_only)
    cleanup(decoder)
    prefill = Prefill("tcp", 4, 8, 1024)
    cleanup(prefill)
    status = prefill.comm.connect(HOST, decoder.port)
    assert status == ConnStatus.INVALID_PARAMETERS and not status
    assert not prefill.comm.is_connected(HOST, decoder.port)
    assert prefill.comm.write_cache(HOST, decoder.port, [0], [0], 0) == \
        WriteStatus.NOT_CONNECTED


def _free_port():
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_connect_to_nothing_listening_is_false_within_a_deadline(transport, cleanup):
    prefill = Prefill(transport, 2, 4, 512, connect_timeout_ms=2000)
    cleanup(prefill)
    port = _free_port()
    started = time.monotonic()
    status = prefill.comm.connect(HOST, port)
    assert time.monotonic() - started < 5
    assert status == ConnStatus.ERROR and not status
    assert not prefill.comm.is_connected(HOST, port)
    assert prefill.comm.write_cache(HOST, port, [0], [0], 0) == WriteStatus.NOT_CONNECTED


def test_connect_to_a_listener_that_never_answers_times_out(cleanup):
    prefill = Prefill("tcp", 1, 4, 512, connect_timeout_ms=1000)
    cleanup(prefill)
    with socket.create_server((HOST, 0)) as silent:       # accepts (backlog), never speaks
        port = silent.getsockname()[1]
        started = time.monotonic()
        status = prefill.comm.connect(HOST, port)
        elapsed = time.monotonic() - started
    assert status == ConnStatus.TIMEOUT and not status
    assert 0.9 <= elapsed < 5
    assert not prefill.comm.is_connected(HOST, port)


def test_bad_ids_layers_and_addresses_are_refused_before_anything_moves(cleanup):
    layers, blocks, block_bytes = 3, 8, 1024
    decoder = Decoder("tcp", layers, blocks - 2, block_bytes)      # the decoder has 6 blocks
    cleanup(decoder)
    prefill = Prefill("tcp", layers, blocks, block_bytes)
    cleanup(prefill)
    assert prefill.comm.connect(HOST, decoder.port) == 0
    write = prefill.comm.write_cache
    bad = [
        ([8], [0], 0),                    # local id == our block_number
        ([0], [6], 0),                    # remote id == the decoder's block_number
        ([-1], [0], 0),
        ([0], [-1], 0),
        ([0, 1], [0], 0),                 # lengths differ
        ([0], [0], 3),                    # layer == layer count
        ([0], [0], -1),
        ([0], [0], 1.5),
        ([0.0], [0], 0),                  # not integers
        ([True], [0], 0),
        ([[0]], [[0]], 0),                # not flat
        ("01", "01", 0),
        ([1 << 70], [0], 0),
        (None, [0], 0),
    ]
    for local, remote, layer in bad:
        assert write(HOST, decoder.port, local, remote, layer) == WriteStatus.INVALID, \
            (local, remote, layer)
    assert write(None, decoder.port, [0], [0], 0) == WriteStatus.INVALID
    assert write(HOST, "port", [0], [0], 0) == WriteStatus.INVALID
    assert write(HOST, 70000, [0], [0], 0) == WriteStatus.INVALID
    assert not prefill.comm.is_connected(HOST, "no port")
    assert prefill.comm.connect(HOST, "no port") == ConnStatus.INVALID_PARAMETERS
    keys, values = decoder.dump()
    assert not any(k.any() for k in keys) and not any(v.any() for v in values)
    # The link is unharmed: a good write lands.
    assert prefill.comm.is_connected(HOST, decoder.port)
    assert write(HOST, decoder.port, [7], [5], 2) == 0
    _assert_same(decoder.dump(), _expect((layers, 6, block_bytes, False), prefill,
                                         [(2, [7], [5])]))


class _Writer:
    """write_cache in a loop on a thread until a result is not 0; records
    every result."""

    def __init__(self, comm, port, ids):
        self.results = []
        self.ended_at = None
        self._args = (comm, port, ids)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        comm, port, ids = self._args
        while True:
            code = comm.write_cache(HOST, port, ids, ids, 0)
            self.results.append(code)
            if code != 0:
                break
        self.ended_at = time.monotonic()

    def join(self, timeout_s):
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), f"write_cache still running after {timeout_s} s"


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_a_decoder_killed_during_a_write_fails_that_write_within_a_deadline(transport,
                                                                            cleanup):
    # Over TCP, 16 MiB of key and 16 MiB of value per write: more than socket
    # buffers hold, so a write to a stopped decoder stays in flight. RDMA
    # needs no stop (writes are never idle) and emulated RDMA is slow.
    stalled = transport != "rdma"          # the NIC writes into a stopped process's memory
    blocks, block_bytes = 64, (256 if stalled else 16) << 10
    decoder = Decoder(transport, 1, blocks, block_bytes)
    cleanup(decoder)
    prefill = Prefill(transport, 1, blocks, block_bytes, timeout_ms=60_000)
    cleanup(prefill)
    assert prefill.comm.connect(HOST, decoder.port) == 0
    writer = _Writer(prefill.comm, decoder.port, list(range(blocks)))
    wait_until(lambda: len(writer.results) >= 2, 30, "two writes done")
    if stalled:
        decoder.kill(signal.SIGSTOP)
        time.sleep(0.5)                    # the write running now cannot end
        done = len(writer.results)
        time.sleep(1.0)
        assert len(writer.results) == done and writer.ended_at is None, \
            "a write finished while the decoder was stopped"
    killed_at = time.monotonic()
    decoder.kill()
    writer.join(15)
    assert writer.ended_at - killed_at < 10
    *ok, failed = writer.results
    assert all(code == 0 for code in ok)
    if stalled:
        assert failed == WriteStatus.LINK_FAILED, failed
    else:
        assert failed in (WriteStatus.LINK_FAILED, WriteStatus.NOT_CONNECTED), failed
    wait_until(lambda: not prefill.comm.is_connected(HOST, decoder.port), 10,
               "the link to the killed decoder ended")
    assert prefill.comm.write_cache(HOST, decoder.port, [0], [0], 0) == \
        WriteStatus.NOT_CONNECTED
    assert prefill.comm.connect(HOST, decoder.port) == ConnStatus.ERROR


def test_is_connected_follows_the_link_and_connect_again_links_anew(cleanup):
    first = Decoder("tcp", 2, 4, 1024)
    cleanup(first)
    prefill = Prefill("tcp", 2, 4, 1024)
    cleanup(prefill)
    assert not prefill.comm.is_connected(HOST, first.port)
    assert prefill.comm.connect(HOST, first.port) == 0
    assert prefill.comm.connect(HOST, str(first.port)) == 0      # already: still 0
    assert prefill.comm.is_connected(HOST, first.port)
    assert not prefill.comm.is_connected("127.0.0.2", first.port)
    first.close()                                                # an orderly end
    wait_until(lambda: not prefill.comm.is_connected(HOST, first.port), 10, "unlinked")
    second = Decoder("tcp", 2, 4, 1024)
    cleanup(second)
    assert prefill.comm.connect(HOST, second.port) == 0
    assert prefill.comm.write_cache(HOST, second.port, [3], [0], 1) == 0
    _assert_same(second.dump(), _expect((2, 4, 1024, False), prefill, [(1, [3], [0])]))


def test_bad_constructor_arguments_raise_llm_exception(cleanup):
    buf = np.zeros(8 * 1024, np.uint8)
    other = np.zeros(8 * 1024, np.uint8)
    addr, addr2 = buf.ctypes.data, other.ctypes.data
    cases = [
        (("mix", 0, "0", [addr], [addr2], 8, 1024), {}),
        (("prefill", 0, "0", [], [], 8, 1024), {}),
        (("prefill", 0, "0", [addr], [addr2, addr2], 8, 1024), {}),
        (("prefill", 0, "0", [addr], [addr2], 0, 1024), {}),
        (("prefill", 0, "0", [addr], [addr2], 8, 0), {}),
        (("prefill", 0, "0", [addr], [addr], 8, 1024), {}),         # key and value overlap
        (("prefill", 0, "0", [4096], [], 1, 1024), {}),             # memory not ours
        (("prefill", 0, "0", addr, [], 8, 1024), {}),
        (("prefill", -1, "0", [addr], [], 8, 1024), {}),
        (("decode", 0, "http", [addr], [], 8, 1024), {}),
        (("prefill", 0, "0", [addr], [], 8, 1024), {"transport": "ucx"}),
        (("prefill", 0, "0", [addr], [], 8, 1024), {"timeout_ms": 0}),
    ]
    for args, kwargs in cases:
        with pytest.raises(LLMException) as err:
            RDMACommunicator(*args, **kwargs).close()
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID, (args, kwargs)
    decode = RDMACommunicator("decode", 0, 0, [addr], [addr2], 8, 1024, transport="tcp",
                              host=HOST)
    cleanup(decode)
    assert decode.connect(HOST, 1) == ConnStatus.INVALID_PARAMETERS   # decoders are connected to


_ENV_SCRIPT = textwrap.dedent("""
    import numpy as np
    from kvcache.compat.fastdeploy import RDMACommunicator
    caches = [np.zeros(4 * 1024, np.uint8) for _ in range(4)]
    a = [c.ctypes.data for c in caches]
    decode = RDMACommunicator("decode", 0, 0, a[:1], a[1:2], 4, 1024)
    prefill = RDMACommunicator("prefill", 0, 0, a[2:3], a[3:], 4, 1024)
    again = RDMACommunicator("prefill", 1, 0, a[2:3], [], 4, 1024)
    port = decode.port
    assert prefill.connect("127.0.0.1", port) == 0
    assert prefill.write_cache("127.0.0.1", port, [1], [2], 0) == 0
    assert prefill.write_cache("127.0.0.1", port, [1], [4], 0) == -1
    print(decode.address, decode.transport)
    for comm in (again, prefill, decode):
        comm.close()
""")


def test_fastdeploy_environment_variables(tmp_path):
    debug_file, error_file = tmp_path / "debug.log", tmp_path / "error.log"
    env = dict(os.environ, KVCACHE_DEBUG="true", KVCACHE_DEBUG_FILE=str(debug_file),
               KVCACHE_ERROR_FILE=str(error_file), KVCACHE_SOCKET_IFNAME="lo",
               KVCACHE_TRANSPORT="tcp", KVCACHE_RDMA_GID_INDEX="3",
               KVCACHE_IB_TIMEOUT="18")
    out = subprocess.run([sys.executable, "-c", _ENV_SCRIPT], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    address, transport = out.stdout.split()
    assert address.startswith("127.0.0.1:") and transport == "tcp"   # lo's address
    debug, errors = debug_file.read_text(), error_file.read_text()
    assert "DEBUG kvcache.compat.fastdeploy: write_cache to 127.0.0.1" in debug
    # Variables without a meaning on TCP are said to be so, once each.
    for name in ("KVCACHE_RDMA_GID_INDEX", "KVCACHE_IB_TIMEOUT", "KVCACHE_SOCKET_IFNAME"):
        assert debug.count(f"{name} has no effect") == 1, name
    assert "remote_block_ids[0] = 4 is outside 0..3" in errors and "INVALID (-1)" in errors
    assert " DEBUG " not in errors and " WARNING " not in errors


@pytest.mark.rdma
def test_rdma_with_fastdeploy_variables_writes_each_layer_byte_exact(monkeypatch, cleanup):
    import pyverbs_kv
    nic = pyverbs_kv.get_device_list()[0]
    buf = np.zeros(4 * 1024, np.uint8)
    for name, value in (("KVCACHE_IB_TIMEOUT", "32"), ("KVCACHE_RDMA_NICS", "no_such_nic")):
        with monkeypatch.context() as env:
            env.setenv(name, value)
            with pytest.raises(LLMException) as err:
                RDMACommunicator("prefill", 0, "0", [buf.ctypes.data], [], 4, 1024,
                                 transport="rdma")
            assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
            assert name in str(err.value) or value in str(err.value)
    # FastDeploy's values; the decoder (spawned next) inherits them too.
    monkeypatch.setenv("KVCACHE_RDMA_NICS", f"{nic},{nic}")
    monkeypatch.setenv("KVCACHE_RDMA_GID_INDEX", "1")          # rxe's RoCE v2 IPv4 GID
    monkeypatch.setenv("KVCACHE_IB_TIMEOUT", "18")
    monkeypatch.setenv("KVCACHE_RELAX_ORDERING", "true")
    _write_layers_and_check("rdma", False, cleanup)
