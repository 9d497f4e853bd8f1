"""Plain value types of the public API, after llm_datadist: roles, data
types, placements, cache descriptions and keys, cluster info."""
import math
from dataclasses import dataclass, field
from enum import Enum, IntEnum

import numpy as np

from kvcache.status import LLMException, LLMStatusCode


class LLMRole(Enum):
    """llm_datadist's values (``LLMRole(1)`` is PROMPT). The role names
    ("prompt", "decoder", "mix", any case) are accepted too."""
    PROMPT = 1
    DECODER = 2
    MIX = 3

    @classmethod
    def _missing_(cls, value):
        if isinstance(value, str):
            return cls.__members__.get(value.upper())
        return None

    @property
    def engine_role(self):
        """The role name a TransferEngine and its peers use."""
        return self.name.lower()


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


INVALID_ID = 2 ** 64 - 1          # llm_datadist's "no id" (req_id / prefix_id)


def default_placement():
    """Where a CacheDesc without a placement lives: DEVICE once a device
    runtime is configured for caches (as llm_datadist, whose default is
    DEVICE), HOST until then (a DEVICE cache needs LLMConfig.device_type)."""
    return Placement.HOST


def _uint64(value, what):
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= INVALID_ID:
        raise _invalid(f"{what} must be an integer in 0..2**64-1, got {value!r}")
    return value


class CacheDesc:
    """``num_tensors`` tensors of ``shape`` and ``data_type`` each, as
    llm_datadist's CacheDesc(num_tensors, shape, data_type, placement,
    batch_dim_index=0, seq_len_dim_index=-1, kv_tensor_format=None). For a
    blocks cache shape[0] is the number of blocks; for a per-request cache
    shape[0] is the batch size. ``placement`` None: ``default_placement()``.
    The order (num_tensors, data_type, shape) of earlier kvcache releases is
    still accepted (a DataType second and a list third cannot be mistaken).
    batch_dim_index must be 0 (rows are contiguous); seq_len_dim_index and
    kv_tensor_format are kept but change nothing here."""

    def __init__(self, num_tensors, shape, data_type=None, placement=None, batch_dim_index=0,
                 seq_len_dim_index=-1, kv_tensor_format=None):
        if isinstance(shape, (DataType, int)) and isinstance(data_type, (list, tuple)):
            shape, data_type = data_type, shape
        if isinstance(num_tensors, bool) or not isinstance(num_tensors, int) or num_tensors <= 0:
            raise _invalid(f"num_tensors must be a positive int, got {num_tensors!r}")
        self.num_tensors = num_tensors
        try:
            self.data_type = DataType(data_type)
            self.placement = default_placement() if placement is None else Placement(placement)
            self.shape = [int(d) for d in shape]
        except (TypeError, ValueError):
            raise _invalid(f"CacheDesc: bad data_type {data_type!r}, placement {placement!r} "
                           f"or shape {shape!r}") from None
        if not self.shape or any(d <= 0 for d in self.shape):
            raise _invalid(f"shape must be non-empty with positive dimensions, got {self.shape}")
        if batch_dim_index != 0:
            raise _invalid(f"batch_dim_index {batch_dim_index!r}: only 0 is supported (batch "
                           "rows are contiguous)")
        if not isinstance(seq_len_dim_index, int) or not -1 <= seq_len_dim_index < len(self.shape):
            raise _invalid(f"seq_len_dim_index {seq_len_dim_index!r} must be -1 or in "
                           f"0..{len(self.shape) - 1}")
        self.batch_dim_index = 0
        self.seq_len_dim_index = seq_len_dim_index
        self.kv_tensor_format = kv_tensor_format

    @property
    def batch_size(self):
        return self.shape[0]

    @property
    def tensor_bytes(self):
        return math.prod(self.shape) * self.data_type.itemsize

    @property
    def size(self):
        """Bytes of one tensor (llm_datadist's name)."""
        return self.tensor_bytes

    @property
    def row_bytes(self):
        """Bytes of one block (blocks cache) or one batch row."""
        return self.tensor_bytes // self.shape[0]

    def __eq__(self, other):
        return isinstance(other, CacheDesc) and self.to_dict() == other.to_dict()

    def __repr__(self):
        return (f"CacheDesc(num_tensors={self.num_tensors}, shape={self.shape}, "
                f"data_type={self.data_type.name}, placement={self.placement.name})")

    def to_dict(self):
        return dict(num_tensors=self.num_tensors, data_type=int(self.data_type),
                    shape=list(self.shape), placement=int(self.placement))

    @classmethod
    def from_dict(cls, d):
        return cls(int(d["num_tensors"]), list(d["shape"]), DataType(d["data_type"]),
                   Placement(d["placement"]))


class CacheKey:
    """Names one batch row of a per-request cache on the prompt side, as
    llm_datadist's CacheKey(cluster_id, req_id, model_id=0, prefix_id=2**64-1)
    (``prompt_cluster_id=`` is accepted for ``cluster_id``). The i-th key a
    cache is allocated with names its batch row i; a key whose req_id and
    prefix_id are both 2**64-1 holds the place of an unused row. Keys are
    equal when all four fields are; a lookup matches on all four."""
    __slots__ = ("prompt_cluster_id", "req_id", "model_id", "prefix_id")

    def __init__(self, *args, **kwargs):
        names = ("cluster_id", "req_id", "model_id", "prefix_id")
        if len(args) > len(names):
            raise _invalid(f"CacheKey takes at most 4 arguments, got {len(args)}")
        for name, value in zip(names, args):
            if name in kwargs:
                raise _invalid(f"CacheKey: {name} given twice")
            kwargs[name] = value
        unknown = set(kwargs) - set(names) - {"prompt_cluster_id"}
        if unknown:
            raise _invalid(f"CacheKey: unsupported arguments {sorted(unknown)}")
        if ("cluster_id" in kwargs) == ("prompt_cluster_id" in kwargs):
            raise _invalid("CacheKey needs exactly one of cluster_id and prompt_cluster_id")
        if "req_id" not in kwargs:
            raise _invalid("CacheKey needs req_id")
        cluster = kwargs.get("cluster_id", kwargs.get("prompt_cluster_id"))
        self.prompt_cluster_id = _uint64(cluster, "cluster_id")
        self.req_id = _uint64(kwargs["req_id"], "req_id")
        self.model_id = _uint64(kwargs.get("model_id", 0), "model_id")
        self.prefix_id = _uint64(kwargs.get("prefix_id", INVALID_ID), "prefix_id")

    @property
    def cluster_id(self):
        return self.prompt_cluster_id

    @property
    def placeholder(self):
        """Holds the place of an unused batch row (names nothing)."""
        return self.req_id == INVALID_ID and self.prefix_id == INVALID_ID

    def check_pullable(self):
        """As llm_datadist: exactly one of req_id and prefix_id is an id."""
        if (self.req_id == INVALID_ID) == (self.prefix_id == INVALID_ID):
            raise _invalid(f"{self!r}: exactly one of req_id and prefix_id must be in "
                           "0..2**64-2")

    def _fields(self):
        return (self.prompt_cluster_id, self.req_id, self.model_id, self.prefix_id)

    def __eq__(self, other):
        return isinstance(other, CacheKey) and self._fields() == other._fields()

    def __hash__(self):
        return hash(("key",) + self._fields())

    def __repr__(self):
        return (f"CacheKey(cluster_id={self.prompt_cluster_id}, req_id={self.req_id}, "
                f"model_id={self.model_id}, prefix_id={self.prefix_id})")


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
