"""Paged KV memory for the demo model: which blocks a request owns (its block
table) and the per-layer K/V views of a blocks cache.

Layout, as llm_datadist's blocks caches with ``tensor_num_per_layer=2``: one
cache of ``2 * num_layers`` tensors, tensor ``2L`` the K blocks and ``2L+1``
the V blocks of layer L, each ``[num_blocks, block_tokens, num_kv_heads,
head_dim]``. Block id b is row b of every one of them, so
``push_blocks(..., src_layer_range=range(L, L + 1))`` moves one layer's K
and V blocks of a request in one call."""
from kvcache.checks import integer, invalid
from kvcache.status import LLMException, LLMStatusCode


class BlockAllocator:
    """Free block ids of one blocks cache. ``allocate(n)`` hands out the
    lowest free ids (``highest=True``: the highest), ascending (a block
    table, in token order); ``free(ids)`` returns them. Not thread-safe: one
    owner (a server's request loop) uses it."""

    def __init__(self, num_blocks, highest=False):
        self.num_blocks = integer(num_blocks, "num_blocks", 1)
        self.highest = bool(highest)
        self._free = set(range(self.num_blocks))

    @property
    def free_count(self):
        return len(self._free)

    def allocate(self, n):
        """``n`` block ids, or LLMException(LLM_OUT_OF_MEMORY) when fewer are
        free (nothing is taken then)."""
        n = integer(n, "block count", 0)
        if n > len(self._free):
            raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                               f"{n} blocks asked, {len(self._free)} of {self.num_blocks} "
                               "free (raise num_blocks)")
        free = sorted(self._free)
        ids = free[len(free) - n:] if self.highest else free[:n]
        self._free.difference_update(ids)
        return ids

    def free(self, ids):
        """Return ``ids``; an id that is not allocated is LLM_PARAM_INVALID
        (a double free would hand one block to two requests)."""
        ids = [integer(i, "block id", 0, self.num_blocks - 1) for i in ids]
        if len(set(ids)) != len(ids) or self._free.intersection(ids):
            raise invalid(f"block ids {ids} are not all allocated (double free?)")
        self._free.update(ids)


def layer_views(cache, num_layers):
    """``[(K, V), ...]`` torch views, one pair per layer, of a kvcache host
    blocks cache laid out as the module docstring says (``cache.torch(i)``
    shares the cache's registered memory: what the model writes is what a
    transfer sends)."""
    num_layers = integer(num_layers, "num_layers", 1)
    tensors = cache.cache_desc.num_tensors
    if tensors != 2 * num_layers:
        raise invalid(f"a blocks cache of {tensors} tensors cannot hold K and V of "
                      f"{num_layers} layers (needs {2 * num_layers})")
    return [(cache.torch(2 * i), cache.torch(2 * i + 1)) for i in range(num_layers)]
