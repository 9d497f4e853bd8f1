"""The ``kvcache`` command as a user runs it (subprocesses): --help,
--version, info (text and JSON), bench's argument errors, and bench stopped
by SIGTERM or Ctrl-C ending its children without tracebacks."""
import fcntl
import importlib.metadata
import json
import logging
import os
import pty
import resource
import signal
import struct
import subprocess
import sys
import termios
import threading

import pytest

import kvcache
from kvcache.log import setup as setup_logging
from kvcache.status import LLMException, LLMStatusCode
from tests.helpers import wait_until

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def kvcache_cmd(*args, env=None, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvcache", *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT,
                          env=None if env is None else {**os.environ, **env})


def test_help_lists_every_subcommand_and_their_options():
    out = kvcache_cmd("--help")
    assert out.returncode == 0, out.stderr
    assert "info" in out.stdout and "bench" in out.stdout and "--version" in out.stdout
    bench = kvcache_cmd("bench", "--help")
    assert bench.returncode == 0
    for option in ("--sizes", "--batch", "--transports", "--threads", "--json", "--plot"):
        assert option in bench.stdout
    info = kvcache_cmd("info", "--help")
    assert info.returncode == 0 and "--json" in info.stdout


def test_version_comes_from_the_package_metadata():
    out = kvcache_cmd("--version")
    assert out.returncode == 0
    assert out.stdout.strip() == f"kvcache {importlib.metadata.version('pyverbs-kv')}"


def test_no_or_unknown_command_is_a_usage_error():
    for args in ((), ("frobnicate",)):
        out = kvcache_cmd(*args)
        assert out.returncode == 2
        assert out.stderr.startswith("usage: kvcache") and "Traceback" not in out.stderr


def test_info_text_and_json_describe_this_host():
    out = kvcache_cmd("info", "--json", env={"KVCACHE_AUTH_KEY": "hunter2",
                                              "KVCACHE_RDMA_QPS": "3"})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    status = kvcache.rdma_status()
    assert info["rdma"]["available"] == status.available
    assert [d["name"] for d in info["rdma"]["devices"]] == status.devices
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    assert info["memlock"]["soft_bytes"] == (None if soft == resource.RLIM_INFINITY else soft)
    transports = info["transports"]
    assert transports["tcp"]["usable"] is True
    assert transports["rdma"]["usable"] == status.available
    if not status.available:
        assert transports["rdma"]["why"] == status.reason
    assert transports["auto"]["picks"] == ("rdma" if status.available else "shm")
    assert {a["name"] for a in info["accelerators"]} == {"cuda", "acl"}
    assert info["environment"]["KVCACHE_RDMA_QPS"] == "3"
    assert "hunter2" not in out.stdout             # the secret is never printed

    text = kvcache_cmd("info")
    assert text.returncode == 0, text.stderr
    for heading in ("memlock limit", "transports:", "RDMA devices:", "accelerator runtimes:"):
        assert heading in text.stdout
    assert f"auto  picks {transports['auto']['picks']}" in text.stdout


