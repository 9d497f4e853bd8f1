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

cimport numpy as cnp
from pyverbs_kv.arrays cimport as_i64, as_u64, data_of, length_of
from pyverbs_kv.byteview cimport fill_byte_view
from libc.stdint cimport int64_t, uint64_t, uintptr_t
from libc.stdlib cimport calloc, free, malloc
from libc.string cimport memcpy

cnp.import_array()

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

    def __getbuffer__(self, Py_buffer *view, int flags):
        fill_byte_view(view, self, self.ptr, self.nbytes, flags)

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


cdef inline Py_ssize_t _region_of(const uint64_t *starts, const uint64_t *ends,
                                  Py_ssize_t regions, uint64_t addr, uint64_t end,
                                  Py_ssize_t last) noexcept nogil:
    """Index of the region wholly holding [addr, end), or -1. ``last`` (a
    previous answer, or -1) is tried before a binary search: consecutive
    pieces mostly share a region."""
    cdef Py_ssize_t lo, hi, mid
    if end < addr:                          # wraps: never inside anything
        return -1
    if not (last >= 0 and starts[last] <= addr < ends[last]):
        lo, hi = 0, regions                 # the last start <= addr
        while lo < hi:
            mid = (lo + hi) >> 1
            if starts[mid] <= addr:
                lo = mid + 1
            else:
                hi = mid
        last = lo - 1
    if last >= 0 and end <= ends[last]:
        return last
    return -1


def block_pieces(local_bases, uint64_t local_block_bytes, local_ids, remote_bases,
                 uint64_t remote_block_bytes, remote_ids, uint64_t piece_bytes):
    """Pieces copying block local_ids[j] of local tensor i to block
    remote_ids[j] of remote tensor i, tensor-major. ValueError for a
    negative block id or mismatched counts."""
    cdef cnp.ndarray lb = as_u64(local_bases), rb = as_u64(remote_bases)
    cdef cnp.ndarray li = as_i64(local_ids), ri = as_i64(remote_ids)
    cdef Py_ssize_t tensors = length_of(lb), blocks = length_of(li), t, j, k
    if blocks != length_of(ri):
        raise ValueError(f"{blocks} source blocks but {length_of(ri)} destination blocks")
    if tensors != length_of(rb):
        raise ValueError(f"{tensors} source tensors but {length_of(rb)} destination tensors")
    cdef const uint64_t *lbv = data_of(lb)
    cdef const uint64_t *rbv = data_of(rb)
    cdef const int64_t *liv = <const int64_t *>data_of(li)
    cdef const int64_t *riv = <const int64_t *>data_of(ri)
    cdef Py_ssize_t bad = -1
    local = _empty_u64(tensors * blocks)
    remote = _empty_u64(tensors * blocks)
    lengths = _empty_u64(tensors * blocks)
    cdef uint64_t *lv = data_of(local)
    cdef uint64_t *rv = data_of(remote)
    cdef uint64_t *nv = data_of(lengths)
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
    cdef cnp.ndarray s = as_u64(starts), e = as_u64(ends), v = as_u64(values)
    cdef cnp.ndarray a = as_u64(addrs), n = as_u64(lengths)
    cdef Py_ssize_t regions = length_of(s), count = length_of(a), i, last = -1
    if not (regions == length_of(e) == length_of(v)):
        raise ValueError("region arrays differ in length")
    if count != length_of(n):
        raise ValueError(f"{count} addresses but {length_of(n)} lengths")
    out = _empty_u64(count)
    cdef const uint64_t *sv = data_of(s)
    cdef const uint64_t *ev = data_of(e)
    cdef const uint64_t *vv = data_of(v)
    cdef const uint64_t *av = data_of(a)
    cdef const uint64_t *nv = data_of(n)
    cdef uint64_t *ov = data_of(out)
    cdef Py_ssize_t misses = 0, found
    with nogil:
        for i in range(count):
            found = _region_of(sv, ev, regions, av[i], av[i] + nv[i], last)
            if found >= 0:
                ov[i] = vv[found]
                last = found
            else:
                ov[i] = missing
                misses += 1
    return out, misses


