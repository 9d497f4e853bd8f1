"""Caches in one process: allocation, views, keys, deallocation."""
import mmap

import numpy as np
import pytest

from kvcache import (BlocksCacheKey, CacheDesc, CacheKey, DataType, LLMConfig, LLMDataDist,
                     LLMException, LLMRole, LLMStatusCode, Placement)


@pytest.fixture
def dd():
    cluster = LLMDataDist(LLMRole.MIX, 5)
    cfg = LLMConfig()
    cfg.buf_pool_cfg = '{"buf_pool_size": 67108864}'
    cluster.init(cfg.generate_options())
    yield cluster
    cluster.finalize()


def test_views_share_the_cache_memory(dd):
    cache = dd.cache_manager.allocate_blocks_cache(
        CacheDesc(4, DataType.DT_FLOAT16, [16, 128]), BlocksCacheKey(5))
    assert len(cache.tensor_addrs) == 4
    views = cache.tensors()
    assert views[0].dtype == np.float16 and views[0].shape == (16, 128)
    views[2][3, :] = 1.5
    assert cache.numpy(2)[3, 0] == np.float16(1.5)
    assert views[2].ctypes.data == cache.tensor_addrs[2]


def test_torch_views_share_memory_and_bf16_is_bfloat16(dd):
    torch = pytest.importorskip("torch", reason="torch is optional; `make setup` installs it")
    cache = dd.cache_manager.allocate_cache(CacheDesc(2, DataType.DT_BF16, [2, 64]))
    t = cache.torch(1)
    assert t.dtype == torch.bfloat16 and tuple(t.shape) == (2, 64)
    t[1, 5] = 3.0
    assert cache.numpy(1)[1, 5] == t.view(torch.int16)[1, 5].item() & 0xFFFF
    assert t.data_ptr() == cache.tensor_addrs[1]


def test_keys_are_unique_and_a_keyed_cache_is_released_with_its_last_key(dd):
    # As llm_datadist's deallocate_cache: while a CacheKey names the cache the
    # release waits for the key to be pulled or removed; freeing a cache that
    # is gone does nothing.
    cm = dd.cache_manager
    desc = CacheDesc(2, [1, 64], DataType.DT_INT8)
    key = CacheKey(prompt_cluster_id=5, req_id=1)
    cache = cm.allocate_cache(desc, [key])
    with pytest.raises(LLMException) as err:
        cm.allocate_cache(desc, [key])
    assert err.value.status_code == LLMStatusCode.LLM_REPEAT_REQUEST
    cm.deallocate_cache(cache)
    assert cm.get_cache(cache.cache_id) is cache
    cm.deallocate_cache(cache)
    with pytest.raises(LLMException) as err:
        cm.allocate_cache(desc, [key])
    assert err.value.status_code == LLMStatusCode.LLM_REPEAT_REQUEST
    cm.remove_cache_key(key)
    with pytest.raises(LLMException) as err:
        cm.get_cache(cache.cache_id)
    assert err.value.status_code == LLMStatusCode.LLM_KV_CACHE_NOT_EXIST
    cm.deallocate_cache(cache)
    cm.allocate_cache(desc, [key])


def test_pool_exhaustion_is_out_of_memory(dd):
    with pytest.raises(LLMException) as err:
        dd.cache_manager.allocate_blocks_cache(CacheDesc(2, DataType.DT_FLOAT, [1024, 16384]))
    assert err.value.status_code == LLMStatusCode.LLM_OUT_OF_MEMORY


def test_bad_descriptions_and_options_are_param_invalid():
    for args in ((0, DataType.DT_FLOAT16, [1]), (2, DataType.DT_FLOAT16, []),
                 (2, DataType.DT_FLOAT16, [4, -1])):
        with pytest.raises(LLMException) as err:
            CacheDesc(*args)
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
    cluster = LLMDataDist(LLMRole.PROMPT, 1)
    cfg = LLMConfig()
    cfg.sync_kv_timeout = "soon"
    with pytest.raises(LLMException, match="not an integer"):
        cluster.init(cfg.generate_options())
    cfg = LLMConfig()
    cfg.listen_ip_info = "nowhere"
    with pytest.raises(LLMException, match="not 'ip:port'"):
        cluster.init(cfg.generate_options())
    cfg = LLMConfig()
    cfg.transport = "carrier-pigeon"
    with pytest.raises(LLMException, match="transport must be one of"):
        cluster.init(cfg.generate_options())
    with pytest.raises(LLMException) as err:
        cluster.cache_manager
    assert err.value.status_code == LLMStatusCode.LLM_ENGINE_FINALIZED


def test_transport_choice_is_reported(dd):
    assert dd.transport in ("tcp", "shm", "rdma")
    assert dd.transport_reason


def test_only_host_memory_that_is_mapped_read_write_can_be_registered(dd):
    cm = dd.cache_manager
    desc = CacheDesc(1, DataType.DT_UINT8, [4, 4096])
    with pytest.raises(LLMException) as err:
        cm.allocate_blocks_cache(CacheDesc(1, DataType.DT_UINT8, [4, 4096], Placement.DEVICE))
    assert err.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    host = np.zeros((4, 4096), dtype=np.uint8)
    with pytest.raises(LLMException) as err:
        cm.register_blocks_cache(CacheDesc(1, DataType.DT_UINT8, [4, 4096], Placement.DEVICE),
                                 [host.ctypes.data])
    assert err.value.status_code == LLMStatusCode.LLM_FEATURE_NOT_ENABLED
    # Reserved but inaccessible (how a device allocation looks from the host)
    # or read-only: refused.
    reserved = mmap.mmap(-1, 4 * 4096, prot=0)                      # PROT_NONE
    read_only = mmap.mmap(-1, 4 * 4096, prot=mmap.PROT_READ)
    for region in (reserved, read_only):
        address = np.frombuffer(region, dtype=np.uint8).ctypes.data  # touches nothing
        with pytest.raises(LLMException) as err:
            cm.register_blocks_cache(desc, [address])
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "not host memory mapped readable and writable" in str(err.value)
    cache = cm.register_blocks_cache(desc, [host.ctypes.data])       # host memory is fine
    cm.deallocate_cache(cache)
