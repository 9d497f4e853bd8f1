"""The demo's server processes as children of one parent: started as
``python -m kvcache.demo.<server>``, they announce on stdout the one line
``READY {json}`` once they listen, and die with their parent.

A child that fails before it is ready is reported at once with the end of
its log (its stderr), not after a timeout: the parent waits for the READY
line and the child's exit together."""
import json
import os
import select
import signal
import subprocess
import sys
import time

from kvcache.status import LLMException, LLMStatusCode

READY_PREFIX = "READY "
LOG_TAIL_BYTES = 4000
EXIT_GRACE_S = 2.0                   # for a child whose stdout ended to exit


def announce_ready(info):
    """In a child: print the READY line (``info``: a JSON-able dict) and
    close stdout, so the parent never has to drain the pipe afterwards."""
    sys.stdout.write(READY_PREFIX + json.dumps(info) + "\n")
    sys.stdout.flush()
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


class ChildFailed(LLMException):
    """A child exited or stayed silent before it was ready (LLM_FAILED /
    LLM_TIMEOUT); the message ends with its log's last lines."""


class Child:
    """One server process. ``argv``: the module and its options (the
    parent's pid is added as ``--parent-pid``); stderr goes to
    ``log_path``. Start it in the thread that will outlive it (the death
    signal follows the thread that forked)."""

    def __init__(self, name, argv, log_path):
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        self.info = None
        self.process = None

    def start(self):
        self.info = None
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", *self.argv, "--parent-pid", str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log)
        return self

    def log_tail(self):
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, os.path.getsize(self.log_path) - LOG_TAIL_BYTES))
                return log.read().decode("utf-8", "replace").strip()
        except OSError as exc:
            return f"(no log: {exc})"

    def wait_ready(self, timeout_s):
        """The child's READY info (a dict); ChildFailed as soon as it exits
        first, or at ``timeout_s`` seconds (then it is killed)."""
        deadline = time.monotonic() + timeout_s
        out = self.process.stdout
        buffer = b""
        try:
            while b"\n" not in buffer:
                left = deadline - time.monotonic()
                if left <= 0:
                    self.kill()
                    raise ChildFailed(LLMStatusCode.LLM_TIMEOUT,
                                      f"{self.name} not ready within {timeout_s} s; its log:\n"
                                      f"{self.log_tail()}")
                readable, _, _ = select.select([out], [], [], min(left, 0.5))
                chunk = os.read(out.fileno(), 65536) if readable else None
                if chunk == b"":
                    raise self._ended_early(left)
                buffer += chunk or b""
        finally:
            out.close()
        line = buffer.split(b"\n", 1)[0].decode("utf-8", "replace")
        if not line.startswith(READY_PREFIX):
            self.kill()
            raise ChildFailed(LLMStatusCode.LLM_FAILED,
                              f"{self.name} printed {line[:200]!r} instead of its READY line")
        try:
            info = json.loads(line[len(READY_PREFIX):])
        except ValueError:
            info = None
        if not isinstance(info, dict):
            self.kill()
            raise ChildFailed(LLMStatusCode.LLM_FAILED,
                              f"{self.name} printed a READY line whose info is not a JSON "
                              f"object: {line[:200]!r}")
        self.info = info
        return self.info

    def _ended_early(self, left):
        """The ChildFailed for a child whose stdout ended before its READY
        line: it exited, or (still running after a grace of at most
        ``left`` s) it closed stdout and is killed."""
        try:
            code = self.process.wait(timeout=min(max(left, 0.1), EXIT_GRACE_S))
        except subprocess.TimeoutExpired:
            self.kill()
            return ChildFailed(LLMStatusCode.LLM_FAILED,
                               f"{self.name} closed its stdout without a READY line and kept "
                               f"running (killed); its log:\n{self.log_tail()}")
        return ChildFailed(LLMStatusCode.LLM_FAILED,
                           f"{self.name} exited with {code} before it was ready; "
                           f"its log:\n{self.log_tail()}")

    def kill(self, sig=signal.SIGKILL):
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)

    def stop(self, timeout_s=10.0):
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit code."""
        if self.process is None:
            return None
        self.kill(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.wait(timeout=timeout_s)
