"""llm_datadist's semantics where ours used to differ: switch_role, forced
and repeated unlinks, links in both directions between any roles, CacheKey
rows and their consumption, LLMConfig options, and the public types. Links
run between real processes on 127.0.0.1."""
import logging
import pickle
import socket
import threading

import numpy as np
import pytest

from helpers import wait_until, watchdog
from kv_peer import PeerError, PeerProcess, pattern
from kvcache import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex, DataType,
                     LLMClusterInfo, LLMConfig, LLMDataDist, LLMException, LLMRole,
                     LLMStatusCode, Placement)
from kvcache.llm_datadist import NO_EFFECT

POOL = '{"buf_pool_size": 67108864}'
ROWS, ROW_ELEMS = 4, 1024                 # a per-request cache: 4 rows of 2 KiB (fp16)
TRANSPORTS = ["tcp", "shm", pytest.param("rdma", marks=pytest.mark.rdma)]


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


def _peer(role, cluster_id, transport, listen="127.0.0.1:0", **options):
    return PeerProcess(role, cluster_id, listen=listen, transport=transport, buf_pool_cfg=POOL,
                       **options)


@pytest.fixture
def peers():
    started = []
    yield started
    for peer in started:
        peer.close()


def _local(role, cluster_id, **config):
    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.transport = "tcp"
    for key, value in config.items():
        setattr(cfg, key, value)
    dd.init(cfg.generate_options())
    return dd


def _cluster(remote_cluster_id, address=None):
    info = LLMClusterInfo()
    info.remote_cluster_id = remote_cluster_id
    if address:
        host, port = address.rsplit(":", 1)
        info.append_remote_ip_info(host, int(port))
    return info


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- types --------------------------------------------------------------------------

# llm_datadist's names and values (its llm_error_codes.h, and its Python
# package for the runtime codes and LLM_UNKNOWN_ERROR).
LLM_DATADIST_CODES = {
    "LLM_SUCCESS": 0, "LLM_FAILED": 0xFFFFFFFF, "LLM_WAIT_PROCESS_TIMEOUT": 0x5010B001,
    "LLM_KV_CACHE_NOT_EXIST": 0x5010B002, "LLM_REPEAT_REQUEST": 0x5010B003,
    "LLM_REQUEST_ALREADY_COMPLETED": 0x5010B004, "LLM_PARAM_INVALID": 0x5010B005,
    "LLM_ENGINE_FINALIZED": 0x5010B006, "LLM_NOT_YET_LINK": 0x5010B007,
    "LLM_ALREADY_LINK": 0x5010B008, "LLM_LINK_FAILED": 0x5010B009,
    "LLM_UNLINK_FAILED": 0x5010B00A, "LLM_NOTIFY_PROMPT_UNLINK_FAILED": 0x5010B00B,
    "LLM_CLUSTER_NUM_EXCEED_LIMIT": 0x5010B00C, "LLM_PROCESSING_LINK": 0x5010B00D,
    "LLM_DEVICE_OUT_OF_MEMORY": 0x5010B00E, "LLM_PREFIX_ALREADY_EXIST": 0x5010B00F,
    "LLM_PREFIX_NOT_EXIST": 0x5010B010, "LLM_SEQ_LENOVERLIMIT": 0x5010B011,
    "LLM_NO_FREE_BLOCK": 0x5010B012, "LLM_BLOCKS_OUT_OF_MEMORY": 0x5010B013,
    "LLM_EXIST_LINK": 0x5010B018, "LLM_FEATURE_NOT_ENABLED": 0x5010B019,
    "LLM_TIMEOUT": 0x5010B01A, "LLM_LINK_BUSY": 0x5010B01B, "LLM_OUT_OF_MEMORY": 0x5010B01C,
    "LLM_DEVICE_MEM_ERROR": 507053, "LLM_SUSPECT_REMOTE_ERROR": 507057,
    "LLM_UNKNOWN_ERROR": -1,
}


