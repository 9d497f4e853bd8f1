"""Moving device bytes through pinned host buffers ("staged" path).

Transports move host bytes only (no GPUDirect here: see README), so a piece
of device memory travels as: device -> pinned staging slot (D2H) on the side
that holds it, slot -> host memory or the other side's slot (the engine's
transfer), slot -> device (H2D) on the side that receives it. A transfer is
cut into chunks of at most the slot size (pieces split where a chunk ends);
with two slots per side, the device copy of chunk i+1 runs (on its own
stream, or on the peer while we move bytes) during the move of chunk i.

The side that holds device memory does its copies itself: on a peer, through
the control calls cache.stage_slots (its slots for us: addresses, region ids,
size), cache.stage_out (copy pieces of its device regions into a slot, stream
synchronised before it answers) and cache.stage_in (copy a slot into its
device regions; it answers only after the stream is synchronised, so the
caller's completion never runs ahead of the bytes being in device memory).
Every piece names its device region and is checked against it there."""
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvcache.device.runtime import D2H, H2D
from kvcache.engine.rpc import is_int, list_of
from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

DEPTH = 2                           # slots per side: one moving, one being copied
DEFAULT_CHUNK_BYTES = 4 << 20
MAX_PIECES = 4096                   # per chunk: what one control call names
PATH_HOST, PATH_STAGED = "host", "staged"


def chunked(local, remote, lengths, chunk, max_pieces=MAX_PIECES):
    """Pieces -> chunks of at most ``chunk`` bytes and ``max_pieces``
    pieces: a list of (local, remote, lengths, slot offsets, index of the
    piece each part comes from) arrays; a piece longer than what is left
    of a chunk is split, so a chunk is full unless it is the last or holds
    ``max_pieces`` pieces."""
    local, remote, lengths = (np.asarray(a, dtype=np.uint64) for a in (local, remote, lengths))
    starts = np.concatenate((np.zeros(1, np.uint64), np.cumsum(lengths, dtype=np.uint64)))
    total = int(starts[-1])
    out = []
    for begin in range(0, total, chunk):
        end = min(begin + chunk, total)
        first = int(np.searchsorted(starts, begin, side="right")) - 1
        last = int(np.searchsorted(starts, end, side="left"))
        idx = np.arange(first, last)
        lo = np.maximum(starts[idx], np.uint64(begin))
        hi = np.minimum(starts[idx + 1], np.uint64(end))
        keep = hi > lo
        idx, lo, hi = idx[keep], lo[keep], hi[keep]
        skip = lo - starts[idx]
        loc, rem, lens = local[idx] + skip, remote[idx] + skip, hi - lo
        for at in range(0, idx.size, max_pieces):
            part = slice(at, at + max_pieces)
            ends = np.cumsum(lens[part], dtype=np.uint64)
            out.append((loc[part], rem[part], lens[part], ends - lens[part], idx[part]))
    return out


class Slot:
    """A pinned host buffer registered with the engine, and its stream."""

    def __init__(self, runtime, engine, nbytes, remote):
        self.buffer = runtime.alloc_host(nbytes)
        self.stream = None
        try:
            self.stream = runtime.stream()
            self.addr, self.nbytes = self.buffer.ptr, nbytes
            self.region_id = engine.register_memory(self.addr, nbytes, remote_accessible=remote)
        except BaseException:
            if self.stream is not None:
                self.stream.close()
            self.buffer.close()
            raise
        self.pending = None                 # a stream to synchronise or a Future to wait on


