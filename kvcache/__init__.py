"""kvcache: move LLM KV cache between prefill and decode processes.

Pure Python over pyverbs_kv. The LLM-DataDist-style API (LLMDataDist and its
cache_manager) sits on a one-sided TransferEngine with pluggable transports;
``kvcache.TransferEngine`` is that engine with device memory too
(kvcache.device.engine).
Everything but the RDMA transport works where libibverbs is missing:
``rdma_status()`` then says why RDMA is off."""
from kvcache.bufpool import BufferPool, BufPoolConfig
from kvcache.cache import Cache
from kvcache.device.engine import TransferEngine
from kvcache.engine import LinkState, Peer, TransferRequest
from kvcache.layer_notifications import LayerArrivals
from kvcache.layerwise import (CacheTask, LayerSynchronizer, TransferConfig,
                               TransferWithCacheKeyConfig)
from kvcache.llm_datadist import LLMConfig, LLMDataDist
from kvcache.rank_table import RegisterMemStatus
from kvcache.rdma_support import RdmaStatus, rdma_status
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.tcp.protocol import MAX_NOTIFY_BYTES
from kvcache.values import (BlocksCacheKey, CacheDesc, CacheKey, CacheKeyByIdAndIndex,
                            DataType, LLMClusterInfo, LLMRole, Placement)

__all__ = ["BlocksCacheKey", "BufPoolConfig", "BufferPool", "Cache", "CacheDesc", "CacheKey",
           "CacheKeyByIdAndIndex", "DataType", "LLMClusterInfo", "LLMConfig", "LLMDataDist",
           "LLMException", "LLMRole", "LLMStatusCode", "LinkState", "MAX_NOTIFY_BYTES", "Peer",
           "Placement", "RdmaStatus", "RegisterMemStatus", "TransferEngine", "TransferRequest",
           "rdma_status"]
# Layer-wise transfer (llm_datadist's transfer_cache_async) and its receiving side.
__all__ += ["CacheTask", "LayerArrivals", "LayerSynchronizer", "TransferConfig",
            "TransferWithCacheKeyConfig"]
