"""Device memory regions: the device ranges of this process's caches, by id,
with pins. The engine's region registry holds host memory its transports
reach; device memory is no such memory, so it is listed here instead, and
only the staging layer copies from or into it, after checking every piece
against the region it names (as the engine's owner-side check does).

As in the engine's registry, a renewed region keeps those of its earlier
ids that copies still pin (``retired``; an id is dropped once unpinned, so
the list stays as short as the copies running): releasing the region waits
for them too. Releasing first withdraws the regions (no new pin, no renewal
reaches them), then waits.

Our own pieces are found by address, and checked to lie in a region of the
cache the copy was planned for (its current ids, or the one it was renewed
from while its cache still names that): memory freed and reused by another
cache since is refused, not copied."""
import itertools
import threading

import numpy as np

from kvcache.descriptors import RegionTable
from kvcache.engine.pins import Pins
from kvcache.status import LLMException, LLMStatusCode

# Ids apart from the engine's (which count up from 1), so that a device
# region id is never taken for a host region of the same process.
FIRST_ID = 1 << 40


class _Region:
    __slots__ = ("addr", "length", "remote", "retired", "previous")

    def __init__(self, addr, length, remote, retired=(), previous=None):
        self.addr, self.length, self.remote = addr, length, remote
        self.retired = set(retired)         # earlier ids copies still pin
        self.previous = previous            # the id it was last renewed from


