"""Layer-wise transfer (transfer_cache_async) between real processes: a
prefill computes layers one by one and each is pushed as soon as it is
ready; the decoder hears of each layer after its bytes landed. Plus the
refusals, a layer never ready, a decoder killed mid-task, and a cache of
one tensor moved whole."""
import time

import numpy as np
import pytest

from kvcache import (BlocksCacheKey, CacheDesc, CacheKeyByIdAndIndex, DataType,
                     LayerSynchronizer, LLMClusterInfo, LLMConfig, LLMDataDist, LLMException,
                     LLMRole, LLMStatusCode, TransferConfig, TransferWithCacheKeyConfig)
from kv_peer import PeerError
from kvcache.engine.link import LinkState
from kvcache.layer_notifications import MAX_PER_PEER, LayerNotifications
from layerwise_peer import LayerwisePeer, layer_bytes

LAYERS, DELAY_S = 8, 0.06
BLOCKS = 64
SRC_BLOCKS = list(range(0, 64, 2))     # 32 blocks of each tensor a layer
DST_BLOCKS = list(range(63, 31, -1))
# fp16 elements per block: 64 KiB blocks (4 MiB a layer) here; 4 KiB inside
# the VM lane, where Soft-RoCE runs under emulation.
ELEMS = {"tcp": 32768, "shm": 32768, "rdma": 2048}
POOL = {"tcp": 112 << 20, "shm": 112 << 20, "rdma": 16 << 20}
SLACK_S = 0.1                          # scheduling on a loaded machine
HOST = ["tcp", "shm"]
TRANSPORTS = HOST + [pytest.param("rdma", marks=pytest.mark.rdma)]

OK = int(LLMStatusCode.LLM_SUCCESS)


def linked_pair(transport):
    """(prefill, decoder, prefill's source cache, decoder's blocks cache,
    elements per block): the prefill linked to the listening decoder."""
    options = dict(transport=transport, buf_pool_cfg=f'{{"buf_pool_size": {POOL[transport]}}}',
                   sync_kv_timeout=1500)
    decoder = LayerwisePeer("decoder", 2, **options)
    prefill = LayerwisePeer("prompt", 1, listen="", **options)
    try:
        elems = ELEMS[transport]
        src = prefill.call("alloc_blocks", 2 * LAYERS, [BLOCKS, elems])
        prefill.call("zero", src)
        dst = decoder.call("alloc_blocks", 2 * LAYERS, [BLOCKS, elems], key_cluster=2)
        decoder.call("fill", dst, seed=99)
        assert prefill.call("link", 2, decoder.address) == OK
        yield prefill, decoder, src, dst, elems
    finally:
        prefill.close()
        decoder.close()


@pytest.fixture(params=TRANSPORTS)
def pd(request):
    yield from linked_pair(request.param)


@pytest.fixture(params=HOST)
def pd_host(request):
    """The same, for what does not depend on the transport (no VM time)."""
    yield from linked_pair(request.param)


def expected(seed, tensor, elems, blocks=BLOCKS, rows=SRC_BLOCKS):
    return layer_bytes(seed, tensor, blocks * elems * 2).reshape(blocks, -1)[rows]


def test_each_layer_is_pushed_and_announced_as_soon_as_it_is_computed(pd):
    prefill, decoder, src, dst, elems = pd
    decoder.send("watch", "req-1", LAYERS, dst, DST_BLOCKS, 10_000)
    started = prefill.call("start_push", "a", src, 2, LAYERS, DELAY_S, 7, SRC_BLOCKS,
                           DST_BLOCKS, "req-1")
    code, results, ready_at, sender_done, asked = prefill.call("task_result", "a")
    arrived, snapshots, final_at, final_layers = decoder.result()
    assert (code, results) == (OK, [OK])
    assert [layer for layer, _ in asked] == list(range(LAYERS))
    assert all(timeout == 1500 for _, timeout in asked)       # sync_kv_timeout, in ms
    assert final_layers == list(range(LAYERS))
    for layer in range(LAYERS):
        # Announced after the layer was computed, and before the next one
        # was (plus slack): the transfer runs beside the compute.
        next_ready = ready_at[layer] + DELAY_S if layer == LAYERS - 1 else ready_at[layer + 1]
        assert ready_at[layer] <= arrived[layer] < next_ready + SLACK_S, (layer, ready_at,
                                                                          arrived)
        # What the decoder's memory held when the announcement came.
        for k, tensor in enumerate((2 * layer, 2 * layer + 1)):
            np.testing.assert_array_equal(snapshots[layer][k], expected(7, tensor, elems))
    # Compute, then transfer: the same 8 layers, every one ready already.
    transfer_s = prefill.call("push_ready", src, 2, LAYERS, SRC_BLOCKS, DST_BLOCKS, "req-2")
    assert decoder.call("wait_final", "req-2", 10_000)[0] == "ok"
    # The transfer hides behind the compute: at least 3/4 of the layers
    # (and their bytes) landed before the last layer was even computed
    # (compute, then transfer: none), and the whole is no slower than
    # compute, then transfer (which a loaded machine makes noisy to beat
    # by a margin: on loopback a layer moves in a fraction of its compute).
    hidden = sum(at < ready_at[-1] for at in arrived)
    assert hidden >= LAYERS * 3 // 4, (arrived, ready_at)
    assert final_at - started < (ready_at[-1] - started) + transfer_s + SLACK_S


