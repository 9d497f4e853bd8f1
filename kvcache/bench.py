"""Transfer benchmark: batches of scattered KV blocks between two processes
on this host, through the TransferEngine and through pull_blocks, next to
the baselines measured in the same run (single-thread memcpy of the same
scattered blocks; TCP loopback bandwidth).

    kvcache bench [--sizes 1K,4K,...] [--batch 1538] [--ops write,read]
        [--transports auto] [--threads 1,2] [--seconds 1.0] [--json out.json]
        [--markdown out.md] [--plot out.png] [--readme]

(``python bench/transfer_bench.py`` is the same.) Each cell: GB/s at the
median batch time, p50/p99 batch latency, and the CPU time this process
spent per batch (all its threads). With N threads each thread moves its
own batch at once; GB/s counts all of them."""
import argparse
import functools
import importlib.util
import json
import multiprocessing as mp
import os
import re
import signal
import socket
import statistics
import sys
import threading
import time

import numpy as np

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                     LLMDataDist, LLMRole, bench_peers)
from kvcache.descriptors import RegionTable, block_descriptors, merge_runs
from kvcache.lifeline import worker_dies_with_parent
from pyverbs_kv import sgio

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SIZES = [1 << k for k in range(10, 19)]
POOL = '{"buf_pool_size": %d}'