class DeviceRegions:
    def __init__(self):
        self._lock = threading.Lock()
        self._pins = Pins(self._lock)
        self._regions = {}                  # id -> _Region (live: pieces may name it)
        self._withdrawn = {}                # id -> _Region being released
        self._retired = {}                  # earlier id still pinned -> its _Region
        self._ids = itertools.count(FIRST_ID)
        self._table = RegionTable()

    def register(self, addr, length, remote):
        """A new region's id; LLM_PARAM_INVALID for a range overlapping one
        registered already (a piece of ours is found by its address, so it
        must lie in one region only)."""
        addr, length = int(addr), int(length)
        if not (0 < addr and 0 < length and addr + length < 1 << 64):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"device range [{addr:#x}, +{length}) is not inside the 64-bit "
                               "address space")
        with self._lock:
            for other_id, other in {**self._regions, **self._withdrawn}.items():
                if addr < other.addr + other.length and other.addr < addr + length:
                    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                       f"device range [{addr:#x}, +{length}) overlaps device "
                                       f"region {other_id} [{other.addr:#x}, +{other.length})")
            region_id = next(self._ids)
            self._regions[region_id] = _Region(addr, length, bool(remote))
            self._index()
            return region_id

    def renew(self, region_id):
        """A new id for the same range; pieces naming the old one are refused,
        copies already pinned under it finish (``release`` waits for them).
        A region being released (or gone) keeps its id: nothing reaches it
        any more anyway."""
        with self._lock:
            old = self._regions.pop(region_id, None)
            if old is None:
                return region_id
            new_id = next(self._ids)
            retired = old.retired | ({region_id} if self._pins.count([region_id]) else set())
            region = self._regions[new_id] = _Region(old.addr, old.length, old.remote, retired,
                                                     region_id)
            for earlier in retired:
                self._retired[earlier] = region
            self._index()
            return new_id

    def release(self, region_ids, timeout_s, then=None):
        """Forget ``region_ids`` (with their earlier ids) once no copy uses
        them; LLM_LINK_BUSY (they stay) when one still does after
        ``timeout_s``. Ids not registered are left alone. ``then()``: run
        once they are withdrawn and unused, before they are forgotten; if
        it raises, they are restored (so a caller releases them together
        with other memory, all or none)."""
        with self._lock:
            gone = {i: self._regions.pop(i) for i in region_ids if i in self._regions}
            self._withdrawn.update(gone)
            self._index()
            every = [g for i, region in gone.items() for g in [i, *region.retired]]
            if not self._pins.wait_clear(every, timeout_s):
                self._restore(gone)
                raise LLMException(LLMStatusCode.LLM_LINK_BUSY,
                                   f"device regions {sorted(gone)} are still being copied "
                                   f"after {timeout_s:.1f} s")
        try:
            if then is not None:
                then()
        except BaseException:
            with self._lock:
                self._restore(gone)
            raise
        with self._lock:
            for i in gone:
                del self._withdrawn[i]

    def _restore(self, gone):
        for i in gone:
            del self._withdrawn[i]
        self._regions.update(gone)
        self._index()

    def _index(self):
        """The live regions' table, sorted by start (under the lock): for
        ``find`` and ``_locate``."""
        self._table = RegionTable((i, r.addr, r.length) for i, r in self._regions.items())

    def find(self, addrs, lengths):
        """The live region each piece lies wholly in, NO_REGION where none
        (uint64 array); None while no region is registered (the common
        host-only case costs no look-up)."""
        with self._lock:
            table = self._table
        if not len(table):
            return None
        return table.locate(np.asarray(addrs, dtype=np.uint64),
                            np.asarray(lengths, dtype=np.uint64))[0]

    def __contains__(self, region_id):
        with self._lock:
            return region_id in self._regions

    def rows(self):
        """[(region id, addr, length)] of the live regions offered to peers."""
        with self._lock:
            return [(i, r.addr, r.length) for i, r in self._regions.items() if r.remote]

    def _locate(self, addrs):
        """The live region each address lies in (its start at or below it;
        the caller checks the piece's end), 0 where none starts below it."""
        starts, ids = self._table.starts, self._table.ids
        at = np.searchsorted(starts, np.asarray(addrs, dtype=np.uint64), side="right") - 1
        return np.where(at >= 0, ids[np.maximum(at, 0)] if ids.size else 0, 0)

    def pin(self, addrs, lengths, region_ids=None, own=None):
        """Pin the regions of device pieces; returns the pinned ids for
        ``unpin``. A peer's pieces name their region (``region_ids[i]``),
        which must be offered to peers; our own (``region_ids`` None) are
        found by address, as the engine's pin_local: a key removed since
        the copy was planned renews the id, not the memory. ``own``: for
        our own pieces, the cache they were planned in (its
        ``region_ids`` are read here): a piece must lie in one of its
        regions. LLM_KV_CACHE_NOT_EXIST for a named region that is gone
        (freed or renewed), for our piece in no live region (its memory
        freed, as the host cache path reports a freed cache) and for our
        piece in a region not of ``own`` (the cache freed and its memory
        reused); LLM_PARAM_INVALID for a piece that runs past the end of its
        region."""
        with self._lock:
            peer_side = region_ids is not None
            if not peer_side:
                region_ids = self._locate(addrs)
                # Its ids, as its manager renews them: a region renewed a
                # moment ago may still be named by the one it was renewed from.
                ids = set(own.region_ids)
            for i, (addr, length, region_id) in enumerate(zip(addrs, lengths, region_ids)):
                addr, length = int(addr), int(length)
                region = self._regions.get(int(region_id))
                if peer_side and (region is None or not region.remote):
                    raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                       f"device region {int(region_id)} does not exist (freed "
                                       "or renewed)")
                if not peer_side:
                    # As the host cache path: memory in no live region was
                    # released (its cache freed), not mistyped.
                    if region is None or not region.addr <= addr < region.addr + region.length:
                        raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                           f"device piece {i} [{addr:#x}, +{length}) lies in "
                                           "no live device region of this process (its cache "
                                           "freed?)")
                    if int(region_id) not in ids and region.previous not in ids:
                        raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                           f"device piece {i} [{addr:#x}, +{length}) lies in "
                                           f"region {int(region_id)}, not in its cache "
                                           f"(regions {sorted(ids)}): freed meanwhile?")
                if not (region.addr <= addr and addr + length <= region.addr + region.length):
                    where = f"region {int(region_id)}" if peer_side else \
                        f"device region {int(region_id)} it starts in"
                    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                       f"device piece {i} [{addr:#x}, +{length}) is "
                                       f"not inside {where}")
            pinned = sorted({int(r) for r in region_ids})
            self._pins.add(pinned)
            return pinned

    def unpin(self, pinned):
        self._pins.remove(pinned)
        with self._lock:
            for i in pinned:
                if i in self._retired and not self._pins.count([i]):
                    self._retired.pop(i).retired.discard(i)
