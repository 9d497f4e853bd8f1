"""2P2D: two prefill and two decode processes; every decoder links to every
prefill and pulls blocks from each.

    python examples/xpyd.py
"""
import multiprocessing as mp

import numpy as np

from common import expected, fill, finish, link, parse_args, receive, spawn, start, start_process
from kvcache import BlocksCacheKey, CacheDesc, DataType, LLMRole

DESC = CacheDesc(8, DataType.DT_FLOAT16, [256, 2048])
PROMPTS, DECODERS = (1, 2), (11, 12)


def prefill(addresses, done, cluster_id):
    dd = start(LLMRole.PROMPT, cluster_id, "127.0.0.1:0")
    cache = dd.cache_manager.allocate_blocks_cache(DESC, BlocksCacheKey(cluster_id))
    fill(cache, seed=cluster_id)
    addresses.put(dd.listen_address)
    done.wait()
    dd.finalize()


def decode(cluster_id, prompt_addresses, results):
    dd = start(LLMRole.DECODER, cluster_id)
    cache = dd.cache_manager.allocate_blocks_cache(DESC)
    for offset, (prompt, address) in enumerate(prompt_addresses.items()):
        link(dd, prompt, address)
        src = list(range(10))
        dst = [offset * 100 + cluster_id + b for b in range(10)]
        dd.cache_manager.pull_blocks(BlocksCacheKey(prompt), cache, src, dst)
        for i, tensor in enumerate(cache.tensors()):
            want = expected(prompt, i, DESC.shape, tensor.dtype)
            if not np.array_equal(tensor[dst].view(np.uint16), want[src].view(np.uint16)):
                results.put(f"decoder {cluster_id}: blocks from prompt {prompt} differ")
                return
    results.put(f"decoder {cluster_id}: pulled from {sorted(prompt_addresses)}")
    dd.finalize()


def main():
    parse_args(__doc__)
    prompts = {c: spawn(prefill, c) for c in PROMPTS}
    addresses = {c: address for c, (_, address, _) in prompts.items()}
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    decoders = [start_process(decode, c, addresses, results, name=f"decoder {c}")
                for c in DECODERS]
    lines = sorted(receive(results, *decoders, timeout=120) for _ in decoders)
    for d in decoders:
        d.join(60)
    for process, _, done in prompts.values():
        finish(process, done)
    for line in lines:
        print(line)
    assert all("pulled from" in line for line in lines), lines
    print("OK: every decoder pulled from every prompt")


if __name__ == "__main__":
    main()
