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

Copies between host caches run here (numpy over the tensors' memory); a
copy with a DEVICE cache on either side (llm_datadist's swap between a CPU
cache and an NPU cache, copies within a device cache) runs through the
device runtime: D2H, H2D or D2D copies of contiguous runs of blocks on one
stream, synchronised before the call returns. Device caches are pinned in
the device region table as host caches are in the engine's."""
import contextlib
import ctypes

import numpy as np

from kvcache.cache import CPU_CACHE_ID, Cache
from kvcache.descriptors import checked_block_ids
from kvcache.device.runtime import D2D, D2H, H2D
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


# Copies queued on a stream before it is synchronised (runtimes bound the
# queue; the ACL and CUDA doubles at 1024).
COPY_BATCH = 512
_KINDS = {(Placement.HOST, Placement.DEVICE): H2D, (Placement.DEVICE, Placement.HOST): D2H,
          (Placement.DEVICE, Placement.DEVICE): D2D}


def _on_host(src, dst):
    return (src.cache_desc.placement, dst.cache_desc.placement) == (Placement.HOST,
                                                                   Placement.HOST)


def _runs(src_ids, dst_ids):
    """{src: dst} block pairs -> (src start, dst start, blocks) runs where
    both sides are consecutive, so a run is one copy per tensor."""
    order = np.argsort(src_ids, kind="stable")
    s, d = np.asarray(src_ids)[order], np.asarray(dst_ids)[order]
    cuts = np.flatnonzero((np.diff(s) != 1) | (np.diff(d) != 1)) + 1
    starts = np.concatenate(([0], cuts)).astype(np.int64)
    ends = np.concatenate((cuts, [s.size])).astype(np.int64)
    return s[starts], d[starts], ends - starts


def _device_copies(runtime, pieces):
    """Run (dst, src, bytes, kind) copies on one stream, synchronised every
    COPY_BATCH copies and before returning; on a failure the copies already
    queued are drained before the error is raised (they use the caches)."""
    stream = runtime.stream()
    try:
        for at in range(0, len(pieces), COPY_BATCH):
            for dst, src, nbytes, kind in pieces[at:at + COPY_BATCH]:
                runtime.copy(dst, src, nbytes, kind, stream)
            runtime.synchronize(stream)
    except BaseException:
        with contextlib.suppress(LLMException):
            runtime.synchronize(stream)
        raise
    finally:
        stream.close()


class LocalCopies:
    """The copies of one CacheManager: ``lookup(cache_id)`` is its cache
    table (LLM_KV_CACHE_NOT_EXIST for an unknown id), ``registry`` the
    engine's region registry whose pins keep host caches alive, ``device``
    the DeviceCaches (runtime and device regions) of device caches."""

    def __init__(self, lookup, registry, device):
        self._lookup = lookup
        self._registry = registry
        self._device = device

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
                    if desc.placement == Placement.DEVICE:
                        regions = self._device.regions
                        pinned.append((regions, regions.pin(addrs, lengths, own=cache)))
                    else:
                        pinned.append((self._registry,
                                       self._registry.pin_local(addrs, lengths)[1]))
                except LLMException:
                    raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                       f"cache {cache.cache_id} is being freed") from None
            yield
        finally:
            for table, ids in pinned:
                table.unpin(ids)

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
        if not src_ids.size:
            return
        with self._held(src_cache, dst_cache):
            if _on_host(src_cache, dst_cache):
                _host_block_copy(src_cache, dst_cache, src_ids, dst_ids)
                return
            row = src_cache.cache_desc.row_bytes
            src_starts, dst_starts, counts = _runs(src_ids, dst_ids)
            self._device_copy(src_cache, dst_cache, src_starts * row, dst_starts * row,
                              counts * row,
                              src_cache is dst_cache and bool(np.isin(src_ids, dst_ids).any()))

    def _device_copy(self, src_cache, dst_cache, src_offsets, dst_offsets, lengths, overlap):
        """Copy byte ranges (offsets into every tensor) with the device
        runtime. ``overlap``: the same cache with sources among the
        destinations; the sources then go to scratch device memory first,
        so they are read before any destination is written."""
        runtime = self._device.runtime()
        kind = _KINDS[src_cache.cache_desc.placement, dst_cache.cache_desc.placement]
        pieces = []
        scratch = None
        try:
            if overlap:
                total = int(np.sum(lengths)) * src_cache.cache_desc.num_tensors
                scratch = runtime.alloc(total)
                at, back = scratch.ptr, []
                for src, dst in zip(src_cache.tensor_addrs, dst_cache.tensor_addrs):
                    for s, d, n in zip(src_offsets, dst_offsets, lengths):
                        pieces.append((at, src + int(s), int(n), D2D))
                        back.append((dst + int(d), at, int(n), D2D))
                        at += int(n)
                pieces += back
            else:
                for src, dst in zip(src_cache.tensor_addrs, dst_cache.tensor_addrs):
                    pieces += [(dst + int(d), src + int(s), int(n), kind)
                               for s, d, n in zip(src_offsets, dst_offsets, lengths)]
            _device_copies(runtime, pieces)
        finally:
            if scratch is not None:
                scratch.close()

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
        with self._held(src, dst):
            if _on_host(src, dst):
                _host_row_copy(src, dst, src_batch_index, dst_batch_index, offset, stop)
                return
            row = s.row_bytes
            self._device_copy(src, dst, [src_batch_index * row + offset],
                              [dst_batch_index * row + offset], [stop - offset],
                              src is dst and src_batch_index == dst_batch_index)
