"""kvcache on a machine whose libibverbs is missing at run time."""
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_kvcache_reports_rdma_unavailable_when_libibverbs_cannot_load(tmp_path):
    # A libibverbs.so.1 without any verbs symbol shadows the real one for the
    # child, so loading pyverbs_kv fails in the dynamic loader itself.
    stub_src = tmp_path / "stub.c"
    stub_src.write_text("int pyverbs_kv_test_stub;\n")
    for soname in ("libibverbs.so.1", "librdmacm.so.1"):
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / soname),
                        str(stub_src), f"-Wl,-soname,{soname}"], check=True)
    code = textwrap.dedent("""
        import kvcache
        status = kvcache.rdma_status()
        print(status.available)
        print(status.reason)
    """)
    env = dict(os.environ, LD_LIBRARY_PATH=str(tmp_path), PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    available, reason = out.stdout.splitlines()[:2]
    assert available == "False"
    assert "pyverbs_kv cannot be loaded" in reason and "libibverbs" in reason


def test_rdma_status_on_this_machine_is_consistent():
    import kvcache
    import pyverbs_kv
    status = kvcache.rdma_status(refresh=True)
    assert status.available == bool(pyverbs_kv.get_device_list())
    assert status.reason
