"""The LLM-DataDist flows between real processes on 127.0.0.1, contents
checked byte for byte, layer ranges honoured."""
import numpy as np
import pytest

from kv_peer import PeerError, PeerProcess, pattern
from kvcache import LLMStatusCode

L, N = 4, 2                           # layers, tensors per layer (K, V)
BLOCKS, BLOCK_ELEMS = 64, 512         # 1 KiB fp16 blocks


# Every flow runs on each transport; RDMA ones run in the Soft-RoCE VM lane.
TRANSPORTS = ["tcp", "shm", pytest.param("rdma", marks=pytest.mark.rdma)]


@pytest.fixture(params=TRANSPORTS)
def transport(request):
    return request.param


POOL = '{"buf_pool_size": 67108864}'      # small: RDMA registers (pins) all of it


@pytest.fixture
def prompt(transport):
    peer = PeerProcess("prompt", 1, transport=transport, buf_pool_cfg=POOL)
    yield peer
    peer.close()


@pytest.fixture
def decoder(transport):
    peer = PeerProcess("decoder", 2, listen="", transport=transport, buf_pool_cfg=POOL)
    yield peer
    peer.close()


def linked(prompt, decoder):
    assert decoder.call("link", 1, prompt.address) == LLMStatusCode.LLM_SUCCESS


def test_pull_blocks_honours_layer_ranges(prompt, decoder):
    src = prompt.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS], key_cluster=1)
    prompt.call("fill", src, seed=1)
    dst = decoder.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS])
    decoder.call("fill", dst, seed=2)
    linked(prompt, decoder)
    src_blocks = [5, 6, 7, 40, 1]
    dst_blocks = [10, 11, 12, 0, 63]
    decoder.call("pull_blocks", 1, dst, src_blocks, dst_blocks, range(1, 3), range(2, 4))
    want = prompt.call("tensors", src)
    got = decoder.call("tensors", dst)
    before = [pattern(2, i, BLOCKS * BLOCK_ELEMS * 2).reshape(BLOCKS, -1)
              for i in range(2 * L)]
    for t in range(2 * L):
        layer = t // N
        expect = before[t].copy()
        if layer in (2, 3):                          # dst layers 2,3 <- src layers 1,2
            expect[dst_blocks] = want[t - 2][src_blocks]
        np.testing.assert_array_equal(got[t], expect, err_msg=f"tensor {t}")


def test_pull_from_a_contiguous_cache_into_blocks(prompt, decoder):
    # A per-request cache of 3 blocks' worth per tensor, cut into our blocks.
    src = prompt.call("alloc_cache", 2 * L, [1, 3 * BLOCK_ELEMS], keys=[(1, 77)])
    prompt.call("fill", src, seed=3)
    dst = decoder.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS])
    decoder.call("fill", dst, seed=4)
    linked(prompt, decoder)
    decoder.call("pull_blocks", 1, dst, [], [9, 3, 30], req_id=77)
    want = prompt.call("tensors", src)
    got = decoder.call("tensors", dst)
    for t in range(2 * L):
        np.testing.assert_array_equal(got[t][[9, 3, 30]], want[t].reshape(3, -1))


def test_pull_cache_and_push_cache_rows(prompt, decoder):
    src = prompt.call("alloc_cache", 2 * L, [4, 1024], keys=[(1, 5)])
    prompt.call("fill", src, seed=5)
    dst = decoder.call("alloc_cache", 2 * L, [4, 1024])
    decoder.call("fill", dst, seed=6)
    linked(prompt, decoder)
    decoder.call("pull_cache", 1, src, dst, remote_row=2, row=1)
    want, got = prompt.call("tensors", src), decoder.call("tensors", dst)
    for t in range(2 * L):
        np.testing.assert_array_equal(got[t][1], want[t][2])
        np.testing.assert_array_equal(got[t][[0, 2, 3]],
                                      pattern(6, t, 4 * 2048).reshape(4, -1)[[0, 2, 3]])
    # By key: row 0 of the request's cache, first 100 bytes of layer 0 only.
    decoder.call("pull_cache", 1, None, dst, row=3, size=100, src_layers=range(0, 1),
                 dst_layers=range(0, 1), req_id=5)
    got = decoder.call("tensors", dst)
    np.testing.assert_array_equal(got[0][3][:100], want[0][0][:100])
    np.testing.assert_array_equal(got[0][3][100:], pattern(6, 0, 4 * 2048).reshape(4, -1)[3][100:])
    # Push row 0 of ours into the prompt's row 3.
    decoder.call("push_cache", 1, src, dst, remote_row=3, row=0)
    want2, got2 = prompt.call("tensors", src), decoder.call("tensors", dst)
    for t in range(2 * L):
        np.testing.assert_array_equal(want2[t][3], got2[t][0])
        np.testing.assert_array_equal(want2[t][:3], want[t][:3])


