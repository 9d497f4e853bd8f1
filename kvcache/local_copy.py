"""Copies between caches of one process (llm_datadist's swap_blocks,
copy_blocks and copy_cache).

Every copy is checked whole before a byte moves: block ids and batch rows in
range, matching layouts, destinations that do not repeat. The caches of this
CacheManager are pinned (their regions, as a transfer pins them) for the
length of the copy, so freeing one waits for it; a CPU cache
(``Cache.create_cpu_cache``) is the caller's memory and is checked to be
mapped right before the copy. The sources of a copy are read before any
destination is written, so maps whose sources and destinations overlap copy
what the sources held when the call began.

Copies between host caches run here (numpy over the tensors' memory); the
copier is chosen per (source placement, destination placement), which is
where a device copy will slot in."""
import contextlib
import ctypes

import numpy as np

from kvcache.cache import CPU_CACHE_ID, Cache
from kvcache.descriptors import checked_block_ids
from kvcache.engine.regions import check_host_mapped
from kvcache.status import LLMException, LLMStatusCode
from kvcache.values import Placement


def _invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, message)


def _cache(cache, what, blocks):
    """``cache`` is a Cache of the wanted kind (``blocks``: a blocks cache)."""
    if not isinstance(cache, Cache):
        raise _invalid(f"{what} must be a Cache, got {type(cache).__name__}")
    if blocks and cache.kind != "blocks":
        raise _invalid(f"{what} must be a blocks cache, got a per-request cache")
    if not blocks and cache.kind == "blocks":
        raise _invalid(f"{what} cannot be a blocks cache (copy_blocks or swap_blocks copy "
                       "blocks)")
    return cache


def _rows(cache, index):
    """Tensor ``index`` as bytes, one row per block (or batch row)."""
    desc = cache.cache_desc
    raw = (ctypes.c_uint8 * desc.tensor_bytes).from_address(cache.tensor_addrs[index])
    return np.frombuffer(raw, dtype=np.uint8).reshape(desc.shape[0], desc.row_bytes)


def _host_block_copy(src, dst, src_ids, dst_ids):
    for i in range(src.cache_desc.num_tensors):
        # The gather makes a copy first: sources are read before any write.
        _rows(dst, i)[dst_ids] = _rows(src, i)[src_ids]


def _host_row_copy(src, dst, src_row, dst_row, start, stop):
    for i in range(src.cache_desc.num_tensors):
        _rows(dst, i)[dst_row, start:stop] = _rows(src, i)[src_row, start:stop]


def _placements(src, dst):
    """LLM_FEATURE_NOT_ENABLED unless both caches are host memory (the only
    copier there is yet)."""
    pair = (src.cache_desc.placement, dst.cache_desc.placement)
    if pair != (Placement.HOST, Placement.HOST):
        raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED,
                           f"local copy {pair[0].name} -> {pair[1].name}: only host caches "
                           "can be copied here yet")


