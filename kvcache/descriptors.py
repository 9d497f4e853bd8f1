"""Transfers as numpy descriptor arrays (local address, remote address,
length): building them from cache layouts, merging runs contiguous on both
sides, and checking every piece against registered regions before anything
moves. Vectorised: no Python loop per block."""
import numpy as np

from kvcache.status import LLMException, LLMStatusCode


def _invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, message)


def merge_runs(local, remote, lengths, *groups):
    """Merge consecutive descriptors contiguous on both sides into one.
    Each array in ``groups`` (e.g. region ids) must also agree for two
    pieces to merge; they come back reduced alongside."""
    if len(local) <= 1:
        return (local, remote, lengths) + groups
    joined = ((local[1:] == local[:-1] + lengths[:-1])
              & (remote[1:] == remote[:-1] + lengths[:-1]))
    for group in groups:
        joined &= group[1:] == group[:-1]
    if not joined.any():
        return (local, remote, lengths) + groups
    starts = np.flatnonzero(np.concatenate(([True], ~joined)))
    return ((local[starts], remote[starts], np.add.reduceat(lengths, starts))
            + tuple(group[starts] for group in groups))


def as_descriptor_arrays(local_addrs, remote_addrs, lengths):
    """Validated uint64 arrays of equal length."""
    local = np.ascontiguousarray(local_addrs, dtype=np.uint64).ravel()
    remote = np.ascontiguousarray(remote_addrs, dtype=np.uint64).ravel()
    length = np.ascontiguousarray(lengths, dtype=np.uint64).ravel()
    if not (local.size == remote.size == length.size):
        raise _invalid(f"descriptor arrays differ in length: {local.size} local, "
                       f"{remote.size} remote, {length.size} lengths")
    if local.size and not length.all():
        raise _invalid(f"descriptor {int(np.flatnonzero(length == 0)[0])} has length 0")
    return local, remote, length


def block_descriptors(local_bases, local_block_bytes, local_ids, remote_bases,
                      remote_block_bytes, remote_ids, piece_bytes=None):
    """Descriptors for copying block local_ids[j] of local tensor i to block
    remote_ids[j] of remote tensor i, for every tensor pair i and block j.
    A block is ``piece_bytes`` long (default: the local block size)."""
    local_bases = np.asarray(local_bases, dtype=np.uint64)
    remote_bases = np.asarray(remote_bases, dtype=np.uint64)
    lid = np.asarray(local_ids, dtype=np.int64).ravel()
    rid = np.asarray(remote_ids, dtype=np.int64).ravel()
    if lid.size != rid.size:
        raise _invalid(f"{lid.size} source blocks but {rid.size} destination blocks")
    if local_bases.size != remote_bases.size:
        raise _invalid(f"{local_bases.size} source tensors but {remote_bases.size} "
                       "destination tensors")
    if (lid < 0).any() or (rid < 0).any():
        raise _invalid("block ids must be non-negative")
    piece = int(piece_bytes if piece_bytes is not None else local_block_bytes)
    local = (local_bases[:, None] + lid.astype(np.uint64)[None, :]
             * np.uint64(local_block_bytes)).ravel()
    remote = (remote_bases[:, None] + rid.astype(np.uint64)[None, :]
              * np.uint64(remote_block_bytes)).ravel()
    return local, remote, np.full(local.size, piece, dtype=np.uint64)


class RegionTable:
    """Registered regions [addr, addr + length) with ids, for bounds checks.
    Regions never overlap."""

    def __init__(self, regions=()):
        self.set(regions)

    def set(self, regions):
        """``regions``: iterable of (region_id, addr, length)."""
        items = sorted((int(a), int(n), int(i)) for i, a, n in regions)
        self.starts = np.array([a for a, _, _ in items], dtype=np.uint64)
        self.ends = np.array([a + n for a, n, _ in items], dtype=np.uint64)
        self.ids = np.array([i for _, _, i in items], dtype=np.uint64)
        if len(items) > 1 and (self.starts[1:] < self.ends[:-1]).any():
            raise _invalid("registered regions overlap")

    def __len__(self):
        return int(self.starts.size)

    def as_list(self):
        return [(int(i), int(s), int(e - s)) for i, s, e in zip(self.ids, self.starts,
                                                                 self.ends)]

    def locate(self, addrs, lengths):
        """Region id of every piece; -1 (as uint64 max) where a piece is not
        wholly inside one region."""
        addrs = np.asarray(addrs, dtype=np.uint64)
        lengths = np.asarray(lengths, dtype=np.uint64)
        if self.starts.size == 0:
            return np.full(addrs.size, np.iinfo(np.uint64).max, dtype=np.uint64)
        index = np.searchsorted(self.starts, addrs, side="right").astype(np.int64) - 1
        safe = np.maximum(index, 0)
        ends = addrs + lengths
        inside = (index >= 0) & (ends <= self.ends[safe]) & (ends >= addrs)
        return np.where(inside, self.ids[safe], np.iinfo(np.uint64).max)

    def check(self, addrs, lengths, what):
        """Region ids of every piece, or LLM_PARAM_INVALID naming the first
        piece outside the registered regions."""
        ids = self.locate(addrs, lengths)
        bad = np.flatnonzero(ids == np.iinfo(np.uint64).max)
        if bad.size:
            i = int(bad[0])
            raise _invalid(f"{what} piece {i} [{int(addrs[i]):#x}, +{int(lengths[i])}) is "
                           f"outside registered memory ({bad.size} such pieces)")
        return ids
