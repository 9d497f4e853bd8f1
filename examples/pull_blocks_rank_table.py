"""The pull-blocks flow with the rank-table link: both sides register their
own memory as blocks caches and call link with the same rank table; decode
pulls blocks, swaps them out to a CPU cache and back into other slots.

    python examples/pull_blocks_rank_table.py
"""
import numpy as np

from common import expected, start, finish, parse_args, receive
from rank_table_common import LINK_TIMEOUT_MS, TIMEOUT_S, link, rank_table, spawn
from kvcache import BlocksCacheKey, Cache, CacheDesc, DataType, LLMRole

TENSORS, BLOCKS, BLOCK_ELEMS = 4, 16, 4096
DESC = CacheDesc(TENSORS, DataType.DT_FLOAT, [BLOCKS, BLOCK_ELEMS])


def own_memory(seed=None):
    """Memory of our own (as a framework's tensors would be), one per tensor."""
    if seed is None:
        return [np.zeros(DESC.shape, dtype=np.float32) for _ in range(TENSORS)]
    return [expected(seed, i, DESC.shape, np.float32).copy() for i in range(TENSORS)]


def prefill(ready, done, table):
    dd = start(LLMRole.PROMPT, 1, link_timeout=LINK_TIMEOUT_MS)
    tensors = own_memory(seed=1)
    dd.cache_manager.register_blocks_cache(DESC, [t.ctypes.data for t in tensors],
                                           BlocksCacheKey(1, 0))
    comm_id = link(dd, table)
    ready.put("linked")
    done.wait(TIMEOUT_S)
    dd.unlink(comm_id)
    dd.finalize()


def main():
    parse_args(__doc__)
    table = rank_table()
    process, ready, done = spawn(prefill, table)
    try:
        dd = start(LLMRole.DECODER, 2, link_timeout=LINK_TIMEOUT_MS)
        tensors = own_memory()
        cache = dd.cache_manager.register_blocks_cache(DESC, [t.ctypes.data for t in tensors])
        comm_id = link(dd, table)
        receive(ready, process)
        dd.cache_manager.pull_blocks(BlocksCacheKey(1, 0), cache, src_blocks=[0, 1, 9],
                                     dst_blocks=[0, 1, 2])
        # Compared as bit patterns: random bits include NaNs.
        want = [expected(1, i, DESC.shape, np.float32).view(np.uint32) for i in range(TENSORS)]
        tensors = [t.view(np.uint32) for t in tensors]
        for i in range(TENSORS):
            assert np.array_equal(tensors[i][[0, 1, 2]], want[i][[0, 1, 9]]), i
        # Swap out to host memory of our own, then back in to other slots.
        host = [t.view(np.uint32) for t in own_memory()]
        cpu_cache = Cache.create_cpu_cache(DESC, [t.ctypes.data for t in host])
        dd.cache_manager.swap_blocks(cache, cpu_cache, {0: 0, 1: 1, 2: 2})
        dd.cache_manager.swap_blocks(cpu_cache, cache, {0: 10, 1: 11, 2: 12})
        for i in range(TENSORS):
            assert np.array_equal(host[i][:3], want[i][[0, 1, 9]]), i
            assert np.array_equal(tensors[i][10:13], want[i][[0, 1, 9]]), i
        dd.unlink(comm_id)
        print("OK: 3 blocks of 4 tensors pulled over the rank-table link, swapped out to a "
              "CPU cache and back in, byte for byte")
        dd.finalize()
    finally:
        finish(process, done)


if __name__ == "__main__":
    main()
