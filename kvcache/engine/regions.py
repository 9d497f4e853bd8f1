"""The region registry: the memory this engine exposes, the pins that keep
it alive while transfers use it, and the checks every piece passes.

A region is [addr, addr + length) with an id that is never reused while
the engine lives: the id is also the region's generation, so a peer that
names an id we released (or renewed, when a cache key moved) is refused.
Top-level regions are what transports register (an RDMA MR, a shareable
mapping); sub-regions (caches inside the buffer pool) get ids of their own
on the same memory. Only addressable regions can be reached by pieces:
our own pieces may lie in any of them, a peer's only in those offered to
peers (``remote``). The table a peer receives lists only the offered ones,
so free pool space, freed caches and local-only memory are neither revealed
nor reachable. A region offered to one link only (``peer``, a staging slot
lent to it) is, to every other peer, like one not offered: absent from its
table, its renewals and its shares, and refused when it names it.

Every transfer pins the regions its pieces touch, on both sides, from the
moment its descriptors are checked until it completed or failed. Releasing
a region first withdraws it (new pins fail), then waits for the pins up to a
deadline; at the deadline the region is restored, intact and still
registered, and the release is refused with LLM_LINK_BUSY."""
import itertools
import os
import threading
import time

import numpy as np

from kvcache.checks import integer
from kvcache.descriptors import NO_REGION, RegionTable
from pyverbs_kv.pieces import distinct
from kvcache.engine.pins import Pins
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.base import SLOTS



class Region:
    """``retired``: the earlier ids (generations) of a renewed region, whose
    transfers may still run."""
    __slots__ = ("region_id", "addr", "length", "parent", "addressable", "remote", "share",
                 "memfd", "retired", "peer")

    def __init__(self, region_id, addr, length, parent, addressable, remote, share=None,
                 retired=(), peer=None, memfd=None):
        self.region_id = region_id
        self.addr = addr
        self.length = length
        self.parent = parent
        self.addressable = addressable
        self.remote = addressable and remote
        self.share = share                  # (memfd, offset) holding exactly this memory
        self.memfd = memfd                  # (st_dev, st_ino) of the share's file
        self.retired = list(retired)
        self.peer = peer if self.remote else None     # the one link it is offered to

    def ids(self):
        return [self.region_id] + self.retired


def _memfd_of(share):
    """(st_dev, st_ino) of the file behind a share's fd, None without one."""
    if share is None:
        return None
    try:
        st = os.fstat(share[0])
    except (OSError, TypeError, ValueError, IndexError) as exc:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"share must be (an open memfd, offset): {exc}") from None
    return st.st_dev, st.st_ino


def check_host_mapped(addr, length):
    """LLM_PARAM_INVALID unless [addr, addr + length) is host memory mapped
    readable and writable here: a device pointer, a freed buffer or a wrong
    address would otherwise crash the process at the first copy into it."""
    end, covered = addr + length, addr
    with open("/proc/self/maps") as maps:        # sorted by address
        for line in maps:
            span, perms = line.split(None, 2)[:2]
            lo, hi = (int(x, 16) for x in span.split("-"))
            if hi <= covered:
                continue
            if lo > covered or perms[:2] != "rw":
                break
            covered = hi
            if covered >= end:
                return
    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                       f"[{addr:#x}, +{length}) is not host memory mapped readable and "
                       f"writable in this process (from {covered:#x} on); device memory "
                       "cannot be registered")


