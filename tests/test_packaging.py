"""The wheel holds every package: setuptools finds the subpackages of kvcache and pyverbs_kv
itself (pyproject's packages.find), so a new one needs no edit. This is the fast check of the
host suite; `make wheel-check` builds the real wheel, installs it and imports every module."""
import os
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOP = ("kvcache", "pyverbs_kv")


def source_packages():
    """Every directory of kvcache/ and pyverbs_kv/ holding Python or Cython sources."""
    found = set()
    for top in TOP:
        for dirpath, dirnames, filenames in os.walk(ROOT / top):
            dirnames[:] = [d for d in dirnames if d != "__pycache__"]
            if any(f.endswith((".py", ".pyx")) for f in filenames):
                found.add(".".join(Path(dirpath).relative_to(ROOT).parts))
    return found


def test_setuptools_packages_every_source_package():
    pyprojecttoml = pytest.importorskip("setuptools.config.pyprojecttoml")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        config = pyprojecttoml.read_configuration(str(ROOT / "pyproject.toml"), expand=True)
    packaged = set(config["tool"]["setuptools"]["packages"])
    assert source_packages() <= packaged, f"not packaged: {sorted(source_packages() - packaged)}"
    assert {p.split(".")[0] for p in packaged} <= set(TOP)
    assert not [p for p in packaged if "__pycache__" in p]
