"""Segment discovery through a real etcd server (the session's ``etcd``
fixture): records published under a kept-alive lease, found by name from
other processes, gone when their process is killed and the lease expires;
Mooncake-style engines and an xPyD LLMDataDist deployment that find each
other only through etcd."""
import os
import sys
import time

import numpy as np
import pytest

from helpers import wait_until
from kv_peer import PeerProcess
from mooncake_target import Target
from kvcache import LLMStatusCode
from kvcache.compat import mooncake
from kvcache.compat.mooncake import TransferEngine
from kvcache.engine import discovery
from kvcache.status import LLMException

TTL_S = 2                    # short leases, so a killed process disappears quickly


@pytest.fixture
def short_leases(monkeypatch):
    # Inherited by the processes the test starts.
    monkeypatch.setenv("KVCACHE_ETCD_TTL_S", str(TTL_S))


def test_publish_resolve_withdraw(etcd):
    writer = discovery.open_discovery(etcd.url, ttl_s=TTL_S)
    reader = discovery.open_discovery(etcd.endpoint)          # "host:port" as Mooncake takes
    try:
        key = discovery.segment_key("127.0.0.1:5555")
        assert reader.resolve(key) is None
        writer.publish(key, {"listen": "127.0.0.1:5555", "regions": [[1, 4096, 64]]})
        assert reader.resolve(key) == {"listen": "127.0.0.1:5555", "regions": [[1, 4096, 64]]}
        writer.withdraw(key)
        assert reader.resolve(key) is None
        # The keepalive thread holds the lease past several ttls.
        writer.publish(key, {"listen": "127.0.0.1:5555"})
        deadline = time.monotonic() + 2.5 * TTL_S
        while time.monotonic() < deadline:
            assert reader.resolve(key) is not None
            time.sleep(0.2)
        # close() revokes the lease: the record goes at once, not after the ttl.
        writer.close()
        assert reader.resolve(key) is None
    finally:
        writer.close()
        reader.close()


def test_bad_endpoints_and_a_missing_client(etcd, monkeypatch):
    with pytest.raises(LLMException) as info:
        discovery.open_discovery("zookeeper://127.0.0.1:2181")
    assert info.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException) as info:
        discovery.open_discovery("127.0.0.1:1", call_timeout_s=2)
    assert info.value.status_code == LLMStatusCode.LLM_LINK_FAILED
    assert not discovery.open_discovery("P2PHANDSHAKE").uses_server
    monkeypatch.setitem(sys.modules, "etcd3gw", None)          # as if not installed
    with pytest.raises(LLMException, match="etcd3gw") as info:
        discovery.open_discovery(etcd.url)
    assert info.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED


def test_mooncake_segments_by_name_and_a_killed_one_expires(etcd, short_leases):
    target = Target("tcp", etcd.url)
    initiator = TransferEngine(managed_pool_bytes=1 << 20)
    try:
        assert initiator.initialize("127.0.0.1", etcd.url, "tcp", "") == 0
        # The target's first buffer comes from its record in etcd.
        assert initiator.get_first_buffer_address(target.segment) == target.first
        src = initiator.get_first_buffer_address(initiator.get_local_segment_name())
        data = os.urandom(3000)
        assert initiator.write_bytes_to_buffer(src, data, len(data)) == 0
        assert initiator.transfer_sync_write(target.segment, src, target.first, len(data)) == 0
        assert target.read(target.first, len(data)) == data
        # Memory registered later is in the record too.
        added = target.ask(cmd="register", len=8192)["addr"]
        reader = discovery.open_discovery(etcd.url)
        try:
            rows = reader.resolve(discovery.segment_key(target.segment))["regions"]
            assert added in [addr for _, addr, _ in rows]
            assert initiator.get_first_buffer_address("127.0.0.1:9") == 0     # not published
            assert initiator.transfer_sync_write("127.0.0.1:9", src, target.first, 8) == \
                mooncake.ERR_DNS_FAIL
            target.kill()
            # Killed: nobody revoked its lease, so the record stays until it expires.
            assert reader.resolve(discovery.segment_key(target.segment)) is not None
            wait_until(lambda: reader.resolve(discovery.segment_key(target.segment)) is None,
                       timeout_s=TTL_S + 10, what="the killed segment's lease expiring")
        finally:
            reader.close()
        assert initiator.get_first_buffer_address(target.segment) == 0
        assert initiator.transfer_sync_write(target.segment, src, target.first, 8) < 0
    finally:
        initiator.close()
        target.close()


def test_initialize_with_etcd_down_is_err_metadata():
    engine = TransferEngine()
    assert engine.initialize("127.0.0.1", "etcd://127.0.0.1:1", "tcp", "") == \
        mooncake.ERR_METADATA
    engine.close()


L, BLOCKS, BLOCK_ELEMS = 2, 16, 512
POOL = '{"buf_pool_size": 16777216}'


def test_xpyd_decoders_find_prompts_only_through_etcd(etcd, short_leases):
    """2 prompt + 2 decoder clusters; decoders link by cluster id alone."""
    prompts = [PeerProcess("prompt", c, transport="tcp", buf_pool_cfg=POOL,
                           metadata_server=etcd.url) for c in (21, 22)]
    decoders = [PeerProcess("decoder", c, listen="", transport="tcp", buf_pool_cfg=POOL,
                            metadata_server=etcd.url) for c in (31, 32)]
    try:
        srcs = {}
        for p in prompts:
            src = p.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS], key_cluster=p.cluster_id)
            p.call("fill", src, seed=p.cluster_id)
            srcs[p.cluster_id] = p.call("tensors", src)
        for d in decoders:
            d.dst = d.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS])
            for p in prompts:
                assert d.call("link", p.cluster_id, None) == LLMStatusCode.LLM_SUCCESS
            # A cluster nobody published cannot be linked by id.
            assert d.call("link", 99, None) == LLMStatusCode.LLM_LINK_FAILED
        for d in decoders:
            d.call("pull_blocks", 21, d.dst, [0, 1], [0, 1])
            d.call("pull_blocks", 22, d.dst, [7, 8], [2, 3])
            got = d.call("tensors", d.dst)
            for t in range(2 * L):
                np.testing.assert_array_equal(got[t][[0, 1]], srcs[21][t][[0, 1]])
                np.testing.assert_array_equal(got[t][[2, 3]], srcs[22][t][[7, 8]])
        # A decoder does not listen, so it publishes nothing.
        reader = discovery.open_discovery(etcd.url)
        try:
            assert reader.resolve(discovery.cluster_key(31)) is None
            assert reader.resolve(discovery.cluster_key(21))["listen"] == prompts[0].address
        finally:
            reader.close()
    finally:
        for peer in prompts + decoders:
            peer.close()


def test_a_killed_cluster_leaves_etcd_and_cannot_be_linked_by_id(etcd, short_leases):
    prompt = PeerProcess("prompt", 41, transport="tcp", buf_pool_cfg=POOL,
                         metadata_server=etcd.url)
    decoder = PeerProcess("decoder", 42, listen="", transport="tcp", buf_pool_cfg=POOL,
                          metadata_server=etcd.url)
    reader = discovery.open_discovery(etcd.url)
    try:
        assert reader.resolve(discovery.cluster_key(41))["listen"] == prompt.address
        prompt.kill()
        wait_until(lambda: reader.resolve(discovery.cluster_key(41)) is None,
                   timeout_s=TTL_S + 10, what="the killed cluster's lease expiring")
        assert decoder.call("link", 41, None) == LLMStatusCode.LLM_LINK_FAILED
    finally:
        reader.close()
        decoder.close()
        prompt.close()
