"""Builds the C test doubles of the accelerator runtimes (tests/doubles/:
fake_ascendcl.c for libascendcl.so, fake_cudart.c for libcudart) with the C
compiler, checks that a call leaves the GIL free, and runs a Python snippet in
a fresh process with a given runtime environment (the library is loaded once
per process, at first use)."""
import ctypes
import os
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

DOUBLES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "doubles")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# Device type -> (the double's source, its library name, the variable a
# process loads the runtime from).
RUNTIMES = {"npu": ("fake_ascendcl.c", "libascendcl.so", "KVCACHE_ACL_LIB"),
            "cuda": ("fake_cudart.c", "libcudart.so", "KVCACHE_CUDA_LIB")}


def build_runtimes(out_dir):
    """Every runtime double built into ``out_dir``: {device type: path}."""
    return {kind: build(src, out_dir, name) for kind, (src, name, _) in RUNTIMES.items()}


def build(source, out_dir, lib_name, omit=None):
    """Compile tests/doubles/``source`` into ``out_dir``/``lib_name``;
    ``omit`` names a symbol to leave out (the missing-symbol path). Returns
    the path. Needs ``cc`` (build-essential, which `make setup` installs)."""
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        raise RuntimeError("no C compiler (cc) to build the runtime test doubles; "
                           "install build-essential (make setup does)")
    out = os.path.join(str(out_dir), lib_name)
    cmd = [cc, "-shared", "-fPIC", "-O1", "-Wall", "-Werror", "-o", out,
           os.path.join(DOUBLES, source), "-lpthread"]
    if omit:
        cmd.insert(1, f"-DOMIT_{omit}")
    subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=120)
    return out


def load(path, prefix):
    """The double as a ctypes library, for its test-only ``prefix``_* symbols.
    dlopen of the same path yields the copy the binding loaded (same state)."""
    lib = ctypes.CDLL(path)
    getattr(lib, f"{prefix}_calls").argtypes = [ctypes.c_char_p]
    getattr(lib, f"{prefix}_calls").restype = ctypes.c_long
    return lib


def install(binding, source, lib_name, env_var, prefix, out_dir):
    """Build the double of a runtime and make ``binding`` (pyverbs_kv.acl or
    .cuda) load it through ``env_var`` in this process. Returns (the
    double as a ctypes library, the MonkeyPatch whose ``undo`` restores the
    environment): what each module-scoped ``fake`` fixture sets up."""
    path = build(source, out_dir, lib_name)
    env = pytest.MonkeyPatch()
    env.setenv(env_var, path)
    ok, reason = binding.available()
    assert ok, reason
    assert binding.library_path() == path, \
        f"another {lib_name} was loaded first in this process"
    return load(path, prefix), env


def calls(lib, prefix, name):
    """How often the double's function ``name`` was called since its reset."""
    return getattr(lib, f"{prefix}_calls")(name.encode())


def random_bytes(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8)


def run_python(code, env_updates, timeout=120):
    """Run ``code`` in a fresh interpreter with this worktree on PYTHONPATH and
    ``env_updates`` applied (a None value removes the variable). Returns the
    CompletedProcess (text)."""
    env = dict(os.environ, PYTHONPATH=ROOT)
    for key, value in env_updates.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def probe(code, env_updates):
    """Run ``code`` as run_python does (it must succeed) and return what it
    printed as {first word of a line: the rest}."""
    res = run_python(code, env_updates)
    assert res.returncode == 0, res.stderr
    return dict(line.split(" ", 1) for line in res.stdout.splitlines())


def gil_free_during(call, delay_setter):
    """Run ``call`` while the double makes each copy take 0.4 s, and say whether
    another Python thread ran in the middle of it (it cannot while the GIL is
    held). The margins keep the thread's own start and stop out of the window."""
    seen, stop = [], threading.Event()

    def ticker():
        while not stop.is_set():
            seen.append(time.monotonic())
            time.sleep(0.002)

    delay_setter(400_000)
    thread = threading.Thread(target=ticker)
    thread.start()
    try:
        time.sleep(0.05)
        start = time.monotonic()
        call()
        end = time.monotonic()
    finally:
        stop.set()
        thread.join(10)
        delay_setter(0)
    assert end - start >= 0.4
    return any(start + 0.1 < t < end - 0.1 for t in seen)
