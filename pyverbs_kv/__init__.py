"""pyverbs_kv: Cython bindings of libibverbs and librdmacm with a vectorised
RDMA data path (see README.md).

Importing this package needs libibverbs and librdmacm at run time; callers
that can live without RDMA (the kvcache package) catch the ImportError."""
from pyverbs_kv.base import (VerbsError, VerbsTimeout, CompletionError, fork_init,
                             memlock_limit, memlock_advice)
from pyverbs_kv.device import (Context, GIDEntry, get_device_list, gid_to_str, gid_from_str,
                               MTU_BYTES)
from pyverbs_kv.pd import PD
from pyverbs_kv.mr import MR, DEFAULT_ACCESS
from pyverbs_kv.cq import CompChannel, CQ, WC_DTYPE
from pyverbs_kv.qp import QP, QPCap, Batch, block_descriptors, wait_batches
from pyverbs_kv import enums

__all__ = ["VerbsError", "VerbsTimeout", "CompletionError", "fork_init", "memlock_limit",
           "memlock_advice", "Context", "GIDEntry", "get_device_list", "gid_to_str",
           "gid_from_str", "MTU_BYTES", "PD", "MR", "DEFAULT_ACCESS", "CompChannel", "CQ",
           "WC_DTYPE", "QP", "QPCap", "Batch", "block_descriptors", "wait_batches", "enums"]
