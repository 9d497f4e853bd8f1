"""KV caches in device memory (Placement.DEVICE) against the runtime test
doubles (tests/doubles: ACL for 'npu', CUDA for 'cuda'), loaded through
KVCACHE_ACL_LIB / KVCACHE_CUDA_LIB as a real process loads the runtime.
Two processes, tcp and shm: pull and push of blocks and cache rows between
DEVICE and HOST caches and between two DEVICE caches, staged in chunks that
do not divide the transfer, contents read back with the runtime's D2H copy.
The doubles run an asynchronous copy only when its stream is synchronised,
so a byte found in place proves the side that received it synchronised its
stream before the call returned."""
import textwrap
import threading

import numpy as np
import pytest

from accel_doubles import RUNTIMES, build, run_python
from device_peer import DevicePeer
from kv_peer import PeerError, pattern
from kvcache.device.regions import DeviceRegions
from kvcache.device.staging import chunked
from kvcache.status import LLMException, LLMStatusCode

BLOCKS, BLOCK = 24, 1000          # 1000-byte blocks: chunks of 2300 bytes split them
TENSORS = 4
CHUNK = 2300


@pytest.fixture(params=["npu", "cuda"])
def device_type(request, libraries, monkeypatch):
    monkeypatch.setenv(RUNTIMES[request.param][2], libraries[request.param])
    return request.param


def peers(transport, device_type):
    options = dict(transport=transport, buf_pool_cfg='{"buf_pool_size": 16777216}',
                   device_type=device_type, device_mem_pool_size=8 << 20,
                   device_chunk_size=CHUNK)
    prompt = DevicePeer("prompt", 1, **options)
    try:
        decoder = DevicePeer("decoder", 2, listen="", **options)
    except BaseException:
        prompt.close()
        raise
    assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
    return prompt, decoder


def expected(seed, tensor, rows):
    return pattern(seed, tensor, BLOCKS * BLOCK).reshape(BLOCKS, BLOCK)[rows]


@pytest.mark.parametrize("transport", ["tcp", "shm"])
def test_blocks_move_between_device_and_host_caches_every_way(transport, device_type):
    prompt, decoder = peers(transport, device_type)
    try:
        shape = [BLOCKS, BLOCK]
        src_dev = prompt.call("alloc", "blocks", TENSORS, shape, "DEVICE", key=1, model_id=0)
        src_host = prompt.call("alloc", "blocks", TENSORS, shape, "HOST", key=1, model_id=1)
        prompt.call("fill", src_dev, seed=1)
        prompt.call("fill", src_host, seed=2)
        dst_dev = decoder.call("alloc", "blocks", TENSORS, shape, "DEVICE")
        dst_host = decoder.call("alloc", "blocks", TENSORS, shape, "HOST")
        src_ids = [5, 6, 7, 0, 23, 11, 12]
        dst_ids = [1, 2, 3, 9, 10, 22, 4]
        # Pull: device -> device, device -> host, host -> device.
        for model, seed, dst in ((0, 1, dst_dev), (0, 1, dst_host), (1, 2, dst_dev)):
            decoder.call("pull_model", 1, model, dst, src_ids, dst_ids)
            got = decoder.call("tensors", dst)
            for t in range(TENSORS):
                assert np.array_equal(got[t][dst_ids], expected(seed, t, src_ids)), (model, dst)
        assert decoder.call("transfer_path", 1, dst_dev) == ("staged", "staged")
        # Push: device -> device, device -> host (the remote caches' blocks
        # 13..19 get the decoder's dst_ids blocks, the second pattern).
        decoder.call("fill", dst_dev, seed=3)
        back = [13, 14, 15, 16, 17, 18, 19]
        for model, src in ((0, dst_dev), (1, dst_dev)):
            decoder.call("push_model", 1, model, src, dst_ids, back)
            landed = prompt.call("tensors", src_dev if model == 0 else src_host)
            for t in range(TENSORS):
                assert np.array_equal(landed[t][back], expected(3, t, dst_ids))
                untouched = [b for b in range(BLOCKS) if b not in back]
                assert np.array_equal(landed[t][untouched],
                                      expected(1 if model == 0 else 2, t, untouched))
        # Host -> device push.
        decoder.call("fill", dst_host, seed=4)
        decoder.call("push_model", 1, 0, dst_host, [0, 1], [2, 3])
        landed = prompt.call("tensors", src_dev)
        for t in range(TENSORS):
            assert np.array_equal(landed[t][[2, 3]], expected(4, t, [0, 1]))
        assert decoder.call("transfer_path", 1, dst_host) == ("staged", "host")
    finally:
        decoder.close()
        prompt.close()


@pytest.mark.rdma
def test_a_staged_device_cache_moves_over_rdma(libraries, monkeypatch):
    """The VM lane: staging slots registered with the RDMA transport; a pull
    device -> device and a push device -> host, chunks splitting blocks."""
    monkeypatch.setenv("KVCACHE_ACL_LIB", libraries["npu"])
    prompt, decoder = peers("rdma", "npu")
    try:
        shape = [BLOCKS, BLOCK]
        src = prompt.call("alloc", "blocks", TENSORS, shape, "DEVICE", key=1, model_id=0)
        host = prompt.call("alloc", "blocks", TENSORS, shape, "HOST", key=1, model_id=1)
        prompt.call("fill", src, seed=1)
        dst = decoder.call("alloc", "blocks", TENSORS, shape, "DEVICE")
        src_ids, dst_ids = [5, 6, 7, 0, 23], [1, 2, 3, 9, 10]
        decoder.call("pull_model", 1, 0, dst, src_ids, dst_ids)
        got = decoder.call("tensors", dst)
        for t in range(TENSORS):
            assert np.array_equal(got[t][dst_ids], expected(1, t, src_ids))
        decoder.call("push_model", 1, 1, dst, dst_ids, [11, 12, 13, 14, 15])
        landed = prompt.call("tensors", host)
        for t in range(TENSORS):
            assert np.array_equal(landed[t][11:16], expected(1, t, src_ids))
    finally:
        decoder.close()
        prompt.close()


