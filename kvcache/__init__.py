"""kvcache: move LLM KV cache between prefill and decode processes.

Pure Python over pyverbs_kv. Everything but the RDMA transport works where
libibverbs is missing: ``rdma_status()`` then says why RDMA is off."""
from kvcache.rdma_support import RdmaStatus, rdma_status

__all__ = ["RdmaStatus", "rdma_status"]
