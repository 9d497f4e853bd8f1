"""Prefill pushes a request's cache row into a decode cache (push_cache).

    python examples/push_cache.py
"""
import numpy as np

import multiprocessing as mp

from common import expected, fill, link, parse_args, receive, start, start_process
from kvcache import CacheDesc, CacheKeyByIdAndIndex, DataType, LLMRole

LAYERS = 4
DESC = CacheDesc(2 * LAYERS, DataType.DT_FLOAT16, [8, 16384])


def decoder(addresses, done, results):
    dd = start(LLMRole.DECODER, 2, "127.0.0.1:0")
    cache = dd.cache_manager.allocate_cache(DESC)
    addresses.put((dd.listen_address, cache.cache_id))
    done.wait()
    results.put([bytes(t[5].view(np.uint8)) for t in cache.tensors()])
    dd.finalize()


def main():
    parse_args(__doc__)
    ctx = mp.get_context("spawn")
    addresses, done, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    process = start_process(decoder, addresses, done, results)
    address, remote_cache_id = receive(addresses, process)
    dd = start(LLMRole.PROMPT, 1)
    cache = dd.cache_manager.allocate_cache(DESC)
    fill(cache, seed=1)
    link(dd, 2, address)
    dd.cache_manager.push_cache(CacheKeyByIdAndIndex(cluster_id=2, cache_id=remote_cache_id,
                                                     batch_index=5), cache, src_batch_index=0)
    done.set()
    got = receive(results, process)
    for i in range(2 * LAYERS):
        want = expected(1, i, DESC.shape, np.float16)[0]
        assert got[i] == want.tobytes(), i
    print("OK: row 0 pushed into the decoder's batch row 5")
    dd.finalize()
    process.join(60)


if __name__ == "__main__":
    main()