def test_push_blocks_into_registered_user_memory(prompt, decoder):
    # The decoder's blocks cache is user-owned numpy memory; the prompt pushes.
    dst = decoder.call("register_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS], key_cluster=2)
    src = prompt.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS])
    prompt.call("fill", src, seed=7)
    linked(prompt, decoder)
    prompt.call("push_blocks", 2, src, [0, 1, 2, 3], [60, 61, 62, 2], range(0, 4), range(0, 4))
    want, got = prompt.call("tensors", src), decoder.call("tensors", dst)
    for t in range(2 * L):
        np.testing.assert_array_equal(got[t][[60, 61, 62, 2]], want[t][[0, 1, 2, 3]])
        untouched = np.setdiff1d(np.arange(BLOCKS), [60, 61, 62, 2])
        assert not got[t][untouched].any()


def test_switch_role_pull_then_swap_and_push(prompt, decoder):
    src = prompt.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS], key_cluster=1)
    prompt.call("fill", src, seed=8)
    dst = decoder.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS], key_cluster=2)
    linked(prompt, decoder)
    decoder.call("pull_blocks", 1, dst, [1, 2], [3, 4])
    with pytest.raises(PeerError) as err:
        decoder.call("switch_role", "prompt", listen="127.0.0.1:0")
    assert err.value.status_code == LLMStatusCode.LLM_EXIST_LINK
    assert decoder.call("unlink", 1) == LLMStatusCode.LLM_SUCCESS
    # Swap: the old decoder listens as prompt, the old prompt links to it and
    # pushes into its blocks cache.
    new_address = decoder.call("switch_role", "prompt", listen="127.0.0.1:0")
    prompt.call("switch_role", "decoder")
    assert prompt.call("link", 2, new_address) == LLMStatusCode.LLM_SUCCESS
    prompt.call("push_blocks", 2, src, [10, 11], [20, 21])
    want, got = prompt.call("tensors", src), decoder.call("tensors", dst)
    for t in range(2 * L):
        np.testing.assert_array_equal(got[t][[3, 4, 20, 21]], want[t][[1, 2, 10, 11]])


def test_xpyd_every_decoder_pulls_from_every_prompt(transport):
    prompts = [PeerProcess("prompt", c, transport=transport, buf_pool_cfg=POOL) for c in (1, 2)]
    decoders = [PeerProcess("decoder", c, listen="", transport=transport, buf_pool_cfg=POOL)
                for c in (11, 12)]
    try:
        srcs = []
        for p in prompts:
            src = p.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS], key_cluster=p.cluster_id)
            p.call("fill", src, seed=p.cluster_id)
            srcs.append(p.call("tensors", src))
        for d in decoders:
            dst = d.call("alloc_blocks", 2 * L, [BLOCKS, BLOCK_ELEMS])
            for p in prompts:
                assert d.call("link", p.cluster_id, p.address) == LLMStatusCode.LLM_SUCCESS
            # Start both decoders' pulls before collecting: they run concurrently.
            d.send("pull_blocks", 1, dst, [0, 1, 2], [0, 1, 2])
            d.dst = dst
        for d in decoders:
            d.result()
            d.call("pull_blocks", 2, d.dst, [5, 6], [3, 4])
            got = d.call("tensors", d.dst)
            for t in range(2 * L):
                np.testing.assert_array_equal(got[t][[0, 1, 2]], srcs[0][t][[0, 1, 2]])
                np.testing.assert_array_equal(got[t][[3, 4]], srcs[1][t][[5, 6]])
    finally:
        for peer in prompts + decoders:
            peer.close()
