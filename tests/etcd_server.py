"""A real etcd server for a test session (Debian's etcd-server package): on
free loopback ports, with a temporary data dir, stopped and removed at the
end. Without the binary the tests that need it skip, except where
KVCACHE_REQUIRE_ETCD=1 (CI), where they fail."""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

START_TIMEOUT_S = 30


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _binary():
    for path in (shutil.which("etcd"), "/usr/bin/etcd"):
        if path and os.access(path, os.X_OK):
            return path
    return None


class EtcdServer:
    """``endpoint``: "127.0.0.1:port" of its client (gateway) listener;
    ``url``: the same as "etcd://..."."""

    def __init__(self, binary):
        self.data_dir = tempfile.mkdtemp(prefix="kvcache-etcd-")
        client, peer = _free_port(), _free_port()
        self.endpoint = f"127.0.0.1:{client}"
        self.url = f"etcd://{self.endpoint}"
        self.log_path = os.path.join(self.data_dir, "etcd.log")
        self._log = open(self.log_path, "wb")
        self.process = subprocess.Popen(
            [binary, "--name", "kvcache-test", "--data-dir", os.path.join(self.data_dir, "d"),
             "--listen-client-urls", f"http://{self.endpoint}",
             "--advertise-client-urls", f"http://{self.endpoint}",
             "--listen-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
             "--initial-cluster", f"kvcache-test=http://127.0.0.1:{peer}"],
            stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self):
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.process.returncode}: "
                                   f"{self.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://{self.endpoint}/health", timeout=2) as r:
                    if b"true" in r.read():
                        return
            except OSError:
                pass
            if time.monotonic() >= deadline:
                raise RuntimeError(f"etcd not healthy within {START_TIMEOUT_S} s: "
                                   f"{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, nbytes=2000):
        with open(self.log_path, "rb") as file:
            return file.read()[-nbytes:].decode(errors="replace")

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()
        shutil.rmtree(self.data_dir, ignore_errors=True)


def start_or_skip(pytest):
    """An EtcdServer; pytest.skip without the binary or client, unless
    KVCACHE_REQUIRE_ETCD=1 (then pytest.fail)."""
    binary = _binary()
    reason = None
    if binary is None:
        reason = "no etcd binary (apt-get install etcd-server, or `make setup`)"
    else:
        try:
            import etcd3gw  # noqa: F401
        except ImportError:
            reason = "the etcd3gw package is not installed (pip install 'pyverbs-kv[etcd]')"
    if reason is not None:
        if os.environ.get("KVCACHE_REQUIRE_ETCD") == "1":
            pytest.fail(f"etcd required here (KVCACHE_REQUIRE_ETCD=1) but unavailable: {reason}")
        pytest.skip(reason)
    return EtcdServer(binary)
