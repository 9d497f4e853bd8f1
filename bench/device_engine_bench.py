"""What the device-capable engine costs host transfers.

    python bench/device_engine_bench.py [--transports tcp,shm] [--sizes 1K,64K] [--repeat 60]

kvcache.TransferEngine looks up, per transfer, whether any piece lies in
device memory (ours or the peer's) before handing a host-only batch to the
host engine of kvcache.engine. This runs the same batches, 1538 permuted
blocks from one process to another engine on 127.0.0.1, through both
initiators in the same invocation, taking turns (each first every other
round), and prints the median time
of each and their ratio (device-capable / host engine: 1.00 means no cost)."""
import argparse
import os
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kvcache import TransferEngine  # noqa: E402
from kvcache.engine import TransferEngine as HostEngine  # noqa: E402

BATCH = 1538


def size_of(text):
    units = {"K": 1 << 10, "M": 1 << 20}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def one(initiator, peer, src, dst, size, order):
    local = src.ctypes.data + np.arange(BATCH, dtype=np.uint64) * size
    remote = dst.ctypes.data + order.astype(np.uint64) * size
    lengths = np.full(BATCH, size, dtype=np.uint64)
    start = time.perf_counter()
    initiator.transfer_sync(peer, "write", local, remote, lengths, timeout_ms=60_000)
    return time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--transports", default="tcp,shm")
    parser.add_argument("--sizes", default="1K,64K")
    parser.add_argument("--repeat", type=int, default=60)
    args = parser.parse_args()
    order = np.random.default_rng(0).permutation(BATCH)
    print(f"batch {BATCH} permuted blocks, write, median of {args.repeat}, 127.0.0.1")
    print(f"{'transport':>9} {'block':>6} {'host engine ms':>15} {'device-capable ms':>18} "
          f"{'ratio':>6}")
    for transport in args.transports.split(","):
        target = HostEngine("target", transport=transport)
        initiators = {"host": HostEngine("host", transport=transport, listen=None),
                      "device": TransferEngine("device", transport=transport, listen=None)}
        try:
            for text in args.sizes.split(","):
                size = size_of(text)
                dst = np.zeros(BATCH * size, np.uint8)
                target_region = target.register_memory(dst.ctypes.data, dst.nbytes)
                src = np.random.default_rng(1).integers(0, 256, BATCH * size, dtype=np.uint8)
                times = {}
                regions = {}
                peers = {}
                for name, engine in initiators.items():
                    regions[name] = engine.register_memory(src.ctypes.data, src.nbytes)
                    peers[name] = engine.connect(target.address, timeout_ms=10_000)
                    one(engine, peers[name], src, dst, size, order)         # warm
                    times[name] = []
                names = list(initiators)
                for i in range(args.repeat):
                    # Each goes first every other round: neither gets the warmer turn.
                    for name in names if i % 2 else names[::-1]:
                        times[name].append(one(initiators[name], peers[name], src, dst, size,
                                               order))
                assert np.array_equal(dst.reshape(BATCH, size)[order],
                                      src.reshape(BATCH, size))
                host, device = (statistics.median(times[n]) * 1e3 for n in ("host", "device"))
                print(f"{transport:>9} {text:>6} {host:>15.3f} {device:>18.3f} "
                      f"{device / host:>6.2f}", flush=True)
                for name, engine in initiators.items():
                    engine.disconnect(peers[name], force=True)
                    engine.unregister_memory(regions[name])
                target.unregister_memory(target_region)
        finally:
            for engine in initiators.values():
                engine.close()
            target.close()


if __name__ == "__main__":
    main()