def test_status_codes_have_llm_datadists_names_and_values():
    assert {c.name: int(c) for c in LLMStatusCode} == LLM_DATADIST_CODES


def test_llm_exception_takes_llm_datadists_forms_and_ours():
    exc = LLMException("pull failed", status_code=LLMStatusCode.LLM_TIMEOUT)
    assert exc.status_code == LLMStatusCode.LLM_TIMEOUT and "pull failed" in str(exc)
    assert LLMException("no code").status_code == LLMStatusCode.LLM_SUCCESS
    ours = LLMException(LLMStatusCode.LLM_LINK_BUSY, "busy")
    assert ours.status_code == LLMStatusCode.LLM_LINK_BUSY and "busy" in str(ours)
    assert LLMException(0x5010B01A).status_code == LLMStatusCode.LLM_TIMEOUT
    assert LLMException("x", status_code=12345).status_code == LLMStatusCode.LLM_UNKNOWN_ERROR
    again = pickle.loads(pickle.dumps(ours))
    assert again.status_code == LLMStatusCode.LLM_LINK_BUSY and str(again) == str(ours)


def test_role_values_desc_order_and_key_defaults():
    assert [LLMRole(v) for v in (1, 2, 3)] == [LLMRole.PROMPT, LLMRole.DECODER, LLMRole.MIX]
    assert LLMRole("decoder") is LLMRole.DECODER
    desc = CacheDesc(2, [4, 8], DataType.DT_FLOAT16)
    assert (desc.shape, desc.data_type, desc.placement) == ([4, 8], DataType.DT_FLOAT16,
                                                             Placement.HOST)
    assert CacheDesc(2, DataType.DT_FLOAT16, [4, 8]) == desc        # the earlier order
    assert CacheDesc(2, [4, 8], DataType.DT_FLOAT16, Placement.HOST, 0, 1).seq_len_dim_index == 1
    with pytest.raises(LLMException) as err:
        CacheDesc(2, [4, 8], DataType.DT_FLOAT16, Placement.HOST, 1)
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    key = CacheKey(1, 2)
    assert (key.cluster_id, key.req_id, key.model_id, key.prefix_id) == (1, 2, 0, 2**64 - 1)
    assert CacheKey(prompt_cluster_id=1, req_id=2) == key != CacheKey(1, 2, 0, 7)
    for bad in (dict(cluster_id=-1, req_id=0), dict(cluster_id=1), dict(cluster_id=1, req_id=2**64),
                dict(cluster_id=1, req_id=1, prompt_cluster_id=1)):
        with pytest.raises(LLMException) as err:
            CacheKey(**bad)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID


def test_a_second_init_does_nothing_and_init_after_finalize_starts_afresh():
    dd = _local(LLMRole.PROMPT, 1, listen_ip_info="127.0.0.1:0")
    try:
        address, engine = dd.listen_address, dd.engine
        dd.init({"llm.listenIpInfo": "127.0.0.1:0"})
        assert dd.listen_address == address and dd.engine is engine
        dd.finalize()
        dd.init({"llm.listenIpInfo": "127.0.0.1:0"})
        assert dd.engine is not engine
    finally:
        dd.finalize()


# --- switch_role -------------------------------------------------------------------------

