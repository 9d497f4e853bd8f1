"""``kvcache bench --peers`` as a user runs it (subprocesses): a small run
through each peer engine that is installed (its rows, read cells checked
byte-exact by the bench itself), and, with the peers hidden, a one-line
error naming what to install. The peers are an optional extra that CI does
not install: their runs skip there with the reason."""
import json
import os
import subprocess
import sys

import pytest

from kvcache import bench_peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = (1024, 16384)


def bench(*args, pythonpath=ROOT, timeout=600):
    env = dict(os.environ, PYTHONPATH=pythonpath)
    return subprocess.run([sys.executable, "-m", "kvcache", "bench", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=env)


@pytest.mark.parametrize("name", list(bench_peers.PEERS))
def test_peer_rows_next_to_ours(name, tmp_path):
    peer = bench_peers.PEERS[name]
    if bench_peers.missing([name]):
        pytest.skip(f"{name} is not installed ({peer.PIP}; `make bench-peers` installs it)")
    out_json = tmp_path / "bench.json"
    out = bench("--sizes", "1K,16K", "--batch", "64", "--seconds", "0.1", "--transports",
                "tcp", "--peers", name, "--json", str(out_json))
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out_json.read_text())
    rows = [r for r in result["rows"] if r["path"] == name]
    cells = {(r["transport"], r["op"], r["block"]) for r in rows}
    assert cells == {(t, op, size) for t in peer.VARIANTS for op in ("write", "read")
                     for size in SIZES}
    for r in rows:
        assert r["threads"] == 1 and r["batches"] >= 5, r
        assert r["GBps"] > 0 and r["memcpy_GBps"] > 0, r
    # Our rows are still there, and the table shows the peer's beside them.
    assert any(r["path"] == "engine" for r in result["rows"])
    table = out.stdout
    for transport in peer.VARIANTS:
        assert f"| {transport} | {name} | read | 1 | 16 KiB |" in table
        # The ratios to our engine on the matching transport (tcp ran here).
        if peer.OURS.get(transport, transport) == "tcp":
            assert f"| tcp engine | {name} {transport} | read | " in table
    # Neither library's log lines reach the table.
    assert all(line.startswith(("|", "Batch of", "Ours vs peers")) or not line.strip()
               for line in table.splitlines()), table


def test_without_the_peers_a_one_line_error_names_what_to_install(tmp_path):
    """Packages that shadow both libraries, first on the path, stand for a
    machine where they are not installed."""
    for package in ("mooncake", "nixl_cu12"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    out = bench("--peers", "--sizes", "1K", timeout=120,
                pythonpath=os.pathsep.join([str(tmp_path), ROOT]))
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1, out.stderr
    for peer in bench_peers.PEERS.values():
        assert peer.PIP in lines[0]
    assert out.stdout == ""
    # One missing peer is named alone.
    out = bench("--peers", "nixl", "--sizes", "1K", timeout=120,
                pythonpath=os.pathsep.join([str(tmp_path), ROOT]))
    assert out.returncode == 1 and "nixl-cu12" in out.stderr and "mooncake" not in out.stderr


def test_an_unknown_peer_is_a_usage_error():
    out = bench("--peers", "mooncake,ucx")
    assert out.returncode == 2
    assert "'ucx': choose from mooncake,nixl" in out.stderr and "Traceback" not in out.stderr
