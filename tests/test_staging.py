"""The stager's lifetimes and waits, in one process against doubles of the
engine (control calls answered by the test, transfers copied with memmove)
and of the device runtime (numpy memory, copies that can be held at a
gate): close drains stage calls before freeing slots, slots are lent per
link and freed when it ends (at most MAX_SERVED_LINKS links), and every
wait of a staged transfer is bounded by its one deadline, with no peer
holding up another. The byte paths through real runtimes and links are in
test_device_caches.py."""
import ctypes
import threading
import time

import numpy as np
import pytest

from helpers import wait_until
from kvcache.device import staging
from kvcache.device.caches import DeviceCaches, DeviceConfig
from kvcache.device.regions import DeviceRegions
from kvcache.engine.rpc import Rpc
from kvcache.status import LLMException, LLMStatusCode

CHUNK = 1000


class Memory:
    def __init__(self, nbytes):
        self.array = np.zeros(nbytes, np.uint8)
        self.ptr = self.array.ctypes.data
        self.closed = False

    def close(self):
        self.closed = True


class Stream:
    def close(self):
        pass


class Runtime:
    """Copies run at once, unless ``gate`` is cleared: then they wait for it."""

    def __init__(self):
        self.host = []
        self.gate = threading.Event()
        self.gate.set()
        self.copying = threading.Event()

    def alloc_host(self, nbytes):
        self.host.append(Memory(nbytes))
        return self.host[-1]

    def stream(self):
        return Stream()

    def copy(self, dst, src, nbytes, kind, stream=None):
        self.copying.set()
        assert self.gate.wait(30)
        ctypes.memmove(dst, src, nbytes)

    def synchronize(self, stream):
        pass

    def open_slots(self):
        return [m for m in self.host if not m.closed]


class Link:
    def __init__(self, name):
        self.name = name
        self.linked = True


class Engine:
    """``answer(peer, method, params, timeout_ms)`` answers our control calls."""

    timeout_ms = 5000

    def __init__(self, answer=None):
        self.rpc = Rpc()
        self.answer = answer
        self.hooks = []
        self.ids = iter(range(1, 1 << 30))
        self.registered = set()
        self.calls = []
        self.transfer_gate = threading.Event()
        self.transfer_gate.set()

    def on_link_closed(self, hook):
        self.hooks.append(hook)

    def end(self, link):
        link.linked = False
        for hook in self.hooks:
            hook(link)

    def register_memory(self, addr, nbytes, remote_accessible=True, peer=None):
        region = next(self.ids)
        self.registered.add(region)
        return region

    def unregister_memory(self, region):
        self.registered.remove(region)

    def call(self, peer, method, params, timeout_ms):
        self.calls.append((peer.name, method, timeout_ms))
        return self.answer(peer, method, params, timeout_ms)

    def transfer_sync(self, peer, op, local, remote, lengths, timeout_ms, remote_regions=None):
        assert self.transfer_gate.wait(30)
        for loc, rem, n in zip(local, remote, lengths):
            dst, src = (loc, rem) if op == "read" else (rem, loc)
            ctypes.memmove(int(dst), int(src), int(n))


def stager_with(engine=None):
    runtime = Runtime()
    engine = engine or Engine()
    return staging.Stager(engine, DeviceRegions(), lambda: runtime, CHUNK), engine, runtime


def code_of(call, *args):
    with pytest.raises(LLMException) as err:
        call(*args)
    return err.value.status_code, str(err.value)


def device_memory(stager, nbytes, remote=True):
    memory = np.arange(nbytes, dtype=np.uint8)
    return memory, stager._regions.register(memory.ctypes.data, nbytes, remote)


class Own:
    """Our device cache as the stager takes it: its region ids."""

    def __init__(self, region_ids):
        self.region_ids = region_ids


def stage_out(stager, link, memory, region, slot=0):
    return stager._engine.rpc.dispatch(link, "cache.stage_out", {
        "slot": slot, "addrs": [memory.ctypes.data], "lengths": [100], "regions": [region],
        "budget_ms": 30_000})


def stalled_stage_out():
    """A stager whose peer's stage_out call is held inside its device copy
    (the runtime's gate closed): (stager, engine, runtime, link, the call's
    thread); open ``runtime.gate`` to let it finish."""
    stager, engine, runtime = stager_with()
    link = Link("decoder")
    memory, region = device_memory(stager, 4096)
    runtime.gate.clear()
    call = threading.Thread(target=stage_out, args=(stager, link, memory, region))
    call.start()
    if not runtime.copying.wait(10):
        runtime.gate.set()
        call.join(10)
        raise AssertionError("the stage_out call never reached its device copy")
    return stager, engine, runtime, link, call