def test_cache_rows_and_registered_device_memory_move_both_ways(libraries, monkeypatch):
    """Per-request DEVICE caches (pull_cache by CacheKey and by id, push_cache)
    and device memory the caller allocated and registered (pull_blocks)."""
    monkeypatch.setenv("KVCACHE_ACL_LIB", libraries["npu"])
    prompt, decoder = peers("tcp", "npu")
    try:
        rows, row_bytes = 3, 5000                  # 5000 % 2300: rows split unevenly too
        src = prompt.call("alloc", "cache", 2, [rows, row_bytes], "DEVICE",
                          keys=[(1, 10), (1, 11)])
        prompt.call("fill", src, seed=5)
        dst = decoder.call("alloc", "cache", 2, [rows, row_bytes], "DEVICE")
        decoder.call("pull_cache", 1, None, dst, row=2, req_id=11)       # key of row 1
        decoder.call("pull_cache", 1, src, dst, remote_row=0, row=0)
        want = [pattern(5, t, rows * row_bytes).reshape(rows, row_bytes) for t in range(2)]
        got = decoder.call("tensors", dst)
        for t in range(2):
            assert np.array_equal(got[t][2], want[t][1])
            assert np.array_equal(got[t][0], want[t][0])
        decoder.call("fill", dst, seed=6)
        decoder.call("push_cache", 1, src, dst, remote_row=2, row=1)
        mine = [pattern(6, t, rows * row_bytes).reshape(rows, row_bytes) for t in range(2)]
        landed = prompt.call("tensors", src)
        for t in range(2):
            assert np.array_equal(landed[t][2], mine[t][1])
            assert np.array_equal(landed[t][:2], want[t][:2])
        registered = prompt.call("register_device_blocks", 2, [BLOCKS, BLOCK], 1, model_id=7)
        prompt.call("fill", registered, seed=8)
        into = decoder.call("alloc", "blocks", 2, [BLOCKS, BLOCK], "HOST")
        decoder.call("pull_model", 1, 7, into, [3, 4, 20], [0, 1, 2])
        got = decoder.call("tensors", into)
        for t in range(2):
            assert np.array_equal(got[t][:3], expected(8, t, [3, 4, 20]))
    finally:
        decoder.close()
        prompt.close()