def test_switch_role_needs_no_option_refuses_while_linked_and_moves_the_listener(peers):
    with watchdog(120):
        prompt = _peer("prompt", 1, "tcp")
        peers.append(prompt)
        dd = _local(LLMRole.DECODER, 2, buf_pool_cfg=POOL)      # no enable_switch_role
        try:
            assert dd.link_clusters([_cluster(1, prompt.address)])[0] == LLMStatusCode.LLM_SUCCESS
            with pytest.raises(LLMException) as err:
                dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
            assert err.value.status_code == LLMStatusCode.LLM_EXIST_LINK
            assert dd.unlink_clusters([_cluster(1)])[0] == LLMStatusCode.LLM_SUCCESS
            dd.switch_role(LLMRole.PROMPT, {"llm.listenIpInfo": "127.0.0.1:0"})
            address = dd.listen_address
            assert address and dd.role == LLMRole.PROMPT
            src = dd.cache_manager.allocate_cache(CacheDesc(2, [ROWS, ROW_ELEMS],
                                                            DataType.DT_FLOAT16))
            for i, tensor in enumerate(src.tensors()):
                tensor.view(np.uint8).reshape(-1)[:] = pattern(7, i, tensor.nbytes)
            # The former prompt links to us and pulls: the listener moved here.
            assert prompt.call("link", 2, address) == LLMStatusCode.LLM_SUCCESS
            dst = prompt.call("alloc_cache", 2, [ROWS, ROW_ELEMS])
            prompt.call("pull_cache", 2, src.cache_id, dst, remote_row=3, row=0)
            got = prompt.call("tensors", dst)
            for i, tensor in enumerate(src.tensors()):
                assert np.array_equal(got[i][0], tensor.view(np.uint8).reshape(ROWS, -1)[3])
            assert prompt.call("unlink", 2) == LLMStatusCode.LLM_SUCCESS
            wait_until(lambda: not dd.engine.peers(), 10, "the unlink to reach us")
            # Our spelling of the key still works; no option: stop listening.
            dd.switch_role(LLMRole.MIX, {"llm.ListenIpInfo": "127.0.0.1:0"})
            assert dd.listen_address not in (None, address)
            address = dd.listen_address
            dd.switch_role(LLMRole.DECODER)
            assert dd.listen_address is None
            assert prompt.call("link", 2, address) in (LLMStatusCode.LLM_LINK_FAILED,
                                                       LLMStatusCode.LLM_TIMEOUT)
        finally:
            dd.finalize()


# --- unlinking -------------------------------------------------------------------------

@pytest.mark.parametrize("first", ["client", "server"])
def test_a_forced_unlink_is_local_and_unlinking_a_gone_link_succeeds(peers, first):
    with watchdog(120):
        server = _peer("prompt", 1, "tcp")
        client = _peer("decoder", 2, "tcp", listen="")
        peers.extend([server, client])
        assert client.call("link", 1, server.address) == LLMStatusCode.LLM_SUCCESS
        wait_until(lambda: server.call("link_state", 2) == "LINKED", 10, "the server's link")
        one, other = (client, server) if first == "client" else (server, client)
        one_id, other_id = (1, 2) if first == "client" else (2, 1)
        assert one.call("unlink", one_id, force=True) == LLMStatusCode.LLM_SUCCESS
        assert one.call("link_state", one_id) == "IDLE"
        # Not told, the other end sees its link fail, and unlinks it in turn.
        wait_until(lambda: other.call("link_state", other_id) == "FAILED", 10,
                   "the other end to notice")
        assert other.call("unlink", other_id, force=True) == LLMStatusCode.LLM_SUCCESS
        assert other.call("link_state", other_id) == "IDLE"
        for peer, cluster in ((one, one_id), (other, other_id)):
            assert peer.call("unlink", cluster) == LLMStatusCode.LLM_SUCCESS
            assert peer.call("unlink", cluster, force=True) == LLMStatusCode.LLM_SUCCESS
        assert client.call("link", 1, server.address) == LLMStatusCode.LLM_SUCCESS


def test_an_unforced_unlink_closes_both_ends_in_order(peers):
    with watchdog(120):
        server = _peer("prompt", 1, "tcp")
        client = _peer("decoder", 2, "tcp", listen="")
        peers.extend([server, client])
        assert client.call("link", 1, server.address) == LLMStatusCode.LLM_SUCCESS
        wait_until(lambda: server.call("link_state", 2) == "LINKED", 10, "the server's link")
        assert client.call("unlink", 1) == LLMStatusCode.LLM_SUCCESS
        wait_until(lambda: server.call("link_state", 2) == "IDLE", 10, "the server's end")
        assert server.call("unlink", 2) == LLMStatusCode.LLM_SUCCESS