def test_a_layer_never_ready_fails_its_task_with_timeout_and_not_the_other(pd_host):
    prefill, decoder, src, dst, elems = pd_host
    other = prefill.call("alloc_blocks", 2 * LAYERS, [BLOCKS // 2, elems])
    prefill.call("zero", other)
    half = DST_BLOCKS[:16]
    prefill.call("start_push", "stuck", src, 2, LAYERS, 0.02, 3, SRC_BLOCKS[:16],
                 DST_BLOCKS[16:], "stuck", never=3)
    prefill.call("start_push", "fine", other, 2, LAYERS, 0.02, 5, SRC_BLOCKS[:16], half,
                 "fine")
    fine = prefill.call("task_result", "fine")
    stuck = prefill.call("task_result", "stuck")
    assert (fine[0], fine[1]) == (OK, [OK])
    timeout = int(LLMStatusCode.LLM_TIMEOUT)
    assert (stuck[0], stuck[1]) == (timeout, [timeout])
    assert [layer for layer, _ in stuck[4]] == [0, 1, 2, 3]
    # The stuck task waited its 1.5 s for layer 3; the other did not wait for it.
    assert fine[3] < stuck[3] - 0.5
    assert decoder.call("wait_final", "fine", 5000)[0] == "ok"
    # The decoder hears of the failure from the prefill, well before its
    # own deadline.
    code, waited_s = decoder.call("wait_final", "stuck", 20_000)
    assert code == timeout and waited_s < 5
    got = decoder.call("tensors", dst)
    for tensor in range(2 * LAYERS):
        rows = got[tensor][half]
        np.testing.assert_array_equal(rows, expected(5, tensor, elems, BLOCKS // 2,
                                                     SRC_BLOCKS[:16]))


def test_a_decoder_killed_mid_task_fails_it_with_a_link_error(pd):
    prefill, decoder, src, dst, _ = pd
    prefill.call("start_push", "a", src, 2, LAYERS, DELAY_S, 1, SRC_BLOCKS, DST_BLOCKS, "k")
    time.sleep(2.5 * DELAY_S)
    decoder.kill()
    killed_at = time.monotonic()
    code, results, _, done_at, _ = prefill.call("task_result", "a")
    assert code == int(LLMStatusCode.LLM_LINK_FAILED) and results == [code]
    assert done_at - killed_at < 5


def test_a_prefill_killed_mid_task_fails_the_decoders_wait_with_a_link_error(pd_host):
    prefill, decoder, src, dst, _ = pd_host
    decoder.send("wait_final", "k", 30_000)
    prefill.call("start_push", "a", src, 2, LAYERS, DELAY_S, 1, SRC_BLOCKS, DST_BLOCKS, "k")
    time.sleep(3.5 * DELAY_S)                 # a few layers arrived
    prefill.kill()
    code, waited_s = decoder.result()
    assert code == int(LLMStatusCode.LLM_LINK_FAILED) and waited_s < 10


def test_bad_inputs_are_refused_before_anything_starts(pd_host):
    prefill, decoder, src, dst, _ = pd_host
    blocks = dict(src_blocks=[0, 1], dst_blocks=[5, 6])
    cases = [
        (("blocks", 2, 0, range(0, LAYERS + 1), range(0, LAYERS + 1)), blocks, "outside"),
        (("blocks", 2, 0, range(0, 2), range(LAYERS - 1, LAYERS + 1)), blocks, "outside"),
        (("blocks", 2, 0, range(0, 2), range(0, 2)), dict(src_blocks=[0, 1], dst_blocks=[5]),
         "2 src_block_indices but 1 dst_block_indices"),
        (("blocks", 2, 0, range(0, 2), range(0, 2)), dict(src_blocks=[0, 1]), "not supported"),
        (("blocks", 2, 0, range(0, 2), range(0, 2)), dict(src_blocks=[0, BLOCKS],
                                                          dst_blocks=[1, 2]), "out of range"),
        (("blocks", 2, 0, range(0, 2), range(0, 2)), dict(src_blocks=[0, 1],
                                                          dst_blocks=[3, 3]), "repeat"),
        (("raw", 2, [1 << 20] * 3, range(0, 2)), {}, "3 dst_addrs for 2 layers"),
    ]
    for config, kwargs, fragment in cases:
        with pytest.raises(PeerError) as err:
            prefill.call("try_transfer", src, config, **kwargs)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID, config
        assert fragment in str(err.value), (fragment, str(err.value))
    for config, code in ((("blocks", 2, 7, range(0, 2), range(0, 2)),
                          LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),
                         (("id", (2, 999, 0), range(0, 2), range(0, 2)),
                          LLMStatusCode.LLM_KV_CACHE_NOT_EXIST),
                         (("blocks", 5, 0, range(0, 2), range(0, 2)),
                          LLMStatusCode.LLM_NOT_YET_LINK)):
        with pytest.raises(PeerError) as err:
            prefill.call("try_transfer", src, config, **blocks)
        assert err.value.status_code == code, config
    # Nothing moved, and the link still works.
    assert prefill.call("try_transfer", src, ("blocks", 2, 0, range(0, 1), range(0, 1)),
                        **blocks) == OK


# --- in one process: argument checks, and a one-tensor cache ------------------------


def start(role, cluster_id, listen):
    dd = LLMDataDist(role, cluster_id)
    cfg = LLMConfig()
    cfg.listen_ip_info = listen
    cfg.transport = "tcp"
    cfg.buf_pool_cfg = '{"buf_pool_size": 16777216}'
    dd.init(cfg.generate_options())
    return dd


@pytest.fixture
def pair():
    decoder = start(LLMRole.DECODER, 2, "127.0.0.1:0")
    prefill = start(LLMRole.PROMPT, 1, "")
    info = LLMClusterInfo()
    info.remote_cluster_id = 2
    host, port = decoder.listen_address.rsplit(":", 1)
    info.append_remote_ip_info(host, int(port))
    assert prefill.link_clusters([info])[0] == LLMStatusCode.LLM_SUCCESS
    yield prefill, decoder
    prefill.finalize()
    decoder.finalize()


class Ready(LayerSynchronizer):
    def synchronize_layer(self, layer_index, timeout_in_millis):
        return True


def test_configs_and_calls_refuse_bad_arguments_with_param_invalid(pair):
    prefill, decoder = pair
    src = prefill.cache_manager.allocate_cache(CacheDesc(4, DataType.DT_FLOAT16, [2, 64]))
    bad = [
        lambda: TransferConfig(2, [4096, 8192], range(0, 4, 2)),
        lambda: TransferConfig(2, [4096, 8192], range(-1, 1)),
        lambda: TransferConfig(2, [], None),
        lambda: TransferConfig(2, ["0x1000"]),
        lambda: TransferWithCacheKeyConfig(BlocksCacheKey(2), range(0, 2), range(0, 1)),
        lambda: TransferWithCacheKeyConfig(BlocksCacheKey(2), range(0, 2)),
        lambda: TransferWithCacheKeyConfig(BlocksCacheKey(2), range(0, 1), range(0, 1), 1),
        lambda: TransferWithCacheKeyConfig(2, range(0, 1), range(0, 1)),
        lambda: prefill.cache_manager.transfer_cache_async(None, Ready(),
                                                           [TransferConfig(2, [4096] * 4)]),
        lambda: prefill.cache_manager.transfer_cache_async(src, object(),
                                                           [TransferConfig(2, [4096] * 4)]),
        lambda: prefill.cache_manager.transfer_cache_async(src, Ready(), []),
        lambda: prefill.cache_manager.transfer_cache_async(src, Ready(), [TransferConfig(
            2, [4096] * 4, src_batch_index=2)]),
        lambda: prefill.cache_manager.transfer_cache_async(src, Ready(), [TransferConfig(
            2, [4096] * 4)], dst_block_memory_size=128),
        lambda: prefill.cache_manager.transfer_cache_async(src, Ready(), [TransferConfig(
            2, [4096] * 4)], dst_block_indices=[0, 1]),           # no dst_block_memory_size
        lambda: prefill.cache_manager.transfer_cache_async(src, Ready(), [TransferConfig(
            2, [4096] * 4)], transfer_id=""),
        lambda: decoder.cache_manager.wait_layers("x", -1, 10),
        lambda: decoder.cache_manager.wait_layers("x", 0, 0),
        lambda: decoder.cache_manager.wait_layers(1.5, 0, 10),
    ]
    for i, call in enumerate(bad):
        with pytest.raises(LLMException) as err:
            call()
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID, i
    foreign = decoder.cache_manager.allocate_cache(CacheDesc(4, DataType.DT_FLOAT16, [2, 64]))
    with pytest.raises(LLMException) as err:
        prefill.cache_manager.transfer_cache_async(foreign, Ready(), [TransferConfig(2, [1])])
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    with pytest.raises(LLMException) as err:
        decoder.cache_manager.wait_layers("nobody", None, 50)
    assert err.value.status_code == LLMStatusCode.LLM_TIMEOUT


def test_raw_addresses_outside_the_peers_memory_fail_the_task_not_the_link(pair):
    prefill, decoder = pair
    desc = CacheDesc(2, DataType.DT_FLOAT16, [2, 64])
    src = prefill.cache_manager.allocate_cache(desc)
    dst = decoder.cache_manager.allocate_cache(desc)
    task = prefill.cache_manager.transfer_cache_async(src, Ready(), [TransferConfig(2, [
        dst.tensor_addrs[0], 4096])], transfer_id="far")
    assert task.synchronize(5000) == LLMStatusCode.LLM_PARAM_INVALID
    with pytest.raises(LLMException) as err:
        decoder.cache_manager.wait_layers("far", None, 5000)
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    src.tensors()[1][1] = 3.0
    task = prefill.cache_manager.transfer_cache_async(src, Ready(), [TransferConfig(2, [
        dst.tensor_addrs[0] + 128, dst.tensor_addrs[1] + 128], src_batch_index=1)])
    assert task.get_results(5000) == [LLMStatusCode.LLM_SUCCESS]
    decoder.cache_manager.wait_layers(task.transfer_id, 0, 5000)
    assert (dst.tensors()[1][1] == 3.0).all() and (dst.tensors()[1][0] == 0).all()


def test_a_one_tensor_cache_moves_whole_without_a_layer_range(pair):
    prefill, decoder = pair
    desc = CacheDesc(1, DataType.DT_FLOAT16, [4, 256])
    src = prefill.cache_manager.allocate_cache(desc)
    src.tensors()[0][...] = np.arange(1024, dtype=np.float16).reshape(4, 256)
    dst = decoder.cache_manager.allocate_cache(desc)
    # pull_cache / push_cache: no range, every tensor moves, whatever the
    # per-layer count says.
    decoder.cache_manager.pull_cache(CacheKeyByIdAndIndex(1, src.cache_id, 2), dst, 0)
    np.testing.assert_array_equal(dst.tensors()[0][0], src.tensors()[0][2])
    with pytest.raises(LLMException) as err:
        decoder.cache_manager.pull_cache(CacheKeyByIdAndIndex(1, src.cache_id, 2), dst, 0,
                                         src_layer_range=range(0, 1),
                                         dst_layer_range=range(0, 1))
    assert "1 tensors do not split into layers of 2" in str(err.value)
    # transfer_cache_async: with no layer range the whole cache is one
    # layer; with one, it must split into layers of 2.
    task = prefill.cache_manager.transfer_cache_async(
        src, Ready(), [TransferConfig(2, [dst.tensor_addrs[0] + 3 * desc.row_bytes],
                                      src_batch_index=1)])
    assert task.get_results(5000) == [LLMStatusCode.LLM_SUCCESS]
    assert decoder.cache_manager.wait_layers(task.transfer_id, None, 5000).layers == [0]
    np.testing.assert_array_equal(dst.tensors()[0][3], src.tensors()[0][1])
    with pytest.raises(LLMException) as err:
        prefill.cache_manager.transfer_cache_async(
            src, Ready(), [TransferWithCacheKeyConfig(CacheKeyByIdAndIndex(2, dst.cache_id, 3),
                                                      range(0, 1), range(0, 1), 1)])
    assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    assert "do not split into layers of 2" in str(err.value)


def test_two_configs_to_one_decoder_share_the_id_and_end_with_one_final(pair):
    prefill, decoder = pair
    desc = CacheDesc(4, DataType.DT_FLOAT16, [2, 256])
    src = prefill.cache_manager.allocate_cache(desc)
    for i, tensor in enumerate(src.tensors()):
        tensor[...] = i + 1
    dst = decoder.cache_manager.allocate_cache(desc)
    row = desc.row_bytes
    configs = [TransferConfig(2, [a + row for a in dst.tensor_addrs]),       # both layers
               TransferConfig(2, dst.tensor_addrs[:2], range(1, 2))]        # layer 1 again
    task = prefill.cache_manager.transfer_cache_async(src, Ready(), configs, transfer_id=9)
    assert task.get_results(5000) == [LLMStatusCode.LLM_SUCCESS] * 2
    arrivals = decoder.cache_manager.wait_layers(9, None, 5000)
    # Raw addresses have no destination layers: the source's are announced.
    assert sorted(arrivals.layers) == [0, 1, 1] and arrivals.final
    got = [t[:, 0].tolist() for t in dst.tensors()]
    assert got == [[3.0, 1.0], [4.0, 2.0], [0.0, 3.0], [0.0, 4.0]]


def test_finalize_stops_a_task_waiting_for_its_layer(pair):
    prefill, decoder = pair
    src = prefill.cache_manager.allocate_cache(CacheDesc(2, DataType.DT_FLOAT16, [1, 64]))
    dst = decoder.cache_manager.allocate_cache(CacheDesc(2, DataType.DT_FLOAT16, [1, 64]))

    class Never(LayerSynchronizer):
        def synchronize_layer(self, layer_index, timeout_in_millis):
            time.sleep(0.3)
            return False
    task = prefill.cache_manager.transfer_cache_async(
        src, Never(), [TransferConfig(2, dst.tensor_addrs)], transfer_id="f")
    started = time.monotonic()
    prefill.finalize()
    assert time.monotonic() - started < 5
    assert task.synchronize(1000) == LLMStatusCode.LLM_TIMEOUT
    with pytest.raises(LLMException) as err:
        prefill.cache_manager
    assert err.value.status_code == LLMStatusCode.LLM_ENGINE_FINALIZED


class _Sender:
    """Stands in for a linked peer in LayerNotifications' bookkeeping."""

    def __init__(self, cluster_id):
        self.cluster_id = cluster_id
        self.state = LinkState.LINKED


def _notice(transfer_id, layer, final=False):
    return {"transfer_id": transfer_id, "layer": layer, "final": final, "status": 0,
            "message": ""}


def test_a_transfer_is_announced_only_by_its_sender():
    notices, first, second = LayerNotifications(), _Sender(1), _Sender(2)
    notices.serve(first, _notice("req-1", 0))
    with pytest.raises(LLMException) as other:
        notices.serve(second, _notice("req-1", 1, final=True))
    assert other.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    notices.serve(first, _notice("req-1", 1, final=True))
    arrived = notices.wait("req-1", None, 1000)
    assert arrived.layers == [0, 1] and arrived.src_cluster_id == 1
    # Once finished, the id is free for the next transfer, whoever makes it.
    notices.serve(second, _notice("req-1", 0, final=True))
    assert notices.wait("req-1", None, 1000).src_cluster_id == 2


def test_one_sender_cannot_keep_more_than_its_share_of_unfinished_transfers():
    notices, flooder, other = LayerNotifications(), _Sender(1), _Sender(2)
    for i in range(MAX_PER_PEER):
        notices.serve(flooder, _notice(i, 0))
    with pytest.raises(LLMException) as full:
        notices.serve(flooder, _notice(MAX_PER_PEER, 0))
    assert full.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY
    notices.serve(other, _notice("fair", 0, final=True))
    assert notices.wait("fair", None, 1000).layers == [0]