class Stager:
    """``engine``: the TransferEngine; ``regions``: DeviceRegions;
    ``runtime()``: the DeviceRuntime (opened at first call; raises
    LLM_FEATURE_NOT_ENABLED without a configured device);
    ``chunk_bytes``: the slot size."""

    def __init__(self, engine, regions, runtime, chunk_bytes=DEFAULT_CHUNK_BYTES):
        self._engine = engine
        self._regions = regions
        self._runtime = runtime
        self.chunk_bytes = chunk_bytes
        self._lock = threading.Lock()
        self._local = None                  # our slots for our own transfers
        self._local_lock = threading.Lock()  # one staged transfer at a time uses them
        self._served = {}                   # peer name -> slots we lend it
        self._peer_slots = weakref.WeakKeyDictionary()   # Peer (a link) -> its slots for us
        self._paths = {}                    # peer name -> the path its last transfer took
        self._helper = None
        pieces = list_of(is_int, MAX_PIECES)
        engine.rpc.serve("cache.stage_slots", self._rpc_slots, {})
        engine.rpc.serve("cache.stage_out", self._rpc_out,
                         {"slot": is_int, "addrs": pieces, "lengths": pieces,
                          "regions": pieces})
        engine.rpc.serve("cache.stage_in", self._rpc_in,
                         {"slot": is_int, "addrs": pieces, "lengths": pieces,
                          "regions": pieces})

    # --- what path a link took -----------------------------------------------------

    def path(self, peer_name):
        """'staged' or 'host': the path of the last transfer on the link to
        ``peer_name``; None before its first."""
        return self._paths.get(peer_name)

    def _record(self, peer, path):
        if self._paths.get(peer.name) != path:
            log.info("transfers with %s take the %s path", peer.name, path)
        self._paths[peer.name] = path

    # --- the side that holds the device memory, for a peer ----------------------------

    def _slots_for(self, peer):
        with self._lock:
            slots = self._served.get(peer.name)
            if slots is None:
                runtime = self._runtime()
                slots = [Slot(runtime, self._engine, self.chunk_bytes, True)
                         for _ in range(DEPTH)]
                self._served[peer.name] = slots
            return slots

    def _rpc_slots(self, peer, params):
        slots = self._slots_for(peer)
        return {"slots": [[s.addr, s.region_id] for s in slots], "bytes": self.chunk_bytes}

    def _peer_pieces(self, peer, params):
        slots = self._slots_for(peer)
        if not 0 <= params["slot"] < len(slots):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"no staging slot {params['slot']}")
        addrs, lengths, regions = params["addrs"], params["lengths"], params["regions"]
        if (not len(addrs) == len(lengths) == len(regions) or sum(lengths) > self.chunk_bytes
                or min(addrs + lengths, default=1) <= 0):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"staging request: {len(addrs)} addresses, {len(lengths)} "
                               f"lengths, {len(regions)} regions, {sum(lengths)} bytes for a "
                               f"{self.chunk_bytes}-byte slot (addresses and lengths must be "
                               "positive)")
        return slots[params["slot"]], addrs, lengths, regions

    def _rpc_out(self, peer, params):
        slot, addrs, lengths, regions = self._peer_pieces(peer, params)
        self._copy_pieces(slot, addrs, lengths, regions, D2H, True)
        return {}

    def _rpc_in(self, peer, params):
        slot, addrs, lengths, regions = self._peer_pieces(peer, params)
        self._copy_pieces(slot, addrs, lengths, regions, H2D, True)
        return {}

    def _copy_pieces(self, slot, addrs, lengths, regions, kind, peer_side, wait=True):
        """Copy device pieces into (D2H) or out of (H2D) ``slot``, packed in
        order, on the slot's stream; ``wait``: synchronise it before
        returning (else ``slot.pending`` is the stream to synchronise)."""
        runtime = self._runtime()
        pinned = self._regions.pin(addrs, lengths, regions if peer_side else None)
        try:
            offset = 0
            for addr, length in zip(addrs, lengths):
                addr, length = int(addr), int(length)
                if kind == D2H:
                    runtime.copy(slot.addr + offset, addr, length, D2H, slot.stream)
                else:
                    runtime.copy(addr, slot.addr + offset, length, H2D, slot.stream)
                offset += length
            if wait:
                runtime.synchronize(slot.stream)
        except BaseException:
            # Copies already queued may still use the regions: drain first.
            slot.pending = (slot.stream, pinned)
            self._settle(slot, quiet=True)
            raise
        if wait:
            self._regions.unpin(pinned)
        else:
            # The regions stay pinned until the stream is synchronised.
            slot.pending = (slot.stream, pinned)

    def _settle(self, slot, quiet=False):
        """Wait for what ``slot`` still has running (a stream's copies, a
        peer's call); its error, unless ``quiet``."""
        pending, slot.pending = slot.pending, None
        if pending is None:
            return
        try:
            if isinstance(pending, tuple):
                stream, pinned = pending
                try:
                    self._runtime().synchronize(stream)
                finally:
                    self._regions.unpin(pinned)
            else:
                pending.result()
        except LLMException:
            if not quiet:
                raise

    # --- our transfers ---------------------------------------------------------------

    def _local_slots(self):
        with self._lock:
            if self._local is None:
                runtime = self._runtime()
                self._local = [Slot(runtime, self._engine, self.chunk_bytes, False)
                               for _ in range(DEPTH)]
            return self._local

    def _remote_slots(self, peer, timeout_ms):
        with self._lock:
            known = self._peer_slots.get(peer)
        if known is None:
            reply = self._engine.call(peer, "cache.stage_slots", {}, timeout_ms)
            try:
                slots = [RemoteSlot(int(a), int(r)) for a, r in reply["slots"]]
                size = int(reply["bytes"])
            except (KeyError, TypeError, ValueError):
                slots, size = [], 0
            if len(slots) != DEPTH or size <= 0:
                raise LLMException(LLMStatusCode.LLM_FAILED,
                                   f"{peer.name} described its staging slots badly: {reply}")
            with self._lock:
                known = self._peer_slots.setdefault(peer, (slots, size, threading.Lock()))
        return known

    def _calls(self):
        with self._lock:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix="kv-stage")
            return self._helper

    def transfer(self, peer, op, local, remote, lengths, timeout_ms, local_regions=None,
                 remote_regions=None, remote_device_regions=None):
        """Move pieces between our memory and the peer's as the engine's
        transfer_sync (op 'read': remote -> local, 'write': local ->
        remote). ``local_regions``: our device region of each piece when
        our side is device memory (else None: host memory the engine has
        registered); ``remote_regions``: the peer's host region of each
        piece, or ``remote_device_regions``: its device region of each
        piece. Returns the path taken ('host' or 'staged'). When it
        returns, every byte is in place, in device memory included."""
        if local_regions is None and remote_device_regions is None:
            self._engine.transfer_sync(peer, op, local, remote, lengths, timeout_ms,
                                       remote_regions=remote_regions)
            self._record(peer, PATH_HOST)
            return PATH_HOST
        chunk = self.chunk_bytes
        remote_slots = lock = None
        if remote_device_regions is not None:
            remote_slots, remote_bytes, lock = self._remote_slots(peer, timeout_ms)
            chunk = min(chunk, remote_bytes)
        local_slots = self._local_slots() if local_regions is not None else None
        if local_slots is not None:
            chunk = min(chunk, local_slots[0].nbytes)
        chunks = chunked(local, remote, lengths, chunk)
        deadline = Deadline(timeout_ms, f"staged {op} with {peer.name}")
        with _maybe(self._local_lock if local_slots is not None else None), _maybe(lock):
            self._pipeline(peer, op, chunks, deadline, local_slots, remote_slots,
                           None if local_regions is None else np.asarray(local_regions),
                           None if remote_regions is None else np.asarray(remote_regions),
                           None if remote_device_regions is None
                           else np.asarray(remote_device_regions))
        self._record(peer, PATH_STAGED)
        return PATH_STAGED

    def _pipeline(self, peer, op, chunks, deadline, local_slots, remote_slots,
                  local_regions, remote_regions, remote_device_regions):
        """Per chunk: produce (the side bytes come from copies device ->
        its slot), move (engine transfer), consume (the side bytes go to
        copies its slot -> device). Chunk i+1 is produced while chunk i
        is waited for, moved and consumed (the peer's calls run in a helper
        thread, our copies on the slots' streams)."""
        reading = op == "read"
        slots_of = [remote_slots, local_slots] if reading else [local_slots, remote_slots]
        producer_slots, consumer_slots = slots_of

        def produce(i):
            loc, rem, lens, _, idx = chunks[i]
            k = i % DEPTH
            if reading and remote_slots is not None:
                slot = remote_slots[k]
                slot.pending = self._calls().submit(self._peer_call, peer, "cache.stage_out", k,
                                                    rem, lens, remote_device_regions[idx],
                                                    deadline)
            elif not reading and local_slots is not None:
                self._copy_pieces(local_slots[k], loc, lens, local_regions[idx], D2H, False,
                                  wait=False)

        def consume(i):
            loc, rem, lens, _, idx = chunks[i]
            k = i % DEPTH
            if reading and local_slots is not None:
                self._copy_pieces(local_slots[k], loc, lens, local_regions[idx], H2D, False,
                                  wait=False)
            elif not reading and remote_slots is not None:
                remote_slots[k].pending = self._calls().submit(
                    self._peer_call, peer, "cache.stage_in", k, rem, lens,
                    remote_device_regions[idx], deadline)

        def move(i):
            loc, rem, lens, offsets, idx = chunks[i]
            k = i % DEPTH
            local_addrs = loc if local_slots is None else np.uint64(local_slots[k].addr) + offsets
            if remote_slots is None:
                remote_addrs, named = rem, None if remote_regions is None else remote_regions[idx]
            else:
                remote_addrs = np.uint64(remote_slots[k].addr) + offsets
                named = np.full(lens.size, remote_slots[k].region_id, dtype=np.uint64)
            self._engine.transfer_sync(peer, op, local_addrs, remote_addrs, lens, deadline.left(),
                                       remote_regions=named)

        def settle(slots, k):
            if slots is not None:
                self._settle(slots[k])

        used = [s for s in (local_slots, remote_slots) if s is not None]
        try:
            if chunks:
                produce(0)
            for i in range(len(chunks)):
                k = i % DEPTH
                if i + 1 < len(chunks):
                    # Its source slot was emptied by the move of chunk i-1.
                    produce(i + 1)
                settle(producer_slots, k)           # chunk i is in its source slot
                settle(consumer_slots, k)           # chunk i-2 has left its destination slot
                move(i)
                consume(i)
            for slots in used:
                for k in range(DEPTH):
                    self._settle(slots[k])
        except BaseException:
            for slots in used:
                for slot in slots:
                    self._settle(slot, quiet=True)
            raise

    def _peer_call(self, peer, method, slot, addrs, lengths, regions, deadline):
        self._engine.call(peer, method, {"slot": slot, "addrs": [int(a) for a in addrs],
                                         "lengths": [int(n) for n in lengths],
                                         "regions": [int(r) for r in regions]}, deadline.left())

    def _close_slot(self, slot):
        self._settle(slot, quiet=True)
        try:
            self._engine.unregister_memory(slot.region_id)
        except LLMException as exc:
            log.warning("staging slot %s stays registered: %s", slot.region_id, exc)
            return
        slot.stream.close()
        slot.buffer.close()

    def close(self):
        with self._lock:
            helper, self._helper = self._helper, None
            slots = [s for group in self._served.values() for s in group] + (self._local or [])
            self._served.clear()
            self._local = None
        if helper is not None:
            helper.shutdown(wait=True)
        for slot in slots:
            self._close_slot(slot)


class Deadline:
    """One deadline for every step of a staged transfer."""

    def __init__(self, timeout_ms, what):
        self.end = time.monotonic() + timeout_ms / 1000
        self.what = what

    def left(self):
        """The ms left (at least 1); LLM_TIMEOUT once none are."""
        left = int((self.end - time.monotonic()) * 1000)
        if left <= 0:
            raise LLMException(LLMStatusCode.LLM_TIMEOUT, f"{self.what}: deadline passed")
        return left


class RemoteSlot:
    def __init__(self, addr, region_id):
        self.addr, self.region_id = addr, region_id
        self.pending = None


class _maybe:
    """``with _maybe(lock)``: the lock, or nothing for None."""

    def __init__(self, lock):
        self.lock = lock

    def __enter__(self):
        if self.lock is not None:
            self.lock.acquire()

    def __exit__(self, *exc):
        if self.lock is not None:
            self.lock.release()
