"""What posting a batch costs pyverbs_kv itself, natively (no VM, no NIC).

    python bench/post_cost_bench.py [--sizes 1K,64K] [--repeat 300]

Soft-RoCE only runs inside the TCG-emulated VM here, where every instruction
is tens of times slower than on the host, so the VM's posting times say
little about the code. This benchmark builds bench/null_provider (a
libibverbs whose data path accepts every work request and completes it
without moving a byte) and runs, in a child process that loads it through
LD_LIBRARY_PATH, the real pyverbs_kv batch path: post_write_batch of 1538
permuted blocks, then wait. It reports per batch: the whole Python call,
the posting loop, the part of it inside the provider's post_send, and the
rest (pyverbs_kv's own cost), next to a baseline from the same run: one C
pass over the same descriptor arrays (pyverbs_kv.pieces.merge_pieces)."""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BATCH = 1538


def build_null_provider(out_dir):
    src = os.path.join(HERE, "null_provider", "null_ibverbs.c")
    version_script = os.path.join(HERE, "null_provider", "null_ibverbs.map")
    subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o",
                    os.path.join(out_dir, "libibverbs.so.1"), src,
                    "-Wl,-soname,libibverbs.so.1", f"-Wl,--version-script={version_script}"],
                   check=True)


def child(sizes, repeat):
    sys.path.insert(0, ROOT)
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import numpy as np
    import pyverbs_kv as pv
    from pyverbs_kv import pieces
    from rdma_util import connected_pair

    if pv.get_device_list() != ["null0"]:
        raise SystemExit(f"the null provider is not loaded: devices {pv.get_device_list()}")
    ctx = pv.Context("null0")
    pd = pv.PD(ctx)
    a, b = connected_pair(ctx, pd, max_send_wr=4096)
    slots = np.random.default_rng(0).permutation(BATCH)
    while np.any(np.diff(slots) == 1):               # nothing merges: one WR per block
        slots = np.random.default_rng(int(slots[0])).permutation(BATCH)
    print(f"batch {BATCH} permuted blocks, median of {repeat}, null provider (no NIC)")
    print(f"{'block':>7} {'WRs':>5} {'call us':>8} {'loop us':>8} {'provider us':>12} "
          f"{'ours us':>8} {'ours ns/WR':>11} {'C pass us':>10} {'ours / C pass':>14}")
    for size in sizes:
        src = np.zeros(BATCH * size, dtype=np.uint8)
        dst = np.zeros(BATCH * size, dtype=np.uint8)
        src_mr, dst_mr = pv.MR(pd, src), pv.MR(pd, dst)
        local = src_mr.addr + np.arange(BATCH, dtype=np.uint64) * size
        remote = dst_mr.addr + slots.astype(np.uint64) * size
        lengths = np.full(BATCH, size, dtype=np.uint64)
        calls, loops, provider, passes = [], [], [], []
        for _ in range(repeat):
            t0 = time.perf_counter()
            batch = a.qp.post_write_batch(local, lengths, src_mr.lkey, remote, dst_mr.rkey)
            calls.append(time.perf_counter() - t0)
            batch.wait(5000)
            loops.append(batch.post_seconds)
            provider.append(batch.provider_seconds)
            t0 = time.perf_counter()
            pieces.merge_pieces(local, remote, lengths)
            passes.append(time.perf_counter() - t0)
        assert batch.num_wrs == BATCH
        ours = statistics.median(loops) - statistics.median(provider)
        c_pass = statistics.median(passes)
        print(f"{size // 1024:>6}K {batch.num_wrs:>5} {statistics.median(calls) * 1e6:>8.1f} "
              f"{statistics.median(loops) * 1e6:>8.1f} {statistics.median(provider) * 1e6:>12.1f} "
              f"{ours * 1e6:>8.1f} {ours / BATCH * 1e9:>11.1f} {c_pass * 1e6:>10.1f} "
              f"{ours / c_pass:>14.2f}", flush=True)
        src_mr.close()
        dst_mr.close()
    a.close()
    b.close()
    ctx.close()


def parse_size(text):
    text = text.strip().upper()
    return int(text.rstrip("K")) * (1024 if text.endswith("K") else 1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="1K,64K")
    parser.add_argument("--repeat", type=int, default=300)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    if args.child:
        child(sizes, args.repeat)
        return
    with tempfile.TemporaryDirectory() as lib_dir:
        build_null_provider(lib_dir)
        env = dict(os.environ, LD_LIBRARY_PATH=lib_dir)
        sys.exit(subprocess.run([sys.executable, os.path.abspath(__file__), "--child",
                                 "--sizes", args.sizes, "--repeat", str(args.repeat)],
                                env=env).returncode)


if __name__ == "__main__":
    main()
