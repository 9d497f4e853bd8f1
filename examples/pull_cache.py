"""Decode pulls one request's contiguous KV cache from prefill (pull_cache).

    python examples/pull_cache.py
"""
import numpy as np

from common import expected, fill, finish, link, parse_args, spawn, start
from kvcache import CacheDesc, CacheKey, DataType, LLMRole

LAYERS, SEQ, HIDDEN = 4, 128, 256
DESC = CacheDesc(2 * LAYERS, DataType.DT_FLOAT16, [1, SEQ * HIDDEN])


def prefill(addresses, done):
    dd = start(LLMRole.PROMPT, 1, "127.0.0.1:0")
    cache = dd.cache_manager.allocate_cache(DESC, [CacheKey(prompt_cluster_id=1, req_id=42)])
    fill(cache, seed=1)
    addresses.put(dd.listen_address)
    done.wait()
    dd.finalize()


def main():
    parse_args(__doc__)
    process, address, done = spawn(prefill)
    try:
        dd = start(LLMRole.DECODER, 2)
        cache = dd.cache_manager.allocate_cache(CacheDesc(2 * LAYERS, DataType.DT_FLOAT16,
                                                          [4, SEQ * HIDDEN]))
        link(dd, 1, address)
        # Request 42's cache lands in row 3 of our batch.
        dd.cache_manager.pull_cache(CacheKey(prompt_cluster_id=1, req_id=42), cache,
                                    batch_index=3)
        for i, tensor in enumerate(cache.tensors()):
            want = expected(1, i, DESC.shape, tensor.dtype)[0]
            assert np.array_equal(tensor[3].view(np.uint16), want.view(np.uint16)), i
        print(f"OK: request 42 ({2 * LAYERS} tensors of {DESC.tensor_bytes} bytes) pulled "
              "into batch row 3")
        dd.finalize()
    finally:
        finish(process, done)


if __name__ == "__main__":
    main()
