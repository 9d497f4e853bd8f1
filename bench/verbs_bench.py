"""Batch RDMA WRITE sweep against ib_write_bw, in one run (Soft-RoCE VM).

    scripts/rdma-vm -- python bench/verbs_bench.py [--sizes 1K,4K,...] [--repeat 7]

For each block size: ib_write_bw (perftest) moving 1538 messages of that size
between two processes on rxe0, then pyverbs_kv posting one batch of 1538
blocks of that size to permuted remote slots (so nothing merges) and waiting
for it. Prints GB/s of both and the ratio; the median of --repeat runs each,
interleaved so both see the same machine. Also prints what posting the batch
cost pyverbs_kv itself: the posting loop's time minus the time inside the
provider's ibv_post_send (on rxe that call does the transfer work inline).
Writes JSON to $RDMA_VM_OUT/verbs_bench.json when that is set."""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

import pyverbs_kv as pv

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from rdma_util import connected_pair  # noqa: E402

BATCH = 1538
SIZES = [1 << k for k in range(10, 19)]


def parse_size(text):
    text = text.strip().upper()
    factor = {"K": 1024, "M": 1 << 20}.get(text[-1], 1)
    return int(text.rstrip("KM")) * factor


def ib_write_bw(device, gid_index, ip, size, iters, port):
    """ib_write_bw's average bandwidth in bytes/s."""
    args = ["ib_write_bw", "-d", device, "-x", str(gid_index), "-s", str(size), "-n",
            str(iters), "--report_gbits", "-F", "-p", str(port)]
    server = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(40):
            time.sleep(0.25)
            client = subprocess.run(args + [ip], capture_output=True, text=True, timeout=300)
            if client.returncode == 0:
                break
        else:
            raise RuntimeError(f"ib_write_bw client failed: {client.stdout}{client.stderr}")
        server.communicate(timeout=60)
    finally:
        server.kill()
    for line in client.stdout.splitlines():
        fields = line.split()
        if len(fields) >= 4 and fields[0] == str(size) and re.match(r"^\d+$", fields[1]):
            return float(fields[3]) * 125e6            # Gb/s -> bytes/s
    raise RuntimeError(f"no result line in ib_write_bw output:\n{client.stdout}")


def ours(pair, pd, size, slots):
    """Our batch write: (bytes/s, seconds of posting spent outside the
    provider's ibv_post_send, i.e. pyverbs_kv's own cost)."""
    a, _ = pair
    src = np.full((BATCH, size), 7, dtype=np.uint8)
    dst = np.zeros((BATCH, size), dtype=np.uint8)
    src_mr, dst_mr = pv.MR(pd, src), pv.MR(pd, dst)
    local = src_mr.addr + np.arange(BATCH, dtype=np.uint64) * size
    remote = dst_mr.addr + slots.astype(np.uint64) * size
    lengths = np.full(BATCH, size, dtype=np.uint32)
    t0 = time.perf_counter()
    batch = a.qp.post_write_batch(local, lengths, src_mr.lkey, remote, dst_mr.rkey,
                                  timeout_ms=600_000)
    batch.wait(timeout_ms=600_000)
    elapsed = time.perf_counter() - t0
    assert batch.num_wrs == BATCH
    assert dst[slots[0]][0] == 7 and dst[slots[-1]][-1] == 7
    src_mr.close()
    dst_mr.close()
    return BATCH * size / elapsed, batch.post_seconds - batch.provider_seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(str(s) for s in SIZES),
                        help="comma-separated block sizes (1K, 64K, ...)")
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--device", default=None)
    parser.add_argument("--ip", default=os.environ.get("PYVERBS_KV_TEST_IP", "10.99.0.1"))
    parser.add_argument("--send-queue", type=int, default=4096,
                        help="max_send_wr of our QP (credits bound what is in flight)")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]

    ctx = pv.Context(args.device)
    pd = pv.PD(ctx)
    gid_index = ctx.pick_gid(1)
    # Non-adjacent permuted slots: every block is its own work request.
    slots = np.random.default_rng(0).permutation(BATCH)
    while np.any(np.diff(slots) == 1):
        slots = np.random.default_rng(int(slots[0])).permutation(BATCH)
    # By default a send queue deeper than the batch: posting never waits for
    # credits, so the post time below is the cost of posting alone.
    pair = connected_pair(ctx, pd, max_send_wr=args.send_queue)
    rows = []
    port = 18600
    print(f"device {ctx.name}, gid index {gid_index}, batch {BATCH} permuted blocks, "
          f"median of {args.repeat}", flush=True)
    print(f"{'block':>8} {'ib_write_bw GB/s':>17} {'pyverbs_kv GB/s':>16} {'ratio':>6} "
          f"{'our post cost us':>17}", flush=True)
    for size in sizes:
        base, mine, post_cpu = [], [], []
        for _ in range(args.repeat):
            port += 1
            base.append(ib_write_bw(ctx.name, gid_index, args.ip, size, BATCH, port))
            bw, cpu = ours(pair, pd, size, slots)
            mine.append(bw)
            post_cpu.append(cpu)
        row = dict(block=size, ib_write_bw_GBps=statistics.median(base) / 1e9,
                   pyverbs_kv_GBps=statistics.median(mine) / 1e9,
                   our_post_cost_us=statistics.median(post_cpu) * 1e6)
        row["ratio"] = row["pyverbs_kv_GBps"] / row["ib_write_bw_GBps"]
        rows.append(row)
        print(f"{size // 1024:>7}K {row['ib_write_bw_GBps']:>17.4f} "
              f"{row['pyverbs_kv_GBps']:>16.4f} {row['ratio']:>6.2f} "
              f"{row['our_post_cost_us']:>17.1f}", flush=True)
    out_dir = os.environ.get("RDMA_VM_OUT")
    if out_dir:
        with open(os.path.join(out_dir, "verbs_bench.json"), "w") as f:
            json.dump(rows, f, indent=2)
    for end in pair:
        end.close()
    ctx.close()


if __name__ == "__main__":
    main()
