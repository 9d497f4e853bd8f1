"""pyverbs_kv: Cython bindings of libibverbs and librdmacm with a vectorised
RDMA data path (see README.md), plus modules that need no RDMA library:
``pyverbs_kv.sgio`` (scatter/gather I/O for sockets and shared memory),
``pyverbs_kv.pieces`` (building, locating and merging descriptor arrays), and
``pyverbs_kv.acl`` / ``pyverbs_kv.cuda`` (the Ascend and CUDA runtimes, loaded
with dlopen at first use).

The verbs names below load on first use, so ``import pyverbs_kv.sgio`` works
where libibverbs is missing; touching a verbs name there raises ImportError."""
import importlib

_EXPORTS = {
    "base": ["VerbsError", "VerbsTimeout", "CompletionError", "fork_init", "memlock_limit",
             "memlock_advice"],
    "device": ["Context", "GIDEntry", "get_device_list", "gid_to_str", "gid_from_str",
               "MTU_BYTES"],
    "pd": ["PD"],
    "mr": ["MR", "DEFAULT_ACCESS"],
    "cq": ["CompChannel", "CQ", "WC_DTYPE"],
    "qp": ["QP", "QPCap", "Batch", "block_descriptors", "wait_batches"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

_MODULES = ("enums", "cm", "sgio", "pieces", "acl", "cuda")
__all__ = sorted(_WHERE) + list(_MODULES)


def __getattr__(name):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"pyverbs_kv.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    if name in _MODULES:
        return importlib.import_module(f"pyverbs_kv.{name}")
    raise AttributeError(f"module 'pyverbs_kv' has no attribute {name!r}")
