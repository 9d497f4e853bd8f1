"""Kernels over piece descriptor arrays (address, address, length), the
per-transfer work every transport does before it moves a byte: building
the pieces of a block copy, finding the registered region of each piece,
merging runs contiguous on both sides.

One pass in C with the GIL released, no temporaries: a 1538-block 32-layer
transfer is about 98k pieces, and numpy's one-temporary-per-step spelling
of the same work costs milliseconds. Needs no RDMA library.

Outputs of 64 KiB and more come from a small cache of recycled buffers:
a fresh 800 KB array costs ~200 page faults on first touch, several times
the work of filling it, and every transfer needs a few."""
import numpy as np

from cpython.buffer cimport PyBUF_FORMAT
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport calloc, free, malloc

NO_REGION = np.iinfo(np.uint64).max

DEF RECYCLE_MIN_BYTES = 65536
DEF RECYCLE_KEEP_PER_SIZE = 8
DEF RECYCLE_KEEP_BYTES = 128 << 20

# size class -> list of free blocks (as integers); freed blocks stay mapped
# and faulted in, up to RECYCLE_KEEP_BYTES in all.
cdef dict _free_blocks = {}
cdef Py_ssize_t _kept_bytes = 0


cdef class _Block:
    """A malloc'd buffer that numpy arrays view; back to the cache when the
    last view is gone (the GIL serialises both ends)."""
    cdef char *ptr
    cdef Py_ssize_t nbytes
    cdef Py_ssize_t shape[1]
    cdef Py_ssize_t strides[1]

    def __getbuffer__(self, Py_buffer *view, int flags):
        self.shape[0] = self.nbytes
        self.strides[0] = 1
        view.buf = self.ptr
        view.obj = self
        view.len = self.nbytes
        view.readonly = 0
        view.itemsize = 1
        view.format = NULL
        if flags & PyBUF_FORMAT:
            view.format = b"B"
        view.ndim = 1
        view.shape = self.shape
        view.strides = self.strides
        view.suboffsets = NULL
        view.internal = NULL

    def __releasebuffer__(self, Py_buffer *view):
        pass

    def __dealloc__(self):
        global _kept_bytes
        if self.ptr == NULL:
            return
        if _free_blocks is None:            # the module is being torn down
            free(self.ptr)
            return
        free_list = _free_blocks.setdefault(self.nbytes, [])
        if len(free_list) < RECYCLE_KEEP_PER_SIZE and \
                _kept_bytes + self.nbytes <= RECYCLE_KEEP_BYTES:
            free_list.append(<size_t>self.ptr)
            _kept_bytes += self.nbytes
        else:
            free(self.ptr)
        self.ptr = NULL


def _empty_u64(Py_ssize_t count):
    """An uninitialised uint64 array, recycled when large."""
    global _kept_bytes
    cdef Py_ssize_t need = count * 8, size = RECYCLE_MIN_BYTES
    if need < RECYCLE_MIN_BYTES:
        return np.empty(count, dtype=np.uint64)
    while size < need:
        size <<= 1
    cdef _Block block = _Block.__new__(_Block)
    free_list = _free_blocks.get(size)
    if free_list:
        block.ptr = <char *><size_t>free_list.pop()
        _kept_bytes -= size
    else:
        block.ptr = <char *>malloc(size)
        if block.ptr == NULL:
            raise MemoryError(f"{size} bytes for a descriptor array")
    block.nbytes = size
    return np.frombuffer(block, dtype=np.uint64, count=count)


# Contiguous 1-D arrays of the kernels' types (no copy when they already are).
def _u64(values):
    return np.ascontiguousarray(values, dtype=np.uint64).ravel()


def _i64(values):
    return np.ascontiguousarray(values, dtype=np.int64).ravel()


