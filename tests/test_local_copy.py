"""Local copies between caches (Cache.create_cpu_cache, swap_blocks,
copy_blocks, copy_cache, deallocate_blocks_cache): byte-exact against a numpy
model with random data, overlapping maps read their sources first, every bad
argument refused with its status code, and a free waits for a copy in
progress."""
import threading

import numpy as np
import pytest

import kvcache.local_copy as local_copy
from helpers import watchdog
from kvcache import (BlocksCacheKey, Cache, CacheDesc, CacheKey, DataType, LLMConfig,
                     LLMDataDist, LLMException, LLMRole, LLMStatusCode, Placement)

BLOCKS, ROW = 16, 96                  # fp16 elements per block row: 192 bytes
TENSORS = 3


@pytest.fixture(scope="module")
def dd():
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    cfg = LLMConfig()
    cfg.transport = "tcp"
    cfg.buf_pool_cfg = '{"buf_pool_size": 16777216}'
    dd.init(cfg.generate_options())
    yield dd
    dd.finalize()


@pytest.fixture
def cm(dd):
    return dd.cache_manager


def blocks_desc(blocks=BLOCKS, row=ROW, tensors=TENSORS, dtype=DataType.DT_FLOAT16):
    return CacheDesc(tensors, dtype, [blocks, row])


def random_fill(cache, seed):
    rng = np.random.default_rng(seed)
    for tensor in cache.tensors():
        tensor.view(np.uint8)[...] = rng.integers(0, 256, tensor.view(np.uint8).shape,
                                                  dtype=np.uint8)


def snapshot(cache):
    return [t.view(np.uint8).reshape(t.shape[0], -1).copy() for t in cache.tensors()]


def host_tensors(desc, seed):
    """Caller-owned host memory for a CPU cache, with random bytes."""
    rng = np.random.default_rng(seed)
    arrays = [rng.integers(0, 256, desc.tensor_bytes, dtype=np.uint8)
              for _ in range(desc.num_tensors)]
    return arrays, [a.ctypes.data for a in arrays]


def test_create_cpu_cache_wraps_caller_memory(cm):
    desc = blocks_desc()
    arrays, addrs = host_tensors(desc, 1)
    cpu = Cache.create_cpu_cache(desc, addrs)
    assert cpu.cache_id == -1 and cpu.kind == "blocks" and cpu.tensor_addrs == addrs
    assert np.array_equal(cpu.tensors()[1].view(np.uint8).reshape(-1), arrays[1])


@pytest.mark.parametrize("args, code", [
    ((blocks_desc(), [1, 2]), LLMStatusCode.LLM_PARAM_INVALID),             # count
    ((CacheDesc(1, DataType.DT_FLOAT16, [4, 4], Placement.DEVICE), [4096]),
     LLMStatusCode.LLM_PARAM_INVALID),                                      # placement
    (("desc", [1]), LLMStatusCode.LLM_PARAM_INVALID),
    ((CacheDesc(1, DataType.DT_FLOAT16, [4, 4]), [4096]), LLMStatusCode.LLM_PARAM_INVALID),
    ((CacheDesc(1, DataType.DT_FLOAT16, [4, 4]), [True]), LLMStatusCode.LLM_PARAM_INVALID),
])
def test_create_cpu_cache_refuses_bad_arguments(args, code):
    with pytest.raises(LLMException) as err:
        Cache.create_cpu_cache(*args)
    assert err.value.status_code == code


def test_swap_blocks_out_and_in_is_byte_exact(cm):
    desc = blocks_desc()
    device_like = cm.allocate_blocks_cache(desc)
    try:
        random_fill(device_like, 2)
        arrays, addrs = host_tensors(desc, 3)
        cpu = Cache.create_cpu_cache(desc, addrs)
        before_cache, before_cpu = snapshot(device_like), [a.reshape(BLOCKS, -1).copy()
                                                           for a in arrays]
        out = {0: 5, 3: 3, 15: 0, 7: 14}
        cm.swap_blocks(device_like, cpu, out)
        for t in range(TENSORS):
            want = before_cpu[t].copy()
            for s, d in out.items():
                want[d] = before_cache[t][s]
            assert np.array_equal(arrays[t].reshape(BLOCKS, -1), want)
        # And back in, to other slots.
        back = {5: 9, 14: 10}
        cm.swap_blocks(cpu, device_like, back)
        after = snapshot(device_like)
        for t in range(TENSORS):
            want = before_cache[t].copy()
            want[9], want[10] = before_cache[t][0], before_cache[t][7]
            assert np.array_equal(after[t], want)
    finally:
        cm.deallocate_blocks_cache(device_like)