def test_close_waits_for_stage_calls_running_then_refuses_new_ones():
    stager, engine, runtime = stager_with()
    link = Link("decoder")
    memory, region = device_memory(stager, 4096)
    engine.rpc.dispatch(link, "cache.stage_slots", {})
    runtime.gate.clear()
    call = threading.Thread(target=stage_out, args=(stager, link, memory, region))
    call.start()
    assert runtime.copying.wait(10)
    closed = []
    closer = threading.Thread(target=lambda: closed.append(stager.close(10_000)))
    closer.start()
    time.sleep(0.3)
    # The copy into the slot still runs: its memory must stay.
    assert closer.is_alive() and all(not m.closed for m in runtime.host)
    runtime.gate.set()
    call.join(10)
    closer.join(10)
    assert closed == [True] and not runtime.open_slots() and not engine.registered
    # A call arriving after close allocates nothing.
    code, message = code_of(engine.rpc.dispatch, link, "cache.stage_slots", {})
    assert code == LLMStatusCode.LLM_ENGINE_FINALIZED, message
    assert len(runtime.host) == staging.DEPTH


def test_close_keeps_slots_a_call_still_uses_after_its_wait():
    stager, engine, runtime, link, call = stalled_stage_out()
    try:
        assert stager.close(200) is False
        assert len(runtime.open_slots()) == staging.DEPTH
    finally:
        runtime.gate.set()
        call.join(10)


class Pool:
    closed = False

    def close(self):
        self.closed = True


def test_device_memory_stays_while_a_cache_could_not_be_freed():
    for in_use in (True, False):
        caches = DeviceCaches(Engine(), DeviceConfig("cuda"))
        caches._runtime, caches._pool = Runtime(), Pool()
        caches._runtime.close = lambda: None
        pool = caches._pool
        caches.close(in_use)
        assert pool.closed is not in_use


def test_slots_are_lent_per_link_and_freed_when_it_ends(monkeypatch):
    monkeypatch.setattr(staging, "MAX_SERVED_LINKS", 3)
    stager, engine, runtime = stager_with()
    # One cluster, two links at once (one each way): a slot pair each.
    out, back = Link("prompt"), Link("prompt")
    first = engine.rpc.dispatch(out, "cache.stage_slots", {})["slots"]
    second = engine.rpc.dispatch(back, "cache.stage_slots", {})["slots"]
    assert not {a for a, _ in first} & {a for a, _ in second}
    engine.end(out)
    assert len(runtime.open_slots()) == staging.DEPTH
    assert engine.rpc.dispatch(back, "cache.stage_slots", {})["slots"] == second
    # Restarting decoders, each a new name: what is lent stays bounded.
    for i in range(10):
        link = Link(f"decoder-{i}")
        engine.rpc.dispatch(link, "cache.stage_slots", {})
        engine.end(link)
    assert len(runtime.open_slots()) == staging.DEPTH
    live = [Link(f"live-{i}") for i in range(2)]
    for link in live:
        engine.rpc.dispatch(link, "cache.stage_slots", {})
    code, message = code_of(engine.rpc.dispatch, Link("one-more"), "cache.stage_slots", {})
    assert code == LLMStatusCode.LLM_OUT_OF_MEMORY and "MAX_SERVED_LINKS" in message
    # A link that ended asks for nothing more.
    code, _ = code_of(engine.rpc.dispatch, out, "cache.stage_slots", {})
    assert code == LLMStatusCode.LLM_LINK_FAILED


def test_a_link_ending_during_a_stage_call_frees_its_slots_after_the_call():
    stager, engine, runtime, link, call = stalled_stage_out()
    engine.end(link)
    assert len(runtime.open_slots()) == staging.DEPTH
    runtime.gate.set()
    call.join(10)
    assert not runtime.open_slots() and not engine.registered