def block_pieces(local_bases, uint64_t local_block_bytes, local_ids, remote_bases,
                 uint64_t remote_block_bytes, remote_ids, uint64_t piece_bytes):
    """Pieces copying block local_ids[j] of local tensor i to block
    remote_ids[j] of remote tensor i, tensor-major. ValueError for a
    negative block id or mismatched counts."""
    lb, rb = _u64(local_bases), _u64(remote_bases)
    li, ri = _i64(local_ids), _i64(remote_ids)
    if li.shape[0] != ri.shape[0]:
        raise ValueError(f"{li.shape[0]} source blocks but {ri.shape[0]} destination blocks")
    if lb.shape[0] != rb.shape[0]:
        raise ValueError(f"{lb.shape[0]} source tensors but {rb.shape[0]} destination tensors")
    cdef const uint64_t[::1] lbv = lb
    cdef const uint64_t[::1] rbv = rb
    cdef const int64_t[::1] liv = li
    cdef const int64_t[::1] riv = ri
    cdef Py_ssize_t tensors = lbv.shape[0], blocks = liv.shape[0], t, j, k
    cdef Py_ssize_t bad = -1
    local = _empty_u64(tensors * blocks)
    remote = _empty_u64(tensors * blocks)
    lengths = _empty_u64(tensors * blocks)
    cdef uint64_t[::1] lv = local
    cdef uint64_t[::1] rv = remote
    cdef uint64_t[::1] nv = lengths
    cdef uint64_t lbase, rbase
    with nogil:
        for j in range(blocks):
            if liv[j] < 0 or riv[j] < 0:
                bad = j
                break
        if bad < 0:
            k = 0
            for t in range(tensors):
                lbase = lbv[t]
                rbase = rbv[t]
                for j in range(blocks):
                    lv[k] = lbase + <uint64_t>liv[j] * local_block_bytes
                    rv[k] = rbase + <uint64_t>riv[j] * remote_block_bytes
                    nv[k] = piece_bytes
                    k += 1
    if bad >= 0:
        raise ValueError(f"block ids must be non-negative (pair {bad}: {li[bad]} -> {ri[bad]})")
    return local, remote, lengths


def region_lookup(starts, ends, values, addrs, lengths, uint64_t missing):
    """For each piece [addrs[i], addrs[i] + lengths[i]), values[r] of the
    region r = [starts[r], ends[r]) wholly holding it, else ``missing``.
    ``starts`` sorted, regions disjoint. Returns (out, count of misses).
    Consecutive pieces mostly share a region, so the last hit is tried
    before a binary search."""
    s, e, v = _u64(starts), _u64(ends), _u64(values)
    a, n = _u64(addrs), _u64(lengths)
    if not (s.shape[0] == e.shape[0] == v.shape[0]):
        raise ValueError("region arrays differ in length")
    if a.shape[0] != n.shape[0]:
        raise ValueError(f"{a.shape[0]} addresses but {n.shape[0]} lengths")
    out = _empty_u64(a.shape[0])
    cdef const uint64_t[::1] sv = s
    cdef const uint64_t[::1] ev = e
    cdef const uint64_t[::1] vv = v
    cdef const uint64_t[::1] av = a
    cdef const uint64_t[::1] nv = n
    cdef uint64_t[::1] ov = out
    cdef Py_ssize_t count = av.shape[0], regions = sv.shape[0], i, lo, hi, mid, last = -1
    cdef Py_ssize_t misses = 0
    cdef uint64_t addr, end
    with nogil:
        for i in range(count):
            addr = av[i]
            end = addr + nv[i]
            if end < addr:                      # wraps: never inside anything
                ov[i] = missing
                misses += 1
                continue
            if not (last >= 0 and sv[last] <= addr < ev[last]):
                lo, hi = 0, regions             # last start <= addr, by bisection
                while lo < hi:
                    mid = (lo + hi) >> 1
                    if sv[mid] <= addr:
                        lo = mid + 1
                    else:
                        hi = mid
                last = lo - 1
            if last >= 0 and end <= ev[last]:
                ov[i] = vv[last]
            else:
                ov[i] = missing
                misses += 1
    return out, misses


