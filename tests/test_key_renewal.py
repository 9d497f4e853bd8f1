"""What renewing a cache's regions costs (a cache key removed or consumed):
one revocation round per peer however many regions and keys, run outside
the cache manager's lock (a slow peer stalls no other call), and on RDMA a
bounded number of memory regions however often a cache is renewed.

Engines in one process linked over real sockets. On the host the revocation
protocol runs over TCP made one-sided (the owner then relies on peers
dropping old ids, as on RDMA); inside the Soft-RoCE VM over RDMA itself."""
import subprocess
import threading

import numpy as np
import pytest

from helpers import watchdog
from kvcache import BufferPool, BufPoolConfig, CacheDesc, CacheKey, DataType, TransferEngine
from kvcache.cache_manager import CacheManager
from kvcache.engine import TRANSPORTS
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.tcp.transport import TcpTransport

TENSORS, ROWS, ELEMS = 8, 4, 256
RENEWALS = 40


class OneSidedTcp(TcpTransport):
    """TCP with the owner relying on peers to drop released ids, as RDMA."""
    one_sided = True


TRANSPORT_PARAMS = ["tcp-one-sided", pytest.param("rdma", marks=pytest.mark.rdma)]


class RevokeCounter:
    """Counts (and, while ``hold`` is clear, stalls) the revocation calls a
    peer engine serves."""

    def __init__(self, engine):
        self.engine = engine
        self.calls = []
        self.entered = threading.Event()
        self.hold = threading.Event()
        self.hold.set()
        serve = engine._rpc_revoke

        def counted(peer, params):
            self.calls.append(list(params["ids"]))
            self.entered.set()
            self.hold.wait(30)
            return serve(peer, params)

        engine.rpc.serve("engine.revoke", counted, {})


@pytest.fixture
def world(monkeypatch):
    monkeypatch.setitem(TRANSPORTS, "tcp-one-sided", lambda device_id: OneSidedTcp())
    made = []

    def build(transport, peers=2):
        """(owner engine, its cache manager, a RevokeCounter per linked peer)."""
        owner = TransferEngine("owner", cluster_id=1, transport=transport,
                               listen="127.0.0.1:0", timeout_ms=20_000)
        pool = BufferPool(BufPoolConfig(pool_size=4 << 20))
        made.append(owner)
        made.append(pool)
        cm = CacheManager(owner, pool, 1, 20_000)
        counters = []
        for i in range(peers):
            peer = TransferEngine(f"peer-{i}", cluster_id=10 + i, transport=transport)
            made.insert(0, peer)
            peer.connect(owner.address)
            counters.append(RevokeCounter(peer))
        return owner, cm, counters

    def manager(engine):
        """A cache manager of a peer's own (closed after the engines)."""
        pool = BufferPool(BufPoolConfig(pool_size=4 << 20))
        made.append(pool)
        return CacheManager(engine, pool, engine.cluster_id, 20_000)

    build.manager = manager
    yield build
    for thing in made:
        thing.close()


def registered(cm, keys):
    """A cache in memory of ours: one region per tensor (TENSORS regions)."""
    desc = CacheDesc(TENSORS, DataType.DT_FLOAT16, [ROWS, ELEMS])
    arrays = [np.zeros(ROWS * ELEMS, dtype=np.float16) for _ in range(TENSORS)]
    cache = cm.register_cache(desc, [a.ctypes.data for a in arrays], keys)
    return cache, arrays


@pytest.mark.parametrize("transport", TRANSPORT_PARAMS)
def test_removing_keys_costs_one_revocation_round_per_peer(world, transport):
    owner, cm, counters = world(transport)
    keys = [CacheKey(1, req_id=i) for i in range(ROWS)]
    cache, _arrays = registered(cm, keys)
    before = list(cache.region_ids)
    with watchdog(60):
        cm.remove_cache_key(keys[0])
        assert [len(c.calls) for c in counters] == [1, 1], "one key of 8 tensors"
        assert sorted(counters[0].calls[0]) == sorted(before)
        cm.remove_cache_key(keys[1:])
    assert [len(c.calls) for c in counters] == [2, 2], "three keys removed at once"
    assert len(counters[0].calls[1]) == 3 * TENSORS
    assert not set(cache.region_ids) & set(before)