class Holder:
    """The peer side of staged reads: its slots are numpy buffers; its
    stage_out calls fill them, after ``delay`` s (or when ``release`` is
    set, for a peer that hangs)."""

    def __init__(self, delay=0.0, slots_delay=0.0):
        self.slots = [np.zeros(CHUNK, np.uint8) for _ in range(staging.DEPTH)]
        self.delay, self.slots_delay = delay, slots_delay
        self.release = threading.Event()
        self.budgets = []                   # budget_ms of each stage call

    def answer(self, method, params, timeout_ms):
        if method == "cache.stage_slots":
            time.sleep(self.slots_delay)
            return {"slots": [[s.ctypes.data, i + 1] for i, s in enumerate(self.slots)],
                    "bytes": CHUNK}
        self.budgets.append((params["budget_ms"], timeout_ms))
        if self.delay:
            self.release.wait(self.delay)
        self.slots[params["slot"]][:sum(params["lengths"])] = 7
        return {}


def read_staged(stager, link, dst, timeout_ms):
    n = dst.size
    return stager.transfer(link, "read", [dst.ctypes.data], [0x1000], [n], timeout_ms,
                           remote_device_regions=[9])


def test_a_slow_peer_holds_up_no_transfer_with_another():
    holders = {"slow": Holder(delay=20), "quick": Holder()}
    engine = Engine(lambda peer, method, params, timeout_ms:
                    holders[peer.name].answer(method, params, timeout_ms))
    stager, _, _ = stager_with(engine)
    slow_dst, quick_dst = np.zeros(3 * CHUNK, np.uint8), np.zeros(3 * CHUNK, np.uint8)
    slow = threading.Thread(target=read_staged, args=(stager, Link("slow"), slow_dst, 30_000))
    slow.start()
    try:
        wait_until(lambda: any(c[1] == "cache.stage_out" for c in engine.calls), 10,
                   "the slow peer's first stage_out")
        assert read_staged(stager, Link("quick"), quick_dst, 3000) == staging.PATH_STAGED
        assert (quick_dst == 7).all()
    finally:
        holders["slow"].release.set()
        slow.join(30)
    assert (slow_dst == 7).all()


def test_the_peer_describing_its_slots_counts_against_the_transfer_deadline():
    holder = Holder(slots_delay=0.4)
    stager, engine, _ = stager_with(Engine(lambda peer, method, params, timeout_ms:
                                           holder.answer(method, params, timeout_ms)))
    dst = np.zeros(2 * CHUNK, np.uint8)
    read_staged(stager, Link("prompt"), dst, 2000)
    # The holder gets what is left of the deadline; the call waits that long
    # and the margin for the copies queued before it ran out.
    assert holder.budgets and max(b for b, _ in holder.budgets) <= 2000 - 350, holder.budgets
    assert all(t == b + staging.STAGE_MARGIN_MS for b, t in holder.budgets), holder.budgets


def first_transfer_holding_our_slots(monkeypatch):
    """One pair of our slots, held by a staged write stalled at the engine
    (released after 6 s whatever happens): (stager, engine, memory, region,
    dst, args of a transfer like it, its thread, the release timer)."""
    monkeypatch.setattr(staging, "MAX_LOCAL_PAIRS", 1)
    stager, engine, _ = stager_with()
    memory, region = device_memory(stager, 4 * CHUNK, remote=False)
    dst = np.zeros(4 * CHUNK, np.uint8)
    args = (Link("decoder"), "write", [memory.ctypes.data], [dst.ctypes.data], [4 * CHUNK])
    engine.transfer_gate.clear()
    first = threading.Thread(target=stager.transfer, args=args + (30_000, Own([region])))
    first.start()
    opener = threading.Timer(6, engine.transfer_gate.set)
    opener.start()
    wait_until(lambda: stager._local_pairs == 1 and not stager._local_free, 10,
               "the first transfer holding our slots")
    return stager, engine, memory, region, dst, args, first, opener


def test_a_transfer_waiting_for_our_slots_times_out_at_its_deadline(monkeypatch):
    stager, engine, memory, region, dst, args, first, opener = \
        first_transfer_holding_our_slots(monkeypatch)
    try:
        started = time.monotonic()
        code, message = code_of(stager.transfer, *args, 300, Own([region]))
        assert code == LLMStatusCode.LLM_TIMEOUT, message
        assert time.monotonic() - started < 3
    finally:
        engine.transfer_gate.set()
        opener.cancel()
        first.join(30)
    assert np.array_equal(dst, memory)