class RegionRegistry:
    """Thread-safe. ``transport`` is told of top-level regions (register /
    unregister) and of those offered to peers (publish / withdraw)."""

    def __init__(self, transport):
        self.transport = transport
        self._lock = threading.Lock()
        self._regions = {}                  # id -> Region (withdrawn ones excluded)
        self._table = RegionTable()         # the addressable ones (our own pieces)
        self._offered = RegionTable()       # those offered to peers (their pieces)
        self._bound = {}                    # id (every generation) -> the one Peer offered it
        self._pins = Pins(self._lock)
        self._ids = itertools.count(1)
        self._last_id = 0

    # --- registration ----------------------------------------------------------

    def register(self, addr, length, parent=None, addressable=True, share=None, remote=True,
                 peer=None):
        """A new region's id. ``remote``: offered to peers (else only our own
        transfers may use it); ``peer``: to that link (a Peer) only.
        LLM_PARAM_INVALID for memory that is not ours, not inside its parent,
        or overlapping another addressable region."""
        addr, length = integer(addr, "addr"), integer(length, "length")
        if addr <= 0 or length <= 0 or addr + length >= 1 << 64:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"cannot register addr={addr:#x} length={length}")
        if peer is not None and (parent is not None or not addressable):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               "a region offered to one link is an addressable top-level "
                               "region (no parent, addressable=True)")
        if parent is None:
            check_host_mapped(addr, length)
        memfd = _memfd_of(share)
        with self._lock:
            if memfd is not None:
                self._check_share(memfd, remote and addressable, peer)
            if parent is not None:
                top = self._regions.get(parent)
                if top is None or top.parent is not None:
                    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                       f"parent region {parent} is not a registered top-level "
                                       "region")
                if addr < top.addr or addr + length > top.addr + top.length:
                    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                       f"[{addr:#x}, +{length}) is not inside region {parent}")
            region = Region(self._next_id(), addr, length, parent, addressable, remote, share,
                            peer=peer, memfd=memfd)
            regions = dict(self._regions)
            regions[region.region_id] = region
            table = _table_of(regions)              # refuses overlaps
            if parent is None:
                self.transport.register_region(region.region_id, addr, length, share=share)
            self._set(regions, table)
        if region.remote:
            self.transport.publish_region(region.region_id)
        return region.region_id

    def _check_share(self, memfd, remote, peer):
        """A peer granted a memfd can map all of it: regions with different
        audiences (offered or not, to every link or to one) never share one."""
        for other in self._regions.values():
            if (other.memfd == memfd
                    and (other.remote, other.peer) != (remote, peer if remote else None)):
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"the memfd of this share also holds region "
                                   f"{other.region_id}, offered to other peers: a peer granted "
                                   "a memfd can map all of it")

    def _next_id(self):
        """The next id whose pin-board slot no live region holds (nor any
        earlier generation of one, whose copies may still be in flight)."""
        taken = {i % SLOTS for r in self._regions.values() for i in r.ids()}
        if len(taken) >= SLOTS:
            raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                               f"{SLOTS} regions registered; release some first")
        while True:
            region_id = next(self._ids)
            if region_id % SLOTS not in taken:
                self._last_id = region_id
                return region_id

    def release(self, region_ids, deadline, revoke=None):
        """Withdraw the regions ``region_ids`` (an id or a list; with their
        sub-regions and every earlier generation of each), wait for their
        pins and for ``revoke(ids, deadline, bound)`` (peers dropping them;
        ``bound``: {id: Peer} of those offered to one link, which only that
        link is told of; returns whether all did) until ``deadline``
        (time.monotonic()), then forget
        them and unregister the top-level ones from the transport. All or
        nothing: LLM_LINK_BUSY at the deadline, with everything restored."""
        if isinstance(region_ids, int):
            region_ids = [region_ids]
        with self._lock:
            missing = [i for i in region_ids if i not in self._regions]
            if missing:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"region {missing[0]} is not registered")
            gone = set(region_ids) | {i for i, r in self._regions.items()
                                      if r.parent in region_ids}
            saved = self._regions
            kept = {i: r for i, r in saved.items() if i not in gone}
            self._set(kept)
        every = {g for i in gone for g in saved[i].ids()}       # all generations
        withdrawn = [g for i in gone if saved[i].remote for g in saved[i].ids()]
        bound = {g: saved[i].peer for i in gone if saved[i].peer is not None
                 for g in saved[i].ids()}
        ok = all([self.transport.withdraw_region(i, deadline) for i in withdrawn])
        if ok and revoke is not None and withdrawn:
            ok = revoke(withdrawn, deadline, bound)
        with self._lock:
            if ok:
                ok = self._pins.wait_clear(every, deadline - time.monotonic())
            if not ok:
                busy = self._pins.count(every)
                restored = dict(self._regions)
                restored.update((i, saved[i]) for i in gone)
                self._set(restored)
        if not ok:
            for i in gone:
                if saved[i].remote:
                    self.transport.publish_region(i)
            raise LLMException(LLMStatusCode.LLM_LINK_BUSY,
                               f"region {sorted(region_ids)[0]} is still in use by transfers "
                               f"({busy} pinned here{'' if busy else ', or by a peer'}); it stays "
                               "registered, release it again later")
        for i in withdrawn:
            self.transport.retire_region(i)
        for i in region_ids:
            if saved[i].parent is None:
                self.transport.unregister_region(i)

    def renew(self, region_id):
        """Give an addressable region a new id (a new generation): a peer
        naming the old id is refused from now on and looks it up again.
        Transfers already running under the old id finish; its memory stays,
        and releasing the region waits for them too."""
        with self._lock:
            old = self._regions.get(region_id)
            if old is None or not old.addressable:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"region {region_id} is not an addressable region")
            new = Region(self._next_id(), old.addr, old.length, old.parent, True, old.remote,
                         old.share, old.retired + [region_id], old.peer, old.memfd)
            regions = {i: r for i, r in self._regions.items() if i != region_id}
            regions[new.region_id] = new
            self._set(regions)
        if new.remote:
            self.transport.withdraw_region(region_id, time.monotonic())
            self.transport.publish_region(new.region_id)
        return new.region_id

    def _set(self, regions, table=None):
        """Install a new region map and its tables (under the lock)."""
        self._regions = regions
        self._table = _table_of(regions) if table is None else table
        self._offered = RegionTable((i, r.addr, r.length) for i, r in regions.items()
                                    if r.remote)
        self._bound = {g: r.peer for r in regions.values() if r.peer is not None
                       for g in r.ids()}

    # --- pins ----------------------------------------------------------------------

    def pin_local(self, addrs, lengths):
        """Pin the regions our own pieces lie in (the initiator's side).
        Returns (region id per piece, the pinned ids for ``unpin``).
        LLM_PARAM_INVALID for a piece outside them."""
        with self._lock:
            ids = self._table.check(addrs, lengths, "local")
            pinned = distinct(ids)
            self._pins.add(pinned)
        return ids, pinned

    def pin_named(self, named, addrs, lengths, peer=None):
        """Pin the regions the pieces of ``peer`` (the Peer asking) name
        (the target's side): each piece must lie wholly inside the live
        region it names, offered to that peer. Returns the pinned ids (for
        ``unpin``). LLM_KV_CACHE_NOT_EXIST when a named region was released
        or renewed (the peer should look it up again), LLM_PARAM_INVALID for
        any other piece outside our regions (those offered to another link
        only included)."""
        with self._lock:
            found, misses = self._offered.locate(addrs, lengths)
            # A miss is NO_REGION, which a lying peer can name as well.
            bad = np.flatnonzero((found != named) | (found == NO_REGION) if misses
                                 else found != named)
            if not bad.size:
                ids = distinct(named)
                # Per distinct region, not per piece: a transfer names few.
                foreign = [i for i in ids if self._bound.get(i, peer) is not peer] \
                    if self._bound else None
                if not foreign:
                    self._pins.add(ids)
                    return ids
                bad = np.flatnonzero(np.isin(named, np.array(foreign, dtype=named.dtype)))
        i = int(bad[0])
        region = int(named[i])
        message = (f"piece {i} [{int(addrs[i]):#x}, +{int(lengths[i])}) is not inside live "
                   f"region {region} ({bad.size} such pieces)")
        if 0 < region <= self._last_id and region not in self._regions:
            raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                               f"{message}: that region was released or renewed")
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"{message}: a foreign address")

    def unpin(self, ids):
        self._pins.remove(ids)

    # --- views -----------------------------------------------------------------------

    def shares(self, ids, peer=None):
        """[(region id, addr, length, fd, offset)] of the regions among ``ids``
        offered to ``peer`` (the Peer asking) with a memfd of their own, the
        fd a duplicate the caller closes (the region's own may close once it
        is released)."""
        with self._lock:
            found = [self._regions.get(i) for i in ids]
            return [(r.region_id, r.addr, r.length, os.dup(r.share[0]), r.share[1])
                    for r in found if r is not None and r.remote and r.share is not None
                    and (r.peer is None or r.peer is peer)]

    def span(self, region_id):
        """(addr, length) of a live region, or None."""
        with self._lock:
            region = self._regions.get(region_id)
        return None if region is None else (region.addr, region.length)

    def rows(self, peer=None):
        """[(region_id, addr, length)] of the regions offered to ``peer`` (a
        Peer; None: those offered to every peer)."""
        with self._lock:
            rows, bound = self._offered.as_list(), self._bound
        if not bound:
            return rows
        return [row for row in rows if bound.get(row[0], peer) is peer]

    def visible(self, ids, peer):
        """Those of ``ids`` (any generation) that ``peer`` may know of: all
        but the regions offered to another link only."""
        with self._lock:
            bound = self._bound
        return [i for i in ids if bound.get(i, peer) is peer]

    def bound_to(self, peer):
        """The ids (every generation) of the regions offered to ``peer`` alone."""
        with self._lock:
            return [i for i, p in self._bound.items() if p is peer]

    def known(self, region_id):
        """Whether ``region_id`` is a live region or an earlier generation of one."""
        with self._lock:
            return any(region_id in r.ids() for r in self._regions.values())

    def owner(self, region_id):
        """The one Peer a region (any generation) is offered to, or None."""
        with self._lock:
            return self._bound.get(region_id)

    def __contains__(self, region_id):
        return region_id in self._regions

    def pinned(self):
        """{region id: pins} (for tests and diagnostics)."""
        return self._pins.snapshot()


def _table_of(regions):
    return RegionTable((i, r.addr, r.length) for i, r in regions.items() if r.addressable)
