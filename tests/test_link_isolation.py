"""Memory offered to one link only: the staging slots a holder lends a link,
and any region registered with ``register_memory(..., peer=)``. Another
linked peer never sees such a region in its table or its shared-memory
grants, and reading or writing it (naming its region id, by address, or
through a table forged to list it) is refused as for memory not offered,
by the holder's own check; every process stays healthy. The holder runs
in a process of its own (a TransferEngine, a stager over the device
runtime double of test_staging); A and B are engines of this process."""
import fcntl
import mmap
import multiprocessing as mp
import os
import traceback

import numpy as np
import pytest

from helpers import end_process, wait_until
from kvcache import LLMException, LLMStatusCode, TransferEngine
from kvcache.bufpool import SIZE_SEALS

TRANSPORTS = ["tcp", "shm", pytest.param("rdma", marks=pytest.mark.rdma)]
NBYTES = 1000                       # the holder's slot size and "device" memory size
REFUSED = (LLMStatusCode.LLM_PARAM_INVALID, LLMStatusCode.LLM_KV_CACHE_NOT_EXIST)
KEPT = []


class Holder:
    """The holder process, driven over a pipe: ``call(name, *args)``."""

    def __init__(self, transport):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_holder_main, args=(child, transport), daemon=True)
        self.process.start()
        self.info = self.call("info")

    def call(self, *message):
        self.conn.send(message)
        if not self.conn.poll(60):
            raise TimeoutError(f"the holder did not answer {message[0]!r}")
        kind, value = self.conn.recv()
        if kind == "crash":
            raise RuntimeError(f"holder failed:\n{value}")
        return value

    def close(self):
        end_process(self.process, self.conn)


def _holder_main(conn, transport):
    from kvcache.device import staging
    from kvcache.device.regions import DeviceRegions
    from test_staging import Runtime

    state = {}
    try:
        engine = TransferEngine("holder", transport=transport)
        runtime = Runtime()
        regions = DeviceRegions()
        staging.Stager(engine, regions, lambda: runtime, NBYTES)
        device = np.arange(NBYTES, dtype=np.uint8) * 7       # the double's device memory
        plain = np.full(4096, 5, np.uint8)                    # offered to every peer
        hidden = np.full(4096, 6, np.uint8)                   # offered to none
        state.update(engine=engine, runtime=runtime, arrays=[device, plain, hidden])
        info = {"address": engine.address, "device": [device.ctypes.data,
                                                     regions.register(device.ctypes.data,
                                                                      NBYTES, True)],
                "plain": [plain.ctypes.data, engine.register_memory(plain.ctypes.data, 4096)],
                "hidden": [hidden.ctypes.data, engine.register_memory(
                    hidden.ctypes.data, 4096, remote_accessible=False)]}
    except BaseException:
        conn.send(("crash", traceback.format_exc()))
        return
    actions = {
        "info": lambda: info,
        # The table the link of ``name`` gets.
        "table": lambda name: engine.regions(_inbound(engine, name)),
        "slot_bytes": lambda: [bytes(m.array) for m in runtime.open_slots()],
        "share_for": lambda name: _register_shared(state, _inbound(engine, name)),
        "shared_bytes": lambda: bytes(state["shared"][:64]),
        "renew": lambda region: engine.renew_region(region),
        "release": lambda region: engine.unregister_memory(region),
    }
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message[0] == "close":
            break
        try:
            conn.send(("ok", actions[message[0]](*message[1:])))
        except BaseException:
            conn.send(("crash", traceback.format_exc()))
    engine.close()


def _inbound(engine, name):
    return [p for p in engine.peers() if p.inbound and p.name == name][0]


def _register_shared(state, peer):
    """A memfd-backed region (what a peer on this host may map) offered to
    ``peer`` only; returns [addr, region id]."""
    fd = os.memfd_create("kv-test-one-link", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, 4096)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, SIZE_SEALS)
    mapping = mmap.mmap(fd, 4096)
    shared = np.frombuffer(mapping, dtype=np.uint8)
    shared[:] = 3
    state.update(shared=shared, shared_fd=fd)
    region = state["engine"].register_memory(shared.ctypes.data, 4096, share=(fd, 0), peer=peer)
    return [shared.ctypes.data, region]


@pytest.fixture(params=TRANSPORTS)
def linked(request):
    """(holder, A, A's peer for the holder, B, B's peer for the holder)."""
    holder = Holder(request.param)
    a = TransferEngine("peer-a", transport=request.param, listen=None)
    b = TransferEngine("peer-b", transport=request.param, listen=None)
    try:
        ca = a.connect(holder.info["address"], timeout_ms=10_000)
        cb = b.connect(holder.info["address"], timeout_ms=10_000)
        yield holder, a, ca, b, cb
    finally:
        b.close()
        a.close()
        holder.close()
        KEPT.clear()


def registered(engine, value):
    """A registered buffer of this process, kept until the engines closed
    (memory freed while registered would be reused by the next one)."""
    buffer = np.full(4096, value, np.uint8)
    engine.register_memory(buffer.ctypes.data, buffer.nbytes)
    KEPT.append(buffer)
    return buffer