def test_a_real_link_ending_frees_what_was_lent_to_it():
    """Two engines over tcp: the holder's engine tells the stager when each
    link ends (either side unlinking), and a closed stager refuses calls."""
    from kvcache.engine.engine import TransferEngine
    holder = TransferEngine("holder", transport="tcp")
    caller = TransferEngine("caller", transport="tcp")
    runtime = Runtime()
    stager = staging.Stager(holder, DeviceRegions(), lambda: runtime, CHUNK)
    try:
        # One pair, two links at once (one made each way), one name.
        first = caller.connect(holder.address, timeout_ms=5000)
        back = holder.connect(caller.address, timeout_ms=5000)
        second = [p for p in caller.peers() if p.inbound][0]
        lent = [caller.call(p, "cache.stage_slots", {}, 5000)["slots"] for p in (first, second)]
        assert lent[0] != lent[1] and len(runtime.open_slots()) == 2 * staging.DEPTH
        # Each pair is offered to its own link only.
        inbound = [p for p in holder.peers() if p.inbound][0]
        ids = [{r for _, r in slots} for slots in lent]
        offered = [{r for r, _, _ in holder.regions(link)} for link in (inbound, back)]
        assert ids[0] <= offered[0] and ids[1] <= offered[1]
        assert not ids[0] & offered[1] and not ids[1] & offered[0]
        assert not (ids[0] | ids[1]) & {r for r, _, _ in holder.regions()}
        caller.disconnect(first)
        wait_until(lambda: len(runtime.open_slots()) == staging.DEPTH, 10, "one pair freed")
        assert not [r for r in ids[0] if r in holder.registry]
        holder.disconnect(back)
        wait_until(lambda: not runtime.open_slots(), 10, "the other pair freed")
        third = caller.connect(holder.address, timeout_ms=5000)
        assert stager.close(5000) is True
        code, message = code_of(caller.call, third, "cache.stage_slots", {}, 5000)
        assert code == LLMStatusCode.LLM_ENGINE_FINALIZED, message
        assert not runtime.open_slots()
    finally:
        caller.close()
        holder.close()


class HeldEngine(Engine):
    """Unregistering waits at ``unregister_gate``; regions in ``in_use``
    stay registered (LLM_LINK_BUSY), as a slot a transfer still uses."""

    def __init__(self, answer=None):
        super().__init__(answer)
        self.unregister_gate = threading.Event()
        self.unregister_gate.set()
        self.unregistering = threading.Event()
        self.in_use = set()

    def unregister_memory(self, region):
        self.unregistering.set()
        assert self.unregister_gate.wait(30)
        if region in self.in_use:
            raise LLMException(LLMStatusCode.LLM_LINK_BUSY, f"region {region} is in use")
        super().unregister_memory(region)


def test_close_waits_for_a_link_ending_to_free_its_slots():
    stager, engine, runtime = stager_with(HeldEngine())
    link = Link("decoder")
    engine.rpc.dispatch(link, "cache.stage_slots", {})
    engine.unregister_gate.clear()
    ending = threading.Thread(target=engine.end, args=(link,))
    ending.start()
    try:
        assert engine.unregistering.wait(10)
        closed = []
        closer = threading.Thread(target=lambda: closed.append(stager.close(10_000)))
        closer.start()
        time.sleep(0.3)
        # The hook still frees the slots: close must not let the runtime go yet.
        assert closer.is_alive() and not closed
    finally:
        engine.unregister_gate.set()
        ending.join(10)
    closer.join(10)
    assert closed == [True] and not runtime.open_slots() and not engine.registered


def test_slots_still_registered_when_their_link_ended_are_retried_at_close():
    stager, engine, runtime = stager_with(HeldEngine())
    link = Link("decoder")
    lent = engine.rpc.dispatch(link, "cache.stage_slots", {})["slots"]
    engine.in_use = {region for _, region in lent}
    engine.end(link)
    assert len(runtime.open_slots()) == staging.DEPTH
    # Still registered: close reports it, so the runtime and memory stay.
    assert stager.close(1000) is False
    assert len(runtime.open_slots()) == staging.DEPTH
    engine.in_use = set()
    assert stager.close(1000) is True
    assert not runtime.open_slots() and not engine.registered


def test_device_memory_stays_while_a_slot_stays_registered():
    engine = HeldEngine()
    caches = DeviceCaches(engine, DeviceConfig("cuda"))
    caches._runtime, caches._pool = Runtime(), Pool()
    caches._runtime.close = lambda: None
    pool = caches._pool
    link = Link("decoder")
    lent = engine.rpc.dispatch(link, "cache.stage_slots", {})["slots"]
    engine.in_use = {region for _, region in lent}
    engine.end(link)
    caches.close()
    assert not pool.closed