# --- links both ways ---------------------------------------------------------------------

@pytest.mark.parametrize("roles", [("prompt", "prompt"), ("decoder", "decoder"),
                                   ("prompt", "decoder")])
def test_two_clusters_link_each_other_and_pull_both_ways(peers, transport, roles):
    with watchdog(180):
        a = _peer(roles[0], 1, transport)
        b = _peer(roles[1], 2, transport)
        peers.extend([a, b])
        a_src = a.call("alloc_blocks", 2, [16, 512], key_cluster=1)
        b_src = b.call("alloc_blocks", 2, [16, 512], key_cluster=2)
        a.call("fill", a_src, seed=1)
        b.call("fill", b_src, seed=2)
        assert a.call("link", 2, b.address) == LLMStatusCode.LLM_SUCCESS
        assert b.call("link", 1, a.address) == LLMStatusCode.LLM_SUCCESS
        assert a.call("link", 2, b.address) == LLMStatusCode.LLM_ALREADY_LINK
        a_dst = a.call("alloc_blocks", 2, [16, 512])
        b_dst = b.call("alloc_blocks", 2, [16, 512])
        a.call("pull_blocks", 2, a_dst, [3, 4], [0, 1])
        b.call("pull_blocks", 1, b_dst, [5, 6], [0, 1])
        a_want, b_want = b.call("tensors", b_src), a.call("tensors", a_src)
        a_got, b_got = a.call("tensors", a_dst), b.call("tensors", b_dst)
        for t in range(2):
            assert np.array_equal(a_got[t][:2], a_want[t][[3, 4]])
            assert np.array_equal(b_got[t][:2], b_want[t][[5, 6]])
        # Dropping one direction leaves the other working.
        assert a.call("unlink", 2) == LLMStatusCode.LLM_SUCCESS
        b.call("pull_blocks", 1, b_dst, [7], [2])
        assert np.array_equal(b.call("tensors", b_dst)[1][2], b_want[1][7])


# --- CacheKey rows ------------------------------------------------------------------------

def test_a_cache_key_names_its_row_and_is_consumed_by_the_pull(peers, transport):
    with watchdog(180):
        prompt = _peer("prompt", 1, transport)
        decoder = _peer("decoder", 2, transport, listen="")
        peers.extend([prompt, decoder])
        # Row 0 has no request (placeholder key), rows 1..3 have keys 11..13.
        keys = [(1, 2**64 - 1), (1, 11), (1, 12), (1, 13)]
        src = prompt.call("alloc_cache", 2, [ROWS, ROW_ELEMS], keys=keys)
        prompt.call("fill", src, seed=3)
        want = prompt.call("tensors", src)
        assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
        dst = decoder.call("alloc_cache", 2, [ROWS, ROW_ELEMS])
        decoder.call("pull_cache", 1, None, dst, row=2, req_id=12)
        got = decoder.call("tensors", dst)
        assert all(np.array_equal(got[t][2], want[t][2]) for t in range(2))
        # Blocks from the row key 13 names: 2 KiB rows, 512-byte blocks.
        blocks = decoder.call("alloc_blocks", 2, [8, 256])
        decoder.call("pull_blocks", 1, blocks, [], [4, 5, 6, 7], req_id=13)
        got = decoder.call("tensors", blocks)
        assert all(np.array_equal(got[t][4:8].reshape(-1), want[t][3]) for t in range(2))
        # A successful pull used its key up.
        for req in (12, 13):
            with pytest.raises(PeerError) as err:
                decoder.call("pull_cache", 1, None, dst, req_id=req)
            assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
        # Freed while key 11 still names it: the cache stays until the pull.
        prompt.call("deallocate", src)
        decoder.call("pull_cache", 1, src, dst, remote_row=3, row=3)
        assert all(np.array_equal(decoder.call("tensors", dst)[t][3], want[t][3])
                   for t in range(2))
        decoder.call("pull_cache", 1, None, dst, row=1, req_id=11)
        assert all(np.array_equal(decoder.call("tensors", dst)[t][1], want[t][1])
                   for t in range(2))
        with pytest.raises(PeerError) as err:
            decoder.call("pull_cache", 1, src, dst, remote_row=3, row=3)
        assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


