"""Transfer planning of the cache manager, in one process over the
in-memory transport (tests/fake_transport.py): which pieces pull_blocks,
push_blocks, pull_cache and push_cache send, and how a stale remembered
lookup is re-validated. Fast: no processes."""
import numpy as np
import pytest

from fake_transport import install
from kvcache import (BlocksCacheKey, BufferPool, BufPoolConfig, CacheDesc, CacheKey,
                     CacheKeyByIdAndIndex, DataType, LLMException, LLMStatusCode,
                     TransferEngine)
from kvcache.cache_manager import CacheManager

BLOCKS, ELEMS = 16, 256          # fp16: 512-byte blocks


@pytest.fixture
def pd(monkeypatch):
    """(prompt manager, decoder manager, decoder's transport)."""
    install(monkeypatch)
    made = []

    def manager(cluster_id, listen):
        engine = TransferEngine(f"cluster-{cluster_id}", cluster_id=cluster_id,
                                transport="memory", listen=listen)
        pool = BufferPool(BufPoolConfig(pool_size=8 << 20))
        made.append((engine, pool))
        return CacheManager(engine, pool, cluster_id, 2000), engine

    prompt, p_engine = manager(1, "127.0.0.1:0")
    decoder, d_engine = manager(2, None)
    d_engine.connect(p_engine.address)
    yield prompt, decoder, d_engine.transport
    for engine, pool in made:
        engine.close()
        pool.close()


def blocks_cache(manager, num_tensors=4, key=None, seed=0):
    cache = manager.allocate_blocks_cache(
        CacheDesc(num_tensors, DataType.DT_FLOAT16, [BLOCKS, ELEMS]), key)
    for i, t in enumerate(cache.tensors()):
        t.view(np.uint8)[:] = np.random.default_rng([seed, i]).integers(
            0, 256, t.nbytes, dtype=np.uint8).reshape(t.shape[0], -1)
    return cache


def rows(cache, tensor, ids):
    return cache.tensors()[tensor].view(np.uint8).reshape(BLOCKS, -1)[ids]


def test_pull_blocks_sends_one_piece_per_run_contiguous_on_both_sides(pd):
    prompt, decoder, transport = pd
    src = blocks_cache(prompt, key=BlocksCacheKey(1), seed=1)
    dst = blocks_cache(decoder, seed=2)
    decoder.pull_blocks(BlocksCacheKey(1), dst, src_blocks=[3, 4, 5, 9], dst_blocks=[0, 1, 2, 7])
    (op, local, remote, lengths, regions), = transport.transfers
    block = ELEMS * 2
    assert op == "read"
    # Per tensor: blocks 3..5 -> 0..2 merge into one piece, 9 -> 7 is its own.
    assert lengths.tolist() == [3 * block, block] * 4
    assert local[:2].tolist() == [dst.tensor_addrs[0], dst.tensor_addrs[0] + 7 * block]
    assert remote[:2].tolist() == [src.tensor_addrs[0] + 3 * block,
                                   src.tensor_addrs[0] + 9 * block]
    assert set(regions.tolist()) == set(src.region_ids)
    for t in range(4):
        np.testing.assert_array_equal(rows(dst, t, [0, 1, 2, 7]), rows(src, t, [3, 4, 5, 9]))


def test_layer_ranges_pick_the_tensors_of_those_layers(pd):
    prompt, decoder, transport = pd
    src = blocks_cache(prompt, key=BlocksCacheKey(1), seed=1)
    dst = blocks_cache(decoder, seed=2)
    before = [t.copy() for t in dst.tensors()]
    decoder.pull_blocks(BlocksCacheKey(1), dst, [1], [2], src_layer_range=range(1, 2),
                        dst_layer_range=range(0, 1))
    (_, local, remote, _, _), = transport.transfers
    assert sorted(local.tolist()) == sorted(a + 2 * ELEMS * 2 for a in dst.tensor_addrs[:2])
    assert sorted(remote.tolist()) == sorted(a + ELEMS * 2 for a in src.tensor_addrs[2:])
    np.testing.assert_array_equal(rows(dst, 0, [2]), rows(src, 2, [1]))
    np.testing.assert_array_equal(dst.tensors()[2], before[2])      # layer 1 untouched


