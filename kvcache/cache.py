"""Cache objects: tensors laid out in registered memory, with numpy (and
torch, when installed) views of host caches."""
import ctypes

import numpy as np

from kvcache.checks import public
from kvcache.engine.regions import check_host_mapped
from kvcache.status import LLMException, LLMStatusCode
from kvcache.values import CacheDesc, Placement

CPU_CACHE_ID = -1           # llm_datadist's id of a cache no cache manager holds


class Cache:
    """A KV cache: ``cache_desc.num_tensors`` tensors at ``tensor_addrs``.
    ``kind`` is 'blocks' (shape[0] = blocks) or 'cache' (shape[0] = batch)."""

    def __init__(self, cache_id, cache_desc, tensor_addrs, kind, region_ids, owned,
                 keys=()):
        self.cache_id = cache_id
        self.cache_desc = cache_desc
        self.tensor_addrs = [int(a) for a in tensor_addrs]
        self.kind = kind
        self.region_ids = list(region_ids)     # one per tensor
        self.owned = owned                     # allocated from the pool (vs registered)
        self.keys = list(keys)
        self.containers = []                   # top-level regions of registered host memory
        self.remote = True                     # offered to linked peers
        self.segment = None                    # the memfd of a pool cache of its own

    @classmethod
    @public
    def create_cpu_cache(cls, cache_desc, addrs):
        """A blocks cache over caller-owned host memory (one address per
        tensor, as llm_datadist's create_cpu_cache), for swap_blocks: no
        cache manager holds it (cache_id -1) and no peer can reach it.
        LLM_PARAM_INVALID for a placement other than HOST, a wrong address
        count, or memory not mapped readable and writable here."""
        if not isinstance(cache_desc, CacheDesc):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"cache_desc must be a CacheDesc, got {type(cache_desc).__name__}")
        if cache_desc.placement != Placement.HOST:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"cache_desc placement must be HOST, got "
                               f"{cache_desc.placement.name}")
        if not isinstance(addrs, (list, tuple)) or len(addrs) != cache_desc.num_tensors:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"addrs must be a list of {cache_desc.num_tensors} addresses "
                               "(one per tensor)")
        for addr in addrs:
            if isinstance(addr, bool) or not isinstance(addr, int) or addr <= 0:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"address {addr!r} is not a positive int")
            check_host_mapped(addr, cache_desc.tensor_bytes)
        return cls(CPU_CACHE_ID, cache_desc, addrs, "blocks", [], owned=False)

    @property
    def transfer_path(self):
        """How this cache's bytes move: 'staged' for a DEVICE cache (through
        pinned host slots, see kvcache.device.staging), 'host' else."""
        return "staged" if self.cache_desc.placement == Placement.DEVICE else "host"

    @property
    def per_device_tensor_addrs(self):
        return [self.tensor_addrs]

    def numpy(self, index):
        """A numpy view of tensor ``index`` (host caches only)."""
        desc = self.cache_desc
        if desc.placement != Placement.HOST:
            raise ValueError("only host caches have numpy views")
        raw = (ctypes.c_uint8 * desc.tensor_bytes).from_address(self.tensor_addrs[index])
        return np.frombuffer(raw, dtype=np.uint8).view(desc.data_type.numpy_dtype).reshape(
            desc.shape)

    def tensors(self):
        """numpy views of every tensor."""
        return [self.numpy(i) for i in range(self.cache_desc.num_tensors)]

    def torch(self, index):
        """A torch view of tensor ``index`` sharing the memory (needs torch)."""
        import torch
        from kvcache.values import DataType
        view = torch.from_numpy(self.numpy(index))
        return view.view(torch.bfloat16) if self.cache_desc.data_type == DataType.DT_BF16 \
            else view

    def describe(self):
        """What a peer needs to address this cache."""
        return {"cache_id": self.cache_id, "kind": self.kind,
                "desc": self.cache_desc.to_dict(), "tensor_addrs": self.tensor_addrs,
                "region_ids": self.region_ids}

    def __repr__(self):
        return (f"Cache(id={self.cache_id}, {self.kind}, {self.cache_desc.num_tensors} x "
                f"{self.cache_desc.shape} {self.cache_desc.data_type.name})")


class RemoteCache:
    """A peer's cache as its lookup described it."""

    def __init__(self, info):
        self.cache_id = int(info["cache_id"])
        self.kind = info["kind"]
        self.cache_desc = CacheDesc.from_dict(info["desc"])
        self.tensor_addrs = [int(a) for a in info["tensor_addrs"]]
        self.region_ids = [int(r) for r in info["region_ids"]]
        self.row = int(info.get("batch_index", 0))      # the row a CacheKey lookup named
        if not (len(self.tensor_addrs) == len(self.region_ids)
                == self.cache_desc.num_tensors):
            raise ValueError("inconsistent cache description")
