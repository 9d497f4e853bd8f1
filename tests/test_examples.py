"""Every example runs as real processes and checks its own results, has
--help, fails at once with a child's start-up error, and leaves no child
behind when killed."""
import json
import os
import subprocess
import sys
import time

import pytest

from tests.helpers import wait_until
from tests.test_cli import _alive, _descendants

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
    if name == "pull_blocks":                  # says which pass its GB/s is
        assert "GB/s warm (the cold first pass:" in out.stdout


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


def run_example(name, *args, timeout=120):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("name", EXAMPLES + ["verbs_demo"])
def test_every_example_has_help(name):
    out = run_example(name, "--help", timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and "python examples/" in out.stdout


@pytest.mark.parametrize("args, wrong", [
    (("--block-kib", "0"), "'0' is not a positive integer"),
    (("--batch", "-3"), "'-3' is not a positive integer"),
    (("--transport", "udp"), "invalid choice: 'udp'"),
])
def test_bad_example_arguments_are_one_line_usage_errors(args, wrong):
    out = run_example("pull_blocks", *args, timeout=60)
    assert out.returncode == 2 and wrong in out.stderr and "Traceback" not in out.stderr


def test_a_prefill_child_failing_at_start_fails_the_parent_at_once_with_its_error():
    # 200000 blocks of 16 KiB in 16 tensors: far more than the prefill's 2 GiB pool.
    started = time.monotonic()
    out = run_example("pull_blocks", "--batch", "200000", timeout=120)
    took = time.monotonic() - started
    assert out.returncode == 1, out.stdout + out.stderr
    assert "prefill process failed: LLMException: LLM_OUT_OF_MEMORY" in out.stderr
    assert "mem_pool_cfg" in out.stderr and "memory_size" in out.stderr   # what to raise
    assert "Traceback" not in out.stderr and "Empty" not in out.stderr
    assert took < 45, f"took {took:.0f} s: the parent waited out its 60 s deadline"


def test_example_children_die_with_their_parent():
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "examples", "pull_blocks.py")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        def prefill():
            return [p for p in _descendants(proc.pid) if _alive(p)
                    and "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        wait_until(lambda: prefill() or proc.poll() is not None, 60, "the prefill process")
        children = _descendants(proc.pid)
        assert proc.poll() is None and children
        proc.kill()                      # no chance to end them itself
        proc.wait(30)
        wait_until(lambda: not any(_alive(p) for p in children), 30,
                   f"children {children} gone with their parent")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