def test_a_layer_range_pull_does_not_consume_the_key(peers):
    with watchdog(120):
        prompt = _peer("prompt", 1, "tcp")
        decoder = _peer("decoder", 2, "tcp", listen="")
        peers.extend([prompt, decoder])
        src = prompt.call("alloc_cache", 4, [1, ROW_ELEMS], keys=[(1, 5)])
        prompt.call("fill", src, seed=4)
        assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS
        dst = decoder.call("alloc_cache", 4, [1, ROW_ELEMS])
        decoder.call("pull_cache", 1, None, dst, src_layers=range(0, 1),
                     dst_layers=range(0, 1), req_id=5)
        decoder.call("pull_cache", 1, None, dst, src_layers=range(1, 2),
                     dst_layers=range(1, 2), req_id=5)
        got, want = decoder.call("tensors", dst), prompt.call("tensors", src)
        assert all(np.array_equal(g, w) for g, w in zip(got, want))
        decoder.call("pull_cache", 1, None, dst, req_id=5)
        with pytest.raises(PeerError) as err:
            decoder.call("pull_cache", 1, None, dst, req_id=5)
        assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST


def test_prefix_id_is_part_of_the_key_and_pulls_need_one_id():
    dd = _local(LLMRole.PROMPT, 1, buf_pool_cfg=POOL)
    try:
        cm = dd.cache_manager
        desc = CacheDesc(2, [1, 64], DataType.DT_INT8)
        cm.allocate_cache(desc, [CacheKey(1, 5, 0, 9)])
        cm.allocate_cache(desc, [CacheKey(1, 5)])            # another prefix_id: another key
        dst = cm.allocate_cache(desc)
        for bad in (CacheKey(1, 2**64 - 1), CacheKey(1, 5, 0, 9)):
            with pytest.raises(LLMException) as err:
                cm.pull_cache(bad, dst)
            assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        with pytest.raises(LLMException) as err:
            cm.allocate_cache(desc, [CacheKey(1, 6), CacheKey(1, 7)])     # 2 keys, 1 row
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    finally:
        dd.finalize()


# --- LLMConfig options ---------------------------------------------------------------------

def test_allocations_need_a_configured_pool_and_mem_pool_cfg_sizes_it():
    dd = _local(LLMRole.PROMPT, 1)
    try:
        with pytest.raises(LLMException) as err:
            dd.cache_manager.allocate_cache(CacheDesc(1, [1, 64], DataType.DT_UINT8))
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        owned = np.zeros((1, 64), dtype=np.uint8)
        dd.cache_manager.register_cache(CacheDesc(1, [1, 64], DataType.DT_UINT8),
                                        [owned.ctypes.data])
    finally:
        dd.finalize()
    dd = _local(LLMRole.PROMPT, 1, mem_pool_cfg='{"memory_size": 4194304}')
    try:
        dd.cache_manager.allocate_cache(CacheDesc(1, [1, 2 << 20], DataType.DT_UINT8))
        with pytest.raises(LLMException) as err:
            dd.cache_manager.allocate_cache(CacheDesc(1, [1, 4 << 20], DataType.DT_UINT8))
        assert err.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY
    finally:
        dd.finalize()
    for bad in ('{"size": 4096}', "4096", '{"memory_size": -1}'):
        with pytest.raises(LLMException) as err:
            _local(LLMRole.PROMPT, 1, mem_pool_cfg=bad)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID


