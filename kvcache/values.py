"""Plain value types of the public API, after llm_datadist: roles, data
types, placements, cache descriptions and keys, cluster info."""
import math
from dataclasses import dataclass, field
from enum import Enum, IntEnum

import numpy as np

from kvcache.status import LLMException, LLMStatusCode


class LLMRole(Enum):
    PROMPT = "prompt"
    DECODER = "decoder"
    MIX = "mix"


class Placement(IntEnum):
    HOST = 0
    DEVICE = 1


class DataType(IntEnum):
    """Values follow llm_datadist (GE) DataType numbering."""
    DT_FLOAT = 0
    DT_FLOAT16 = 1
    DT_INT8 = 2
    DT_INT32 = 3
    DT_UINT8 = 4
    DT_INT16 = 6
    DT_UINT16 = 7
    DT_UINT32 = 8
    DT_INT64 = 9
    DT_UINT64 = 10
    DT_DOUBLE = 11
    DT_BOOL = 12
    DT_BF16 = 27

    @property
    def itemsize(self):
        return _NUMPY[self].itemsize

    @property
    def numpy_dtype(self):
        """The numpy dtype of host views (bfloat16 is stored as uint16)."""
        return _NUMPY[self]


_NUMPY = {
    DataType.DT_FLOAT: np.dtype(np.float32), DataType.DT_FLOAT16: np.dtype(np.float16),
    DataType.DT_INT8: np.dtype(np.int8), DataType.DT_INT32: np.dtype(np.int32),
    DataType.DT_UINT8: np.dtype(np.uint8), DataType.DT_INT16: np.dtype(np.int16),
    DataType.DT_UINT16: np.dtype(np.uint16), DataType.DT_UINT32: np.dtype(np.uint32),
    DataType.DT_INT64: np.dtype(np.int64), DataType.DT_UINT64: np.dtype(np.uint64),
    DataType.DT_DOUBLE: np.dtype(np.float64), DataType.DT_BOOL: np.dtype(np.bool_),
    DataType.DT_BF16: np.dtype(np.uint16),
}


def _invalid(message):
    return LLMException(LLMStatusCode.LLM_PARAM_INVALID, message)


@dataclass
class CacheDesc:
    """``num_tensors`` tensors of ``shape`` and ``data_type`` each. For a
    blocks cache shape[0] is the number of blocks; for a per-request cache
    shape[0] is the batch size."""
    num_tensors: int
    data_type: DataType
    shape: list
    placement: Placement = Placement.HOST

    def __post_init__(self):
        if not isinstance(self.num_tensors, int) or self.num_tensors <= 0:
            raise _invalid(f"num_tensors must be a positive int, got {self.num_tensors!r}")
        self.data_type = DataType(self.data_type)
        self.placement = Placement(self.placement)
        self.shape = [int(d) for d in self.shape]
        if not self.shape or any(d <= 0 for d in self.shape):
            raise _invalid(f"shape must be non-empty with positive dimensions, got {self.shape}")

    @property
    def tensor_bytes(self):
        return math.prod(self.shape) * self.data_type.itemsize

    @property
    def row_bytes(self):
        """Bytes of one block (blocks cache) or one batch row."""
        return self.tensor_bytes // self.shape[0]

    def to_dict(self):
        return dict(num_tensors=self.num_tensors, data_type=int(self.data_type),
                    shape=list(self.shape), placement=int(self.placement))

    @classmethod
    def from_dict(cls, d):
        return cls(int(d["num_tensors"]), DataType(d["data_type"]), list(d["shape"]),
                   Placement(d["placement"]))


@dataclass(frozen=True)
class CacheKey:
    """Names a per-request cache on the prompt side."""
    prompt_cluster_id: int
    req_id: int
    model_id: int = 0
    prefix_id: int = -1


@dataclass(frozen=True)
class CacheKeyByIdAndIndex:
    """Names one batch row of a cache by cache id on a remote cluster."""
    cluster_id: int
    cache_id: int
    batch_index: int = 0


class BlocksCacheKey:
    """Names the blocks cache of a cluster (llm_datadist spells the id
    ``prompt_cluster_id``; ``cluster_id`` is accepted too)."""
    __slots__ = ("prompt_cluster_id", "model_id")

    def __init__(self, prompt_cluster_id=None, model_id=0, *, cluster_id=None):
        if (prompt_cluster_id is None) == (cluster_id is None):
            raise _invalid("give exactly one of prompt_cluster_id and cluster_id")
        self.prompt_cluster_id = int(prompt_cluster_id if cluster_id is None else cluster_id)
        self.model_id = int(model_id)

    @property
    def cluster_id(self):
        return self.prompt_cluster_id

    def __eq__(self, other):
        return (isinstance(other, BlocksCacheKey)
                and (self.prompt_cluster_id, self.model_id) == (other.prompt_cluster_id,
                                                                other.model_id))

    def __hash__(self):
        return hash(("blocks", self.prompt_cluster_id, self.model_id))

    def __repr__(self):
        return (f"BlocksCacheKey(prompt_cluster_id={self.prompt_cluster_id}, "
                f"model_id={self.model_id})")


@dataclass
class LLMClusterInfo:
    """Who to link to: ``remote_cluster_id`` and its address."""
    remote_cluster_id: int = 0
    local_ip_info: list = field(default_factory=list)
    remote_ip_info: list = field(default_factory=list)

    def append_local_ip_info(self, ip, port):
        self.local_ip_info.append((str(ip), int(port)))

    def append_remote_ip_info(self, ip, port):
        self.remote_ip_info.append((str(ip), int(port)))
