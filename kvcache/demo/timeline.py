"""When each layer of a prefill was computed and sent, and how much of the
sending hid behind the compute.

``LayerClock`` is the LayerSynchronizer a prefill hands transfer_cache_async:
the model's per-layer hook marks layer L computed, and the task's worker,
asking for layer L, learns it may send it. The worker asks for L + 1 right
after layer L's write and its notice to the decoder completed, so the asks
time every layer's send without reaching into the transfer."""
import threading
import time

from kvcache.layerwise import LayerSynchronizer


class LayerClock(LayerSynchronizer):
    """Per layer: ``ready_at`` (the hook ran), ``send_start`` (the worker
    was let go), ``send_end`` (the worker asked for the next layer, or
    ``finish`` for the last); time.monotonic() seconds. ``abort()`` makes
    every later ask answer False (the task then fails with LLM_TIMEOUT at
    once instead of at its deadline)."""

    def __init__(self, num_layers):
        self.num_layers = num_layers
        self._ready = [threading.Event() for _ in range(num_layers)]
        self._aborted = False
        self.ready_at = [None] * num_layers
        self.send_start = [None] * num_layers
        self.send_end = [None] * num_layers

    def layer_done(self, layer, block_ids=None):
        """The model's ``on_layer`` hook: layer ``layer``'s K/V are in place."""
        self.ready_at[layer] = time.monotonic()
        self._ready[layer].set()

    def abort(self):
        self._aborted = True
        for event in self._ready:
            event.set()

    def synchronize_layer(self, layer_index, timeout_in_millis):
        asked = time.monotonic()
        if layer_index > 0 and self.send_start[layer_index - 1] is not None:
            self.send_end[layer_index - 1] = asked
        ready = self._ready[layer_index].wait(timeout_in_millis / 1000) and not self._aborted
        if ready:
            self.send_start[layer_index] = time.monotonic()
        return ready

    def finish(self, done_at):
        """The task ended at ``done_at``: the last layer's send ended then."""
        last = self.num_layers - 1
        if self.send_start[last] is not None:
            self.send_end[last] = done_at

    def summary(self, compute_start, compute_end, done_at, nbytes):
        """Milliseconds from ``compute_start``: ``compute_ms`` (the forward
        pass), ``send_ms`` (the layers' sends added up), ``hidden_ms`` (send
        time inside the forward pass), ``tail_ms`` (from the end of the
        forward pass to the last layer's notice), ``hidden_pct``,
        ``gbps`` (``nbytes`` over send_ms, 1e9 bytes/s), and per layer
        ``[ready, send start, send end]``."""
        spans = [(s, e) for s, e in zip(self.send_start, self.send_end)
                 if s is not None and e is not None]
        send_s = sum(e - s for s, e in spans)
        hidden_s = sum(max(0.0, min(e, compute_end) - max(s, compute_start)) for s, e in spans)

        def ms(t):
            return None if t is None else round(1000 * (t - compute_start), 3)

        return {
            "compute_ms": round(1000 * (compute_end - compute_start), 3),
            "send_ms": round(1000 * send_s, 3),
            "hidden_ms": round(1000 * hidden_s, 3),
            "tail_ms": round(1000 * max(0.0, done_at - compute_end), 3),
            "hidden_pct": round(100 * hidden_s / send_s, 1) if send_s else 0.0,
            "gbps": round(nbytes / send_s / 1e9, 4) if send_s else 0.0,
            "layers_ms": [[ms(r), ms(s), ms(e)] for r, s, e in
                          zip(self.ready_at, self.send_start, self.send_end)],
        }