def copy_mapped(bint to_mapping, local, mapped, lengths, starts, ends, shifts):
    """Copy piece i between local[i] and mapped[i] (``to_mapping``: local ->
    mapped, else back), where mapped addresses are translated by the region
    [starts[r], ends[r]) wholly holding the piece: mapped[i] + shifts[r]
    (mod 2**64). One pass, GIL released: find, translate, memcpy. Pieces in
    no region are not copied; returns their indices (int64), or None when
    every piece was copied."""
    cdef cnp.ndarray s = as_u64(starts), e = as_u64(ends), d = as_u64(shifts)
    cdef cnp.ndarray l = as_u64(local), m = as_u64(mapped), n = as_u64(lengths)
    cdef Py_ssize_t regions = length_of(s), count = length_of(l), i, last = -1, found, misses = 0
    if not (regions == length_of(e) == length_of(d)):
        raise ValueError("region arrays differ in length")
    if not (count == length_of(m) == length_of(n)):
        raise ValueError("descriptor arrays differ in length")
    cdef const uint64_t *sv = data_of(s)
    cdef const uint64_t *ev = data_of(e)
    cdef const uint64_t *dv = data_of(d)
    cdef const uint64_t *lv = data_of(l)
    cdef const uint64_t *mv = data_of(m)
    cdef const uint64_t *nv = data_of(n)
    cdef uint64_t there
    with nogil:
        for i in range(count):
            found = _region_of(sv, ev, regions, mv[i], mv[i] + nv[i], last)
            if found < 0:
                misses += 1
                continue
            last = found
            there = mv[i] + dv[found]
            if to_mapping:
                memcpy(<void *><uintptr_t>there, <const void *><uintptr_t>lv[i], nv[i])
            else:
                memcpy(<void *><uintptr_t>lv[i], <const void *><uintptr_t>there, nv[i])
    if not misses:
        return None
    missed = np.empty(misses, dtype=np.int64)
    cdef int64_t *xv = <int64_t *>data_of(missed)
    cdef Py_ssize_t k = 0
    last = -1
    with nogil:
        for i in range(count):
            found = _region_of(sv, ev, regions, mv[i], mv[i] + nv[i], last)
            if found < 0:
                xv[k] = i
                k += 1
            else:
                last = found
    return missed


def merge_pieces(local, remote, lengths, group_a=None, group_b=None):
    """Merge consecutive pieces contiguous on both sides (and equal in the
    optional group arrays, e.g. region ids) into one. Returns the arrays
    reduced, groups included (None stays None); the inputs are returned as
    they are when nothing merges."""
    cdef cnp.ndarray l = as_u64(local), r = as_u64(remote), n = as_u64(lengths)
    cdef Py_ssize_t count = length_of(l), i, k
    if length_of(r) != count or length_of(n) != count:
        raise ValueError("descriptor arrays differ in length")
    cdef cnp.ndarray ga = None if group_a is None else as_u64(group_a)
    cdef cnp.ndarray gb = None if group_b is None else as_u64(group_b)
    for g in (ga, gb):
        if g is not None and length_of(g) != count:
            raise ValueError("group arrays differ in length from the descriptors")
    cdef bint has_a = ga is not None, has_b = gb is not None
    cdef const uint64_t *lv = data_of(l)
    cdef const uint64_t *rv = data_of(r)
    cdef const uint64_t *nv = data_of(n)
    cdef const uint64_t *av = data_of(ga) if has_a else lv
    cdef const uint64_t *bv = data_of(gb) if has_b else lv
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
    cdef uint64_t *olv = data_of(out_l)
    cdef uint64_t *orv = data_of(out_r)
    cdef uint64_t *onv = data_of(out_n)
    cdef uint64_t *oav = data_of(out_a)
    cdef uint64_t *obv = data_of(out_b)
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


cdef inline bint _joins(const uint64_t *lv, const uint64_t *rv, const uint64_t *nv,
                        const uint64_t *av, const uint64_t *bv, bint has_a, bint has_b,
                        Py_ssize_t i) noexcept nogil:
    """Piece i continues piece i - 1 on both sides, in the same groups."""
    return (lv[i] == lv[i - 1] + nv[i - 1] and rv[i] == rv[i - 1] + nv[i - 1]
            and (not has_a or av[i] == av[i - 1]) and (not has_b or bv[i] == bv[i - 1]))


def length_total(lengths):
    """(sum of ``lengths``, index of the first zero length or -1), in one
    pass: what every transfer checks and announces."""
    cdef cnp.ndarray n = as_u64(lengths)
    cdef const uint64_t *nv = data_of(n)
    cdef Py_ssize_t count = length_of(n), i, zero = -1
    cdef uint64_t total = 0
    with nogil:
        for i in range(count):
            if nv[i] == 0 and zero < 0:
                zero = i
            total += nv[i]
    return total, zero


def check_pieces(local, remote, lengths):
    """(sum of ``lengths``, index of the first zero length or -1, index of
    the first piece that runs past 2**64 on either side or -1), in one pass:
    what every transfer checks before anything else."""
    cdef cnp.ndarray l = as_u64(local), r = as_u64(remote), n = as_u64(lengths)
    cdef const uint64_t *lv = data_of(l)
    cdef const uint64_t *rv = data_of(r)
    cdef const uint64_t *nv = data_of(n)
    cdef Py_ssize_t count = length_of(n), i, zero = -1, wrap = -1
    cdef uint64_t total = 0
    if length_of(l) != count or length_of(r) != count:
        raise ValueError("descriptor arrays differ in length")
    with nogil:
        for i in range(count):
            if nv[i] == 0 and zero < 0:
                zero = i
            if wrap < 0 and (lv[i] + nv[i] < lv[i] or rv[i] + nv[i] < rv[i]):
                wrap = i
            total += nv[i]
    return total, zero, wrap


