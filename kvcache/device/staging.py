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
from concurrent import futures
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from kvcache.checks import MAX_TIMEOUT_MS
from kvcache.device.runtime import D2H, H2D
from kvcache.engine.rpc import is_int, list_of
from kvcache.status import LLMException, LLMStatusCode

log = logging.getLogger(__name__)

DEPTH = 2                           # slots per side: one moving, one being copied
DEFAULT_CHUNK_BYTES = 4 << 20
MAX_PIECES = 4096                   # per chunk: what one control call names
# Links we lend a slot pair to at once (2 x chunk bytes of pinned, registered
# memory each, freed when the link ends); one more is LLM_OUT_OF_MEMORY.
MAX_SERVED_LINKS = 32
MAX_LOCAL_PAIRS = 4                 # our own staged transfers running at once
# How much longer than a stage call's budget the caller waits for its answer:
# the copies its holder queued before the budget ran out (one chunk at the
# most) finish inside it, so a failure is reported after every byte landed.
STAGE_MARGIN_MS = 1000
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
    """A pinned host buffer registered with the engine, and its stream;
    ``remote``: offered to the link ``peer`` only (a Peer), which the slot
    is lent to, so no other peer can see or touch a transfer in flight."""

    def __init__(self, runtime, engine, nbytes, remote, peer=None):
        self.buffer = runtime.alloc_host(nbytes)
        self.stream = None
        try:
            self.stream = runtime.stream()
            self.addr, self.nbytes = self.buffer.ptr, nbytes
            self.region_id = engine.register_memory(self.addr, nbytes, remote_accessible=remote,
                                                    peer=peer)
        except BaseException:
            if self.stream is not None:
                self.stream.close()
            self.buffer.close()
            raise
        self.pending = None                 # a stream to synchronise or a Future to wait on


class _Served:
    """The slots we lend one link, and how many of its stage calls run."""

    def __init__(self, slots):
        self.slots = slots
        self.busy = 0
        self.ended = False                  # the link ended: free once no call runs