def test_a_contiguous_cache_is_cut_into_destination_blocks(pd):
    prompt, decoder, transport = pd
    src = prompt.allocate_cache(CacheDesc(2, DataType.DT_FLOAT16, [1, 3 * ELEMS]),
                                [CacheKey(1, 7)])
    for i, t in enumerate(src.tensors()):
        t[:] = i + 1
    dst = blocks_cache(decoder, num_tensors=2)
    decoder.pull_blocks(CacheKey(1, 7), dst, dst_blocks=[5, 1, 3], tensor_num_per_layer=1)
    (_, local, _, lengths, _), = transport.transfers
    assert lengths.tolist() == [ELEMS * 2] * 6          # nothing contiguous to merge
    for t in range(2):
        assert (rows(dst, t, [5, 1, 3]).view(np.float16) == t + 1).all()


def test_push_cache_writes_the_rows_it_names(pd):
    prompt, decoder, transport = pd
    target = decoder.allocate_cache(CacheDesc(2, DataType.DT_FLOAT16, [4, ELEMS]))
    src = prompt.allocate_cache(CacheDesc(2, DataType.DT_FLOAT16, [4, ELEMS]))
    for t in src.tensors():
        t[:] = np.arange(4)[:, None]
    p_transport = prompt._engine.transport
    prompt.push_cache(CacheKeyByIdAndIndex(2, target.cache_id, 3), src, src_batch_index=1)
    (op, local, remote, lengths, _), = p_transport.transfers
    assert op == "write" and lengths.tolist() == [ELEMS * 2] * 2
    assert remote.tolist() == [a + 3 * ELEMS * 2 for a in target.tensor_addrs]
    for t in target.tensors():
        assert (t[3] == 1).all() and (t[:3] == 0).all()


@pytest.mark.parametrize("bad", [[2.7], ["3"], [2 ** 64], [True], [np.float32(1)]])
def test_block_ids_must_be_integers_in_range(pd, bad):
    prompt, decoder, transport = pd
    blocks_cache(prompt, key=BlocksCacheKey(1))
    dst = blocks_cache(decoder)
    for src_ids, dst_ids in ((bad, [0]), ([0], bad)):
        with pytest.raises(LLMException) as err:
            decoder.pull_blocks(BlocksCacheKey(1), dst, src_ids, dst_ids)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert transport.transfers == []


def test_a_freed_and_replaced_cache_is_looked_up_again_once(pd):
    prompt, decoder, transport = pd
    old = blocks_cache(prompt, key=BlocksCacheKey(1), seed=1)
    dst = blocks_cache(decoder, seed=2)
    decoder.pull_blocks(BlocksCacheKey(1), dst, [0], [0])
    prompt.deallocate_cache(old)
    new = blocks_cache(prompt, key=BlocksCacheKey(1), seed=3)
    decoder.pull_blocks(BlocksCacheKey(1), dst, [4], [4])
    # The remembered lookup named the freed region: refused, looked up, retried.
    assert len(transport.transfers) == 3
    np.testing.assert_array_equal(rows(dst, 0, [4]), rows(new, 0, [4]))


def test_a_removed_key_is_not_served_from_a_remembered_lookup(pd):
    prompt, decoder, transport = pd
    a = prompt.allocate_cache(CacheDesc(2, DataType.DT_FLOAT16, [1, ELEMS]), [CacheKey(1, 5)])
    for t in a.tensors():
        t[:] = 1
    dst = decoder.allocate_cache(CacheDesc(2, DataType.DT_FLOAT16, [1, ELEMS]))
    decoder.pull_cache(CacheKey(1, 5), dst)
    prompt.remove_cache_key(CacheKey(1, 5))
    with pytest.raises(LLMException) as err:
        decoder.pull_cache(CacheKey(1, 5), dst)
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    b = prompt.allocate_cache(CacheDesc(2, DataType.DT_FLOAT16, [1, ELEMS]), [CacheKey(1, 5)])
    for t in b.tensors():
        t[:] = 2
    decoder.pull_cache(CacheKey(1, 5), dst)
    assert all((t == 2).all() for t in dst.tensors())