def refusal(engine, peer, op, local, remote, length, regions=None):
    with pytest.raises(LLMException) as err:
        engine.transfer_sync(peer, op, [local], [remote], [length], timeout_ms=10_000,
                             remote_regions=regions)
    assert err.value.status_code in REFUSED, str(err.value)
    return err.value.status_code


def forged_refusal(engine, peer, op, local, row):
    """The refusal of a transfer by address into ``row`` (region id, addr,
    length) once ``peer``'s copy of the holder's table is forged to list it
    (a lying or stale peer: its pieces then name that region)."""
    peer.set_regions(peer.regions.as_list() + [tuple(row)])
    try:
        return refusal(engine, peer, op, local, row[1], 64)
    finally:
        engine.refresh_regions(peer)


def owner_checks(engine):
    """Whether the holder's CPU checks B's pieces (not over RDMA, where an
    rkey B never got refuses them)."""
    return engine.transport.name != "rdma"


def assert_healthy(holder, a, ca, b, cb):
    """Every process answers and a legitimate transfer works on both links."""
    plain_addr, plain_id = holder.info["plain"]
    for engine, peer, value in ((a, ca, 11), (b, cb, 12)):
        mine = registered(engine, value)
        engine.transfer_sync(peer, "write", [mine.ctypes.data], [plain_addr], [64],
                             timeout_ms=10_000, remote_regions=[plain_id])
        mine[:] = 0
        engine.transfer_sync(peer, "read", [mine.ctypes.data], [plain_addr], [64],
                             timeout_ms=10_000, remote_regions=[plain_id])
        assert (mine[:64] == value).all()
    assert holder.process.is_alive()


def test_a_staging_slot_lent_to_one_link_is_refused_to_another(linked):
    holder, a, ca, b, cb = linked
    device_addr, device_region = holder.info["device"]
    # A begins a staged read: the holder lends it slots and copies device
    # bytes into one, which A then reads.
    slots = a.call(ca, "cache.stage_slots", {}, 10_000)["slots"]
    a.call(ca, "cache.stage_out", {"slot": 0, "addrs": [device_addr], "lengths": [NBYTES],
                                   "regions": [device_region], "budget_ms": 10_000}, 10_000)
    slot_addr, slot_id = slots[0]
    mine = registered(a, 0)
    a.transfer_sync(ca, "read", [mine.ctypes.data], [slot_addr], [NBYTES], timeout_ms=10_000,
                    remote_regions=[slot_id])
    expected = np.arange(NBYTES, dtype=np.uint8) * 7
    assert np.array_equal(mine[:NBYTES], expected)
    slot_ids = {r for _, r in slots}
    assert slot_ids <= {r for r, _, _ in holder.call("table", "peer-a")}

    # B is told nothing of A's slots.
    b.refresh_regions(cb)
    assert not slot_ids & {int(i) for i in cb.regions.ids}
    assert not slot_ids & {r for r, _, _ in holder.call("table", "peer-b")}

    theirs = registered(b, 0xEE)
    hidden_addr, hidden_id = holder.info["hidden"]
    for op in ("read", "write"):
        # Naming the slot's id is refused as naming memory not offered is.
        assert (refusal(b, cb, op, theirs.ctypes.data, slot_addr, 64, [slot_id])
                == refusal(b, cb, op, theirs.ctypes.data, hidden_addr, 64, [hidden_id]))
        refusal(b, cb, op, theirs.ctypes.data, slot_addr, 64)               # by address
        # A table forged to list the slot: the holder's own check refuses it.
        code = forged_refusal(b, cb, op, theirs.ctypes.data, (slot_id, slot_addr, NBYTES))
        assert code == forged_refusal(b, cb, op, theirs.ctypes.data,
                                      (hidden_id, hidden_addr, 4096))
        assert code == LLMStatusCode.LLM_PARAM_INVALID or not owner_checks(b)
    assert (theirs == 0xEE).all()                   # nothing read into B
    assert holder.call("slot_bytes")[0] == expected.tobytes()       # nothing written
    assert_healthy(holder, a, ca, b, cb)
    a.transfer_sync(ca, "read", [mine.ctypes.data], [slot_addr], [NBYTES], timeout_ms=10_000,
                    remote_regions=[slot_id])
    assert np.array_equal(mine[:NBYTES], expected)


