"""Pulling a request's contiguous cache into paged blocks, with the
rank-table link: prefill links, then allocates a cache keyed by CacheKey;
decode pulls it into blocks of its own blocks cache (pull_blocks with a
CacheKey source, no src_blocks).

    python examples/pull_from_cache_to_blocks_rank_table.py
"""
import numpy as np

from common import expected, fill, start, finish, parse_args, receive
from rank_table_common import LINK_TIMEOUT_MS, TIMEOUT_S, link, rank_table, spawn
from kvcache import CacheDesc, CacheKey, DataType, LLMRole

TENSORS, BLOCK_ELEMS, SEQ_BLOCKS, BLOCKS = 4, 2048, 3, 8
KEY = CacheKey(prompt_cluster_id=1, req_id=0, model_id=0)
POOL = '{"buf_pool_size": 33554432}'
PROMPT_DESC = CacheDesc(TENSORS, DataType.DT_FLOAT16, [1, SEQ_BLOCKS * BLOCK_ELEMS])


def prefill(ready, done, table):
    dd = start(LLMRole.PROMPT, 1, link_timeout=LINK_TIMEOUT_MS, buf_pool_cfg=POOL)
    comm_id = link(dd, table)
    cache = dd.cache_manager.allocate_cache(PROMPT_DESC, [KEY])
    fill(cache, seed=1)
    ready.put("cache ready")
    done.wait(TIMEOUT_S)
    dd.unlink(comm_id)
    dd.cache_manager.remove_cache_key(KEY)
    dd.cache_manager.deallocate_cache(cache)
    dd.finalize()


def main():
    parse_args(__doc__)
    table = rank_table()
    process, ready, done = spawn(prefill, table)
    try:
        dd = start(LLMRole.DECODER, 2, link_timeout=LINK_TIMEOUT_MS, buf_pool_cfg=POOL)
        cache = dd.cache_manager.allocate_blocks_cache(
            CacheDesc(TENSORS, DataType.DT_FLOAT16, [BLOCKS, BLOCK_ELEMS]))
        comm_id = link(dd, table)
        receive(ready, process)
        dst_blocks = [6, 1, 4]
        dd.cache_manager.pull_blocks(KEY, cache, src_blocks=[], dst_blocks=dst_blocks)
        for i, tensor in enumerate(cache.tensors()):
            want = expected(1, i, PROMPT_DESC.shape, tensor.dtype).reshape(SEQ_BLOCKS, -1)
            assert np.array_equal(tensor[dst_blocks].view(np.uint16), want.view(np.uint16)), i
        dd.unlink(comm_id)
        print(f"OK: a {SEQ_BLOCKS}-block request pulled over the rank-table link into blocks "
              f"{dst_blocks} of {TENSORS} tensors")
        dd.finalize()
    finally:
        finish(process, done)


if __name__ == "__main__":
    main()
