"""Transfer benchmark: batches of scattered KV blocks between two processes
on this host, through the TransferEngine and through pull_blocks, next to
the baselines measured in the same run (single-thread memcpy of the same
scattered blocks; TCP loopback bandwidth).

    python bench/transfer_bench.py [--sizes 1K,4K,...] [--batch 1538]
        [--ops write,read] [--transports auto] [--threads 1] [--seconds 1.0]
        [--json out.json] [--markdown out.md] [--readme]

Each cell: GB/s at the median batch time, p50/p99 batch latency, and the
CPU time this process spent per batch (all its threads)."""
import argparse
import json
import multiprocessing as mp
import os
import socket
import statistics
import sys
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,  # noqa: E402
                     LLMDataDist, LLMRole)
from kvcache.descriptors import block_descriptors, merge_runs  # noqa: E402
from pyverbs_kv import sgio  # noqa: E402

SIZES = [1 << k for k in range(10, 19)]
POOL = '{"buf_pool_size": %d}'


def parse_size(text):
    text = text.strip().upper()
    factor = {"K": 1024, "M": 1 << 20}.get(text[-1], 1)
    return int(text.rstrip("KM")) * factor


def pool_for(sizes, batch, threads):
    need = sum(2 * batch * threads * s for s in sizes)
    return -(-int(need * 1.1 + (64 << 20)) // 4096) * 4096


def desc_for(size, batch, threads):
    return CacheDesc(1, DataType.DT_UINT8, [2 * batch * threads, size])


def target_main(addresses, done, sizes, batch, threads, transport):
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    cfg = LLMConfig()
    cfg.listen_ip_info = "127.0.0.1:0"
    cfg.transport = transport
    cfg.buf_pool_cfg = POOL % pool_for(sizes, batch, threads)
    dd.init(cfg.generate_options())
    for index, size in enumerate(sizes):
        cache = dd.cache_manager.allocate_blocks_cache(desc_for(size, batch, threads),
                                                       BlocksCacheKey(1, model_id=index))
        cache.numpy(0)[...] = index + 1
    addresses.put(dd.listen_address)
    done.wait()
    dd.finalize()


class Progress:
    def __init__(self, total):
        self.total, self.done, self.started = total, 0, time.monotonic()

    def step(self, label):
        self.done += 1
        width = 30
        filled = width * self.done // self.total
        sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {self.done}/{self.total} "
                         f"{label:<36} {time.monotonic() - self.started:5.0f}s")
        sys.stderr.flush()
        if self.done == self.total:
            sys.stderr.write("\n")


def measure(run_batch, batch_bytes, seconds, threads=1):
    """Run batches for about ``seconds`` (at least 5); per-batch stats."""
    run_batch(0)                                      # warm-up
    times = []
    cpu0 = time.process_time()
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        if threads == 1:
            t0 = time.perf_counter()
            run_batch(0)
            times.append(time.perf_counter() - t0)
        else:
            workers = [threading.Thread(target=run_batch, args=(i,)) for i in range(threads)]
            t0 = time.perf_counter()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            times.append(time.perf_counter() - t0)
        if len(times) >= 2000:
            break
    cpu = (time.process_time() - cpu0) / len(times)
    p50 = statistics.median(times)
    p99 = float(np.percentile(times, 99))
    return dict(GBps=batch_bytes * threads / p50 / 1e9, p50_ms=p50 * 1e3, p99_ms=p99 * 1e3,
                cpu_ms=cpu * 1e3, batches=len(times))


def memcpy_baseline(size, batch, seconds):
    src = np.ones((2 * batch, size), dtype=np.uint8)
    dst = np.zeros((2 * batch, size), dtype=np.uint8)
    rng = np.random.default_rng(size)
    s_ids, d_ids = rng.permutation(2 * batch)[:batch], rng.permutation(2 * batch)[:batch]
    s = src.ctypes.data + s_ids.astype(np.uint64) * size
    d = dst.ctypes.data + d_ids.astype(np.uint64) * size
    n = np.full(batch, size, dtype=np.uint64)
    return measure(lambda _: sgio.copy_pieces(d, s, n), batch * size, seconds)


