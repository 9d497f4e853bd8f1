"""Prefill pushes blocks layer by layer into the decoder's blocks cache,
which lives in the decoder's own (numpy) memory (register_blocks_cache).

    python examples/push_blocks.py
"""
import numpy as np

import multiprocessing as mp

from common import expected, fill, link, parse_args, receive, start, start_process
from kvcache import BlocksCacheKey, CacheDesc, DataType, LLMRole

LAYERS, BLOCKS, ELEMS = 4, 128, 4096
DESC = CacheDesc(2 * LAYERS, DataType.DT_FLOAT16, [BLOCKS, ELEMS])


def decoder(addresses, done, results):
    dd = start(LLMRole.DECODER, 2, "127.0.0.1:0")
    memory = [np.zeros((BLOCKS, ELEMS), dtype=np.float16) for _ in range(2 * LAYERS)]
    dd.cache_manager.register_blocks_cache(DESC, [m.ctypes.data for m in memory],
                                           BlocksCacheKey(prompt_cluster_id=2))
    addresses.put(dd.listen_address)
    done.wait()
    results.put([m[[100, 101, 5]].tobytes() for m in memory])
    dd.finalize()


def main():
    parse_args(__doc__)
    ctx = mp.get_context("spawn")
    addresses, done, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    process = start_process(decoder, addresses, done, results)
    dd = start(LLMRole.PROMPT, 1)
    cache = dd.cache_manager.allocate_blocks_cache(DESC)
    fill(cache, seed=1)
    link(dd, 2, receive(addresses, process))
    for layer in range(LAYERS):          # as each layer's prefill finishes
        dd.cache_manager.push_blocks(BlocksCacheKey(cluster_id=2), cache, [0, 1, 2],
                                     [100, 101, 5], range(layer, layer + 1),
                                     range(layer, layer + 1))
    done.set()
    got = receive(results, process)
    for i in range(2 * LAYERS):
        assert got[i] == expected(1, i, DESC.shape, np.float16)[[0, 1, 2]].tobytes(), i
    print(f"OK: blocks 0,1,2 of {LAYERS} layers pushed into the decoder's blocks 100,101,5")
    dd.finalize()
    process.join(60)


if __name__ == "__main__":
    main()
