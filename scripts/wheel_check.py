"""Build the wheel as a user's `pip install .` does, install it into a fresh venv and use it
from outside the source tree (`make wheel-check`).

    python scripts/wheel_check.py [--python python3] [--keep]

1. Copies what a clean clone of this working tree holds (tracked files and untracked files
   git does not ignore) to a temporary directory, so nothing built in place (.so, .c,
   build/, *.egg-info, __pycache__) reaches the build.
2. `pip wheel --no-deps` there, with build isolation: setuptools, Cython and numpy come from
   the index (and the pip cache), as for any user.
3. Checks the wheel: every .py module under kvcache/ and pyverbs_kv/ (subpackages found
   by walking the source, so a new one is checked without an edit here), one extension per
   .pyx, the .pxd/.pyx package data, and nothing but those two packages at top level.
4. Installs the wheel into a fresh venv (not .venv) and, from a directory where the source
   tree is not importable: imports every module (from the venv, not the source), runs the
   `kvcache` command and examples/pull_blocks.py with small arguments over shm and tcp.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("kvcache", "pyverbs_kv")
# When git cannot list the files: what .gitignore ignores, minus what the wheel needs.
FALLBACK_IGNORED = {".git", ".venv", "build", "__pycache__", ".pytest_cache", ".hypothesis",
                    ".ci-out", "results"}
EXAMPLE_ARGS = ["--batch", "64", "--block-kib", "4"]
EXAMPLE_TIMEOUT_S = 180

# Runs inside the fresh venv: import every module, and say where each came from.
IMPORT_ALL = r"""
import importlib, json, os, sys
modules, optional, site = json.loads(sys.argv[1])
failed, skipped = [], []
for name in modules:
    try:
        module = importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] in optional:
            skipped.append(f"{name} (needs the optional {exc.name})")
            continue
        failed.append(f"{name}: {exc!r}")
        continue
    except Exception as exc:
        failed.append(f"{name}: {exc!r}")
        continue
    where = getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), "?")
    if not os.path.realpath(where).startswith(os.path.realpath(site) + os.sep):
        failed.append(f"{name}: imported from {where}, not from the venv ({site})")
print(f"imported {len(modules) - len(failed) - len(skipped)} of {len(modules)} modules "
      f"from {site}")
for line in skipped:
    print(f"  skipped {line}")
for line in failed:
    print(f"  FAILED {line}")
