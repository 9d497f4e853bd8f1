"""Peer processes for the layer-wise tests: a prefill that "computes"
layers one by one (a thread sleeping, then writing each layer) while
transfer_cache_async pushes them, and a decoder that records when each
layer's notification arrives and what its memory held at that moment."""
import threading
import time

import numpy as np

from kv_peer import Actions, PeerProcess
from kvcache import (BlocksCacheKey, CacheKeyByIdAndIndex, LayerSynchronizer, LLMException,
                     LLMStatusCode, TransferConfig, TransferWithCacheKeyConfig)


def layer_bytes(seed, tensor, nbytes):
    """The bytes the prefill computes for a tensor (cheap, distinct per
    seed and tensor)."""
    words = (np.arange(nbytes // 4, dtype=np.uint32) * np.uint32(2654435761)
             + np.uint32(seed * 7919 + tensor * 104729 + 1))
    return words.view(np.uint8)


class Compute(LayerSynchronizer):
    """A prefill's forward pass: layer i is written ``delay_s`` after layer
    i - 1, then reported ready. ``never``: a layer that is never ready."""

    def __init__(self, cache, layers, delay_s, seed, never=None):
        self.cache, self.layers, self.delay_s, self.seed = cache, layers, delay_s, seed
        self.never = never
        self.ready = [threading.Event() for _ in range(layers)]
        self.ready_at = [None] * layers
        self.asked = []

    def run(self):
        tensors = self.cache.tensors()
        for layer in range(self.layers):
            time.sleep(self.delay_s)
            if layer == self.never:
                return
            for t in (2 * layer, 2 * layer + 1):
                view = tensors[t].view(np.uint8).reshape(-1)
                view[:] = layer_bytes(self.seed, t, view.size)
            self.ready_at[layer] = time.monotonic()
            self.ready[layer].set()

    def synchronize_layer(self, layer_index, timeout_in_millis):
        self.asked.append((layer_index, timeout_in_millis))
        return self.ready[layer_index].wait(timeout_in_millis / 1000)


class AllReady(LayerSynchronizer):
    """Every layer computed already."""

    def synchronize_layer(self, layer_index, timeout_in_millis):
        return True


class LayerwiseActions(Actions):
    def __init__(self, *args):
        super().__init__(*args)
        self.tasks = {}

    def zero(self, cache_id):
        for tensor in self.caches[cache_id].tensors():
            tensor.view(np.uint8)[...] = 0

    def start_push(self, name, cache_id, dst_cluster, layers, delay_s, seed, src_blocks,
                   dst_blocks, transfer_id, never=None, raw_addrs=None):
        """Start computing ``layers`` layers and pushing each as it is ready
        (into the decoder's blocks cache, or to ``raw_addrs`` with a
        TransferConfig). Returns the start time."""
        cache = self.caches[cache_id]
        compute = Compute(cache, layers, delay_s, seed, never)
        if raw_addrs is None:
            configs = [TransferWithCacheKeyConfig(BlocksCacheKey(dst_cluster), range(layers),
                                                  range(layers))]
        else:
            configs = [TransferConfig(dst_cluster, raw_addrs)]
        started = time.monotonic()
        task = self.dd.cache_manager.transfer_cache_async(
            cache, compute, configs, src_blocks, dst_blocks, transfer_id=transfer_id)
        done = {}

        def wait():
            done["code"] = task.synchronize()
            done["at"] = time.monotonic()
        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        threading.Thread(target=compute.run, daemon=True).start()
        self.tasks[name] = (task, compute, waiter, done)
        return started

    def push_ready(self, cache_id, dst_cluster, layers, src_blocks, dst_blocks, transfer_id):
        """Push layers that are all computed already (compute, then
        transfer); returns the seconds the transfer took."""
        started = time.monotonic()
        task = self.dd.cache_manager.transfer_cache_async(
            self.caches[cache_id], AllReady(),
            [TransferWithCacheKeyConfig(BlocksCacheKey(dst_cluster), range(layers),
                                        range(layers))],
            src_blocks, dst_blocks, transfer_id=transfer_id)
        assert task.synchronize(30_000) == LLMStatusCode.LLM_SUCCESS
        return time.monotonic() - started

    def task_result(self, name, timeout_s=30):
        """(synchronize's code, get_results, layer ready times, done time,
        what the synchronizer was asked)."""
        task, compute, waiter, done = self.tasks.pop(name)
        waiter.join(timeout_s)
        if waiter.is_alive():
            raise TimeoutError(f"task {name} still running after {timeout_s} s")
        return (int(done["code"]), [None if r is None else int(r) for r in task.get_results()],
                compute.ready_at, done["at"], compute.asked)

    def try_transfer(self, cache_id, config, src_blocks=None, dst_blocks=None,
                     dst_block_memory_size=None):
        """A transfer_cache_async expected to be refused before it starts."""
        kind, *args = config
        if kind == "raw":
            config = TransferConfig(*args)
        elif kind == "blocks":
            config = TransferWithCacheKeyConfig(BlocksCacheKey(args[0], args[1]), *args[2:])
        else:
            config = TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(*args[0]), *args[1:])
        task = self.dd.cache_manager.transfer_cache_async(
            self.caches[cache_id], AllReady(), [config], src_blocks, dst_blocks,
            dst_block_memory_size)
        return int(task.synchronize(30_000))

    def watch(self, transfer_id, layers, cache_id, dst_blocks, timeout_ms):
        """Wait for each layer's notification; at each, note the time and
        copy what the destination blocks of that layer hold right then.
        Returns (arrival times, snapshots, final arrival time)."""
        tensors = self.caches[cache_id].tensors()
        arrived, snapshots = [], []
        for layer in range(layers):
            self.dd.cache_manager.wait_layers(transfer_id, layer, timeout_ms)
            arrived.append(time.monotonic())
            snapshots.append([tensors[t].view(np.uint8).reshape(tensors[t].shape[0], -1)
                              [dst_blocks].copy() for t in (2 * layer, 2 * layer + 1)])
        final = self.dd.cache_manager.wait_layers(transfer_id, None, timeout_ms)
        return arrived, snapshots, time.monotonic(), final.layers

    def wait_final(self, transfer_id, timeout_ms):
        """Wait for a whole transfer: its layers, or LLMException."""
        started = time.monotonic()
        try:
            return "ok", self.dd.cache_manager.wait_layers(transfer_id, None, timeout_ms).layers
        except LLMException as exc:
            return int(exc.status_code), time.monotonic() - started

    def cache_addrs(self, cache_id):
        return list(self.caches[cache_id].tensor_addrs)


class LayerwisePeer(PeerProcess):
    """A PeerProcess running LayerwiseActions."""
    actions = LayerwiseActions
