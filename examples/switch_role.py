"""Switch roles: A (decoder) pulls from B (prompt); both unlink and swap
roles; B (now decoder) links to A (now prompt) and pushes into it.

    python examples/switch_role.py
"""
import multiprocessing as mp

import numpy as np

from common import expected, fill, link, parse_args, receive, start, start_process, unlink
from kvcache import BlocksCacheKey, CacheDesc, DataType, LLMRole

DESC = CacheDesc(4, DataType.DT_FLOAT16, [32, 1024])


def node_b(to_a, from_a):
    dd = start(LLMRole.PROMPT, 2, "127.0.0.1:0")
    cache = dd.cache_manager.allocate_blocks_cache(DESC, BlocksCacheKey(prompt_cluster_id=2))
    fill(cache, seed=2)
    to_a.put(dd.listen_address)
    a_address = from_a.get(timeout=60)          # A has pulled, unlinked and switched
    dd.switch_role(LLMRole.DECODER)
    link(dd, 1, a_address)
    dd.cache_manager.push_blocks(BlocksCacheKey(cluster_id=1), cache, [0, 1], [30, 31])
    unlink(dd, 1)
    to_a.put("pushed")
    dd.finalize()


def main():
    parse_args(__doc__)
    ctx = mp.get_context("spawn")
    to_a, from_a = ctx.Queue(), ctx.Queue()
    b = start_process(node_b, to_a, from_a)
    dd = start(LLMRole.DECODER, 1)
    cache = dd.cache_manager.allocate_blocks_cache(DESC, BlocksCacheKey(prompt_cluster_id=1))
    link(dd, 2, receive(to_a, b))
    dd.cache_manager.pull_blocks(BlocksCacheKey(prompt_cluster_id=2), cache, [5, 6], [0, 1])
    unlink(dd, 2)
    dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
    from_a.put(dd.listen_address)
    assert receive(to_a, b) == "pushed"
    for i, tensor in enumerate(cache.tensors()):
        want = expected(2, i, DESC.shape, tensor.dtype)
        assert np.array_equal(tensor[[0, 1]].view(np.uint16), want[[5, 6]].view(np.uint16))
        assert np.array_equal(tensor[[30, 31]].view(np.uint16), want[[0, 1]].view(np.uint16))
    print("OK: pulled as decoder, then switched to prompt and received a push")
    dd.finalize()
    b.join(60)


if __name__ == "__main__":
    main()