sys.exit(1 if failed else 0)
"""


def step(message):
    print(f"wheel-check: {message}", flush=True)


def fail(message):
    raise SystemExit(f"wheel-check: FAILED: {message}")


def run(cmd, **kwargs):
    """Run a command, echoing it; fail with its output when it fails."""
    shown = ["<script>" if "\n" in str(c) else str(c)[:120] for c in cmd]
    print("  $ " + " ".join(shown), flush=True)
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, **kwargs)
    if out.returncode != 0:
        sys.stdout.write(out.stdout + out.stderr)
        fail(f"{Path(str(cmd[0])).name} exited with {out.returncode}")
    return out


def source_files():
    """Paths (relative to ROOT) of what a clean clone of the working tree holds."""
    try:
        listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached",
                                 "--others", "--exclude-standard"],
                                capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        files = []
        for dirpath, dirnames, filenames in os.walk(ROOT):
            dirnames[:] = [d for d in dirnames
                           if d not in FALLBACK_IGNORED and not d.endswith(".egg-info")]
            here = Path(dirpath).relative_to(ROOT)
            for name in filenames:
                built = name.endswith(".so") or (here == Path("pyverbs_kv")
                                                 and name.endswith(".c"))
                if not built:
                    files.append(here / name)
        return files
    names = {n for n in listed.decode().split("\0") if n}
    return sorted(Path(n) for n in names if (ROOT / n).is_file())   # skip deleted ones


def copy_tree(dest):
    files = source_files()
    for rel in files:
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, dest / rel)
    return files


def expected_contents(src):
    """(modules to import, files the wheel must hold, extension stems) from the source."""
    modules, files, extensions = [], set(), set()
    for package in PACKAGES:
        for path in sorted((src / package).rglob("*")):
            rel = path.relative_to(src)
            if "__pycache__" in rel.parts or not path.is_file():
                continue
            dotted = ".".join(rel.with_suffix("").parts)
            if path.suffix == ".py":
                files.add(rel.as_posix())
                modules.append(dotted[:-len(".__init__")] if rel.name == "__init__.py"
                               else dotted)
            elif path.suffix == ".pyx":
                files.add(rel.as_posix())
                extensions.add(rel.with_suffix("").as_posix())
                modules.append(dotted)
            elif path.suffix == ".pxd" and package == "pyverbs_kv":
                files.add(rel.as_posix())
    return modules, files, extensions


def check_wheel(wheel, files, extensions):
    names = set(zipfile.ZipFile(wheel).namelist())
    problems = [f"missing {f}" for f in sorted(files - names)]
    for stem in sorted(extensions):
        if not any(n.startswith(stem + ".") and n.endswith(".so") for n in names):
            problems.append(f"missing the extension {stem}.*.so")
    for name in sorted(names):
        top = name.split("/")[0]
        if top not in PACKAGES and not top.endswith(".dist-info"):
            problems.append(f"unexpected top-level entry {name}")
        elif "__pycache__" in name.split("/") or (top == "pyverbs_kv" and name.endswith(".c")):
            problems.append(f"build leftover {name}")
    if problems:
        fail(f"{wheel.name}:\n  " + "\n  ".join(problems))
    step(f"{wheel.name}: {len(names)} entries, all {len(files)} sources and "
         f"{len(extensions)} extensions present")


def optional_imports():
    """Top-level names of the optional extras (torch, matplotlib, ...), which the fresh venv
    lacks: a module that needs one is reported, not failed."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = set()
    for requirements in project.get("optional-dependencies", {}).values():
        for requirement in requirements:
            name = requirement
            for stop in "<>=!~;[ ":
                name = name.split(stop)[0]
            names.add(name.strip().replace("-", "_").lower())
    return sorted(names)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default=getattr(sys, "_base_executable", sys.executable),
                        help="interpreter for the fresh venv (default: the base of this one)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()
    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="wheel-check-"))
    try:
        src, wheels, venv, run_dir = tmp / "src", tmp / "wheels", tmp / "venv", tmp / "run"
        run_dir.mkdir()
        step(f"copying the working tree to {src} ({len(copy_tree(src))} files)")

        step("building the wheel with build isolation")
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", wheels, src],
            cwd=tmp)
        built = sorted(wheels.glob("*.whl"))
        if len(built) != 1:
            fail(f"expected one wheel in {wheels}, found {[w.name for w in built]}")
        modules, files, extensions = expected_contents(src)
        check_wheel(built[0], files, extensions)

        step(f"installing it into a fresh venv {venv}")
        run([args.python, "-m", "venv", venv])
        python = venv / "bin" / "python"
        run([python, "-m", "pip", "install", "-q", built[0]], cwd=run_dir)

        # Nothing of the source tree on the path: not the cwd, not PYTHONPATH.
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env["PYTHONNOUSERSITE"] = "1"
        site = run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                   cwd=run_dir, env=env).stdout.strip()
        step("importing every module from the installed wheel")
        out = run([python, "-c", IMPORT_ALL, json.dumps([modules, optional_imports(), site])],
                  cwd=run_dir, env=env)
        sys.stdout.write(out.stdout)
        out = run([venv / "bin" / "kvcache", "bench", "--help"], cwd=run_dir, env=env)
        if "usage:" not in out.stdout:
            fail("`kvcache bench --help` printed no usage")

        # The examples, alone in a directory of their own, as a user would run them.
        examples = tmp / "examples"
        shutil.copytree(src / "examples", examples)
        for transport in ("auto", "tcp"):
            step(f"examples/pull_blocks.py --transport {transport} {' '.join(EXAMPLE_ARGS)}")
            out = run([python, examples / "pull_blocks.py", "--transport", transport,
                       *EXAMPLE_ARGS], cwd=run_dir, env=env, timeout=EXAMPLE_TIMEOUT_S)
            sys.stdout.write("".join("  " + line for line in out.stdout.splitlines(True)))
            if "OK:" not in out.stdout:
                fail("pull_blocks.py did not say OK")
        step(f"OK ({time.monotonic() - started:.0f} s)")
    finally:
        if args.keep:
            step(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