def test_the_holder_checks_every_staged_piece_against_its_region(libraries, monkeypatch):
    """A peer's staging calls reach only offered device regions, inside them,
    within the slot; refused calls change nothing."""
    monkeypatch.setenv("KVCACHE_ACL_LIB", libraries["npu"])
    prompt, decoder = peers("tcp", "npu")
    try:
        cache = prompt.call("alloc", "blocks", 1, [BLOCKS, BLOCK], "DEVICE", key=1)
        prompt.call("fill", cache, seed=12)
        info = prompt.call("describe", cache)
        base, region = info["tensor_addrs"][0], info["region_ids"][0]
        size = BLOCKS * BLOCK
        region_end = base + -(-size // 512) * 512         # a pool cache: tensors 512-aligned
        cases = [(dict(addrs=[region_end - 10], lengths=[20], regions=[region]),
                  LLMStatusCode.LLM_PARAM_INVALID, "not inside region"),
                 (dict(addrs=[base - 512], lengths=[8], regions=[region]),
                  LLMStatusCode.LLM_PARAM_INVALID, "not inside region"),
                 (dict(addrs=[base], lengths=[8], regions=[region + 99]),
                  LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, "does not exist"),
                 (dict(addrs=[base], lengths=[CHUNK + 1], regions=[region]),
                  LLMStatusCode.LLM_PARAM_INVALID, "byte slot"),
                 (dict(addrs=[base], lengths=[-8], regions=[region]),
                  LLMStatusCode.LLM_PARAM_INVALID, "positive")]
        for method in ("cache.stage_in", "cache.stage_out"):
            for params, status, text in cases:
                with pytest.raises(PeerError) as err:
                    decoder.call("stage_raw", 1, method, dict(params, slot=0,
                                                              budget_ms=30_000))
                assert err.value.status_code == status, (method, params, err.value)
                assert text in str(err.value)
        got = prompt.call("tensors", cache)[0]
        assert np.array_equal(got, pattern(12, 0, size).reshape(BLOCKS, BLOCK))
    finally:
        decoder.close()
        prompt.close()


def test_the_device_copies_of_both_sides_overlap(libraries, monkeypatch):
    """Device -> device, one block per chunk, every device copy made slow
    on both sides: the peer's D2H of chunk i+1 runs while our H2D of an
    earlier chunk does, so the pull takes well under the sum of the copies."""
    monkeypatch.setenv("KVCACHE_ACL_LIB", libraries["npu"])
    options = dict(transport="tcp", buf_pool_cfg='{"buf_pool_size": 4194304}',
                   device_type="npu", device_mem_pool_size=1 << 20, device_chunk_size=BLOCK,
                   sync_kv_timeout=20000)
    prompt = DevicePeer("prompt", 1, **options)
    decoder = DevicePeer("decoder", 2, listen="", **options)
    try:
        assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
        src = prompt.call("alloc", "blocks", 1, [BLOCKS, BLOCK], "DEVICE", key=1)
        prompt.call("fill", src, seed=13)
        dst = decoder.call("alloc", "blocks", 1, [BLOCKS, BLOCK], "DEVICE")
        decoder.call("pull_model", 1, 0, dst, [0], [0])      # slots set up, not timed
        chunks, delay = 8, 0.15
        for peer in (prompt, decoder):
            peer.call("set_copy_delay", int(delay * 1e6))
        ids = list(range(2, 2 * chunks + 1, 2))               # not contiguous: 8 chunks
        took = decoder.call("timed_pull", 1, 0, dst, ids, ids)
        for peer in (prompt, decoder):
            peer.call("set_copy_delay", 0)
        serial = chunks * 2 * delay
        assert took < 0.8 * serial, f"{took:.2f} s for copies that take {serial:.2f} s in a row"
        got = decoder.call("tensors", dst)[0]
        assert np.array_equal(got[ids], expected(13, 0, ids))
    finally:
        decoder.close()
        prompt.close()


@pytest.mark.parametrize("chunk", [1, 7, 999, 1000, 1001, 4096, 10 ** 6])
def test_chunks_cover_every_byte_once_in_order(chunk):
    """The staging plan: every chunk fits a slot, slot offsets are packed,
    and unpacking every chunk rebuilds exactly the bytes of the pieces."""
    rng = np.random.default_rng(chunk)
    lengths = rng.integers(1, 3000, 40).astype(np.uint64)
    src = rng.integers(0, 256, int(lengths.sum()) * 2, dtype=np.uint8)
    local = np.cumsum(lengths * np.uint64(2)) - lengths * np.uint64(2)      # gaps between
    remote = np.arange(40, dtype=np.uint64) * np.uint64(4000)
    dst = np.zeros(40 * 4000, dtype=np.uint8)
    plan = chunked(local, remote, lengths, chunk, max_pieces=5)
    assert len(plan) >= -(-int(lengths.sum()) // chunk)
    for loc, rem, lens, offsets, _ in plan:
        assert int(lens.sum()) <= chunk and lens.size <= 5
        assert np.array_equal(offsets, np.cumsum(lens) - lens)
        slot = np.concatenate([src[int(a):int(a + n)] for a, n in zip(loc, lens)])
        for r, o, n in zip(rem, offsets, lens):
            dst[int(r):int(r + n)] = slot[int(o):int(o + n)]
    for a, r, n in zip(local, remote, lengths):
        assert np.array_equal(dst[int(r):int(r + n)], src[int(a):int(a + n)])


ERRORS = """
import numpy as np
from kvcache.device.runtime import D2H, H2D, DeviceRuntime
from kvcache.status import LLMException
rt = DeviceRuntime({kind!r}, 0)
buf = rt.alloc(4096)
host = np.zeros(4096, np.uint8)
for name, call in (
        ("kind", lambda: rt.copy(host.ctypes.data, buf.ptr, 4096, H2D)),
        ("free", lambda: (buf.close(), rt.copy(host.ctypes.data, buf_ptr, 4096, D2H)))):
    buf_ptr = buf.ptr
    try:
        call()
    except LLMException as exc:
        print(name, exc.status_code.name, exc.device_code, exc.device_call, "|", exc)
"""


@pytest.mark.parametrize("kind", ["npu", "cuda"])
def test_runtime_errors_surface_as_llm_exceptions_with_the_runtime_code(kind, libraries):
    out = run_python(ERRORS.format(kind=kind), {RUNTIMES[kind][2]: libraries[kind]})
    assert out.returncode == 0, out.stderr
    lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
    call = "aclrtMemcpy" if kind == "npu" else "cudaMemcpy"
    # A host destination with a host-to-device kind: the runtime refuses it.
    status, code, failed, _, text = lines["kind"].split(" ", 4)
    assert status == "LLM_DEVICE_MEM_ERROR" and int(code) != 0 and failed == call
    assert f"error {code}" in text and "kind=" in text
    # Copying from device memory after it was freed.
    status, code, failed, _, text = lines["free"].split(" ", 4)
    assert status == "LLM_DEVICE_MEM_ERROR" and int(code) != 0 and failed == call
    if kind == "npu":                      # the ACL double says what it saw
        assert "use after free" in text


HOST_ONLY = """
import numpy as np
from kvcache import (CacheDesc, DataType, LLMConfig, LLMDataDist, LLMException, LLMRole,
                     Placement)
cfg = LLMConfig()
cfg.buf_pool_cfg = '{{"buf_pool_size": 4194304}}'
cfg.device_type = {device_type!r}
dd = LLMDataDist(LLMRole.PROMPT, 1)
dd.init(cfg.generate_options())
cm = dd.cache_manager
host = cm.allocate_blocks_cache(CacheDesc(1, [4, 16], DataType.DT_UINT8))
host.numpy(0)[:] = 7
print("host", host.transfer_path, int(host.numpy(0).sum()))
try:
    cm.allocate_blocks_cache(CacheDesc(1, [4, 16], DataType.DT_UINT8, Placement.DEVICE))
except LLMException as exc:
    print("device", exc.status_code.name, "|", exc)
dd.finalize()
"""


def test_a_missing_runtime_turns_device_placement_off_and_host_paths_run(tmp_path, libraries):
    cases = {"none": ("", {}),
             "library": ("npu", {"KVCACHE_ACL_LIB": str(tmp_path / "nowhere.so")}),
             "symbol": ("npu", {"KVCACHE_ACL_LIB": build("fake_ascendcl.c", tmp_path,
                                                         "libascendcl.so",
                                                         omit="aclrtMemcpyAsync")})}
    for case, (device_type, env) in cases.items():
        out = run_python(HOST_ONLY.format(device_type=device_type),
                         dict(env, KVCACHE_DEVICE_TYPE=None))
        assert out.returncode == 0, (case, out.stderr)
        lines = dict(line.split(" ", 1) for line in out.stdout.splitlines())
        assert lines["host"] == "host 448", case          # path, 4 x 16 bytes of 7
        assert lines["device"].startswith("LLM_FEATURE_NOT_ENABLED"), (case, lines)
        assert {"none": "no device type is configured", "library": "nowhere.so",
                "symbol": "aclrtMemcpyAsync"}[case] in lines["device"], (case, lines)


def test_a_host_pointer_registered_as_cuda_device_memory_is_refused(libraries):
    code = HOST_ONLY.split("cm = dd.cache_manager")[0] + textwrap.dedent("""
        owned = np.zeros(64, np.uint8)
        try:
            dd.cache_manager.register_blocks_cache(
                CacheDesc(1, [4, 16], DataType.DT_UINT8, Placement.DEVICE), [owned.ctypes.data])
        except LLMException as exc:
            print(exc.status_code.name, "|", exc)
        dd.finalize()
        """)
    out = run_python(code.format(device_type="cuda"), {"KVCACHE_CUDA_LIB": libraries["cuda"]})
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("LLM_PARAM_INVALID") and "not CUDA device memory" in out.stdout


def test_layer_wise_transfers_stage_device_caches_and_announce_layers_in_place(device_type):
    """transfer_cache_async DEVICE -> HOST (by cache key and by raw
    addresses), DEVICE -> DEVICE and HOST -> DEVICE, 3 layers of blocks in
    chunks that split blocks: at each layer's notice the decoder reads that
    layer's destination blocks (from device memory: the doubles run a
    queued copy only when its stream is synchronised, so a layer found in
    place was synchronised before its notice) and finds them byte-exact;
    other blocks are untouched."""
    prompt, decoder = peers("tcp", device_type)
    try:
        layers, shape = 3, [BLOCKS, BLOCK]
        src = {"DEVICE": prompt.call("alloc", "blocks", 2 * layers, shape, "DEVICE"),
               "HOST": prompt.call("alloc", "blocks", 2 * layers, shape, "HOST")}
        dst = {"DEVICE": decoder.call("alloc", "blocks", 2 * layers, shape, "DEVICE", key=2,
                                      model_id=0),
               "HOST": decoder.call("alloc", "blocks", 2 * layers, shape, "HOST", key=2,
                                    model_id=1)}
        src_ids, dst_ids = [4, 5, 6, 20, 0], [10, 11, 12, 1, 23]
        untouched = [b for b in range(BLOCKS) if b not in dst_ids]
        raw = decoder.call("describe", dst["HOST"])["tensor_addrs"]
        for n, (here, there, addrs) in enumerate((("DEVICE", "HOST", None),
                                                  ("DEVICE", "HOST", raw),
                                                  ("DEVICE", "DEVICE", None),
                                                  ("HOST", "DEVICE", None))):
            seed, model = 20 + n, 0 if there == "DEVICE" else 1
            decoder.call("fill", dst[there], seed=9)
            prompt.call("push_layers", "t", src[here], 2, model, layers, seed, src_ids, dst_ids,
                        f"layers-{n}", 0.05, raw_addrs=addrs)
            snapshots, final = decoder.call("watch_layers", f"layers-{n}", layers, dst[there],
                                            dst_ids, 30_000)
            assert prompt.call("task_code", "t") == (LLMStatusCode.LLM_SUCCESS,
                                                     [LLMStatusCode.LLM_SUCCESS])
            assert final == list(range(layers))
            for layer, pair in enumerate(snapshots):
                for t, got in zip((2 * layer, 2 * layer + 1), pair):
                    assert np.array_equal(got, expected(seed, t, src_ids)), (here, there, t)
            after = decoder.call("tensors", dst[there])
            for t in range(2 * layers):
                assert np.array_equal(after[t][untouched], expected(9, t, untouched))
        assert prompt.call("transfer_path", 2, src["HOST"]) == ("staged", "host")
        # Raw destination block ids are checked without a bitmap of the id space.
        with pytest.raises(PeerError) as err:
            prompt.call("push_layers", "bad", src["DEVICE"], 2, 0, layers, 1, [0, 1], [3, 3],
                        "bad", 0, raw_addrs=raw)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "repeat" in str(err.value)
    finally:
        decoder.close()
        prompt.close()


@pytest.mark.gpu
def test_gpu_caches_of_two_processes_move_staged():
    """The real CUDA runtime (torch's libcudart): GPU caches pulled and
    pushed between two processes, staged through pinned host slots."""
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    options = dict(transport="shm", buf_pool_cfg='{"buf_pool_size": 16777216}',
                   device_type="cuda", device_mem_pool_size=64 << 20,
                   device_chunk_size=1 << 20)
    prompt = DevicePeer("prompt", 1, **options)
    decoder = DevicePeer("decoder", 2, listen="", **options)
    try:
        assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
        blocks, block = 256, 16384
        src = prompt.call("alloc", "blocks", 4, [blocks, block], "DEVICE", key=1)
        prompt.call("fill", src, seed=9)
        dst = decoder.call("alloc", "blocks", 4, [blocks, block], "DEVICE")
        order = np.random.default_rng(0).permutation(blocks).tolist()
        decoder.call("pull_model", 1, 0, dst, order, list(range(blocks)))
        got = decoder.call("tensors", dst)
        for t in range(4):
            want = pattern(9, t, blocks * block).reshape(blocks, block)
            assert np.array_equal(got[t], want[order])
        decoder.call("push_model", 1, 0, dst, [0, 1], [5, 6])
        landed = prompt.call("tensors", src)
        for t in range(4):
            assert np.array_equal(landed[t][[5, 6]], got[t][[0, 1]])
    finally:
        decoder.close()
        prompt.close()


@pytest.mark.gpu
def test_a_torch_cuda_tensor_registers_as_device_memory_and_is_pulled():
    torch = pytest.importorskip("torch", reason="torch is not installed")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device here")
    from kvcache import BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMRole
    from kvcache.values import Placement
    blocks, block = 64, 4096
    cfg = LLMConfig()
    cfg.listen_ip_info = "127.0.0.1:0"
    cfg.buf_pool_cfg = '{"buf_pool_size": 16777216}'
    cfg.transport, cfg.device_type = "tcp", "cuda"
    prompt = LLMDataDist(LLMRole.PROMPT, 1)
    prompt.init(cfg.generate_options())
    decoder = DevicePeer("decoder", 2, listen="", transport="tcp", device_type="cuda",
                         buf_pool_cfg='{"buf_pool_size": 16777216}',
                         device_mem_pool_size=16 << 20)
    try:
        tensor = torch.randint(0, 256, (blocks, block), dtype=torch.uint8, device="cuda")
        cache = prompt.cache_manager.register_blocks_cache(
            CacheDesc(1, [blocks, block], DataType.DT_UINT8, Placement.DEVICE),
            [tensor.data_ptr()], BlocksCacheKey(1))
        assert cache.transfer_path == "staged"
        assert decoder.call("link", 1, prompt.listen_address) == LLMStatusCode.LLM_SUCCESS
        dst = decoder.call("alloc", "blocks", 1, [blocks, block], "DEVICE")
        decoder.call("pull_model", 1, 0, dst, list(range(blocks)), list(range(blocks)))
        assert np.array_equal(decoder.call("tensors", dst)[0], tensor.cpu().numpy())
    finally:
        decoder.close()
        prompt.finalize()


LOCAL_COPIES = """
import numpy as np
from kvcache import (Cache, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMException, LLMRole,
                     LLMStatusCode, Placement)
from kvcache.device.runtime import D2H, H2D
B, R, T = 400, 96, 3
cfg = LLMConfig()
cfg.buf_pool_cfg = '{{"buf_pool_size": 4194304}}'
cfg.device_type = {device_type!r}
cfg.device_mem_pool_size = 4 << 20
dd = LLMDataDist(LLMRole.PROMPT, 1)
dd.init(cfg.generate_options())
cm = dd.cache_manager
rt = cm._device.runtime()
rng = np.random.default_rng(7)

def desc(placement, shape=(B, R)):
    return CacheDesc(T, list(shape), DataType.DT_UINT8, placement)

def fill(cache):
    rows, row = cache.cache_desc.shape
    model = [rng.integers(0, 256, (rows, row), dtype=np.uint8) for _ in range(T)]
    for addr, m in zip(cache.tensor_addrs, model):
        if cache.cache_desc.placement == Placement.DEVICE:
            rt.copy(addr, m.ctypes.data, m.nbytes, H2D)
        else:
            np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * m.nbytes).from_address(
                addr))[:] = m.ravel()
    return model

def read(cache):
    rows, row = cache.cache_desc.shape
    out = []
    for addr in cache.tensor_addrs:
        host = np.empty((rows, row), dtype=np.uint8)
        if cache.cache_desc.placement == Placement.DEVICE:
            rt.copy(host.ctypes.data, addr, host.nbytes, D2H)
        else:
            host[:] = np.ctypeslib.as_array((np.ctypeslib.ctypes.c_uint8 * host.nbytes)
                                            .from_address(addr)).reshape(rows, row)
        out.append(host)
    return out

def expect(cache, model, what):
    got = read(cache)
    for t in range(T):
        assert np.array_equal(got[t], model[t]), (what, t)

def apply(dst_model, src_model, pairs):
    old = [m.copy() for m in src_model]
    for s, d in pairs:
        for t in range(T):
            dst_model[t][d] = old[t][s]

def refused(code, call, *args):
    try:
        call(*args)
    except LLMException as exc:
        assert exc.status_code == code, (exc.status_code, exc)
        return str(exc)
    raise AssertionError(f"{{call.__name__}}{{args}} was not refused")

dev, dev2 = cm.allocate_blocks_cache(desc(Placement.DEVICE)), \\
    cm.allocate_blocks_cache(desc(Placement.DEVICE))
m_dev, m_dev2 = fill(dev), fill(dev2)
arrays = [np.zeros(B * R, dtype=np.uint8) for _ in range(T)]
cpu = Cache.create_cpu_cache(desc(Placement.HOST), [a.ctypes.data for a in arrays])
m_cpu = fill(cpu)

# Swap out (D2H), runs of consecutive blocks and single ones.
out = {{0: 5, 1: 6, 2: 7, 10: 0, 399: 399, 20: 1}}
cm.swap_blocks(dev, cpu, out)
apply(m_cpu, m_dev, out.items())
expect(cpu, m_cpu, "swap out")
expect(dev, m_dev, "swap out source")
# Swap in (H2D), and a whole reversed cache: one copy per block and tensor,
# more than a stream queues at once.
back = {{5: 30, 6: 31, 0: 3}}
cm.swap_blocks(cpu, dev, back)
apply(m_dev, m_cpu, back.items())
expect(dev, m_dev, "swap in")
reverse = {{b: B - 1 - b for b in range(B)}}
cm.swap_blocks(cpu, dev2, reverse)
apply(m_dev2, m_cpu, reverse.items())
expect(dev2, m_dev2, "swap in reversed")
# Device to device, two caches.
d2d = {{3: 9, 4: 10, 100: 200}}
cm.swap_blocks(dev, dev2, d2d)
apply(m_dev2, m_dev, d2d.items())
expect(dev2, m_dev2, "swap d2d")
# copy_blocks within a device cache: sources among the destinations are
# read before any is written.
info = {{0: [1, 2], 1: [3], 3: [0], 50: [51, 52, 53]}}
cm.copy_blocks(dev, info)
apply(m_dev, m_dev, [(s, d) for s, ds in info.items() for d in ds])
expect(dev, m_dev, "copy_blocks overlapping")
# Bad maps are refused before a byte moves.
invalid = LLMStatusCode.LLM_PARAM_INVALID
refused(invalid, cm.swap_blocks, dev, cpu, {{0: 1, B: 2}})
refused(invalid, cm.swap_blocks, cpu, dev, {{0: 1, 2: 1}})
refused(invalid, cm.copy_blocks, dev, {{0: [1, 2], 3: [2]}})
small = cm.allocate_blocks_cache(desc(Placement.DEVICE, (B, R // 2)))
assert "block sizes differ" in refused(invalid, cm.swap_blocks, dev, small, {{0: 0}})
expect(dev, m_dev, "refused maps")
expect(cpu, m_cpu, "refused maps")
# A freed device cache is no copy's source.
cm.deallocate_blocks_cache(small)
cm.deallocate_blocks_cache(dev2)
refused(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, cm.swap_blocks, dev2, cpu, {{0: 0}})

# copy_cache: rows of per-request caches, device <-> host and within a device cache.
rows_dev = cm.allocate_cache(desc(Placement.DEVICE, (4, 5000)))
rows_host = cm.allocate_cache(desc(Placement.HOST, (4, 5000)))
m_rd, m_rh = fill(rows_dev), fill(rows_host)
for dst, m_dst, src, m_src, d_row, s_row, offset, size in (
        (rows_host, m_rh, rows_dev, m_rd, 1, 2, 0, -1),
        (rows_dev, m_rd, rows_host, m_rh, 0, 3, 123, 777),
        (rows_dev, m_rd, rows_dev, m_rd, 3, 1, 4000, -1),
        (rows_dev, m_rd, rows_dev, m_rd, 2, 2, 10, 20)):
    cm.copy_cache(dst, src, d_row, s_row, offset, size)
    stop = 5000 if size == -1 else offset + size
    for t in range(T):
        m_dst[t][d_row, offset:stop] = m_src[t][s_row, offset:stop].copy()
    expect(dst, m_dst, ("copy_cache", d_row, s_row, offset, size))
    expect(src, m_src, "copy_cache source")
refused(invalid, cm.copy_cache, rows_dev, rows_host, 0, 4)
dd.finalize()
print("ok")
"""


def test_local_copies_with_device_caches_are_byte_exact(device_type, libraries):
    """swap_blocks CPU cache <-> DEVICE cache (D2H, H2D) and DEVICE <-> DEVICE,
    copy_blocks within a device cache (overlapping maps read their sources
    first), copy_cache rows device <-> host and within a device cache, every
    result read back from device memory; bad maps move nothing."""
    lib_var = RUNTIMES[device_type][2]
    done = run_python(LOCAL_COPIES.format(device_type=device_type),
                      {lib_var: libraries[device_type]})
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-4000:]


def test_registered_device_memory_is_unreachable_once_unregistered_after_a_key_removal(
        libraries, monkeypatch):
    """remove_cache_key renews the device region ids; unregistering then
    withdraws the renewed ids, so a peer's staging call naming them is
    refused and writes nothing into the memory handed back."""
    monkeypatch.setenv("KVCACHE_ACL_LIB", libraries["npu"])
    prompt, decoder = peers("tcp", "npu")
    try:
        cache = prompt.call("register_device_blocks", 1, [BLOCKS, BLOCK], key=1)
        before = prompt.call("describe", cache)["region_ids"]
        prompt.call("remove_blocks_key", 1)
        info = prompt.call("describe", cache)
        assert info["region_ids"] != before
        prompt.call("deallocate", cache)
        for region in (info["region_ids"][0], before[0]):
            with pytest.raises(PeerError) as err:
                decoder.call("stage_raw", 1, "cache.stage_in",
                             dict(slot=0, addrs=[info["tensor_addrs"][0]], lengths=[8],
                                  regions=[region], budget_ms=30_000))
            assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, region
    finally:
        decoder.close()
        prompt.close()


def test_a_key_removed_during_a_layer_wise_push_of_a_device_cache_fails_nothing(device_type):
    """Our own device pieces are pinned by address: the source's key
    removed (its region ids renewed) while its layers are still being
    staged, the task succeeds, every layer lands, and freeing the source
    afterwards works."""
    prompt, decoder = peers("tcp", device_type)
    try:
        layers, shape = 3, [BLOCKS, BLOCK]
        src = prompt.call("alloc", "blocks", 2 * layers, shape, "DEVICE", key=1, model_id=3)
        dst = decoder.call("alloc", "blocks", 2 * layers, shape, "HOST", key=2)
        src_ids, dst_ids = [4, 5, 20], [10, 11, 1]
        prompt.call("push_layers", "t", src, 2, 0, layers, 31, src_ids, dst_ids, "renewed",
                    0.4)
        prompt.call("remove_blocks_key", 1, 3)        # before the first layer is computed
        assert prompt.call("task_code", "t") == (LLMStatusCode.LLM_SUCCESS,
                                                 [LLMStatusCode.LLM_SUCCESS])
        got = decoder.call("tensors", dst)
        for t in range(2 * layers):
            assert np.array_equal(got[t][dst_ids], expected(31, t, src_ids)), t
        prompt.call("deallocate", src)
    finally:
        decoder.close()
        prompt.close()


def test_a_host_range_past_a_cuda_allocation_is_refused(libraries):
    """Both ends of registered CUDA memory are checked: a tensor longer
    than the allocation at its address is refused; so are tensors
    overlapping each other, and nothing of a refused cache stays."""
    code = HOST_ONLY.split("cm = dd.cache_manager")[0] + textwrap.dedent("""
        owned = dd.cache_manager._device.runtime().alloc(64)
        desc = CacheDesc(1, [4, 32], DataType.DT_UINT8, Placement.DEVICE)   # 128 bytes
        try:
            dd.cache_manager.register_blocks_cache(desc, [owned.ptr])
        except LLMException as exc:
            print(exc.status_code.name, "|", exc)
        twice = CacheDesc(2, [4, 16], DataType.DT_UINT8, Placement.DEVICE)
        try:
            dd.cache_manager.register_blocks_cache(twice, [owned.ptr, owned.ptr])
        except LLMException as exc:
            print(exc.status_code.name, "|", exc)
        # Nothing of the refused ones stayed registered: the range is free.
        fits = CacheDesc(1, [4, 16], DataType.DT_UINT8, Placement.DEVICE)
        dd.cache_manager.unregister_cache(
            dd.cache_manager.register_blocks_cache(fits, [owned.ptr]).cache_id)
        owned.close()
        dd.finalize()
        """)
    out = run_python(code.format(device_type="cuda"), {"KVCACHE_CUDA_LIB": libraries["cuda"]})
    assert out.returncode == 0, out.stderr
    past, twice = out.stdout.splitlines()
    assert past.startswith("LLM_PARAM_INVALID") and "not CUDA device memory" in past
    assert twice.startswith("LLM_PARAM_INVALID") and "overlaps" in twice


def test_releasing_a_renewed_device_region_waits_for_copies_under_its_earlier_ids():
    """A copy pinned the region under an id since renewed (a key removed
    mid-copy): the release waits for it, LLM_LINK_BUSY (the region kept,
    still reachable by its new id) until it is unpinned."""
    table = DeviceRegions()
    base = 1 << 20
    first = table.register(base, 4096, True)
    copying = table.pin([base + 8], [100], [first])            # a peer's stage_in
    renewed = table.renew(table.renew(first))
    with pytest.raises(LLMException) as err:
        table.release([renewed], 0.2)
    assert err.value.status_code == LLMStatusCode.LLM_LINK_BUSY
    table.unpin(table.pin([base], [8], [renewed]))
    threading.Timer(0.3, table.unpin, [copying]).start()
    table.release([renewed], 30)
    for named, own in ((None, Own([renewed])), ([renewed], None)):
        with pytest.raises(LLMException):
            table.pin([base], [8], named, own)


def test_a_device_release_whose_companion_release_fails_restores_its_regions():
    """What keeps the engine's unregister of host and device regions all or
    none: the device regions are withdrawn (nothing pins them meanwhile),
    and restored when the host release run before they are forgotten fails."""
    table = DeviceRegions()
    base = 1 << 20
    region = table.register(base, 4096, True)
    seen = []

    def host_release_fails():
        with pytest.raises(LLMException):
            table.pin([base], [8], [region])                   # withdrawn meanwhile
        seen.append(True)
        raise LLMException(LLMStatusCode.LLM_LINK_BUSY, "host region busy")

    with pytest.raises(LLMException) as err:
        table.release([region], 1, then=host_release_fails)
    assert err.value.status_code == LLMStatusCode.LLM_LINK_BUSY and seen
    table.unpin(table.pin([base], [8], [region]))               # restored, same id
    table.release([region], 1, then=lambda: None)
    assert region not in table
    with pytest.raises(LLMException):
        table.register((1 << 64) - 100, 1000, True)


def test_own_device_pieces_are_found_by_address_and_regions_do_not_overlap():
    table = DeviceRegions()
    base = 1 << 20
    first = table.register(base, 4096, False)
    other = table.register(base + 8192, 4096, True)
    renewed = table.renew(first)
    own = Own([renewed, other])
    assert table.pin([base + 4000, base + 8192], [96, 4096], own=own) == sorted([renewed, other])
    for named, status in (([first], LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),      # renewed away
                          ([renewed], LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),    # not offered
                          (None, LLMStatusCode.LLM_PARAM_INVALID)):
        with pytest.raises(LLMException) as err:
            table.pin([base + 4000], [97], named, None if named else own)
        assert err.value.status_code == status, named
    with pytest.raises(LLMException) as err:
        table.register(base + 4095, 10, True)
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert "overlaps" in str(err.value)


def test_own_device_pieces_in_freed_memory_are_gone_and_past_a_region_end_invalid():
    """As the host cache path reports a freed cache: our piece in no live
    device region (its memory released) is LLM_KV_CACHE_NOT_EXIST; one
    that starts in a live region and runs past its end stays
    LLM_PARAM_INVALID."""
    table = DeviceRegions()
    base = 1 << 20
    kept = table.register(base, 4096, False)
    freed = table.register(base + 8192, 4096, False)
    own = Own([kept, freed])
    table.release([freed], 1)
    for addr, length, status in (
            (base + 8192, 16, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),    # released memory
            (base + 4096, 16, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),    # just past a region
            (base - 4096, 16, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),    # below every region
            (base + 4000, 200, LLMStatusCode.LLM_PARAM_INVALID)):       # overflows ``kept``
        with pytest.raises(LLMException) as err:
            table.pin([base, addr], [8, length], own=own)
        assert err.value.status_code == status, (hex(addr), length, str(err.value))
        assert "piece 1" in str(err.value)
    assert not table._pins.snapshot()           # a refused pin leaves nothing pinned
    table.unpin(table.pin([base], [4096], own=own))


class Own:
    """A cache as the region table reads it: its current region ids."""

    def __init__(self, region_ids):
        self.region_ids = region_ids


def test_a_renewed_device_region_keeps_only_the_earlier_ids_still_pinned():
    """Renewed once per request for as long as the cache lives, a region
    keeps only the earlier ids that copies still pin."""
    table = DeviceRegions()
    base = 1 << 20
    region = table.register(base, 4096, True)
    copying = table.pin([base], [8], [region])
    pinned_id = region
    for _ in range(1000):
        region = table.renew(region)
    assert table._regions[region].retired == {pinned_id}
    table.unpin(copying)
    assert not table._regions[region].retired
    # Unpinned, the earlier id no longer holds a release up.
    table.release([region], 0)
    assert not table._regions


def test_own_pieces_in_memory_freed_and_reused_by_another_cache_are_refused():
    """A copy planned for a cache whose memory was freed and registered
    again for another cache meanwhile reads or writes nothing of it; a
    renewal of the planned cache's own region (a key removed) is fine,
    also in the moment before its cache names the new id."""
    table = DeviceRegions()
    base = 1 << 20
    planned = Own([table.register(base, 4096, True)])
    renewed = table.renew(planned.region_ids[0])
    table.unpin(table.pin([base], [8], own=planned))                # cache not updated yet
    planned.region_ids = [renewed]
    table.unpin(table.pin([base], [8], own=planned))
    table.release([renewed], 0)
    newcomer = Own([table.register(base, 4096, True)])
    with pytest.raises(LLMException) as err:
        table.pin([base], [8], own=planned)
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    assert table.pin([base], [8], own=newcomer) == newcomer.region_ids


RELEASING = """
import threading, time
from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMException,
                     LLMRole, LLMStatusCode, Placement)
cfg = LLMConfig()
cfg.buf_pool_cfg = '{"buf_pool_size": 4194304}'
cfg.device_type = "npu"
cfg.device_mem_pool_size = 1 << 20
dd = LLMDataDist(LLMRole.PROMPT, 1)
dd.init(cfg.generate_options())
cm = dd.cache_manager
cache = cm.allocate_blocks_cache(CacheDesc(1, [4, 16], DataType.DT_UINT8, Placement.DEVICE),
                                 BlocksCacheKey(1))
table = cm._device.regions
addr = cache.tensor_addrs[0]
copying = table.pin([addr], [8], cache.region_ids[:1])          # a peer's copy running
freeing = threading.Thread(target=cm.deallocate_cache, args=(cache,))
freeing.start()
deadline = time.monotonic() + 30
while cache.cache_id not in cm._releasing:
    assert time.monotonic() < deadline, "the release never started"
    time.sleep(0.01)
cm.remove_cache_key(BlocksCacheKey(1))                          # while it waits for the copy
table.unpin(copying)
freeing.join(30)
assert not freeing.is_alive()
for named, own in ((cache.region_ids[:1], None), (None, cache)):
    try:
        table.pin([addr], [8], named, own)
    except LLMException:
        continue
    raise AssertionError(f"freed device memory still pinnable by {named}")
dd.finalize()
print("ok")
"""


def test_a_key_removed_while_its_device_cache_is_released_leaves_nothing_reachable(libraries):
    """remove_cache_key during a release waiting for a copy: the cache
    being released counts as gone (no renewal that would outlive the
    release), and once the copy ends nothing of it stays in the table."""
    done = run_python(RELEASING, {"KVCACHE_ACL_LIB": libraries["npu"]})
    assert done.returncode == 0 and "ok" in done.stdout, done.stderr[-4000:]