@pytest.mark.parametrize("transport", TRANSPORT_PARAMS)
def test_a_slow_peer_revoking_does_not_block_other_cache_manager_calls(world, transport):
    owner, cm, counters = world(transport, peers=1)
    slow = counters[0]
    cache, _arrays = registered(cm, [CacheKey(1, req_id=1)])
    slow.hold.clear()
    remover = threading.Thread(target=cm.remove_cache_key, args=(CacheKey(1, req_id=1),))
    remover.start()
    try:
        assert slow.entered.wait(30), "the peer was never asked to drop the old ids"
        done = threading.Event()
        other = threading.Thread(target=lambda: (registered(cm, [CacheKey(1, req_id=2)]),
                                                 cm.get_cache(cache.cache_id), done.set()))
        other.start()
        # The peer still holds the revocation; the other call must not wait for it.
        assert done.wait(20), "a cache manager call waited for a peer's revocation"
        assert remover.is_alive()
    finally:
        slow.hold.set()
        remover.join(30)
    assert not remover.is_alive()



@pytest.mark.parametrize("transport", TRANSPORT_PARAMS)
def test_a_pull_consuming_a_key_costs_one_revocation_round_per_peer(world, transport):
    owner, cm, counters = world(transport)
    cache, arrays = registered(cm, [CacheKey(1, req_id=7)])
    for i, a in enumerate(arrays):
        a[:] = i + 1
    mine = world.manager(counters[0].engine)
    dst = mine.allocate_cache(CacheDesc(TENSORS, DataType.DT_FLOAT16, [ROWS, ELEMS]))
    with watchdog(60):
        mine.pull_cache(CacheKey(1, req_id=7), dst)          # every layer: consumed
    assert [len(c.calls) for c in counters] == [1, 1]
    assert sorted(counters[1].calls[0]) == sorted(set(counters[0].calls[0]))
    assert all((t[0] == i + 1).all() for i, t in enumerate(dst.tensors()))

def test_keys_removed_together_are_revoked_and_freed_when_one_renewal_fails(world,
                                                                         monkeypatch):
    """remove_cache_key of a list failing part-way (the third cache's
    renewal): the regions renewed before the failure are still revoked at
    the peers in one round, and a cache freed while keyed is still freed."""
    owner, cm, counters = world("tcp-one-sided", peers=1)
    pool_key, first_key, failing_key = (CacheKey(1, req_id=i) for i in (1, 2, 3))
    pooled = cm.allocate_cache(CacheDesc(1, DataType.DT_FLOAT16, [ROWS, ELEMS]), [pool_key])
    cm.deallocate_cache(pooled)                  # released with its last key
    first, _a = registered(cm, [first_key])
    failing, _b = registered(cm, [failing_key])
    old = list(dict.fromkeys(pooled.region_ids + first.region_ids))
    renew = owner.renew_regions

    def fail_on_third(ids, revoke=True):
        if set(ids) & set(failing.region_ids):
            raise LLMException(LLMStatusCode.LLM_FAILED, "renewal failed")
        return renew(ids, revoke)

    monkeypatch.setattr(owner, "renew_regions", fail_on_third)
    with watchdog(60), pytest.raises(LLMException) as err:
        cm.remove_cache_key([pool_key, first_key, failing_key])
    assert err.value.status_code == LLMStatusCode.LLM_FAILED
    # One round for the renewed ids, then the freed cache's release.
    assert sorted(counters[0].calls[0]) == sorted(old)
    assert len(counters[0].calls) == 2
    with pytest.raises(LLMException):
        cm.get_cache(pooled.cache_id)
    assert all(r in owner.registry for r in first.region_ids + failing.region_ids)


def _live_mrs():
    out = subprocess.run(["rdma", "resource", "show"], capture_output=True, text=True,
                         check=True).stdout.split()
    return sum(int(out[i + 1]) for i, k in enumerate(out) if k == "mr")


@pytest.mark.rdma
def test_renewals_with_no_transfer_running_keep_the_memory_regions_bounded(world):
    owner, cm, counters = world("rdma", peers=1)
    keys = [CacheKey(1, req_id=i) for i in range(ROWS)]
    cache, arrays = registered(cm, keys)
    before = _live_mrs()
    with watchdog(120):
        for key in keys:
            cm.remove_cache_key(key)
        region = cache.region_ids[0]
        for _ in range(RENEWALS):
            region = owner.renew_region(region)
        grown = _live_mrs() - before
        assert grown == 0, f"{grown} memory regions more after {ROWS + RENEWALS} renewals"
        # The live generation still serves the peer: read it back over RDMA.
        arrays[0][:] = np.arange(arrays[0].size, dtype=np.float16)
        back = np.zeros_like(arrays[0])
        reader = counters[0].engine
        reader.register_memory(back.ctypes.data, back.nbytes)
        link = reader.peers()[0]
        reader.refresh_regions(link)
        reader.transfer_sync(link, "read", [back.ctypes.data], [arrays[0].ctypes.data],
                             [back.nbytes], remote_regions=[region])
    np.testing.assert_array_equal(back, arrays[0])
