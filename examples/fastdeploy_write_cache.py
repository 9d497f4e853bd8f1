"""FastDeploy's RDMACommunicator, from kvcache: a prefill process writes its
KV blocks into a decode process layer by layer, as FastDeploy's cache
messager does, and the decoder checks every byte.

    python examples/fastdeploy_write_cache.py [--transport auto|tcp|shm|rdma]

The only change from FastDeploy is the import line."""
import multiprocessing as mp

import numpy as np

from common import parse_args, receive, start_process
from kvcache.compat.fastdeploy import RDMACommunicator    # was: from rdma_comm import ...

LAYERS, BLOCKS = 8, 64
BLOCK_SHAPE = (2, 64, 128)                  # kv heads x tokens per block x head dim, fp16
BLOCK_BYTES = int(np.prod(BLOCK_SHAPE)) * 2
SRC_BLOCKS, DST_BLOCKS = [3, 4, 5, 17, 40], [10, 11, 12, 0, 63]


def caches(fill):
    """One key and one value cache per layer, [blocks, heads, tokens, dim]."""
    made = []
    for layer in range(2 * LAYERS):
        cache = np.zeros((BLOCKS,) + BLOCK_SHAPE, dtype=np.float16)
        if fill:
            cache[...] = (np.arange(BLOCKS) * 2 * LAYERS + layer).reshape(-1, 1, 1, 1)
        made.append(cache)
    return made[:LAYERS], made[LAYERS:]


def decoder(ports, done, results, transport):
    keys, values = caches(fill=False)
    comm = RDMACommunicator("decode", 0, "0", [k.ctypes.data for k in keys],
                            [v.ctypes.data for v in values], BLOCKS, BLOCK_BYTES,
                            transport=transport, host="127.0.0.1")
    ports.put(comm.port)
    done.wait()
    results.put([(k.copy(), v.copy()) for k, v in zip(keys, values)])
    comm.close()


def main():
    args = parse_args(__doc__, lambda parser: parser.add_argument(
        "--transport", default="auto", choices=["auto", "tcp", "shm", "rdma"]))
    ctx = mp.get_context("spawn")
    ports, done, results = ctx.Queue(), ctx.Event(), ctx.Queue()
    process = start_process(decoder, ports, done, results, args.transport)
    port = str(receive(ports, process))

    keys, values = caches(fill=True)
    comm = RDMACommunicator("prefill", 0, "0", [k.ctypes.data for k in keys],
                            [v.ctypes.data for v in values], BLOCKS, BLOCK_BYTES,
                            transport=args.transport)
    if comm.connect("127.0.0.1", port) != 0:
        raise SystemExit("connect failed")
    for layer in range(LAYERS):
        ret = comm.write_cache("127.0.0.1", port, SRC_BLOCKS, DST_BLOCKS, layer)
        if ret != 0:
            raise SystemExit(f"write_cache of layer {layer} failed: {ret}")
    done.set()
    got = receive(results, process)
    for layer, (key, value) in enumerate(got):
        assert np.array_equal(key[DST_BLOCKS], keys[layer][SRC_BLOCKS]), layer
        assert np.array_equal(value[DST_BLOCKS], values[layer][SRC_BLOCKS]), layer
        untouched = np.setdiff1d(np.arange(BLOCKS), DST_BLOCKS)
        assert not key[untouched].any() and not value[untouched].any(), layer
    print(f"OK: {LAYERS} layers x {len(SRC_BLOCKS)} blocks of {BLOCK_BYTES} bytes (key and "
          f"value) written over {comm.transport}, every byte checked")
    comm.close()
    process.join(60)


if __name__ == "__main__":
    main()