def test_swap_blocks_between_two_pool_caches_and_random_maps(cm):
    rng = np.random.default_rng(4)
    a = cm.allocate_blocks_cache(blocks_desc())
    b = cm.allocate_blocks_cache(blocks_desc(BLOCKS * 2))
    try:
        for trial in range(5):
            random_fill(a, 10 + trial)
            random_fill(b, 20 + trial)
            src = rng.choice(BLOCKS, size=rng.integers(1, BLOCKS), replace=False)
            dst = rng.choice(BLOCKS * 2, size=src.size, replace=False)
            before_a, before_b = snapshot(a), snapshot(b)
            cm.swap_blocks(a, b, {int(s): int(d) for s, d in zip(src, dst)})
            for t in range(TENSORS):
                want = before_b[t].copy()
                want[dst] = before_a[t][src]
                assert np.array_equal(snapshot(b)[t], want)
                assert np.array_equal(snapshot(a)[t], before_a[t])        # source untouched
    finally:
        cm.deallocate_blocks_cache(a)
        cm.deallocate_blocks_cache(b)


def test_copy_blocks_reads_every_source_before_writing(cm):
    cache = cm.allocate_blocks_cache(blocks_desc())
    try:
        random_fill(cache, 5)
        before = snapshot(cache)
        # A chain and a swap: 1->2 while 2->3, and 4<->5: every destination gets
        # what its source held when the call began.
        cm.copy_blocks(cache, {1: [2, 8], 2: [3], 4: [5], 5: [4], 0: []})
        after = snapshot(cache)
        for t in range(TENSORS):
            want = before[t].copy()
            want[2], want[8], want[3] = before[t][1], before[t][1], before[t][2]
            want[5], want[4] = before[t][4], before[t][5]
            assert np.array_equal(after[t], want)
    finally:
        cm.deallocate_blocks_cache(cache)


def test_copy_cache_copies_a_row_range(cm):
    desc = CacheDesc(TENSORS, DataType.DT_FLOAT16, [4, ROW])
    src = cm.allocate_cache(desc, [CacheKey(1, 1)])
    dst = cm.allocate_cache(CacheDesc(TENSORS, DataType.DT_FLOAT16, [2, ROW]))
    try:
        random_fill(src, 6)
        random_fill(dst, 7)
        s, d = snapshot(src), snapshot(dst)
        cm.copy_cache(dst, src, 1, 3, 10, 50)
        for t in range(TENSORS):
            want = d[t].copy()
            want[1, 10:60] = s[t][3, 10:60]
            assert np.array_equal(snapshot(dst)[t], want)
        cm.copy_cache(dst, src, 0, 2)                       # size -1: the whole row
        for t in range(TENSORS):
            assert np.array_equal(snapshot(dst)[t][0], s[t][2])
        cm.copy_cache(src, src, 0, 1, req_id=5)             # rows of one cache
        for t in range(TENSORS):
            assert np.array_equal(snapshot(src)[t][0], s[t][1])
    finally:
        cm.deallocate_cache(src)
        cm.deallocate_cache(dst)


def refused(code, call, *args):
    with pytest.raises(LLMException) as err:
        call(*args)
    assert err.value.status_code == code, err.value
    return str(err.value)


