"""Decode pulls a prefill request's contiguous cache straight into its own
paged blocks (pull_blocks with a CacheKey source, no src_blocks).

    python examples/pull_blocks_from_cache.py
"""
import numpy as np

from common import expected, fill, finish, link, parse_args, spawn, start
from kvcache import CacheDesc, CacheKey, DataType, LLMRole

LAYERS, BLOCK_ELEMS, SEQ_BLOCKS = 4, 2048, 5


def prefill(addresses, done):
    dd = start(LLMRole.PROMPT, 1, "127.0.0.1:0")
    desc = CacheDesc(2 * LAYERS, DataType.DT_FLOAT16, [1, SEQ_BLOCKS * BLOCK_ELEMS])
    cache = dd.cache_manager.allocate_cache(desc, [CacheKey(prompt_cluster_id=1, req_id=7)])
    fill(cache, seed=1)
    addresses.put(dd.listen_address)
    done.wait()
    dd.finalize()


def main():
    parse_args(__doc__)
    process, address, done = spawn(prefill)
    try:
        dd = start(LLMRole.DECODER, 2)
        blocks = dd.cache_manager.allocate_blocks_cache(
            CacheDesc(2 * LAYERS, DataType.DT_FLOAT16, [64, BLOCK_ELEMS]))
        link(dd, 1, address)
        slots = [17, 3, 40, 41, 9]          # the paged-attention slots of this request
        dd.cache_manager.pull_blocks(CacheKey(prompt_cluster_id=1, req_id=7), blocks,
                                     dst_blocks=slots)
        for i, tensor in enumerate(blocks.tensors()):
            want = expected(1, i, (1, SEQ_BLOCKS * BLOCK_ELEMS), tensor.dtype)
            assert np.array_equal(tensor[slots].reshape(1, -1).view(np.uint16),
                                  want.view(np.uint16)), i
        print(f"OK: a {SEQ_BLOCKS}-block request cache landed in blocks {slots}")
        dd.finalize()
    finally:
        finish(process, done)


if __name__ == "__main__":
    main()
