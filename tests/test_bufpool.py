"""The buffer pool: configuration rules, allocation, exhaustion, misuse,
and properties under random alloc/free sequences."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvcache import LLMException, LLMStatusCode
from kvcache.bufpool import LARGE_ALIGN, MiB, BufferPool, BufPoolConfig

EXAMPLE = ('{"buf_cfg":[{"total_size":2097152,"blk_size":256,"max_buf_size":8192},'
           '{"total_size":10485760,"blk_size":8192,"max_buf_size":8388608}],'
           '"buf_pool_size":33554432}')


def test_parses_the_llm_datadist_example():
    cfg = BufPoolConfig.parse(EXAMPLE)
    assert cfg.tiers == [(2097152, 256, 8192), (10485760, 8192, 8388608)]
    assert cfg.pool_size == 32 * MiB
    assert BufPoolConfig.parse("").pool_size == 1 << 30


@pytest.mark.parametrize("tier, fragment", [
    ({"total_size": 2097152, "blk_size": 300, "max_buf_size": 8192}, "power of two"),
    ({"total_size": 2097152, "blk_size": 4 * MiB, "max_buf_size": 8 * MiB}, "power of two"),
    ({"total_size": 3 * MiB, "blk_size": 256, "max_buf_size": 8192}, "multiple of 2 MiB"),
    ({"total_size": 2097152, "blk_size": 8192, "max_buf_size": 4096}, ">= blk_size"),
    ({"total_size": 2097152, "blk_size": 256, "max_buf_size": 2097152}, "< total_size"),
    ({"total_size": 2097152, "blk_size": 256}, "needs exactly"),
    ({"total_size": "2M", "blk_size": 256, "max_buf_size": 8192}, "integers"),
])
def test_tier_rules(tier, fragment):
    with pytest.raises(LLMException) as err:
        BufPoolConfig.parse(json.dumps({"buf_cfg": [tier]}))
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert fragment in str(err.value)


def test_pool_wide_rules():
    tier = {"total_size": 2097152, "blk_size": 256, "max_buf_size": 8192}
    for cfg, fragment in [
        ({"buf_cfg": [tier, tier]}, "larger than the previous"),
        ({"buf_cfg": [tier], "buf_pool_size": MiB}, "more than buf_pool_size"),
        ({"buf_pool_size": 1000}, "multiple of 4096"),
        ({"bogus": 1}, "unknown keys"),
    ]:
        with pytest.raises(LLMException, match=fragment):
            BufPoolConfig.parse(json.dumps(cfg))
    with pytest.raises(LLMException, match="not valid JSON"):
        BufPoolConfig.parse("{")


def test_small_buffers_come_from_tiers_and_large_from_the_rest():
    pool = BufferPool(BufPoolConfig.parse(EXAMPLE))
    try:
        small = pool.alloc(1000)
        assert pool.base <= small < pool.base + 2 * MiB and small % 256 == 0
        assert pool.allocation_size(small) == 1024
        medium = pool.alloc(100_000)
        assert pool.base + 2 * MiB <= medium < pool.base + 12 * MiB
        large = pool.alloc(9 * MiB)
        assert large >= pool.base + 12 * MiB and large % LARGE_ALIGN == 0
        # Large allocations in sequence are contiguous (they feed merging).
        second = pool.alloc(10 * MiB)
        assert second == large + 9 * MiB
        for addr in (small, medium, large, second):
            pool.free(addr)
        assert pool.stats()["free_large_extents"] == 1
    finally:
        pool.close()


def test_exhaustion_and_misuse_raise_clear_errors():
    pool = BufferPool(BufPoolConfig(pool_size=4 * MiB))
    try:
        a = pool.alloc(3 * MiB)
        with pytest.raises(LLMException) as err:
            pool.alloc(2 * MiB)
        assert err.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY
        assert "largest free extent 1048576" in str(err.value)
        pool.free(a)
        with pytest.raises(LLMException) as err:
            pool.free(a)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "double free or foreign pointer" in str(err.value)
        with pytest.raises(LLMException):
            pool.free(pool.base + 12345)
        with pytest.raises(LLMException):
            pool.alloc(0)
    finally:
        pool.close()


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.integers(1, 3 * MiB), st.integers(0, 1000)),
                min_size=1, max_size=60))
def test_random_sequences_never_overlap_stay_aligned_and_coalesce(ops):
    pool = BufferPool(BufPoolConfig.parse(EXAMPLE))
    live = {}
    try:
        for is_alloc, size, pick in ops:
            if is_alloc or not live:
                try:
                    addr = pool.alloc(size)
                except LLMException as exc:
                    assert exc.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY
                    continue
                reserved = pool.allocation_size(addr)
                assert reserved >= size
                assert pool.base <= addr and addr + reserved <= pool.base + pool.size
                align = 256 if size <= 8192 else (8192 if size <= 8388608 else LARGE_ALIGN)
                assert addr % min(align, LARGE_ALIGN) == 0
                for other, other_size in live.items():
                    assert addr + reserved <= other or other + other_size <= addr
                live[addr] = reserved
            else:
                addr = sorted(live)[pick % len(live)]
                pool.free(addr)
                del live[addr]
        for addr in list(live):
            pool.free(addr)
        stats = pool.stats()
        assert stats["live_allocations"] == 0
        assert stats["free_large_extents"] == 1
        assert stats["free_large_bytes"] == pool.size - 12 * MiB
        assert all(t["free_blocks"] == t["total_blocks"] for t in stats["tiers"])
    finally:
        pool.close()
