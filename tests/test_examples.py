"""Every example runs as real processes and checks its own results."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["pull_blocks", "pull_cache", "pull_blocks_from_cache", "push_cache",
            "push_blocks", "switch_role", "xpyd", "fastdeploy_write_cache",
            "pull_blocks_rank_table", "pull_cache_rank_table",
            "pull_from_cache_to_blocks_rank_table", "transfer_cache_async",
            "transfer_backend"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_verifies_its_transfer(name):
    args = [sys.executable, os.path.join(ROOT, "examples", f"{name}.py")]
    if name == "pull_blocks":
        args += ["--batch", "256", "--block-kib", "4"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK:" in out.stdout


def test_transfer_bench_runs_every_cell_and_checks_what_it_read(tmp_path):
    out_json, out_md = tmp_path / "bench.json", tmp_path / "bench.md"
    out = subprocess.run([sys.executable, "-m", "kvcache", "bench", "--sizes", "4K,8K",
                          "--batch", "64", "--seconds", "0.05", "--transports", "tcp,shm",
                          "--threads", "1,2", "--json", str(out_json), "--markdown",
                          str(out_md)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    result = json.loads(out_json.read_text())
    cells = {(r["transport"], r["path"], r["op"], r["threads"], r["block"])
             for r in result["rows"]}
    # 2 transports x 2 thread counts x 2 sizes x (engine write, engine read, pull_blocks)
    assert len(cells) == 24 and all(r["GBps"] > 0 for r in result["rows"])
    assert result["tcp_loopback_GBps"] > 0 and set(result["memcpy"]) == {"4096", "8192"}
    assert out_md.read_text().count("\n| shm |") == 12


def test_post_cost_bench_runs_the_batch_path_on_the_null_provider():
    out = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "post_cost_bench.py"),
                          "--sizes", "1K", "--repeat", "3"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    row = out.stdout.splitlines()[-1].split()
    assert row[0] == "1K" and row[1] == "1538"          # one WR per permuted block
