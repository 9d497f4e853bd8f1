"""Every example runs as real processes and checks its own results."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = ["pull_blocks", "pull_cache", "pull_blocks_from_cache", "push_cache",
            "push_blocks", "switch_role", "xpyd"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_example_runs_and_verifies_its_transfer(name):
    args = [sys.executable, os.path.join(ROOT, "examples", f"{name}.py")]
    if name == "pull_blocks":
        args += ["--batch", "256", "--block-kib", "4"]
    out = subprocess.run(args, capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "OK:" in out.stdout