class LocalCopies:
    """The copies of one CacheManager: ``lookup(cache_id)`` is its cache
    table (LLM_KV_CACHE_NOT_EXIST for an unknown id), ``registry`` the
    engine's region registry whose pins keep caches alive."""

    def __init__(self, lookup, registry):
        self._lookup = lookup
        self._registry = registry

    @contextlib.contextmanager
    def _held(self, *caches):
        """Pin the managed caches among ``caches`` (and check CPU caches are
        mapped) until the block ends."""
        pinned = []
        try:
            for cache in {id(c): c for c in caches}.values():
                desc = cache.cache_desc
                if cache.cache_id == CPU_CACHE_ID:
                    for addr in cache.tensor_addrs:
                        check_host_mapped(addr, desc.tensor_bytes)
                    continue
                if self._lookup(cache.cache_id) is not cache:
                    raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                       f"cache {cache.cache_id} is not a cache of this "
                                       "cache manager")
                addrs = np.asarray(cache.tensor_addrs, dtype=np.uint64)
                lengths = np.full(addrs.size, desc.tensor_bytes, dtype=np.uint64)
                try:
                    pinned.append(self._registry.pin_local(addrs, lengths)[1])
                except LLMException:
                    raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                       f"cache {cache.cache_id} is being freed") from None
            yield
        finally:
            for ids in pinned:
                self._registry.unpin(ids)

    def swap_blocks(self, src_cache, dst_cache, src_to_dst):
        """Copy block s of ``src_cache`` to block d of ``dst_cache`` for each
        {s: d} of ``src_to_dst`` (every tensor). Both blocks caches of the
        same tensor count and block size; LLM_PARAM_INVALID otherwise, for
        ids out of range and for a destination named twice."""
        _cache(src_cache, "src_cache", True)
        _cache(dst_cache, "dst_cache", True)
        src, dst = src_cache.cache_desc, dst_cache.cache_desc
        if src.num_tensors != dst.num_tensors:
            raise _invalid(f"src_cache has {src.num_tensors} tensors, dst_cache "
                           f"{dst.num_tensors}")
        if src.row_bytes != dst.row_bytes:
            raise _invalid(f"block sizes differ: src_cache {src.row_bytes} bytes, dst_cache "
                           f"{dst.row_bytes} bytes")
        if not isinstance(src_to_dst, dict):
            raise _invalid(f"src_to_dst must be a dict {{src block: dst block}}, got "
                           f"{type(src_to_dst).__name__}")
        src_ids = checked_block_ids(list(src_to_dst.keys()), src.shape[0], "src", False)
        dst_ids = checked_block_ids(list(src_to_dst.values()), dst.shape[0], "dst", True)
        self._blocks(src_cache, dst_cache, src_ids, dst_ids)

    def copy_blocks(self, cache, copy_block_info):
        """Within one blocks cache: copy block s to each block of the list
        ``copy_block_info[s]``. LLM_PARAM_INVALID for ids out of range and
        for a destination named twice."""
        _cache(cache, "cache", True)
        if not isinstance(copy_block_info, dict):
            raise _invalid(f"copy_block_info must be a dict {{src block: [dst blocks]}}, got "
                           f"{type(copy_block_info).__name__}")
        sources, targets = [], []
        for src, dsts in copy_block_info.items():
            if not isinstance(dsts, (list, tuple)):
                raise _invalid(f"copy_block_info[{src!r}] must be a list of block ids, got "
                               f"{type(dsts).__name__}")
            sources += [src] * len(dsts)
            targets += list(dsts)
        blocks = cache.cache_desc.shape[0]
        src_ids = checked_block_ids(sources, blocks, "src", False)
        dst_ids = checked_block_ids(targets, blocks, "dst", True)
        self._blocks(cache, cache, src_ids, dst_ids)

    def _blocks(self, src_cache, dst_cache, src_ids, dst_ids):
        _placements(src_cache, dst_cache)
        if not src_ids.size:
            return
        with self._held(src_cache, dst_cache):
            _host_block_copy(src_cache, dst_cache, src_ids, dst_ids)

    def copy_cache(self, dst, src, dst_batch_index=0, src_batch_index=0, offset=0, size=-1,
                   req_id=None):
        """Copy ``size`` bytes (-1: to the end of the row) from ``offset``
        (bytes into the batch row) of row ``src_batch_index`` of every
        tensor of ``src`` to the same place in row ``dst_batch_index`` of
        ``dst``. Per-request caches with the same tensor count, data type
        and row size; LLM_PARAM_INVALID otherwise or for rows and bytes out
        of range. ``req_id`` only names the call in logs."""
        _cache(dst, "dst", False)
        _cache(src, "src", False)
        s, d = src.cache_desc, dst.cache_desc
        if (s.num_tensors, s.data_type, s.row_bytes) != (d.num_tensors, d.data_type,
                                                         d.row_bytes):
            raise _invalid(f"src and dst caches do not match: {s.num_tensors} x "
                           f"{s.data_type.name} rows of {s.row_bytes} bytes vs "
                           f"{d.num_tensors} x {d.data_type.name} rows of {d.row_bytes} bytes")
        for what, row, desc in (("src_batch_index", src_batch_index, s),
                                ("dst_batch_index", dst_batch_index, d)):
            if isinstance(row, bool) or not isinstance(row, int) or not \
                    0 <= row < desc.shape[0]:
                raise _invalid(f"{what} {row!r} out of range 0..{desc.shape[0] - 1}")
        if isinstance(offset, bool) or not isinstance(offset, int) or not \
                0 <= offset < s.row_bytes:
            raise _invalid(f"offset {offset!r} out of range 0..{s.row_bytes - 1} bytes")
        if isinstance(size, bool) or not isinstance(size, int) or not (size == -1 or size > 0):
            raise _invalid(f"size must be -1 or a positive number of bytes, got {size!r}")
        stop = s.row_bytes if size == -1 else offset + size
        if stop > s.row_bytes:
            raise _invalid(f"offset {offset} + size {size} is past the row of {s.row_bytes} "
                           "bytes")
        if req_id is not None and (isinstance(req_id, bool) or not isinstance(req_id, int)):
            raise _invalid(f"req_id must be an int or None, got {req_id!r}")
        _placements(src, dst)
        with self._held(src, dst):
            _host_row_copy(src, dst, src_batch_index, dst_batch_index, offset, stop)