def test_options_without_effect_are_logged_once(caplog):
    caplog.set_level(logging.WARNING, logger="kvcache")
    for _ in range(2):
        dd = _local(LLMRole.PROMPT, 1, local_comm_res="x", transfer_backend="hixl",
                    ge_options={"ge.someOption": "1"})
        dd.finalize()
    for key in ("llm.LocalCommRes", "llm.TransferBackend", "ge.someOption"):
        lines = [r for r in caplog.records if key in r.getMessage()]
        assert len(lines) == 1, key
    assert "llm.LocalCommRes" in NO_EFFECT


def test_rdma_qos_options_are_range_checked():
    for attr, value in (("rdma_traffic_class", 256), ("rdma_service_level", 16),
                        ("link_retry_count", 0), ("link_total_time", -1)):
        with pytest.raises(LLMException) as err:
            _local(LLMRole.PROMPT, 1, **{attr: value})
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID, attr


def test_remote_cache_accessible_pulls_by_id_only():
    dd = _local(LLMRole.DECODER, 2, enable_remote_cache_accessible=True, buf_pool_cfg=POOL)
    try:
        dst = dd.cache_manager.allocate_cache(CacheDesc(1, [1, 64], DataType.DT_UINT8))
        with pytest.raises(LLMException) as err:
            dd.cache_manager.pull_cache(CacheKey(1, 1), dst)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        with pytest.raises(LLMException) as err:          # by id: past the check, no link
            dd.cache_manager.pull_cache(CacheKeyByIdAndIndex(1, 1), dst)
        assert err.value.status_code == LLMStatusCode.LLM_NOT_YET_LINK
    finally:
        dd.finalize()


def test_link_retry_count_retries_within_link_total_time(peers):
    with watchdog(120):
        port = _free_port()
        address = f"127.0.0.1:{port}"
        once = _local(LLMRole.DECODER, 2)
        patient = _local(LLMRole.DECODER, 3, link_retry_count=100, link_total_time=60)
        try:
            # Nobody listens yet: one attempt fails at once.
            assert once.link_clusters([_cluster(1, address)], timeout=500)[1][0] in (
                LLMStatusCode.LLM_LINK_FAILED, LLMStatusCode.LLM_TIMEOUT)
            result = {}
            thread = threading.Thread(target=lambda: result.update(
                rets=patient.link_clusters([_cluster(1, address)], timeout=500)[1]))
            thread.start()
            peers.append(_peer("prompt", 1, "tcp", listen=address))
            thread.join(60)
            assert result["rets"] == [LLMStatusCode.LLM_SUCCESS]
        finally:
            once.finalize()
            patient.finalize()


@pytest.mark.rdma
def test_rdma_qps_carry_the_configured_traffic_class_and_service_level(peers):
    with watchdog(180):
        qos = dict(rdma_traffic_class=96, rdma_service_level=3)
        prompt = _peer("prompt", 1, "rdma", **qos)
        peers.append(prompt)
        src = prompt.call("alloc_blocks", 2, [16, 512], key_cluster=1)
        prompt.call("fill", src, seed=5)
        dd = _local(LLMRole.DECODER, 2, transport="rdma", buf_pool_cfg=POOL, **qos)
        try:
            assert dd.link_clusters([_cluster(1, prompt.address)])[0] == LLMStatusCode.LLM_SUCCESS
            paths = [qp.query_path() for qp in dd.engine.find_peer(1).data.qps]
            assert paths and all(p["traffic_class"] == 96 for p in paths), paths
            # RoCE carries priority in the traffic class; rxe takes the SL at
            # RTR but does not report it back, so the SL is checked as asked.
            assert dd.engine.transport.service_level == 3
            dst = dd.cache_manager.allocate_blocks_cache(CacheDesc(2, [16, 512],
                                                                   DataType.DT_FLOAT16))
            dd.cache_manager.pull_blocks(BlocksCacheKey(1), dst, [1, 2], [0, 1])
            want = prompt.call("tensors", src)
            for t, tensor in enumerate(dst.tensors()):
                assert np.array_equal(tensor.view(np.uint8).reshape(16, -1)[:2], want[t][[1, 2]])
        finally:
            dd.finalize()
