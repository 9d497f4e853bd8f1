import os

import pytest


def _rdma_devices():
    try:
        import pyverbs_kv
    except ImportError as exc:
        return [], f"pyverbs_kv cannot be imported ({exc})"
    devices = pyverbs_kv.get_device_list()
    if not devices:
        return [], "no RDMA device on this machine; run `scripts/rdma-vm -- pytest -m rdma`"
    return devices, ""


@pytest.fixture(autouse=True)
def _rdma_gate(request):
    """Tests marked rdma skip with the reason where no device exists, and fail
    instead inside the VM lane (PYVERBS_KV_REQUIRE_RDMA=1)."""
    if request.node.get_closest_marker("rdma") is None:
        return
    require_rdma()


def require_rdma():
    """Skip where no RDMA device exists; fail instead in the VM lane. For
    fixtures of a wider scope than the test, which run before its gate."""
    devices, reason = _rdma_devices()
    if devices:
        return
    if os.environ.get("PYVERBS_KV_REQUIRE_RDMA") == "1":
        pytest.fail(f"RDMA required in this lane but unavailable: {reason}")
    pytest.skip(reason)


@pytest.fixture
def rdma_ip():
    """The address rxe0 sits on (inside scripts/rdma-vm)."""
    return os.environ.get("PYVERBS_KV_TEST_IP", "10.99.0.1")


@pytest.fixture(scope="session")
def etcd():
    """A real etcd server for the session (tests/etcd_server.py): skips
    without etcd, fails instead where KVCACHE_REQUIRE_ETCD=1 (CI)."""
    from etcd_server import start_or_skip
    server = start_or_skip(pytest)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def libraries(tmp_path_factory):
    """The accelerator runtime doubles, built once: {device type: path}."""
    from accel_doubles import build_runtimes
    return build_runtimes(tmp_path_factory.mktemp("doubles"))