def distinct(values):
    """The distinct values of a uint64 array as a sorted list of ints; one
    value (the usual case: one region) without sorting."""
    cdef cnp.ndarray v = as_u64(values)
    cdef const uint64_t *vv = data_of(v)
    cdef Py_ssize_t count = length_of(v), i
    cdef bint same = True
    if count == 0:
        return []
    with nogil:
        for i in range(1, count):
            if vv[i] != vv[0]:
                same = False
                break
    if same:
        return [int(vv[0])]
    return np.unique(v).tolist()


def check_block_ids(ids, int64_t limit, bint distinct):
    """First problem in a list of block ids: (index, "range") for an id
    outside 0..limit-1, (index, "repeat") for an id seen before (checked
    only when ``distinct``), else None. One pass with a bitmap."""
    cdef cnp.ndarray i64 = as_i64(ids)
    cdef const int64_t *iv = <const int64_t *>data_of(i64)
    cdef Py_ssize_t count = length_of(i64), i, bad = -1
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


# --- the shared-memory pin board -------------------------------------------------
#
# A board is an array of slots shared between the process that owns some
# memory and the processes that copy into it directly (the shared-memory
# transport). Slot = [live region id, copies in flight], two uint64. A copier
# enters a slot (in flight += 1), then checks the slot still names the region
# it expects; the owner withdrawing a region stores 0 as its id, then waits
# for in flight to reach 0. Both sides use sequentially consistent atomics, so
# either the copier sees the withdrawal and backs off, or the owner sees the
# copy and waits for it: no byte lands in memory its owner has released.

cdef extern from *:
    """
    #include <stdint.h>
    static inline uint64_t kv_atomic_add(uint64_t *p, uint64_t v) {
        return __atomic_add_fetch(p, v, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t kv_atomic_sub(uint64_t *p, uint64_t v) {
        return __atomic_sub_fetch(p, v, __ATOMIC_SEQ_CST);
    }
    static inline uint64_t kv_atomic_load(uint64_t *p) {
        return __atomic_load_n(p, __ATOMIC_SEQ_CST);
    }
    static inline void kv_atomic_store(uint64_t *p, uint64_t v) {
        __atomic_store_n(p, v, __ATOMIC_SEQ_CST);
    }
    """
    uint64_t kv_atomic_add(uint64_t *p, uint64_t v) nogil
    uint64_t kv_atomic_sub(uint64_t *p, uint64_t v) nogil
    uint64_t kv_atomic_load(uint64_t *p) nogil
    void kv_atomic_store(uint64_t *p, uint64_t v) nogil


cdef inline uint64_t *_slot(uint64_t board, Py_ssize_t slot) noexcept nogil:
    return <uint64_t *><uintptr_t>(board + 16 * <uint64_t>slot)


def board_enter(uint64_t board, slots, region_ids):
    """Enter slots[i] of the board at address ``board`` for region
    region_ids[i], for every i. Returns -1 when all were entered, else the
    index of the first slot that no longer names its region (the slots
    entered before it are left again)."""
    cdef cnp.ndarray s = as_u64(slots), r = as_u64(region_ids)
    cdef const uint64_t *sv = data_of(s)
    cdef const uint64_t *rv = data_of(r)
    cdef Py_ssize_t count = length_of(s), i, j, bad = -1
    if length_of(r) != count:
        raise ValueError("slot and region arrays differ in length")
    with nogil:
        for i in range(count):
            kv_atomic_add(_slot(board, sv[i]) + 1, 1)
            if kv_atomic_load(_slot(board, sv[i])) != rv[i]:
                for j in range(i + 1):
                    kv_atomic_sub(_slot(board, sv[j]) + 1, 1)
                bad = i
                break
    return bad


def board_leave(uint64_t board, slots):
    """Leave every slot entered by ``board_enter``."""
    cdef cnp.ndarray s = as_u64(slots)
    cdef const uint64_t *sv = data_of(s)
    cdef Py_ssize_t count = length_of(s), i
    with nogil:
        for i in range(count):
            kv_atomic_sub(_slot(board, sv[i]) + 1, 1)


def board_publish(uint64_t board, Py_ssize_t slot, uint64_t region_id):
    """Name ``region_id`` (0: none) as the live region of ``slot``."""
    kv_atomic_store(_slot(board, slot), region_id)


def board_in_flight(uint64_t board, Py_ssize_t slot):
    """Copies in flight in ``slot``."""
    return kv_atomic_load(_slot(board, slot) + 1)


def board_busy_slots(uint64_t board, Py_ssize_t slots):
    """How many of the first ``slots`` slots have copies in flight."""
    cdef Py_ssize_t i, busy = 0
    with nogil:
        for i in range(slots):
            if kv_atomic_load(_slot(board, i) + 1):
                busy += 1
    return busy


def board_reset(uint64_t board, Py_ssize_t slot):
    """Forget the copies of ``slot`` (their copier is known dead)."""
    kv_atomic_store(_slot(board, slot) + 1, 0)
