"""Transfers as numpy descriptor arrays (local address, remote address,
length): building them from cache layouts, merging runs contiguous on both
sides, and checking every piece against registered regions before anything
moves. The loops run in C (``pyverbs_kv.pieces``): no Python loop per block."""
import numpy as np

from pyverbs_kv import pieces
from pyverbs_kv.pieces import NO_REGION
from kvcache.status import LLMException, LLMStatusCode


def _invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, message)


def merge_runs(local, remote, lengths, *groups):
    """Merge consecutive descriptors contiguous on both sides into one.
    Each array in ``groups`` (at most two, e.g. region ids) must also agree
    for two pieces to merge; they come back reduced alongside."""
    if len(groups) > 2:
        raise ValueError("merge_runs takes at most two group arrays")
    merged = pieces.merge_pieces(local, remote, lengths, *groups)
    return merged[:3 + len(groups)]


def u64_column(values, what):
    """``values`` as a contiguous uint64 array: integers in 0..2**64-1 only
    (a float, a string or a bool is refused, not truncated)."""
    try:
        if isinstance(values, np.ndarray):
            array = values
        else:
            array = np.asarray(list(values) if not np.isscalar(values) else [values])
            if array.dtype == object:
                if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool)
                           for v in array.ravel()):
                    raise TypeError("not integers")
                array = np.array([int(v) for v in array.ravel()], dtype=np.uint64)
    except (TypeError, ValueError, OverflowError) as exc:
        raise _invalid(f"{what} must be integers in 0..2**64-1 ({exc})") from None
    if array.dtype.kind == "i":
        if array.size and array.min() < 0:
            raise _invalid(f"{what} must be integers in 0..2**64-1, got {int(array.min())}")
    elif array.dtype.kind != "u":
        raise _invalid(f"{what} must be integers in 0..2**64-1, got {array.dtype} values")
    return np.ascontiguousarray(array, dtype=np.uint64).ravel()


def as_descriptor_arrays(local_addrs, remote_addrs, lengths):
    """Validated uint64 arrays of equal length, and their byte total.
    LLM_PARAM_INVALID for anything but integers, unequal lengths, a zero
    length or a piece that wraps around the address space."""
    local = u64_column(local_addrs, "local addresses")
    remote = u64_column(remote_addrs, "remote addresses")
    length = u64_column(lengths, "lengths")
    if not (local.size == remote.size == length.size):
        raise _invalid(f"descriptor arrays differ in length: {local.size} local, "
                       f"{remote.size} remote, {length.size} lengths")
    total, zero, wrap = pieces.check_pieces(local, remote, length)
    if zero >= 0:
        raise _invalid(f"descriptor {zero} has length 0")
    if wrap >= 0:
        raise _invalid(f"descriptor {wrap} runs past the end of the address space")
    return local, remote, length, total


def block_descriptors(local_bases, local_block_bytes, local_ids, remote_bases,
                      remote_block_bytes, remote_ids, piece_bytes=None):
    """Descriptors for copying block local_ids[j] of local tensor i to block
    remote_ids[j] of remote tensor i, for every tensor pair i and block j.
    A block is ``piece_bytes`` long (default: the local block size)."""
    piece = int(piece_bytes if piece_bytes is not None else local_block_bytes)
    try:
        return pieces.block_pieces(local_bases, local_block_bytes, local_ids, remote_bases,
                                   remote_block_bytes, remote_ids, piece)
    except ValueError as exc:
        raise _invalid(str(exc)) from None


def checked_block_ids(ids, limit, side, destination):
    """Block ids as int64, each an integer (not a float, string or bool) in
    range; a destination's ids must not repeat (two pieces landing on one
    block). LLM_PARAM_INVALID naming the first bad id."""
    try:
        values = ids if isinstance(ids, np.ndarray) else list(ids)
    except TypeError:
        raise _invalid(f"{side} block ids must be a sequence of integers, got "
                       f"{type(ids).__name__}") from None
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise _invalid(f"{side} block ids must be integers, got {values.dtype} values")
    else:
        for i, v in enumerate(values):
            if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
                raise _invalid(f"{side} block id {v!r} (position {i}) is not an integer")
    try:
        ids = np.asarray(values, dtype=np.int64).ravel()
    except OverflowError:                 # past int64: the C check below cannot see it
        bad = next(int(v) for v in values if not -(1 << 63) <= v < 1 << 63)
        raise _invalid(f"{side} block id {bad} out of range 0..{limit - 1}") from None
    if isinstance(values, np.ndarray) and values.dtype.kind == "u" and values.size \
            and values.max() >= limit:
        raise _invalid(f"{side} block id {int(values.max())} out of range 0..{limit - 1}")
    problem = pieces.check_block_ids(ids, limit, destination)
    if problem is not None:
        i, reason = problem
        if reason == "range":
            raise _invalid(f"{side} block id {int(ids[i])} out of range 0..{limit - 1}")
        raise _invalid(f"destination block ids repeat: {side} block {int(ids[i])} "
                       f"(position {i})")
    return ids


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
        """(region id of every piece, count of misses): NO_REGION where a
        piece is not wholly inside one region."""
        return pieces.region_lookup(self.starts, self.ends, self.ids, addrs, lengths,
                                    NO_REGION)

    def check(self, addrs, lengths, what):
        """Region ids of every piece, or LLM_PARAM_INVALID naming the first
        piece outside the registered regions."""
        ids, misses = self.locate(addrs, lengths)
        if misses:
            bad = np.flatnonzero(ids == NO_REGION)
            i = int(bad[0])
            raise _invalid(f"{what} piece {i} [{int(addrs[i]):#x}, +{int(lengths[i])}) is "
                           f"outside registered memory ({bad.size} such pieces)")
        return ids
