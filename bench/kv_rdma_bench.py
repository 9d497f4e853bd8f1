"""Overhead of the cache layer over RDMA (Soft-RoCE VM): kvcache pull_blocks
(RDMA READ) and push_blocks (RDMA WRITE) of 1538 scattered blocks between
two processes, next to pyverbs_kv's raw batch read and write of the same
blocks between two QPs, all in one run; medians of --repeat.

    scripts/rdma-vm -- python bench/kv_rdma_bench.py [--sizes 4K,16K,64K] [--repeat 5]
"""
import argparse
import multiprocessing as mp
import os
import statistics
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import pyverbs_kv as pv  # noqa: E402
from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,  # noqa: E402
                     LLMDataDist, LLMRole)
from verbs_bench import BATCH, connected_pair, parse_size  # noqa: E402


def start(role, cluster, listen, pool):
    dd = LLMDataDist(role, cluster)
    cfg = LLMConfig()
    cfg.listen_ip_info = listen
    cfg.transport = "rdma"
    cfg.sync_kv_timeout = 600_000
    cfg.buf_pool_cfg = '{"buf_pool_size": %d}' % pool
    dd.init(cfg.generate_options())
    return dd


def pool_for(sizes):
    return -(-int(sum(2 * BATCH * s for s in sizes) * 1.1 + (16 << 20)) // 4096) * 4096


def prefill(addresses, done, sizes):
    dd = start(LLMRole.PROMPT, 1, "127.0.0.1:0", pool_for(sizes))
    for i, size in enumerate(sizes):
        dd.cache_manager.allocate_blocks_cache(CacheDesc(1, DataType.DT_UINT8, [2 * BATCH, size]),
                                               BlocksCacheKey(1, model_id=i))
    addresses.put(dd.listen_address)
    done.wait()
    dd.finalize()


def raw(pair, pd, size, slots, op):
    """pyverbs_kv's batch path alone: bytes/s of one batch."""
    a, _ = pair
    mine = np.ones((BATCH, size), dtype=np.uint8)
    theirs = np.zeros((2 * BATCH, size), dtype=np.uint8)
    mine_mr, theirs_mr = pv.MR(pd, mine), pv.MR(pd, theirs)
    local = mine_mr.addr + np.arange(BATCH, dtype=np.uint64) * size
    remote = theirs_mr.addr + slots.astype(np.uint64) * size
    post = a.qp.post_write_batch if op == "write" else a.qp.post_read_batch
    t0 = time.perf_counter()
    post(local, np.full(BATCH, size, dtype=np.uint32), mine_mr.lkey, remote,
         theirs_mr.rkey).wait(600_000)
    elapsed = time.perf_counter() - t0
    mine_mr.close()
    theirs_mr.close()
    return BATCH * size / elapsed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4K,16K,64K")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ctx = mp.get_context("spawn")
    addresses, done = ctx.Queue(), ctx.Event()
    process = ctx.Process(target=prefill, args=(addresses, done, sizes))
    process.start()
    dd = start(LLMRole.DECODER, 2, "", pool_for(sizes))
    info = LLMClusterInfo()
    info.remote_cluster_id = 1
    host, port = addresses.get(timeout=300).rsplit(":", 1)
    info.append_remote_ip_info(host, int(port))
    assert dd.link_clusters([info], timeout=30_000)[0] == 0

    vctx = pv.Context()
    vpd = pv.PD(vctx)
    pair = connected_pair(vctx, vpd, max_send_wr=1024)
    rng = np.random.default_rng(0)
    slots = rng.permutation(2 * BATCH)[:BATCH]
    print(f"{'block':>7} {'raw read':>9} {'pull_blocks':>11} {'ratio':>6} {'raw write':>10} "
          f"{'push_blocks':>11} {'ratio':>6}   (GB/s)", flush=True)
    for i, size in enumerate(sizes):
        cache = dd.cache_manager.allocate_blocks_cache(
            CacheDesc(1, DataType.DT_UINT8, [2 * BATCH, size]))
        remote_blocks = rng.permutation(2 * BATCH)[:BATCH]
        cells = {k: [] for k in ("raw_read", "pull", "raw_write", "push")}
        for _ in range(args.repeat):
            cells["raw_read"].append(raw(pair, vpd, size, slots, "read"))
            t0 = time.perf_counter()
            dd.cache_manager.pull_blocks(BlocksCacheKey(1, model_id=i), cache, remote_blocks,
                                         slots, tensor_num_per_layer=1)
            cells["pull"].append(BATCH * size / (time.perf_counter() - t0))
            cells["raw_write"].append(raw(pair, vpd, size, slots, "write"))
            t0 = time.perf_counter()
            dd.cache_manager.push_blocks(BlocksCacheKey(cluster_id=1, model_id=i), cache,
                                         slots, remote_blocks, tensor_num_per_layer=1)
            cells["push"].append(BATCH * size / (time.perf_counter() - t0))
        m = {k: statistics.median(v) / 1e9 for k, v in cells.items()}
        print(f"{size // 1024:>6}K {m['raw_read']:>9.4f} {m['pull']:>11.4f} "
              f"{m['pull'] / m['raw_read']:>6.2f} {m['raw_write']:>10.4f} {m['push']:>11.4f} "
              f"{m['push'] / m['raw_write']:>6.2f}", flush=True)
        dd.cache_manager.deallocate_cache(cache)
    for end in pair:
        end.close()
    vctx.close()
    dd.finalize()
    done.set()
    process.join(60)


if __name__ == "__main__":
    main()
