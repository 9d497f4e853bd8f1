"""A linked engine as we see it: its link state, control channel, the
transport's per-link data, and our copy of its region table with the pins
our transfers hold on its regions."""
import threading


from kvcache.descriptors import RegionTable
from kvcache.engine.link import Link, LinkState
from kvcache.engine.pins import Pins
from pyverbs_kv.pieces import distinct


class Peer:
    """``regions`` is our copy of the peer's addressable regions; ``data``
    the transport's LinkData; ``channel`` the control channel."""

    def __init__(self, name, cluster_id, role, regions, inbound):
        self.name = name
        self.cluster_id = cluster_id
        self.role = role
        self.inbound = inbound
        self.link = Link(name)
        self.channel = None
        self.data = None
        self.attached = threading.Event()          # set once ``data`` is in place
        self.closing_by_peer = False
        self.regions = RegionTable(regions)
        self._known = set(int(i) for i in self.regions.ids)
        self._lock = threading.Lock()
        self._pins = Pins(self._lock)

    @property
    def state(self):
        return self.link.state

    @property
    def linked(self):
        return self.link.state == LinkState.LINKED and not self.channel.closed

    def set_regions(self, rows):
        with self._lock:
            self.regions = RegionTable(rows)
            self._known = set(int(i) for i in self.regions.ids)

    def pin_remote(self, remote, lengths, named=None, strict=False):
        """Pin the peer's regions our pieces touch. ``named``: the region id
        of every piece, as the caller looked it up. ``strict`` (a transport
        whose owner does not check pieces itself): every piece must lie in
        the region it names in our copy of the peer's table. Returns (ids
        per piece, pinned ids), or None when our copy does not cover the
        pieces that way (refresh it, then try again)."""
        with self._lock:
            if named is None or strict:
                located, misses = self.regions.locate(remote, lengths)
                if misses or (named is not None and (located != named).any()):
                    return None
                ids = located
            else:
                ids = named
            pinned = distinct(ids)
            self._pins.add(pinned)
        return ids, pinned

    def knows(self, ids):
        """Whether every region id in ``ids`` is in our copy of the table."""
        with self._lock:
            return self._known.issuperset(distinct(ids))

    def unpin_remote(self, pinned):
        self._pins.remove(pinned)

    def revoke(self, ids, timeout_s):
        """The peer released regions ``ids``: drop them from our copy and wait
        (up to ``timeout_s``) for our transfers still using them. Whether
        none is left."""
        gone = set(ids)
        with self._lock:
            self.regions = RegionTable(r for r in self.regions.as_list() if r[0] not in gone)
            self._known -= gone
            return self._pins.wait_clear(gone, timeout_s)

    def __repr__(self):
        return f"Peer({self.name!r}, cluster {self.cluster_id}, {self.link.state.name})"
