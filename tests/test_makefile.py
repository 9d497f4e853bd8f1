"""What the Makefile's entry points would run on a fresh machine (``make -n``
with a venv path that does not exist yet): `make demo` installs only what
running needs, `make test` what the tests need, and `make bench` leaves the
tracked README and plot alone; and the editable install they make raises no
setuptools warning."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_make = pytest.mark.skipif(shutil.which("make") is None, reason="needs make")


def dry_run(target, tmp_path):
    # A venv that does not exist: every set-up step shows; its path named neutrally.
    venv = tmp_path / "fresh"
    # Run under `make test` too: a parent make's flags would make this one
    # print "Entering/Leaving directory" lines around the commands.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKEFLAGS", "MFLAGS", "MAKELEVEL")}
    out = subprocess.run(["make", "--no-print-directory", "-n", target, f"VENV={venv}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.replace(str(venv), "VENV")


@needs_make
def test_demo_installs_no_test_dependency(tmp_path):
    commands = dry_run("demo", tmp_path)
    assert "pip install -q --no-build-isolation -e ." in commands
    assert "tqdm==" in commands
    for test_only in ("pytest", "hypothesis", "virtme-ng", "transformers", "etcd-server"):
        assert test_only not in commands, test_only


@needs_make
def test_test_installs_the_test_dependencies(tmp_path):
    commands = dry_run("test", tmp_path)
    for needed in ("pytest", "hypothesis", "etcd-server", "tqdm==", "-e ."):
        assert needed in commands, needed


@needs_make
def test_bench_rewrites_no_tracked_file_and_readme_bench_does(tmp_path):
    bench = dry_run("bench", tmp_path).splitlines()[-1]
    assert "kvcache bench" in bench and "--readme" not in bench and "--plot" not in bench
    regenerate = dry_run("readme-bench", tmp_path)
    assert "--readme" in regenerate and "--plot docs/transfer_bench.png" in regenerate


EDITABLE_STRATEGY = """
import warnings
from setuptools.command.editable_wheel import editable_wheel
from setuptools.dist import Distribution

dist = Distribution()
dist.parse_config_files()
cmd = editable_wheel(dist)
cmd.ensure_finalized()
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with cmd._select_strategy(dist.get_name(), "py3-none-any", "build/lib"):
        pass
print([str(w.message).splitlines()[0] for w in caught])
"""


def test_the_editable_install_raises_no_setuptools_warning():
    # setuptools picks how `pip install -e .` maps the packages from pyproject.toml (its
    # editable_wheel strategy); for an undeclared flat layout it warns on every install.
    out = subprocess.run([sys.executable, "-c", EDITABLE_STRATEGY], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]", out.stdout
