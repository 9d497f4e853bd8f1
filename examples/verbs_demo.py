"""pyverbs_kv in a few lines: two RC QPs on one device, 1538 KV blocks
written to scattered slots in one batch, read back and checked.

    scripts/rdma-vm -- python examples/verbs_demo.py     (Soft-RoCE VM)
"""
import argparse
import random
import time

import numpy as np

import pyverbs_kv as pv

BLOCKS, BLOCK_SIZE = 1538, 16 * 1024

argparse.ArgumentParser(description=__doc__,
                        formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()

with pv.Context() as ctx:                      # the first device (rxe0 in the VM)
    gid_index = ctx.pick_gid(1)                # RoCE v2, IPv4-mapped
    port = ctx.query_port(1)
    print(f"device {ctx.name}: GID[{gid_index}] = {ctx.query_gid(1, gid_index)}, "
          f"MTU {pv.MTU_BYTES[port['active_mtu']]}")
    pd = pv.PD(ctx)
    ends = []
    for _ in range(2):
        cq = pv.CQ(ctx, 4096)
        qp = pv.QP(pd, cq, cq, cap=pv.QPCap(max_send_wr=2048))
        qp.to_init(1)
        ends.append((qp, random.randrange(1 << 24)))
    for (qp, psn), (peer, peer_psn) in zip(ends, reversed(ends)):
        qp.to_rtr(peer.qp_num, peer_psn, ctx.query_gid(1, gid_index), gid_index,
                  path_mtu=port["active_mtu"])
        qp.to_rts(psn)
    sender = ends[0][0]

    prefill = np.random.default_rng(0).integers(0, 255, (BLOCKS, BLOCK_SIZE), dtype=np.uint8)
    decode = np.zeros((BLOCKS * 2, BLOCK_SIZE), dtype=np.uint8)
    src, dst = pv.MR(pd, prefill), pv.MR(pd, decode)   # registered once
    slots = np.random.default_rng(1).permutation(BLOCKS * 2)[:BLOCKS]

    start = time.perf_counter()
    batch = sender.post_write_blocks(src.addr, BLOCK_SIZE, np.arange(BLOCKS), dst.addr,
                                     BLOCK_SIZE, slots, BLOCK_SIZE, src.lkey, dst.rkey)
    batch.wait(timeout_ms=120_000)
    took = time.perf_counter() - start
    assert np.array_equal(decode[slots], prefill)
    print(f"wrote {batch.num_descriptors} blocks of {BLOCK_SIZE // 1024} KiB in "
          f"{batch.num_wrs} work requests: {batch.total_bytes / took / 1e6:.1f} MB/s "
          "(emulated Soft-RoCE: compare ratios, not absolute numbers)")

    echo = np.zeros_like(prefill)
    back = pv.MR(pd, echo)
    sender.post_read_blocks(back.addr, BLOCK_SIZE, np.arange(BLOCKS), dst.addr, BLOCK_SIZE,
                            slots, BLOCK_SIZE, back.lkey, dst.rkey).wait(120_000)
    assert np.array_equal(echo, prefill)
    print("read back and verified byte for byte")
