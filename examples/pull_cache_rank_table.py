"""The pull-cache flow with the rank-table link: prefill allocates one cache
per request, keyed by CacheKey; decode links with the same rank table, pulls
both requests into rows of its batch and copies a row locally (copy_cache).

    python examples/pull_cache_rank_table.py
"""
import numpy as np

from common import expected, fill, start, finish, parse_args, receive
from rank_table_common import LINK_TIMEOUT_MS, TIMEOUT_S, link, rank_table, spawn
from kvcache import CacheDesc, CacheKey, DataType, LLMRole

TENSORS, ELEMS = 4, 64 * 1024
POOL = '{"buf_pool_size": 67108864}'
KEYS = [CacheKey(prompt_cluster_id=1, req_id=0), CacheKey(prompt_cluster_id=1, req_id=1)]


def prefill(ready, done, table):
    dd = start(LLMRole.PROMPT, 1, link_timeout=LINK_TIMEOUT_MS, buf_pool_cfg=POOL)
    comm_id = link(dd, table)
    caches = []
    for seed, key in enumerate(KEYS, start=1):
        cache = dd.cache_manager.allocate_cache(
            CacheDesc(TENSORS, DataType.DT_FLOAT16, [1, ELEMS]), [key])
        fill(cache, seed=seed)
        caches.append(cache)
    ready.put("caches ready")
    done.wait(TIMEOUT_S)
    for key, cache in zip(KEYS, caches):
        dd.cache_manager.remove_cache_key(key)
        dd.cache_manager.deallocate_cache(cache)
    dd.unlink(comm_id)
    dd.finalize()


def main():
    parse_args(__doc__)
    table = rank_table()
    process, ready, done = spawn(prefill, table)
    try:
        dd = start(LLMRole.DECODER, 2, link_timeout=LINK_TIMEOUT_MS, buf_pool_cfg=POOL)
        comm_id = link(dd, table)
        desc = CacheDesc(TENSORS, DataType.DT_FLOAT16, [2, ELEMS])
        cache = dd.cache_manager.allocate_cache(desc)
        receive(ready, process)
        for row, key in enumerate(KEYS):
            dd.cache_manager.pull_cache(key, cache, batch_index=row)
        for i, tensor in enumerate(cache.tensors()):
            for row in range(2):
                want = expected(row + 1, i, [1, ELEMS], tensor.dtype)[0]
                assert np.array_equal(tensor[row].view(np.uint16), want.view(np.uint16)), i
        # Keep request 1 for the next step in a cache of its own.
        kept = dd.cache_manager.allocate_cache(CacheDesc(TENSORS, DataType.DT_FLOAT16,
                                                         [1, ELEMS]))
        dd.cache_manager.copy_cache(kept, cache, dst_batch_index=0, src_batch_index=1)
        for i, (row, whole) in enumerate(zip(kept.tensors(), cache.tensors())):
            assert np.array_equal(row[0].view(np.uint16), whole[1].view(np.uint16)), i
        dd.cache_manager.deallocate_cache(kept)
        dd.cache_manager.deallocate_cache(cache)
        dd.unlink(comm_id)
        print(f"OK: 2 requests ({TENSORS} tensors of {ELEMS * 2} bytes each) pulled over the "
              "rank-table link into batch rows 0 and 1; row 1 copied locally")
        dd.finalize()
    finally:
        finish(process, done)


if __name__ == "__main__":
    main()