class Stager:
    """``engine``: the TransferEngine; ``regions``: DeviceRegions;
    ``runtime()``: the DeviceRuntime (opened at first call; raises
    LLM_FEATURE_NOT_ENABLED without a configured device);
    ``chunk_bytes``: the slot size; ``move``: the engine's transfer of
    host bytes (default ``engine.transfer_sync``; an engine that stages its
    own transfer_sync passes its host one)."""

    def __init__(self, engine, regions, runtime, chunk_bytes=DEFAULT_CHUNK_BYTES, move=None):
        self._engine = engine
        self._move = move or engine.transfer_sync
        self._regions = regions
        self._runtime = runtime
        self.chunk_bytes = chunk_bytes
        self._cond = threading.Condition()
        self._closing = False
        self._busy = 0                      # stage calls served and our transfers running
        self._local_free = []               # our idle slot pairs for our own transfers
        self._local_pairs = 0               # our slot pairs, idle or in use
        self._served = {}                   # Peer (a link) -> _Served: slots we lend it
        self._stranded = []                 # slots still registered when freed: close retries
        self._peer_slots = weakref.WeakKeyDictionary()   # Peer (a link) -> its slots for us
        self._paths = {}                    # peer name -> the path its last transfer took
        pieces = list_of(is_int, MAX_PIECES)
        engine.rpc.serve("cache.stage_slots", self._rpc_slots, {})
        engine.rpc.serve("cache.stage_out", self._rpc_out,
                         {"slot": is_int, "addrs": pieces, "lengths": pieces,
                          "regions": pieces, "budget_ms": is_int})
        engine.rpc.serve("cache.stage_in", self._rpc_in,
                         {"slot": is_int, "addrs": pieces, "lengths": pieces,
                          "regions": pieces, "budget_ms": is_int})
        engine.on_link_closed(self._link_closed)

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

    def _enter(self, peer):
        """A stage call of the link ``peer`` begins: its _Served (slots made
        at its first call). LLM_ENGINE_FINALIZED once closing (the slots may
        be freed), LLM_LINK_FAILED for a link that ended, LLM_OUT_OF_MEMORY
        beyond MAX_SERVED_LINKS links."""
        with self._cond:
            if self._closing:
                raise LLMException(LLMStatusCode.LLM_ENGINE_FINALIZED,
                                   "the cache manager is closing: no more staging")
            served = self._served.get(peer)
            if served is None:
                if not peer.linked:
                    raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                       f"the link to {peer.name} has ended")
                if len(self._served) >= MAX_SERVED_LINKS:
                    raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                                       f"staging slots are lent to {len(self._served)} links "
                                       f"already (MAX_SERVED_LINKS = {MAX_SERVED_LINKS}); "
                                       f"{peer.name} gets none until one ends")
                runtime = self._runtime()
                slots = []
                try:
                    for _ in range(DEPTH):
                        slots.append(Slot(runtime, self._engine, self.chunk_bytes, True, peer))
                except BaseException:
                    self._close_slots(slots)
                    raise
                served = self._served[peer] = _Served(slots)
            served.busy += 1
            self._busy += 1
            return served

    def _leave(self, served):
        with self._cond:
            served.busy -= 1
            free = served.ended and not served.busy
        try:
            if free:
                self._close_slots(served.slots)
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def _link_closed(self, peer):
        """The link ended: free the slots we lent it (once its calls ran)."""
        with self._cond:
            served = self._served.pop(peer, None)
            if served is None:
                return
            served.ended = True
            if served.busy:
                return                      # its last call frees them
            # Counted as a call, so that close waits for this freeing.
            self._busy += 1
        try:
            self._close_slots(served.slots)
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()

    def _rpc_slots(self, peer, params):
        served = self._enter(peer)
        try:
            return {"slots": [[s.addr, s.region_id] for s in served.slots],
                    "bytes": self.chunk_bytes}
        finally:
            self._leave(served)

    def _serve_copy(self, peer, params, kind):
        served = self._enter(peer)
        try:
            slots = served.slots
            if not 0 <= params["slot"] < len(slots):
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"no staging slot {params['slot']}")
            addrs, lengths, regions = params["addrs"], params["lengths"], params["regions"]
            if not 0 < params["budget_ms"] <= MAX_TIMEOUT_MS:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"staging budget {params['budget_ms']} ms outside "
                                   f"1..{MAX_TIMEOUT_MS}")
            until = time.monotonic() + params["budget_ms"] / 1000
            if (not len(addrs) == len(lengths) == len(regions) or sum(lengths) > self.chunk_bytes
                    or min(addrs + lengths, default=1) <= 0):
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"staging request: {len(addrs)} addresses, {len(lengths)} "
                                   f"lengths, {len(regions)} regions, {sum(lengths)} bytes for "
                                   f"a {self.chunk_bytes}-byte slot (addresses and lengths "
                                   "must be positive)")
            self._copy_pieces(slots[params["slot"]], addrs, lengths, regions, kind,
                              until=(until, peer))
            return {}
        finally:
            self._leave(served)

    def _rpc_out(self, peer, params):
        return self._serve_copy(peer, params, D2H)

    def _rpc_in(self, peer, params):
        return self._serve_copy(peer, params, H2D)

    def _copy_pieces(self, slot, addrs, lengths, regions, kind, wait=True, own=None,
                     until=None):
        """Copy device pieces into (D2H) or out of (H2D) ``slot``, packed in
        order, on the slot's stream; ``regions``: the region a peer named
        for each piece (checked), or None for our own pieces (found by
        address, in a region of the cache ``own``); ``wait``: synchronise
        it before returning (else ``slot.pending`` is the stream to
        synchronise); ``until``: (time.monotonic() deadline, Peer) of a
        peer's call: no copy is queued once the deadline passed or the link
        ended (LLM_TIMEOUT), so no byte of a transfer its initiator gave up
        lands later."""
        runtime = self._runtime()
        pinned = self._regions.pin(addrs, lengths, regions, own)
        try:
            offset = 0
            for i, (addr, length) in enumerate(zip(addrs, lengths)):
                addr, length = int(addr), int(length)
                if until is not None and (time.monotonic() > until[0] or not until[1].linked):
                    raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                                       f"staging for {until[1].name}: its deadline passed or "
                                       f"its link ended; pieces {i} and on not copied")
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

    def _settle(self, slot, deadline=None, quiet=False):
        """Wait for what ``slot`` still has running (a stream's copies, or a
        peer's call until ``deadline``); its error, unless ``quiet`` (which
        leaves a peer's call to the helper that runs it)."""
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
            elif not quiet:
                try:
                    pending.result(timeout=deadline.seconds())
                except futures.TimeoutError:
                    raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                                       f"{deadline.what}: deadline passed") from None
        except LLMException:
            if not quiet:
                raise

    # --- our transfers ---------------------------------------------------------------

    def _take_local(self, deadline):
        """An idle pair of our slots (a new one while fewer than
        MAX_LOCAL_PAIRS exist), waiting until ``deadline`` for one;
        LLM_ENGINE_FINALIZED once closing began (close waits for us)."""
        with self._cond:
            while not self._local_free and self._local_pairs >= MAX_LOCAL_PAIRS:
                if self._closing:
                    raise LLMException(LLMStatusCode.LLM_ENGINE_FINALIZED,
                                       "the cache manager is closing")
                self._cond.wait(deadline.left() / 1000)
            if self._local_free:
                return self._local_free.pop()
            self._local_pairs += 1
        slots = []
        try:
            runtime = self._runtime()
            for _ in range(DEPTH):
                slots.append(Slot(runtime, self._engine, self.chunk_bytes, False))
        except BaseException:
            self._close_slots(slots)
            with self._cond:
                self._local_pairs -= 1
                self._cond.notify_all()
            raise
        return slots

    def _give_local(self, slots):
        with self._cond:
            self._local_free.append(slots)
            self._cond.notify_all()

    def _remote_slots(self, peer, deadline):
        with self._cond:
            known = self._peer_slots.get(peer)
        if known is None:
            reply = self._engine.call(peer, "cache.stage_slots", {}, deadline.left())
            try:
                slots = [RemoteSlot(int(a), int(r)) for a, r in reply["slots"]]
                size = int(reply["bytes"])
            except (KeyError, TypeError, ValueError):
                slots, size = [], 0
            if len(slots) != DEPTH or size <= 0:
                raise LLMException(LLMStatusCode.LLM_FAILED,
                                   f"{peer.name} described its staging slots badly: {reply}")
            with self._cond:
                known = self._peer_slots.setdefault(peer, (slots, size, threading.Lock()))
        return known

    def transfer(self, peer, op, local, remote, lengths, timeout_ms, local_cache=None,
                 remote_regions=None, remote_device_regions=None):
        """Move pieces between our memory and the peer's as the engine's
        transfer_sync (op 'read': remote -> local, 'write': local ->
        remote). ``local_cache``: the device cache our pieces lie in (each
        found in our device region table by address and checked to be in
        one of its regions, LLM_KV_CACHE_NOT_EXIST otherwise), else None:
        host memory the engine has registered; ``remote_regions``: the peer's host region of each
        piece, or ``remote_device_regions``: its device region of each
        piece. Returns the path taken ('host' or 'staged'). When it
        returns, every byte is in place, in device memory included.
        Every step of a staged transfer, the peer's description of its
        slots and the wait for slots included, shares one deadline of
        ``timeout_ms`` (LLM_TIMEOUT)."""
        if local_cache is None and remote_device_regions is None:
            self._move(peer, op, local, remote, lengths, timeout_ms,
                                       remote_regions=remote_regions)
            self._record(peer, PATH_HOST)
            return PATH_HOST
        deadline = Deadline(timeout_ms, f"staged {op} with {peer.name}")
        with self._cond:
            if self._closing:
                raise LLMException(LLMStatusCode.LLM_ENGINE_FINALIZED,
                                   "the cache manager is closing")
            self._busy += 1
        try:
            self._staged(peer, op, local, remote, lengths, deadline, local_cache,
                         remote_regions, remote_device_regions)
        finally:
            with self._cond:
                self._busy -= 1
                self._cond.notify_all()
        self._record(peer, PATH_STAGED)
        return PATH_STAGED

    def _staged(self, peer, op, local, remote, lengths, deadline, local_cache,
                remote_regions, remote_device_regions):
        chunk = self.chunk_bytes
        remote_slots = lock = None
        if remote_device_regions is not None:
            remote_slots, remote_bytes, lock = self._remote_slots(peer, deadline)
            chunk = min(chunk, remote_bytes)
            # Our transfers with this link take its slots in turn.
            if not lock.acquire(timeout=deadline.left() / 1000):
                raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                                   f"{deadline.what}: its staging slots stayed busy")
        try:
            local_slots = self._take_local(deadline) if local_cache is not None else None
            try:
                if local_slots is not None:
                    chunk = min(chunk, local_slots[0].nbytes)
                # Each transfer has its own helper for the peer's calls, so a
                # slow peer holds up no other.
                helper = (ThreadPoolExecutor(1, thread_name_prefix="kv-stage")
                          if remote_slots is not None else None)
                try:
                    self._pipeline(peer, op, chunked(local, remote, lengths, chunk), deadline,
                                   local_slots, remote_slots, helper, local_cache,
                                   None if remote_regions is None
                                   else np.asarray(remote_regions),
                                   None if remote_device_regions is None
                                   else np.asarray(remote_device_regions))
                except BaseException:
                    if helper is not None:
                        # The transfer failed: the peer's calls not begun yet are
                        # dropped, the one running ends by the deadline.
                        helper.shutdown(wait=True, cancel_futures=True)
                    raise
                if helper is not None:
                    helper.shutdown(wait=True)
            finally:
                if local_slots is not None:
                    self._give_local(local_slots)
        finally:
            if lock is not None:
                lock.release()

    def _pipeline(self, peer, op, chunks, deadline, local_slots, remote_slots, helper,
                  local_cache, remote_regions, remote_device_regions):
        """Per chunk: produce (the side bytes come from copies device ->
        its slot), move (engine transfer), consume (the side bytes go to
        copies its slot -> device). Chunk i+1 is produced while chunk i
        is waited for, moved and consumed (the peer's calls run in
        ``helper``, our copies on the slots' streams)."""
        reading = op == "read"
        slots_of = [remote_slots, local_slots] if reading else [local_slots, remote_slots]
        producer_slots, consumer_slots = slots_of

        def produce(i):
            loc, rem, lens, _, idx = chunks[i]
            k = i % DEPTH
            if reading and remote_slots is not None:
                slot = remote_slots[k]
                slot.pending = helper.submit(self._peer_call, peer, "cache.stage_out", k,
                                             rem, lens, remote_device_regions[idx], deadline)
            elif not reading and local_slots is not None:
                self._copy_pieces(local_slots[k], loc, lens, None, D2H, False, local_cache)

        def consume(i):
            loc, rem, lens, _, idx = chunks[i]
            k = i % DEPTH
            if reading and local_slots is not None:
                self._copy_pieces(local_slots[k], loc, lens, None, H2D, False, local_cache)
            elif not reading and remote_slots is not None:
                remote_slots[k].pending = helper.submit(
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
            self._move(peer, op, local_addrs, remote_addrs, lens, deadline.left(),
                                       remote_regions=named)

        def settle(slots, k):
            if slots is not None:
                self._settle(slots[k], deadline)

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
                    self._settle(slots[k], deadline)
        except BaseException:
            for slots in used:
                for slot in slots:
                    self._settle(slot, quiet=True)
            raise

    def _peer_call(self, peer, method, slot, addrs, lengths, regions, deadline):
        budget = deadline.left()
        self._engine.call(peer, method, {"slot": slot, "addrs": [int(a) for a in addrs],
                                         "lengths": [int(n) for n in lengths],
                                         "regions": [int(r) for r in regions],
                                         "budget_ms": budget},
                          min(budget + STAGE_MARGIN_MS, MAX_TIMEOUT_MS))

    def _close_slot(self, slot):
        """Free ``slot``; False when its registration stays (a transfer may
        still use it), and with it the memory."""
        self._settle(slot, quiet=True)
        try:
            self._engine.unregister_memory(slot.region_id)
        except LLMException as exc:
            log.warning("staging slot %s stays registered: %s", slot.region_id, exc)
            return False
        slot.stream.close()
        slot.buffer.close()
        return True

    def _close_slots(self, slots):
        """Free ``slots``; those that stay registered are kept for close to
        retry. Whether all were freed."""
        kept = [slot for slot in slots if not self._close_slot(slot)]
        if kept:
            with self._cond:
                self._stranded.extend(kept)
        return not kept

    def close(self, timeout_ms):
        """Stop serving stage calls and starting transfers, wait up to
        ``timeout_ms`` for those running, then free every slot (slots that
        stayed registered when their link ended included: retried here).
        Whether all of it was freed: False keeps what a call may still use
        (slots, and the caller keeps the runtime and device memory); a
        later close retries."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()         # transfers waiting for our slots give up
            if not self._cond.wait_for(lambda: not self._busy, timeout_ms / 1000):
                log.warning("%d staging calls or transfers still run at close: their slots "
                            "stay allocated", self._busy)
                return False
            slots = ([s for served in self._served.values() for s in served.slots]
                     + [s for pair in self._local_free for s in pair] + self._stranded)
            self._served.clear()
            self._local_free, self._stranded = [], []
        return self._close_slots(slots)


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

    def seconds(self):
        """The seconds left (0 once none are)."""
        return max(0.0, self.end - time.monotonic())


class RemoteSlot:
    def __init__(self, addr, region_id):
        self.addr, self.region_id = addr, region_id
        self.pending = None