def merge_pieces(local, remote, lengths, group_a=None, group_b=None):
    """Merge consecutive pieces contiguous on both sides (and equal in the
    optional group arrays, e.g. region ids) into one. Returns the arrays
    reduced, groups included (None stays None); the inputs are returned as
    they are when nothing merges."""
    l, r, n = _u64(local), _u64(remote), _u64(lengths)
    cdef Py_ssize_t count = l.shape[0], i, k
    if r.shape[0] != count or n.shape[0] != count:
        raise ValueError("descriptor arrays differ in length")
    ga = None if group_a is None else _u64(group_a)
    gb = None if group_b is None else _u64(group_b)
    for g in (ga, gb):
        if g is not None and g.shape[0] != count:
            raise ValueError("group arrays differ in length from the descriptors")
    cdef bint has_a = ga is not None, has_b = gb is not None
    cdef const uint64_t[::1] lv = l
    cdef const uint64_t[::1] rv = r
    cdef const uint64_t[::1] nv = n
    cdef const uint64_t[::1] av = ga if has_a else l
    cdef const uint64_t[::1] bv = gb if has_b else l
    cdef Py_ssize_t runs = 0
    with nogil:
        for i in range(count):
            if i == 0 or not _joins(lv, rv, nv, av, bv, has_a, has_b, i):
                runs += 1
    if runs == count:
        return l, r, n, ga, gb
    out_l = _empty_u64(runs)
    out_r = _empty_u64(runs)
    out_n = _empty_u64(runs)
    out_a = _empty_u64(runs if has_a else 0)
    out_b = _empty_u64(runs if has_b else 0)
    cdef uint64_t[::1] olv = out_l
    cdef uint64_t[::1] orv = out_r
    cdef uint64_t[::1] onv = out_n
    cdef uint64_t[::1] oav = out_a
    cdef uint64_t[::1] obv = out_b
    with nogil:
        k = -1
        for i in range(count):
            if i == 0 or not _joins(lv, rv, nv, av, bv, has_a, has_b, i):
                k += 1
                olv[k] = lv[i]
                orv[k] = rv[i]
                onv[k] = nv[i]
                if has_a:
                    oav[k] = av[i]
                if has_b:
                    obv[k] = bv[i]
            else:
                onv[k] += nv[i]
    return out_l, out_r, out_n, (out_a if has_a else None), (out_b if has_b else None)


cdef inline bint _joins(const uint64_t[::1] lv, const uint64_t[::1] rv,
                        const uint64_t[::1] nv, const uint64_t[::1] av,
                        const uint64_t[::1] bv, bint has_a, bint has_b,
                        Py_ssize_t i) noexcept nogil:
    """Piece i continues piece i - 1 on both sides, in the same groups."""
    return (lv[i] == lv[i - 1] + nv[i - 1] and rv[i] == rv[i - 1] + nv[i - 1]
            and (not has_a or av[i] == av[i - 1]) and (not has_b or bv[i] == bv[i - 1]))


def check_block_ids(ids, int64_t limit, bint distinct):
    """First problem in a list of block ids: (index, "range") for an id
    outside 0..limit-1, (index, "repeat") for an id seen before (checked
    only when ``distinct``), else None. One pass with a bitmap."""
    i64 = _i64(ids)
    cdef const int64_t[::1] iv = i64
    cdef Py_ssize_t count = iv.shape[0], i, bad = -1
    cdef int reason = 0
    cdef unsigned char *seen = NULL
    cdef int64_t value
    if distinct and count:
        seen = <unsigned char *>calloc((limit >> 3) + 1, 1)
        if seen == NULL:
            raise MemoryError(f"a bitmap of {limit} block ids")
    try:
        with nogil:
            for i in range(count):
                value = iv[i]
                if value < 0 or value >= limit:
                    bad, reason = i, 1
                    break
                if distinct:
                    if seen[value >> 3] & (1 << (value & 7)):
                        bad, reason = i, 2
                        break
                    seen[value >> 3] |= 1 << (value & 7)
    finally:
        free(seen)
    if bad < 0:
        return None
    return bad, ("range" if reason == 1 else "repeat")