def test_bad_copies_are_refused_and_move_nothing(cm):
    invalid = LLMStatusCode.LLM_PARAM_INVALID
    a = cm.allocate_blocks_cache(blocks_desc())
    other_row = cm.allocate_blocks_cache(blocks_desc(row=ROW * 2))
    other_count = cm.allocate_blocks_cache(blocks_desc(tensors=TENSORS + 1))
    rows = cm.allocate_cache(CacheDesc(TENSORS, DataType.DT_FLOAT16, [2, ROW]))
    rows_f32 = cm.allocate_cache(CacheDesc(TENSORS, DataType.DT_FLOAT, [2, ROW // 2]))
    try:
        random_fill(a, 8)
        random_fill(rows, 9)
        before, before_rows = snapshot(a), snapshot(rows)
        assert "out of range" in refused(invalid, cm.swap_blocks, a, a, {0: BLOCKS})
        assert "out of range" in refused(invalid, cm.swap_blocks, a, a, {-1: 0})
        assert "out of range" in refused(invalid, cm.copy_blocks, a, {BLOCKS: [0]})
        refused(invalid, cm.copy_blocks, a, {0: [1], 2: [1]})        # a destination twice
        refused(invalid, cm.swap_blocks, a, a, {0: 1, 2: 1})
        refused(invalid, cm.copy_blocks, a, {0: 1})
        refused(invalid, cm.copy_blocks, a, {0: [1.0]})
        refused(invalid, cm.copy_blocks, a, [(0, [1])])
        refused(invalid, cm.swap_blocks, a, a, [(0, 1)])
        assert "block sizes differ" in refused(invalid, cm.swap_blocks, a, other_row, {0: 0})
        assert "tensors" in refused(invalid, cm.swap_blocks, a, other_count, {0: 0})
        assert "blocks cache" in refused(invalid, cm.swap_blocks, rows, a, {0: 0})
        assert "blocks cache" in refused(invalid, cm.copy_blocks, rows, {0: [1]})
        assert "blocks cache" in refused(invalid, cm.copy_cache, a, rows)
        refused(invalid, cm.swap_blocks, "a", a, {0: 0})
        assert "do not match" in refused(invalid, cm.copy_cache, rows, rows_f32)
        assert "src_batch_index" in refused(invalid, cm.copy_cache, rows, rows, 0, 2)
        assert "dst_batch_index" in refused(invalid, cm.copy_cache, rows, rows, -1, 0)
        assert "offset" in refused(invalid, cm.copy_cache, rows, rows, 0, 1, ROW * 2)
        assert "past the row" in refused(invalid, cm.copy_cache, rows, rows, 0, 1, 100, 100)
        assert "size" in refused(invalid, cm.copy_cache, rows, rows, 0, 1, 0, 0)
        refused(invalid, cm.copy_cache, rows, rows, 0, 1, 0, -1, "req")
        refused(invalid, cm.deallocate_blocks_cache, rows)
        device = CacheDesc(TENSORS, DataType.DT_FLOAT16, [BLOCKS, ROW], Placement.DEVICE)
        fake_device = Cache(-1, device, a.tensor_addrs, "blocks", [], owned=False)
        refused(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, cm.swap_blocks, fake_device, a, {0: 0})
        assert all(np.array_equal(x, y) for x, y in zip(snapshot(a), before))
        assert all(np.array_equal(x, y) for x, y in zip(snapshot(rows), before_rows))
    finally:
        for cache in (other_row, other_count, a):
            cm.deallocate_blocks_cache(cache)
        cm.deallocate_cache(rows)
        cm.deallocate_cache(rows_f32)


def test_a_freed_or_foreign_cache_is_not_copied(cm, dd):
    a, b = cm.allocate_blocks_cache(blocks_desc()), cm.allocate_blocks_cache(blocks_desc())
    cm.deallocate_blocks_cache(b)
    try:
        refused(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, cm.swap_blocks, a, b, {0: 0})
        refused(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, cm.copy_blocks, b, {0: [1]})
        # A keyed cache of another LLMDataDist is not ours either.
        other = LLMDataDist(LLMRole.DECODER, 2)
        other.init({"llm.Transport": "tcp", "llm.BufPoolCfg": '{"buf_pool_size": 8388608}'})
        try:
            theirs = other.cache_manager.allocate_blocks_cache(blocks_desc(), BlocksCacheKey(2))
            refused(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, cm.swap_blocks, theirs, a, {0: 0})
        finally:
            other.finalize()
    finally:
        cm.deallocate_blocks_cache(a)


def test_a_free_waits_for_the_copy_in_progress(cm, dd, monkeypatch):
    src, dst = cm.allocate_blocks_cache(blocks_desc()), cm.allocate_blocks_cache(blocks_desc())
    random_fill(src, 11)
    want = snapshot(src)
    entered, release, freed = threading.Event(), threading.Event(), threading.Event()
    real_copy = local_copy._host_block_copy

    copied = []

    def slow_copy(*args):
        entered.set()
        assert release.wait(10)
        real_copy(*args)
        copied.append((snapshot(dst), freed.is_set()))

    monkeypatch.setattr(local_copy, "_host_block_copy", slow_copy)
    errors = []
    copier = threading.Thread(target=lambda: cm.swap_blocks(src, dst, {i: i for i in
                                                                       range(BLOCKS)}))

    def free():
        try:
            cm.deallocate_blocks_cache(dst)
        except LLMException as exc:
            errors.append(exc)
        freed.set()

    with watchdog(30):
        copier.start()
        assert entered.wait(10)
        assert dd.engine.registry.pinned()                  # the copy holds its pins
        freeing = threading.Thread(target=free)
        freeing.start()
        assert not freed.wait(0.3)                          # the free waits for the copy
        got = snapshot(dst)                                 # still mapped, not yet written
        release.set()
        copier.join(10)
        freeing.join(10)
    assert freed.is_set() and not errors
    assert not any(np.array_equal(g, w) for g, w in zip(got, want))
    # The whole copy landed while the cache was still allocated.
    (landed, free_done_by_then), = copied
    assert not free_done_by_then
    assert all(np.array_equal(g, w) for g, w in zip(landed, want))
    cm.deallocate_blocks_cache(src)
    assert dd.engine.registry.pinned() == {}
