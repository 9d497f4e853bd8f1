"""CUDA memory at the registration boundary. Needs torch with a CUDA device
(skipped elsewhere, with the reason): device pointers are refused cleanly,
and pinned host memory, the staging area for device caches, is registered
and moved like any host memory."""
import numpy as np
import pytest

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMClusterInfo, LLMConfig,
                     LLMDataDist, LLMException, LLMRole, LLMStatusCode)

torch = pytest.importorskip("torch", reason="torch is not installed")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device here", allow_module_level=True)

BLOCKS, BLOCK_BYTES = 64, 4096


def start(role, cluster, listen=None):
    dd = LLMDataDist(role, cluster)
    cfg = LLMConfig()
    if listen:
        cfg.listen_ip_info = listen
    cfg.transport = "shm"
    cfg.buf_pool_cfg = '{"buf_pool_size": 67108864}'
    dd.init(cfg.generate_options())
    return dd


def test_a_device_pointer_is_refused_at_registration():
    dd = start(LLMRole.PROMPT, 1, "127.0.0.1:0")
    try:
        on_gpu = torch.zeros(BLOCKS * BLOCK_BYTES, dtype=torch.uint8, device="cuda")
        with pytest.raises(LLMException) as err:
            dd.cache_manager.register_blocks_cache(
                CacheDesc(1, DataType.DT_UINT8, [BLOCKS, BLOCK_BYTES]), [on_gpu.data_ptr()])
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "not host memory" in str(err.value)
    finally:
        dd.finalize()


def test_pinned_host_memory_is_pulled_and_lands_on_the_gpu():
    prompt, decoder = start(LLMRole.PROMPT, 1, "127.0.0.1:0"), start(LLMRole.DECODER, 2)
    try:
        source = torch.randint(0, 256, (BLOCKS, BLOCK_BYTES), dtype=torch.uint8, device="cuda")
        staging = torch.empty((BLOCKS, BLOCK_BYTES), dtype=torch.uint8, pin_memory=True)
        staging.copy_(source)                                # device -> pinned host
        prompt.cache_manager.register_blocks_cache(
            CacheDesc(1, DataType.DT_UINT8, [BLOCKS, BLOCK_BYTES]), [staging.data_ptr()],
            BlocksCacheKey(1))
        info = LLMClusterInfo()
        info.remote_cluster_id = 1
        host, port = prompt.listen_address.rsplit(":", 1)
        info.append_remote_ip_info(host, int(port))
        assert decoder.link_clusters([info])[0] == LLMStatusCode.LLM_SUCCESS
        dst = decoder.cache_manager.allocate_blocks_cache(
            CacheDesc(1, DataType.DT_UINT8, [BLOCKS, BLOCK_BYTES]))
        order = np.random.default_rng(0).permutation(BLOCKS)
        decoder.cache_manager.pull_blocks(BlocksCacheKey(1), dst, order.tolist(),
                                          list(range(BLOCKS)), tensor_num_per_layer=1)
        landed = dst.torch(0).to("cuda")                     # pool memory -> device
        assert torch.equal(landed, source[torch.as_tensor(order, device="cuda")])
    finally:
        decoder.finalize()
        prompt.finalize()