def _sink(port_queue, total):
    server = socket.create_server(("127.0.0.1", 0))
    port_queue.put(server.getsockname()[1])
    conn, _ = server.accept()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    got = 0
    while got < total:
        n = conn.recv_into(view)
        if not n:
            break
        got += n
    conn.sendall(b"k")
    conn.close()


def tcp_loopback_baseline(chunk, total=1 << 30):
    """One-stream TCP loopback bandwidth (an iperf-like reference): bytes/s
    of sending ``total`` bytes in ``chunk``-byte sends to another process."""
    ctx = mp.get_context("spawn")
    ports = ctx.Queue()
    sink = ctx.Process(target=_sink, args=(ports, total))
    sink.start()
    sock = socket.create_connection(("127.0.0.1", ports.get(timeout=30)))
    data = memoryview(bytearray(chunk))
    t0 = time.perf_counter()
    sent = 0
    while sent < total:
        sock.sendall(data)
        sent += chunk
    sock.recv(1)
    elapsed = time.perf_counter() - t0
    sock.close()
    sink.join(30)
    return sent / elapsed / 1e9


def descriptor_cost(batch=1538, layers=32, per_layer=2, repeat=200):
    """CPU time to build, merge and bounds-check the descriptors of one
    ``batch``-block transfer of ``layers`` layers."""
    from kvcache.descriptors import RegionTable
    bases = 0x10000000 + np.arange(layers * per_layer, dtype=np.uint64) * (1 << 30)
    table = RegionTable([(i + 1, int(b), 1 << 29) for i, b in enumerate(bases)])
    rng = np.random.default_rng(0)
    src, dst = rng.permutation(4 * batch)[:batch], rng.permutation(4 * batch)[:batch]
    t0 = time.process_time()
    for _ in range(repeat):
        local, remote, lengths = block_descriptors(bases, 65536, dst, bases, 65536, src)
        ids = table.check(local, lengths, "local")
        table.check(remote, lengths, "remote")
        merge_runs(local, remote, lengths, ids)
    return (time.process_time() - t0) / repeat * 1e3


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(f"{s // 1024}K" for s in SIZES))
    parser.add_argument("--batch", type=int, default=1538)
    parser.add_argument("--ops", default="write,read")
    parser.add_argument("--transports", default="auto", help="comma-separated: auto,tcp,...")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=1.0, help="per cell")
    parser.add_argument("--json", default=None)
    parser.add_argument("--markdown", default=None)
    parser.add_argument("--readme", action="store_true",
                        help="also put the table into README.md between its markers")
    args = parser.parse_args()
    sizes = [parse_size(s) for s in args.sizes.split(",")]
    ops = args.ops.split(",")
    transports = args.transports.split(",")
    batch, threads = args.batch, args.threads

    rows = []
    progress = Progress(len(sizes) * (1 + len(transports) * (len(ops) + 1)) + 2)
    tcp_ref = tcp_loopback_baseline(256 * 1024)
    progress.step("tcp loopback baseline")
    desc_ms = descriptor_cost()
    progress.step("descriptor building")
    memcpy = {}
    for size in sizes:
        memcpy[size] = memcpy_baseline(size, batch, args.seconds)
        progress.step(f"memcpy {size // 1024}K")
    for transport in transports:
        ctx = mp.get_context("spawn")
        addresses, done = ctx.Queue(), ctx.Event()
        target = ctx.Process(target=target_main,
                             args=(addresses, done, sizes, batch, threads, transport))
        target.start()
        try:
            dd = LLMDataDist(LLMRole.DECODER, 2)
            cfg = LLMConfig()
            cfg.transport = transport
            cfg.sync_kv_timeout = 60_000
            cfg.buf_pool_cfg = POOL % pool_for(sizes, batch, threads)
            dd.init(cfg.generate_options())
            info = LLMClusterInfo()
            info.remote_cluster_id = 1
            host, port = addresses.get(timeout=120).rsplit(":", 1)
            info.append_remote_ip_info(host, int(port))
            assert dd.link_clusters([info])[0] == 0
            peer = dd.engine.find_peer(1)
            for index, size in enumerate(sizes):
                cache = dd.cache_manager.allocate_blocks_cache(desc_for(size, batch, threads))
                remote = dd.engine.call(peer, "cache.lookup",
                                        {"by": "blocks", "cluster_id": 1, "model_id": index})
                rng = np.random.default_rng(size)
                src = [rng.permutation(2 * batch * threads)[:batch] for _ in range(threads)]
                dst = [rng.permutation(2 * batch * threads)[:batch] for _ in range(threads)]
                arrays = [block_descriptors([cache.tensor_addrs[0]], size, dst[t],
                                            remote["tensor_addrs"], size, src[t])
                          for t in range(threads)]
                regions = np.full(batch, remote["region_ids"][0], dtype=np.uint64)
                for op in ops:
                    def engine_batch(t, op=op):
                        local, remote_addrs, lengths = arrays[t]
                        dd.engine.transfer_sync(peer, op, local, remote_addrs, lengths,
                                                remote_regions=regions)
                    cell = measure(engine_batch, batch * size, args.seconds, threads)
                    rows.append(dict(transport=dd.transport, path="engine", op=op, block=size,
                                     threads=threads, **cell))
                    progress.step(f"{dd.transport} engine {op} {size // 1024}K")

                def pull_batch(t):
                    dd.cache_manager.pull_blocks(BlocksCacheKey(1, model_id=index), cache,
                                                 src[t], dst[t], tensor_num_per_layer=1)
                cell = measure(pull_batch, batch * size, args.seconds, threads)
                rows.append(dict(transport=dd.transport, path="pull_blocks", op="read",
                                 block=size, threads=threads, **cell))
                progress.step(f"{dd.transport} pull_blocks {size // 1024}K")
                dd.cache_manager.deallocate_cache(cache)
            dd.finalize()
        finally:
            done.set()
            target.join(60)

    lines = [f"Batch of {batch} scattered blocks, {threads} thread(s), 127.0.0.1; baselines "
             f"in the same run: TCP loopback {tcp_ref:.2f} GB/s (one stream, 256 KiB sends); "
             f"descriptors of a {batch}-block 32-layer transfer built and checked in "
             f"{desc_ms:.2f} ms of CPU.", "",
             "| transport | path | op | block | GB/s | vs memcpy | vs TCP loopback | p50 ms "
             "| p99 ms | CPU ms/batch |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        m = memcpy[size]
        lines.append(f"| memcpy | - | copy | {size // 1024} KiB | {m['GBps']:.2f} | 1.00 | "
                     f"{m['GBps'] / tcp_ref:.2f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
                     f"{m['cpu_ms']:.3f} |")
    for r in rows:
        lines.append(f"| {r['transport']} | {r['path']} | {r['op']} | {r['block'] // 1024} KiB "
                     f"| {r['GBps']:.2f} | {r['GBps'] / memcpy[r['block']]['GBps']:.2f} | "
                     f"{r['GBps'] / tcp_ref:.2f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['cpu_ms']:.3f} |")
    table = "\n".join(lines)
    print(table)
    result = dict(batch=batch, threads=threads, tcp_loopback_GBps=tcp_ref,
                  descriptor_ms=desc_ms,
                  memcpy={str(k): v for k, v in memcpy.items()}, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.readme:
        splice_readme(table, " ".join(sys.argv[1:]))


START, END = "<!-- transfer-bench:start -->", "<!-- transfer-bench:end -->"


def splice_readme(table, argv):
    path = os.path.join(ROOT, "README.md")
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit("README.md has no transfer-bench markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    body = (f"{START}\nGenerated by `python bench/transfer_bench.py {argv}` on "
            f"{time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores):\n\n{table}\n{END}")
    with open(path, "w") as f:
        f.write(head + body + tail)


if __name__ == "__main__":
    main()
