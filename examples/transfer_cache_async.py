"""Layer-wise transfer: the prefill pushes each layer of a request's cache
into the decoder as soon as its forward pass has computed it
(transfer_cache_async with a LayerSynchronizer); the decoder waits for each
layer's notification and starts on the layers it already has.

    python examples/transfer_cache_async.py
"""
import threading
import time

import numpy as np

from common import expected, finish, link, parse_args, spawn, start
from kvcache import (CacheDesc, DataType, LayerSynchronizer, LLMRole, LLMStatusCode,
                     TransferConfig)

LAYERS, SEQ_ELEMS, LAYER_MS = 8, 1 << 20, 40
DESC = CacheDesc(2 * LAYERS, DataType.DT_FLOAT16, [1, SEQ_ELEMS])     # K, V per layer
REQ_ID = 1001


def decoder(addresses, done):
    dd = start(LLMRole.DECODER, 2, "127.0.0.1:0")
    cache = dd.cache_manager.allocate_cache(DESC)
    addresses.put((dd.listen_address, cache.tensor_addrs))
    tensors = cache.tensors()
    for layer in range(LAYERS):
        dd.cache_manager.wait_layers(REQ_ID, layer, timeout_in_millis=10_000)
        arrived = time.monotonic()
        if layer == 0:
            first = arrived
        for t in (2 * layer, 2 * layer + 1):     # the bytes are in place when told
            want = expected(REQ_ID, t, DESC.shape, np.float16)
            assert np.array_equal(tensors[t].view(np.uint16), want.view(np.uint16)), t
        print(f"decoder: layer {layer} arrived, +{1000 * (arrived - first):.0f} ms")
    dd.cache_manager.wait_layers(REQ_ID, timeout_in_millis=10_000)     # the final one
    done.wait(60)
    dd.finalize()


class ForwardPass(LayerSynchronizer):
    """Stands in for the model: a thread computes one layer every LAYER_MS
    into the prefill's cache; synchronize_layer waits for that layer."""

    def __init__(self, cache):
        self.cache = cache
        self.ready = [threading.Event() for _ in range(LAYERS)]

    def run(self):
        tensors = self.cache.tensors()
        for layer in range(LAYERS):
            time.sleep(LAYER_MS / 1000)
            for t in (2 * layer, 2 * layer + 1):
                tensors[t][...] = expected(REQ_ID, t, DESC.shape, np.float16)
            self.ready[layer].set()

    def synchronize_layer(self, layer_index, timeout_in_millis):
        return self.ready[layer_index].wait(timeout_in_millis / 1000)


def main():
    parse_args(__doc__)
    process, (address, decoder_addrs), done = spawn(decoder)
    dd = start(LLMRole.PROMPT, 1)
    link(dd, 2, address)
    cache = dd.cache_manager.allocate_cache(DESC)
    forward = ForwardPass(cache)
    # One destination address per tensor of the layers sent (2 per layer).
    config = TransferConfig(dst_cluster_id=2, dst_addrs=decoder_addrs)
    started = time.monotonic()
    task = dd.cache_manager.transfer_cache_async(cache, forward, [config], transfer_id=REQ_ID)
    forward.run()                          # the forward pass, while layers go out
    computed_ms = 1000 * (time.monotonic() - started)
    status = task.synchronize(timeout_in_millis=10_000)
    total_ms = 1000 * (time.monotonic() - started)
    assert status == LLMStatusCode.LLM_SUCCESS, status
    assert task.get_results() == [LLMStatusCode.LLM_SUCCESS]
    finish(process, done)
    dd.finalize()
    print(f"OK: {LAYERS} layers of {2 * DESC.tensor_bytes >> 20} MiB pushed as computed; "
          f"compute {computed_ms:.0f} ms, compute + transfer {total_ms:.0f} ms")


if __name__ == "__main__":
    main()