def test_a_transfer_waiting_for_our_slots_gives_up_when_closing_begins(monkeypatch):
    stager, engine, _, region, _, args, first, opener = \
        first_transfer_holding_our_slots(monkeypatch)
    results = []

    def second():
        try:
            results.append(stager.transfer(*args, 30_000, Own([region])))
        except LLMException as exc:
            results.append(exc.status_code)

    waiter = threading.Thread(target=second)
    try:
        waiter.start()
        # Counted busy: past the entry check, so only the wait for our
        # slots can give up.
        wait_until(lambda: stager._busy == 2, 10, "the second transfer started")
        assert stager.close(100) is False           # the first still runs
        waiter.join(3)
        assert results == [LLMStatusCode.LLM_ENGINE_FINALIZED]
    finally:
        engine.transfer_gate.set()
        opener.cancel()
        first.join(30)
        waiter.join(30)


def test_a_failed_transfer_drops_the_peer_calls_not_begun():
    """A staged write whose fourth chunk cannot be copied out of our device
    memory (it lies in none: freed, as far as the stager can tell) fails
    while the peer's first stage_in runs and its second waits: the second is
    never sent."""
    holder = Holder(delay=1.0)
    stager, engine, _ = stager_with(Engine(lambda peer, method, params, timeout_ms:
                                           holder.answer(method, params, timeout_ms)))
    memory, region = device_memory(stager, 3 * CHUNK, remote=False)
    unregistered = np.zeros(CHUNK, np.uint8)
    code, message = code_of(stager.transfer, Link("decoder"), "write",
                            [memory.ctypes.data, unregistered.ctypes.data], [0x1000, 0x9000],
                            [3 * CHUNK, CHUNK], 30_000, Own([region]), None, [9, 9])
    assert code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, message
    assert [m for _, m, _ in engine.calls if m == "cache.stage_in"] == ["cache.stage_in"]


def test_a_staged_transfer_of_a_cache_whose_memory_another_cache_took_moves_nothing():
    stager, engine, _ = stager_with()
    memory, freed = device_memory(stager, 2 * CHUNK, remote=False)
    stager._regions.release([freed], 0)
    device_memory_again = stager._regions.register(memory.ctypes.data, 2 * CHUNK, False)
    assert device_memory_again != freed
    dst = np.zeros(2 * CHUNK, np.uint8)
    code, message = code_of(stager.transfer, Link("decoder"), "write", [memory.ctypes.data],
                            [dst.ctypes.data], [2 * CHUNK], 5000, Own([freed]))
    assert code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST, message
    assert not dst.any()


def test_a_stage_call_queues_no_copy_once_its_budget_ran_out_or_its_link_ended():
    """The holder's side of a stage_in: a copy not queued by the caller's
    budget (or before its link ended) never lands, so nothing of a transfer
    its initiator reported failed arrives afterwards."""
    stager, engine, runtime = stager_with()
    link = Link("prompt")
    memory, region = device_memory(stager, 4096)
    memory[:] = 0
    engine.rpc.dispatch(link, "cache.stage_slots", {})
    slot = stager._served[link].slots[0]
    ctypes.memset(slot.addr, 7, CHUNK)
    params = {"slot": 0, "addrs": [memory.ctypes.data, memory.ctypes.data + 100],
              "lengths": [100, 100], "regions": [region, region], "budget_ms": 50}
    # The first copy is held past the budget: the second is not queued.
    runtime.gate.clear()
    threading.Timer(0.3, runtime.gate.set).start()
    status, text = code_of(engine.rpc.dispatch, link, "cache.stage_in", params)
    assert status == LLMStatusCode.LLM_TIMEOUT and "pieces 1 and on not copied" in text
    assert (memory[:100] == 7).all() and not memory[100:].any()
    # A link that ended gets nothing copied, whatever its budget.
    memory[:] = 0
    link.linked = False
    status, _ = code_of(engine.rpc.dispatch, link, "cache.stage_in",
                        dict(params, budget_ms=30_000))
    assert status == LLMStatusCode.LLM_TIMEOUT and not memory.any()
    link.linked = True
    assert code_of(engine.rpc.dispatch, link, "cache.stage_in",
                   dict(params, budget_ms=0))[0] == LLMStatusCode.LLM_PARAM_INVALID
