"""Whether RDMA can be used here, and if not, why. The only place in kvcache
that imports pyverbs_kv is the RDMA transport; this module imports it lazily
so that a machine without libibverbs runs every other path."""
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RdmaStatus:
    available: bool
    reason: str
    devices: list = field(default_factory=list)


_cached = None


def rdma_status(refresh=False):
    """RdmaStatus(available, reason, devices). Never raises."""
    global _cached
    if _cached is not None and not refresh:
        return _cached
    try:
        from pyverbs_kv import VerbsError, get_device_list
    except (ImportError, OSError) as exc:
        _cached = RdmaStatus(False, f"pyverbs_kv cannot be loaded: {exc} (is rdma-core's "
                                    "libibverbs installed?)")
        return _cached
    try:
        devices = get_device_list()
    except VerbsError as exc:
        _cached = RdmaStatus(False, str(exc))
        return _cached
    if not devices:
        _cached = RdmaStatus(False, "libibverbs found no RDMA device")
    else:
        _cached = RdmaStatus(True, f"RDMA devices: {', '.join(devices)}", devices)
    return _cached
