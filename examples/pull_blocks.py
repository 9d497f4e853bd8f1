"""Decode pulls KV blocks from prefill (the main job; `make demo` runs it).

A prefill process holds a blocks cache of 8 layers (K and V per layer) and
fills it; a decode process links to it and pulls 1538 scattered blocks of
every layer into its own block slots, one call per layer (as prefill
finishes them), then checks every byte.

    python examples/pull_blocks.py [--transport auto|tcp|shm|rdma] [--block-kib 16]
        [--batch 1538]
"""
import time

import numpy as np

from common import expected, fill, finish, link, parse_args, positive, spawn, start
from kvcache import BlocksCacheKey, CacheDesc, DataType, LLMRole

LAYERS = 8
PROMPT_CLUSTER, DECODE_CLUSTER = 1, 2


def prefill(addresses, done, blocks, block_elems, transport):
    dd = start(LLMRole.PROMPT, PROMPT_CLUSTER, "127.0.0.1:0", transport=transport,
               buf_pool_cfg='{"buf_pool_size": 2147483648}')
    desc = CacheDesc(2 * LAYERS, DataType.DT_FLOAT16, [blocks, block_elems])
    cache = dd.cache_manager.allocate_blocks_cache(desc, BlocksCacheKey(PROMPT_CLUSTER))
    fill(cache, seed=PROMPT_CLUSTER)
    addresses.put(dd.listen_address)
    done.wait()
    dd.finalize()


def main():
    def options(parser):
        parser.add_argument("--transport", default="auto", choices=("auto", "tcp", "shm", "rdma"))
        parser.add_argument("--block-kib", type=positive, default=16,
                            help="bytes of one block of one tensor, in KiB (default 16)")
        parser.add_argument("--batch", type=positive, default=1538,
                            help="blocks pulled per layer (default 1538)")
    args = parse_args(__doc__, options)
    block_elems = args.block_kib * 1024 // 2
    blocks = args.batch + args.batch // 4
    process, address, done = spawn(prefill, blocks, block_elems, args.transport)
    try:
        dd = start(LLMRole.DECODER, DECODE_CLUSTER, transport=args.transport,
                   sync_kv_timeout=30_000, buf_pool_cfg='{"buf_pool_size": 2147483648}')
        print(f"decode: transport {dd.transport} ({dd.transport_reason})")
        desc = CacheDesc(2 * LAYERS, DataType.DT_FLOAT16, [blocks, block_elems])
        cache = dd.cache_manager.allocate_blocks_cache(desc)
        link(dd, PROMPT_CLUSTER, address)
        rng = np.random.default_rng(0)
        src_blocks = rng.permutation(blocks)[:args.batch]
        dst_blocks = rng.permutation(blocks)[:args.batch]
        # Layer by layer, as prefill finishes them; then check everything. The
        # first pass is cold (pages touched for the first time, lanes opened);
        # the second, warm, is what a serving process sees.
        took = []
        for _ in ("cold", "warm"):
            start_time = time.perf_counter()
            for layer in range(LAYERS):
                dd.cache_manager.pull_blocks(BlocksCacheKey(PROMPT_CLUSTER), cache,
                                             src_blocks, dst_blocks, range(layer, layer + 1),
                                             range(layer, layer + 1))
            took.append(time.perf_counter() - start_time)
        total = 2 * LAYERS * args.batch * args.block_kib * 1024
        for i, tensor in enumerate(cache.tensors()):
            want = expected(PROMPT_CLUSTER, i, tensor.shape, tensor.dtype)
            if not np.array_equal(tensor[dst_blocks].view(np.uint16),
                                  want[src_blocks].view(np.uint16)):
                raise SystemExit(f"tensor {i}: pulled blocks differ from the source")
        print(f"decode: pulled {LAYERS} layers x 2 tensors x {args.batch} blocks of "
              f"{args.block_kib} KiB ({total / 2**20:.0f} MiB) in {took[1] * 1000:.0f} ms: "
              f"{total / took[1] / 1e9:.2f} GB/s warm (the cold first pass: "
              f"{took[0] * 1000:.0f} ms, {total / took[0] / 1e9:.2f} GB/s)")
        print("OK: every pulled block matches the prefill side byte for byte")
        dd.finalize()
    finally:
        finish(process, done)


if __name__ == "__main__":
    main()