def test_a_region_registered_for_one_link_reaches_that_link_only(linked):
    """register_memory(..., peer=) with a memfd share: the link it names
    sees and moves it (on shm, mapped); the other one gets no row, no memfd
    and no byte."""
    holder, a, ca, b, cb = linked
    addr, region = holder.call("share_for", "peer-a")
    mine = registered(a, 0)
    a.transfer_sync(ca, "read", [mine.ctypes.data], [addr], [64], timeout_ms=10_000,
                    remote_regions=[region])
    assert (mine[:64] == 3).all()
    if a.transport.name == "shm":
        assert region in ca.data.regions            # mapped: the memfd was granted to A
    b.refresh_regions(cb)
    assert region not in {int(i) for i in cb.regions.ids}
    theirs = registered(b, 0xEE)
    for op in ("read", "write"):
        refusal(b, cb, op, theirs.ctypes.data, addr, 64, [region])
        code = forged_refusal(b, cb, op, theirs.ctypes.data, (region, addr, 4096))
        assert code == LLMStatusCode.LLM_PARAM_INVALID or not owner_checks(b)
    if b.transport.name == "shm":                   # asked for it, granted no memfd
        assert region not in cb.data.regions and region in cb.data.unshared
    assert (theirs == 0xEE).all() and holder.call("shared_bytes") == bytes([3]) * 64
    assert_healthy(holder, a, ca, b, cb)
    # Renewing and releasing it: on a one-sided transport A is told to drop
    # each id, B never hears of them.
    told = {"peer-a": [], "peer-b": []}
    for engine, peer in ((a, ca), (b, cb)):
        peer.revoke = (lambda ids, timeout_s, seen=told[engine.name], real=peer.revoke:
                       seen.extend(ids) or real(ids, timeout_s))
    renewed = holder.call("renew", region)
    holder.call("release", renewed)
    one_sided = a.transport.one_sided
    assert told == {"peer-a": [region, renewed, region] if one_sided else [], "peer-b": []}
    assert_healthy(holder, a, ca, b, cb)


def test_a_region_for_one_link_needs_remote_access_and_a_known_link():
    engine = TransferEngine("lonely", transport="tcp", listen=None)
    try:
        buffer = np.zeros(4096, np.uint8)
        for kwargs, status in (({"peer": "nobody"}, LLMStatusCode.LLM_NOT_YET_LINK),
                               ({"peer": "nobody", "remote_accessible": False},
                                LLMStatusCode.LLM_PARAM_INVALID)):
            with pytest.raises(LLMException) as err:
                engine.register_memory(buffer.ctypes.data, buffer.nbytes, **kwargs)
            assert err.value.status_code == status, kwargs
        assert engine.regions() == [] and not engine.registry.span(1)
    finally:
        engine.close()


def test_one_link_regions_refuse_what_would_leak_them_to_other_peers():
    """What would reach other peers is refused: a container or sub-region
    (its sub-regions are offered to everyone), a link that ended, and a
    memfd that also holds memory offered to another audience (a peer granted
    a memfd can map all of it). A revocation deferred past the release of
    its region goes to no peer (the release told the region's link)."""
    holder = TransferEngine("holder", transport="tcp")
    a = TransferEngine("peer-a", transport="tcp", listen=None)
    b = TransferEngine("peer-b", transport="tcp", listen=None)
    fd = os.memfd_create("kv-test")
    try:
        a.connect(holder.address, 5000)
        cb = b.connect(holder.address, 5000)
        pa, pb = _inbound(holder, "peer-a"), _inbound(holder, "peer-b")
        os.ftruncate(fd, 8192)
        memory = mmap.mmap(fd, 8192)
        base = np.frombuffer(memory, np.uint8).ctypes.data

        def refused(status, **kwargs):
            with pytest.raises(LLMException) as err:
                holder.register_memory(kwargs.pop("addr", base), kwargs.pop("length", 4096),
                                       **kwargs)
            assert err.value.status_code == status, (kwargs, err.value)

        refused(LLMStatusCode.LLM_PARAM_INVALID, length=8192, addressable=False, peer=pa)
        container = holder.register_memory(base, 8192, addressable=False)
        refused(LLMStatusCode.LLM_PARAM_INVALID, parent=container, peer=pa)
        holder.unregister_memory(container)
        shared = holder.register_memory(base, 4096, share=(fd, 0))
        refused(LLMStatusCode.LLM_PARAM_INVALID, addr=base + 4096, share=(fd, 4096), peer=pa)
        refused(LLMStatusCode.LLM_PARAM_INVALID, addr=base + 4096, share=(fd, 4096),
                remote_accessible=False)
        holder.unregister_memory(shared)
        mine = holder.register_memory(base, 4096, share=(fd, 0), peer=pa)
        holder.unregister_memory(mine)

        # A deferred revocation of a region released meanwhile goes nowhere.
        holder.transport.one_sided = True           # the revocation rounds of RDMA, over tcp
        told = []
        real = cb.revoke
        cb.revoke = lambda ids, timeout_s: told.extend(ids) or real(ids, timeout_s)
        region = holder.register_memory(base, 4096, peer=pa)
        renewed = holder.renew_regions([region], revoke=False)[0]
        holder.unregister_memory(renewed)
        holder.revoke_regions([region])
        assert told == []

        b.disconnect(cb, force=True)
        wait_until(lambda: not pb.linked, 10, "the holder seeing B's link end")
        refused(LLMStatusCode.LLM_NOT_YET_LINK, peer=pb)
        del memory
    finally:
        os.close(fd)
        b.close()
        a.close()
        holder.close()