def pool_bytes(size, batch, threads):
    """A pool that holds one bench cache of ``size``-byte blocks."""
    need = 2 * batch * threads * size
    return -(-int(need * 1.1 + (64 << 20)) // 4096) * 4096


def desc_for(size, batch, threads):
    return CacheDesc(1, DataType.DT_UINT8, [2 * batch * threads, size])


def target_main(addresses, done, largest, batch, threads, transport):
    """The prompt side: serves one blocks cache at a time ("bench.cache"
    allocates it), so the pool never holds more than the largest."""
    worker_dies_with_parent()
    dd = LLMDataDist(LLMRole.PROMPT, 1)
    cfg = LLMConfig()
    cfg.listen_ip_info = "127.0.0.1:0"
    cfg.transport = transport
    cfg.buf_pool_cfg = POOL % pool_bytes(largest, batch, threads)
    dd.init(cfg.generate_options())
    held = []

    def serve_cache(peer, params):
        while held:
            dd.cache_manager.deallocate_cache(held.pop())
        size, index = int(params["size"]), int(params["model_id"])
        cache = dd.cache_manager.allocate_blocks_cache(desc_for(size, batch, threads),
                                                       BlocksCacheKey(1, model_id=index))
        cache.numpy(0)[...] = index + 1
        held.append(cache)
        return {}

    dd.engine.add_handler("bench.cache", serve_cache)
    addresses.put(dd.listen_address)
    done.wait()
    dd.finalize()


class Progress:
    """A progress bar on stderr (tqdm) while cells run; silent when stderr is
    not a terminal (logs, pipes, CI) or with --quiet."""

    def __init__(self, total, quiet=False):
        from tqdm import tqdm
        # One refresh per cell (cells take a second or more): no throttling.
        self.bar = tqdm(total=total, unit="cell", file=sys.stderr, leave=False, mininterval=0,
                        disable=quiet or not sys.stderr.isatty(), dynamic_ncols=True)

    def step(self, label):
        self.bar.set_postfix_str(label, refresh=False)
        self.bar.update(1)

    def close(self):
        self.bar.close()


WARMUP = 2                             # batches run untimed before each cell


def measure(run_batch, batch_bytes, seconds, threads=1, baseline=None, warmup=WARMUP):
    """Run ``warmup`` untimed batches (first touch of pages, connection and
    cache set-up: a cold first pass), then batches for about ``seconds`` (at
    least 5); per-batch stats of the warm ones. With
    several threads, each runs its batch at once (persistent workers
    released together, so thread start-up is not timed). ``baseline``: a
    single-thread memcpy of the same bytes, run before every round, so both
    see the same machine (its speed here swings by a third within a
    second); its GB/s comes back as ``memcpy_GBps``."""
    if threads == 1:
        def one_round():
            run_batch(0)
        workers = []
    else:
        start, finish = threading.Barrier(threads + 1), threading.Barrier(threads + 1)
        stop = []
        errors = []

        def work(t):
            while True:
                try:
                    start.wait()
                    if stop:
                        return
                    try:
                        run_batch(t)
                    except BaseException as exc:      # reported by the main thread
                        errors.append(exc)
                    finish.wait()
                except threading.BrokenBarrierError:  # the cell ended (or was stopped)
                    return

        def one_round():
            start.wait()
            finish.wait()
            if errors:
                raise errors[0]
        workers = [threading.Thread(target=work, args=(t,), daemon=True)
                   for t in range(threads)]
        for w in workers:
            w.start()
    try:
        for _ in range(warmup):
            one_round()
        times, base_times, cpu = [], [], 0.0
        deadline = time.perf_counter() + seconds
        while len(times) < 5 or time.perf_counter() < deadline:
            if baseline is not None:
                t0 = time.perf_counter()
                baseline()
                base_times.append(time.perf_counter() - t0)
            cpu0 = time.process_time()
            t0 = time.perf_counter()
            one_round()
            times.append(time.perf_counter() - t0)
            cpu += time.process_time() - cpu0
            if len(times) >= 2000:
                break
        cpu /= len(times)
    finally:
        if workers:
            # Aborting both barriers frees workers wherever they wait: after a
            # signal stopped the main thread between start and finish, waiting
            # on start again would hang with the workers waiting on finish.
            stop.append(True)
            start.abort()
            finish.abort()
            for w in workers:
                w.join(timeout=30)
    p50 = statistics.median(times)
    p99 = float(np.percentile(times, 99))
    cell = dict(GBps=batch_bytes * threads / p50 / 1e9, p50_ms=p50 * 1e3, p99_ms=p99 * 1e3,
                cpu_ms=cpu * 1e3, batches=len(times), warmup=warmup)
    if base_times:
        cell["memcpy_GBps"] = batch_bytes / statistics.median(base_times) / 1e9
    return cell


def memcpy_batch(size, batch):
    """A callable copying ``batch`` scattered ``size``-byte blocks with one
    thread (sgio.copy_pieces: a memcpy per block)."""
    src = np.ones((2 * batch, size), dtype=np.uint8)
    dst = np.zeros((2 * batch, size), dtype=np.uint8)
    rng = np.random.default_rng(size)
    s_ids, d_ids = rng.permutation(2 * batch)[:batch], rng.permutation(2 * batch)[:batch]
    s = src.ctypes.data + s_ids.astype(np.uint64) * size
    d = dst.ctypes.data + d_ids.astype(np.uint64) * size
    n = np.full(batch, size, dtype=np.uint64)

    def copy(buffers=(src, dst)):          # the default keeps the buffers alive
        sgio.copy_pieces(d, s, n)
    return copy


def memcpy_baseline(size, batch, seconds, warmup=WARMUP):
    copy = memcpy_batch(size, batch)
    return measure(lambda _: copy(), batch * size, seconds, warmup=warmup)


def _sink(port_queue, total):
    worker_dies_with_parent()
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


UNITS = {"": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10,
         "M": 1 << 20, "MB": 1 << 20, "MIB": 1 << 20}
SIZE_RE = re.compile(r"(\d+)\s*([A-Za-z]*)")


def size_list(text):
    """``1K,64KiB,1MB``: block sizes in bytes; K, KB and KiB all mean 1024
    bytes, M, MB and MiB 1024 * 1024 (block sizes are powers of two). An
    argparse type: a bad item is a one-line usage error naming it."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        match = SIZE_RE.fullmatch(item)
        factor = UNITS.get(match.group(2).upper()) if match else None
        if factor is None or int(match.group(1)) == 0:
            raise argparse.ArgumentTypeError(
                f"{item!r} is not a block size: a positive integer of bytes, optionally "
                "followed by K, KB or KiB (1024 bytes) or M, MB or MiB, e.g. 16K")
        sizes.append(int(match.group(1)) * factor)
    return sizes


def _choices(allowed):
    def parse(text):
        items = [t.strip() for t in text.split(",")]
        bad = [t for t in items if t not in allowed]
        if bad:
            raise argparse.ArgumentTypeError(f"{', '.join(map(repr, bad))}: choose from "
                                             f"{','.join(allowed)}")
        return items
    return parse


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            value = 0
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r} is not a positive {kind.__name__}")
        return value
    return parse


def _count(text):
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a count (0 or more)")
    return int(text)


def _int_list(text):
    return [_positive(int)(t) for t in text.split(",")]


def add_arguments(parser):
    """The bench options (``kvcache bench`` and bench/transfer_bench.py)."""
    parser.add_argument("--sizes", type=size_list, default=SIZES,
                        help="block sizes, comma-separated; K/KB/KiB and M/MB/MiB suffixes "
                        "are binary (default 1K..256K)")
    parser.add_argument("--batch", type=_positive(int), default=1538, help="blocks per batch")
    parser.add_argument("--ops", type=_choices(("write", "read")), default=["write", "read"],
                        help="engine ops: write,read")
    parser.add_argument("--transports", type=_choices(("auto", "tcp", "shm", "rdma")),
                        default=["auto"], help="comma-separated: auto,tcp,shm,rdma")
    parser.add_argument("--threads", type=_int_list, default=[1],
                        help="thread counts, comma-separated (each thread its own batch)")
    parser.add_argument("--seconds", type=_positive(float), default=1.0, help="per cell")
    parser.add_argument("--warmup", type=_count, default=WARMUP,
                        help="untimed batches before each cell; the GB/s printed is of the "
                        "warm batches after them (0: include the cold first pass)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar (it shows only when stderr is a terminal)")
    parser.add_argument("--json", default=None, help="write the results as JSON here")
    parser.add_argument("--markdown", default=None, help="write the table here")
    parser.add_argument("--plot", default=None,
                        help="write a PNG of GB/s vs block size here (needs matplotlib)")
    parser.add_argument("--peers", type=_choices(tuple(bench_peers.PEERS)), nargs="?",
                        default=[], const=",".join(bench_peers.PEERS),
                        help="also run the batches through other engines: "
                             f"{','.join(bench_peers.PEERS)} (all when bare; needs the "
                             "peers extra, `make bench-peers`)")
    parser.add_argument("--readme", action="store_true",
                        help="also put the table into README.md between its markers")
    return parser


def parse_args(argv=None):
    parser = argparse.ArgumentParser(prog="kvcache bench",
                                     description=__doc__.splitlines()[0])
    return add_arguments(parser).parse_args(argv)


def memory_problem(args):
    """Why the run cannot fit in this host's available memory (both
    processes hold a pool for the largest size), or None."""
    need = 2 * pool_bytes(max(args.sizes), args.batch, max(args.threads))
    try:
        with open("/proc/meminfo") as f:
            fields = dict(line.split(":", 1) for line in f)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return None                      # not Linux-like: nothing to check against
    if need > available:
        return (f"blocks of {max(args.sizes)} bytes x {args.batch} x {max(args.threads)} "
                f"threads need {need / (1 << 30):.1f} GiB in two pools, "
                f"{available / (1 << 30):.1f} GiB available: use smaller --sizes, "
                "--batch or --threads")
    return None


def run_transport(transport, sizes, ops, batch, thread_counts, seconds, progress,
                  warmup=WARMUP):
    """Every cell of one transport, against a fresh prompt process."""
    rows = []
    most = max(thread_counts)
    ctx = mp.get_context("spawn")
    addresses, done = ctx.Queue(), ctx.Event()
    target = ctx.Process(target=target_main,
                         args=(addresses, done, max(sizes), batch, most, transport))
    target.start()
    try:
        dd = LLMDataDist(LLMRole.DECODER, 2)
        cfg = LLMConfig()
        cfg.transport = transport
        cfg.sync_kv_timeout = 60_000
        cfg.buf_pool_cfg = POOL % pool_bytes(max(sizes), batch, most)
        dd.init(cfg.generate_options())
        info = LLMClusterInfo()
        info.remote_cluster_id = 1
        host, port = addresses.get(timeout=120).rsplit(":", 1)
        info.append_remote_ip_info(host, int(port))
        if dd.link_clusters([info])[0] != 0:
            raise SystemExit(f"{transport}: could not link to the prompt process")
        peer = dd.engine.find_peer(1)
        for index, size in enumerate(sizes):
            dd.engine.call(peer, "bench.cache", {"size": size, "model_id": index}, 120_000)
            cache = dd.cache_manager.allocate_blocks_cache(desc_for(size, batch, most))
            remote = dd.engine.call(peer, "cache.lookup",
                                    {"by": "blocks", "cluster_id": 1, "model_id": index})
            rng = np.random.default_rng(size)
            # Disjoint scattered blocks per thread, on both sides.
            src = rng.permutation(2 * batch * most)[:batch * most].reshape(most, batch)
            dst = rng.permutation(2 * batch * most)[:batch * most].reshape(most, batch)
            arrays = [block_descriptors([cache.tensor_addrs[0]], size, dst[t],
                                        remote["tensor_addrs"], size, src[t])
                      for t in range(most)]
            regions = np.full(batch, remote["region_ids"][0], dtype=np.uint64)
            # The memcpy baseline runs interleaved with every cell's batches.
            baseline = memcpy_batch(size, batch)
            # Both caches hold index + 1, so writes keep the prompt's bytes;
            # a read starts from zeroed blocks and must bring index + 1 back.
            local_blocks = cache.numpy(0)
            local_blocks[...] = index + 1

            def measure_read(run_batch, label, threads):
                local_blocks[dst[:threads].ravel()] = 0
                cell = measure(run_batch, batch * size, seconds, threads, baseline, warmup)
                if not (local_blocks[dst[:threads].ravel()] == index + 1).all():
                    raise SystemExit(f"bench: {label} left wrong bytes in the blocks it read")
                return cell

            for threads in thread_counts:
                for op in ops:
                    def engine_batch(t, op=op):
                        local, remote_addrs, lengths = arrays[t]
                        dd.engine.transfer_sync(peer, op, local, remote_addrs, lengths,
                                                remote_regions=regions)
                    label = f"{dd.transport} engine {op} {size // 1024}K x{threads}"
                    if op == "read":
                        cell = measure_read(engine_batch, label, threads)
                    else:
                        cell = measure(engine_batch, batch * size, seconds, threads,
                                       baseline, warmup)
                    rows.append(dict(transport=dd.transport, path="engine", op=op,
                                     block=size, threads=threads, **cell))
                    progress.step(label)

                def pull_batch(t):
                    dd.cache_manager.pull_blocks(BlocksCacheKey(1, model_id=index), cache,
                                                 src[t], dst[t], tensor_num_per_layer=1)
                label = f"{dd.transport} pull_blocks {size // 1024}K x{threads}"
                cell = measure_read(pull_batch, label, threads)
                rows.append(dict(transport=dd.transport, path="pull_blocks", op="read",
                                 block=size, threads=threads, **cell))
                progress.step(label)
            dd.cache_manager.deallocate_cache(cache)
        dd.finalize()
    except BaseException:
        target.kill()                    # do not wait 60 s for a target we abandon
        raise
    finally:
        done.set()
        target.join(60)
    return rows


def warm_label(warmup):
    """What the GB/s column measures."""
    if warmup:
        return (f"warm: the median of the batches after {warmup} untimed warm-up "
                f"batch{'es' if warmup > 1 else ''} per cell")
    return "cold: the first batch of each cell is timed too"


def render_table(rows, memcpy, tcp_ref, desc_ms, batch, sizes, warmup=WARMUP):
    gbps = "GB/s warm" if warmup else "GB/s"
    lines = [f"Batch of {batch} scattered blocks per thread, 127.0.0.1; baselines in the same "
             f"run: TCP loopback {tcp_ref:.2f} GB/s (one stream, 256 KiB sends); descriptors "
             f"of a {batch}-block 32-layer transfer built and checked in {desc_ms:.2f} ms of "
             "CPU. \"vs memcpy\" divides by single-thread memcpy of the same blocks, one "
             "memcpy batch run before each of the cell's batches (the memcpy rows are a "
             f"separate first measurement). GB/s is {warm_label(warmup)}.", "",
             f"| transport | path | op | threads | block | {gbps} | vs memcpy | vs TCP "
             "loopback | p50 ms | p99 ms | CPU ms/batch |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for size in sizes:
        m = memcpy[size]
        lines.append(f"| memcpy | - | copy | 1 | {size // 1024} KiB | {m['GBps']:.2f} | 1.00 "
                     f"| {m['GBps'] / tcp_ref:.2f} | {m['p50_ms']:.3f} | {m['p99_ms']:.3f} | "
                     f"{m['cpu_ms']:.3f} |")
    for r in rows:
        lines.append(f"| {r['transport']} | {r['path']} | {r['op']} | {r['threads']} | "
                     f"{r['block'] // 1024} KiB | {r['GBps']:.2f} | "
                     f"{r['GBps'] / r['memcpy_GBps']:.2f} | "
                     f"{r['GBps'] / tcp_ref:.2f} | {r['p50_ms']:.3f} | {r['p99_ms']:.3f} | "
                     f"{r['cpu_ms']:.3f} |")
    return "\n".join(lines)


def plot(path, rows, memcpy, tcp_ref, sizes):
    """GB/s vs block size: one line per transport/path/op/threads, with the
    two baselines."""
    import matplotlib                 # main() checked it is installed before the run
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(9, 5.5))
    kib = [s // 1024 for s in sizes]
    ax.plot(kib, [memcpy[s]["GBps"] for s in sizes], "k--", label="memcpy (1 thread)")
    ax.axhline(tcp_ref, color="grey", linestyle=":", label="TCP loopback")
    # One colour per transport/path/op, one line style per thread count.
    kinds = list(dict.fromkeys((r["transport"], r["path"], r["op"]) for r in rows))
    counts = sorted({r["threads"] for r in rows})
    colours = plt.get_cmap("tab20").colors
    styles = ["-", "--", "-.", ":"]
    for n, kind in enumerate(kinds):
        for threads in counts:
            points = sorted((r["block"] // 1024, r["GBps"]) for r in rows
                            if (r["transport"], r["path"], r["op"]) == kind
                            and r["threads"] == threads)
            if points:
                xs, ys = zip(*points)
                ax.plot(xs, ys, marker="o", markersize=3, color=colours[n % len(colours)],
                        linestyle=styles[counts.index(threads) % len(styles)],
                        label=f"{' '.join(kind)} x{threads}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(kib, [f"{k}K" for k in kib])
    ax.set_xlabel("block size")
    ax.set_ylabel("GB/s (median batch)")
    ax.set_title("kvcache transfers, batches of scattered blocks, one host")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


class Stopped(Exception):
    """SIGTERM arrived (raised in the main thread by the handler)."""


def _raise_stopped(signum, frame):
    raise Stopped()


def main(argv=None, args=None):
    """Run the bench from ``argv`` (or parsed ``args``). SIGTERM or Ctrl-C
    ends the child processes and exits 143/130 with one line, no traceback."""
    args = parse_args(argv) if args is None else args
    problem = memory_problem(args) or (args.peers and bench_peers.missing(args.peers))
    if problem:
        raise SystemExit(f"kvcache bench: {problem}")
    signal.signal(signal.SIGTERM, _raise_stopped)
    try:
        run(args, argv)
    except (KeyboardInterrupt, Stopped) as exc:
        signum = signal.SIGTERM if isinstance(exc, Stopped) else signal.SIGINT
        children = mp.active_children()
        for child in children:
            child.kill()
        for child in children:
            child.join(5)
        sys.stdout.flush()
        sys.stderr.write(f"\nkvcache bench: stopped by {signum.name}; ended "
                         f"{len(children)} child process(es)\n")
        sys.stderr.flush()
        # Engine threads may be mid-transfer: leave without running their
        # shutdown paths (which would wait on them, then print their errors).
        os._exit(128 + signum)


def run(args, argv=None):
    sizes, ops, transports = args.sizes, args.ops, args.transports
    thread_counts = args.threads
    batch = args.batch
    if args.plot:
        if importlib.util.find_spec("matplotlib") is None:
            raise SystemExit("--plot needs matplotlib (pip install matplotlib)")

    cells = len(sizes) * (1 + len(transports) * len(thread_counts) * (len(ops) + 1)) + 2
    cells += bench_peers.cell_count(args.peers, sizes, ops)
    progress = Progress(cells, args.quiet)
    tcp_ref = tcp_loopback_baseline(256 * 1024)
    progress.step("tcp loopback baseline")
    desc_ms = descriptor_cost()
    progress.step("descriptor building")
    memcpy = {}
    for size in sizes:
        memcpy[size] = memcpy_baseline(size, batch, args.seconds, args.warmup)
        progress.step(f"memcpy {size // 1024}K")
    rows = []
    for transport in transports:
        rows += run_transport(transport, sizes, ops, batch, thread_counts, args.seconds,
                              progress, args.warmup)
    rows += bench_peers.run_peers(args.peers, sizes, ops, batch, args.seconds,
                                  functools.partial(measure, warmup=args.warmup),
                                  memcpy_batch, progress)
    progress.close()

    table = render_table(rows, memcpy, tcp_ref, desc_ms, batch, sizes, args.warmup)
    table += bench_peers.render_versus(rows)
    print(table)
    result = dict(batch=batch, threads=thread_counts, warmup=args.warmup,
                  tcp_loopback_GBps=tcp_ref,
                  descriptor_ms=desc_ms,
                  memcpy={str(k): v for k, v in memcpy.items()}, rows=rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(table + "\n")
    if args.plot:
        plot(args.plot, rows, memcpy, tcp_ref, sizes)
    if args.readme:
        splice_readme(table, " ".join(sys.argv[1:] if argv is None else argv))


START, END = "<!-- transfer-bench:start -->", "<!-- transfer-bench:end -->"


def splice_readme(table, argv):
    path = os.path.join(ROOT, "README.md")
    if not os.path.exists(path):
        raise SystemExit(f"--readme works in a source checkout; {path} is missing")
    with open(path) as f:
        text = f.read()
    if START not in text or END not in text:
        raise SystemExit("README.md has no transfer-bench markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    body = (f"{START}\nGenerated by `kvcache bench {argv}` on "
            f"{time.strftime('%Y-%m-%d')} ({os.cpu_count()} cores):\n\n{table}\n{END}")
    with open(path, "w") as f:
        f.write(head + body + tail)


if __name__ == "__main__":
    main()