def test_info_works_where_libibverbs_cannot_load(tmp_path):
    # A libibverbs.so.1 without any verbs symbol shadows the real one (as in
    # test_rdma_support.py): info still answers, saying why RDMA is off.
    stub = tmp_path / "stub.c"
    stub.write_text("int pyverbs_kv_test_stub;\n")
    for soname in ("libibverbs.so.1", "librdmacm.so.1"):
        subprocess.run(["cc", "-shared", "-fPIC", "-o", str(tmp_path / soname), str(stub),
                        f"-Wl,-soname,{soname}"], check=True)
    out = kvcache_cmd("info", "--json", env={"LD_LIBRARY_PATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["rdma"]["devices"] == [] and not info["transports"]["rdma"]["usable"]
    assert "pyverbs_kv cannot be loaded" in info["transports"]["rdma"]["why"]
    assert info["transports"]["auto"]["picks"] == "shm"


@pytest.mark.rdma
def test_info_lists_the_soft_roce_device_with_its_gids():
    info = json.loads(kvcache_cmd("info", "--json").stdout)
    assert info["rdma"]["available"] and info["transports"]["auto"]["picks"] == "rdma", info
    device = info["rdma"]["devices"][0]
    port = device["ports"][0]
    # ibv_port_state_str's words: "active", "down", ...
    assert port["link_layer"] == "Ethernet" and port["state"] == "active", device
    chosen = [g for g in port["gids"] if g["index"] == port["default_gid_index"]]
    assert chosen and chosen[0]["type"] == "RoCE v2" and chosen[0]["ipv4_mapped"], device
    assert chosen[0]["netdev"] and chosen[0]["gid"] == f"::ffff:{chosen[0]['ipv4']}", device
    text = kvcache_cmd("info").stdout
    assert device["name"] in text and "IPv4-mapped" in text


@pytest.mark.parametrize("args, wrong", [
    (("--sizes", "16KX"), "'16KX' is not a block size"),
    (("--sizes", "4K,,8K"), "'' is not a block size"),
    (("--threads", "0"), "'0' is not a positive int"),
    (("--transports", "tcp,udp"), "'udp': choose from"),
    (("--seconds", "soon"), "'soon' is not a positive float"),
])
def test_bench_bad_arguments_are_one_line_errors(args, wrong):
    out = kvcache_cmd("bench", *args)
    assert out.returncode == 2
    assert wrong in out.stderr and "Traceback" not in out.stderr
    assert out.stdout == ""


def test_bench_refuses_a_run_that_cannot_fit_in_memory():
    out = kvcache_cmd("bench", "--sizes", "1024M", "--batch", "100000")
    assert out.returncode == 1
    assert "GiB available" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("spelling", ["16K", "16KB", "16KiB", "16kib", "16384"])
def test_bench_sizes_take_k_kb_and_kib(spelling):
    # A batch that cannot fit: refused before any child starts, naming the size it parsed.
    out = kvcache_cmd("bench", "--sizes", f"4K,{spelling}", "--batch", "10000000000")
    assert out.returncode == 1, out.stderr
    assert "blocks of 16384 bytes" in out.stderr and "Traceback" not in out.stderr


def test_kvcache_debug_is_a_boolean_for_the_kvcache_loggers_only(monkeypatch):
    package, root = logging.getLogger("kvcache"), logging.getLogger()
    before = package.level, root.level
    try:
        for value, debug in (("0", False), ("false", False), ("No", False), ("", False),
                             ("1", True), ("true", True), ("ON", True)):
            package.setLevel(logging.NOTSET)
            monkeypatch.setenv("KVCACHE_DEBUG", value)
            setup_logging()
            assert (package.level == logging.DEBUG) is debug, value
            assert root.level == before[1]
        monkeypatch.setenv("KVCACHE_DEBUG", "maybe")
        with pytest.raises(LLMException) as err:
            setup_logging()
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "KVCACHE_DEBUG" in str(err.value)
    finally:
        package.setLevel(before[0])
    out = kvcache_cmd("info", env={"KVCACHE_DEBUG": "maybe"})
    assert out.returncode == 1 and "KVCACHE_DEBUG='maybe' is not a boolean" in out.stderr


def _descendants(pid):
    """Live (not zombie) descendants of ``pid``, from /proc."""
    parents = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("how", ["SIGTERM", "ctrl-c"])
def test_bench_stopped_ends_its_children_without_tracebacks(how):
    # stderr on a terminal (a pty), as a user sees it: the progress bar shows which cell runs.
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, "-m", "kvcache", "bench", "--sizes", "4K",
                             "--batch", "64", "--seconds", "5", "--transports", "tcp"],
                            stdout=subprocess.PIPE, stderr=slave, cwd=ROOT,
                            start_new_session=True)
    os.close(slave)
    err = []

    def read_stderr():
        try:
            while chunk := os.read(master, 4096):
                err.append(chunk.decode(errors="replace"))
        except OSError:                  # EIO: every writer of the pty is gone
            pass
    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()

    def prompt_process():
        """The bench's prompt-side process, once the engine cells run."""
        if "memcpy 4K" not in "".join(err):
            return None
        spawned = [p for p in _descendants(proc.pid) if _alive(p)
                   and "spawn_main" in open(f"/proc/{p}/cmdline").read()]
        return spawned[0] if spawned else None
    try:
        wait_until(lambda: prompt_process() or proc.poll() is not None, 120,
                   "the bench's prompt process")
        children = _descendants(proc.pid)
        assert proc.poll() is None and prompt_process() in children
        if how == "SIGTERM":
            proc.send_signal(signal.SIGTERM)
        else:
            os.killpg(proc.pid, signal.SIGINT)       # what the terminal sends on Ctrl-C
        rc = proc.wait(60)
        reader.join(30)
        text = "".join(err)
        assert rc == 128 + (signal.SIGTERM if how == "SIGTERM" else signal.SIGINT), text
        assert "Traceback" not in text, text
        assert f"stopped by {'SIGTERM' if how == 'SIGTERM' else 'SIGINT'}" in text
        assert "cell/s" in text or "s/cell" in text, text     # the progress bar ran
        wait_until(lambda: not any(_alive(p) for p in children), 30, "children gone")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        os.close(master)


def test_bench_progress_is_off_without_a_terminal_and_gbps_is_labelled_warm(tmp_path):
    out = kvcache_cmd("bench", "--sizes", "4K", "--batch", "32", "--seconds", "0.05",
                      "--transports", "shm", "--ops", "read", "--json", str(tmp_path / "r.json"),
                      timeout=300)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stderr and "cell/s" not in out.stderr      # not a terminal
    assert "| GB/s warm |" in out.stdout and "after 2 untimed warm-up batches" in out.stdout
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["warmup"] == 2 and all(r["warmup"] == 2 for r in result["rows"])
