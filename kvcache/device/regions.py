"""Device memory regions: the device ranges of this process's caches, by id,
with pins. The engine's region registry holds host memory its transports
reach; device memory is no such memory, so it is listed here instead, and
only the staging layer copies from or into it, after checking every piece
against the region it names (as the engine's owner-side check does)."""
import itertools
import threading

from kvcache.engine.pins import Pins
from kvcache.status import LLMException, LLMStatusCode

# Ids apart from the engine's (which count up from 1), so that a device
# region id is never taken for a host region of the same process.
FIRST_ID = 1 << 40


class DeviceRegions:
    def __init__(self):
        self._lock = threading.Lock()
        self._pins = Pins(self._lock)
        self._regions = {}                  # id -> (addr, length, offered to peers)
        self._ids = itertools.count(FIRST_ID)

    def register(self, addr, length, remote):
        with self._lock:
            region_id = next(self._ids)
            self._regions[region_id] = (int(addr), int(length), bool(remote))
            return region_id

    def renew(self, region_id):
        """A new id for the same range; pieces naming the old one are refused."""
        with self._lock:
            entry = self._regions.pop(region_id)
            new_id = next(self._ids)
            self._regions[new_id] = entry
            return new_id

    def release(self, region_ids, timeout_s):
        """Forget ``region_ids`` once no copy uses them; LLM_LINK_BUSY (they
        stay) when one still does after ``timeout_s``."""
        with self._lock:
            if not self._pins.wait_clear(region_ids, timeout_s):
                raise LLMException(LLMStatusCode.LLM_LINK_BUSY,
                                   f"device regions {region_ids} are still being copied after "
                                   f"{timeout_s:.1f} s")
            for region_id in region_ids:
                self._regions.pop(region_id, None)

    def pin(self, addrs, lengths, region_ids, peer_side):
        """Check that piece i lies in region region_ids[i] (and, for a
        peer's request, that the region is offered) and pin those regions;
        returns the pinned ids for ``unpin``. LLM_KV_CACHE_NOT_EXIST for a
        region that is gone, LLM_PARAM_INVALID for a piece outside it."""
        with self._lock:
            for i, (addr, length, region_id) in enumerate(zip(addrs, lengths, region_ids)):
                entry = self._regions.get(int(region_id))
                if entry is None or (peer_side and not entry[2]):
                    raise LLMException(LLMStatusCode.LLM_KV_CACHE_NOT_EXIST,
                                       f"device region {int(region_id)} does not exist (freed "
                                       "or renewed)")
                base, size, _ = entry
                if not (base <= int(addr) and int(addr) + int(length) <= base + size):
                    raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                       f"device piece {i} [{int(addr):#x}, +{int(length)}) is "
                                       f"not inside region {int(region_id)}")
            pinned = sorted({int(r) for r in region_ids})
            self._pins.add(pinned)
            return pinned

    def unpin(self, pinned):
        self._pins.remove(pinned)
