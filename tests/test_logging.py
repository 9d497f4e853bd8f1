"""Logging as KVCACHE_DEBUG, KVCACHE_DEBUG_FILE and KVCACHE_ERROR_FILE set it
up (kvcache.log), in a fresh process each: two engines link over tcp, one
writes 8 pieces into the other, unlinks, and is refused by a third that
wants a shared secret; a third-party logger logs beside them."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD = '''
import logging
import sys

import numpy as np

from kvcache.engine import TransferEngine
from kvcache.status import LLMException

a = TransferEngine("a", listen="127.0.0.1:0", transport="tcp")
b = TransferEngine("b", transport="tcp")
dst = np.zeros(1 << 16, dtype=np.uint8)
src = np.arange(1 << 16, dtype=np.uint32).astype(np.uint8)
a.register_memory(dst.ctypes.data, dst.nbytes)
b.register_memory(src.ctypes.data, src.nbytes)
peer = b.connect(a.address, timeout_ms=5000)
starts = np.arange(0, 1 << 16, 8192, dtype=np.uint64)
b.transfer_sync(peer, "write", src.ctypes.data + starts, dst.ctypes.data + starts,
                np.full(starts.size, 4096, dtype=np.uint64))
assert (dst[:4096] == src[:4096]).all()
b.disconnect(peer)
locked = TransferEngine("locked", listen="127.0.0.1:0", transport="tcp",
                        auth_key=b"0123456789abcdef0123")
try:
    b.connect(locked.address, timeout_ms=5000)
except LLMException as exc:
    print("refused:", exc)
logging.getLogger("thirdparty").debug("THIRD-PARTY DEBUG")
logging.getLogger("thirdparty").info("THIRD-PARTY INFO")
logging.getLogger("kvcache.test").error("AN ERROR LINE")
print("root level", logging.getLogger().level, "root handlers", logging.getLogger().handlers)
for e in (a, b, locked):
    e.close()
'''


def run(tmp_path, **env):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ROOT, **env})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "root level 30 root handlers []" in out.stdout     # the root logger untouched
    return out.stderr


@pytest.mark.parametrize("value", ["0", "false", "No", ""])
def test_debug_off_words_leave_debug_and_info_off(tmp_path, value):
    err = run(tmp_path, KVCACHE_DEBUG=value)
    assert "DEBUG" not in err and "INFO" not in err and "write a:" not in err, err
    assert "AN ERROR LINE" in err                   # warnings and errors still show


def test_debug_logs_link_events_and_each_transfer_of_kvcache_only(tmp_path):
    err = run(tmp_path, KVCACHE_DEBUG="1")
    assert "INFO kvcache.engine.links: linked to a (outbound)" in err, err
    assert "DEBUG kvcache.engine.engine: write a: 32768 bytes, 8 pieces in 8 descriptors" in err
    assert "INFO kvcache.engine.links: link to a closed: unlinked" in err
    assert "did not prove the shared secret" in err           # a refused handshake
    assert "THIRD-PARTY" not in err                            # other loggers as they were


def test_log_files_receive_the_lines(tmp_path):
    debug_file, error_file = tmp_path / "debug.log", tmp_path / "error.log"
    run(tmp_path, KVCACHE_DEBUG="true", KVCACHE_DEBUG_FILE=str(debug_file),
        KVCACHE_ERROR_FILE=str(error_file))
    debug = debug_file.read_text()
    assert "linked to a (outbound)" in debug and "write a: 32768 bytes" in debug
    assert "ERROR kvcache.test: AN ERROR LINE" in debug and "THIRD-PARTY" not in debug
    errors = error_file.read_text().splitlines()
    assert len(errors) == 1 and errors[0].endswith("ERROR kvcache.test: AN ERROR LINE"), errors


def test_a_log_file_that_cannot_be_opened_is_a_clear_error(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True,
                         timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": ROOT,
                              "KVCACHE_ERROR_FILE": str(tmp_path / "no" / "such.log")})
    assert out.returncode == 1
    assert "LLM_PARAM_INVALID: KVCACHE_ERROR_FILE=" in out.stderr
    assert "cannot be opened" in out.stderr
