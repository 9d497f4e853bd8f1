"""Every ```python block of README.md runs as written, as README's Quick
start says: alone in a fresh process by default; a block marked
``<!-- snippet: prefill -->`` in the background while the next block, marked
``<!-- snippet: decode -->``, runs once the prefill printed its first line
(port 26000 moved to a free one), and the prefill then ends on Ctrl-C;
``<!-- snippet: reference -->`` blocks (API outlines) are not run."""
import os
import re
import signal
import socket
import subprocess
import sys
import threading

import pytest


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = re.compile(r"<!-- snippet: (\w+) -->")
KINDS = ("run", "prefill", "decode", "reference")
README_PORT = "26000"
DEADLINE_S = 120


def snippets():
    """(kind, first line number, code) of every ```python block, in order."""
    with open(os.path.join(ROOT, "README.md")) as f:
        lines = f.read().split("\n")
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            marker = MARKER.fullmatch(lines[i - 1].strip()) if i else None
            end = lines.index("```", i + 1)
            found.append((marker.group(1) if marker else "run", i + 1,
                          "\n".join(lines[i + 1:end]) + "\n"))
            i = end
        i += 1
    return found


def cases():
    """One case per process group: ("run", [block]) or ("pair", [prefill, decode])."""
    found, made = snippets(), []
    for n, (kind, line, code) in enumerate(found):
        if kind == "run":
            made.append(pytest.param("run", [code], id=f"line{line}"))
        elif kind == "prefill":
            following = found[n + 1] if n + 1 < len(found) else None
            made.append(pytest.param("pair", [code, following and following[2]],
                                     id=f"line{line}-pair"))
    return made


def test_every_block_has_a_known_marker_and_pairs_are_complete():
    found = snippets()
    assert found, "README.md has no python block"
    for n, (kind, line, _) in enumerate(found):
        assert kind in KINDS, f"README.md line {line}: unknown snippet kind {kind!r}"
        if kind == "prefill":
            assert n + 1 < len(found) and found[n + 1][0] == "decode", \
                f"README.md line {line}: a prefill block must be followed by a decode block"
        if kind == "decode":
            assert n and found[n - 1][0] == "prefill", \
                f"README.md line {line}: a decode block must follow a prefill block"


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def listening(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def python(code, tmp_path, name, **kwargs):
    path = tmp_path / f"{name}.py"
    path.write_text(code)
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.Popen([sys.executable, str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


def finished(proc, what):
    try:
        out, _ = proc.communicate(timeout=DEADLINE_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate()
        pytest.fail(f"{what} did not finish within {DEADLINE_S} s:\n{out}")
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{out}"
    return out


@pytest.mark.parametrize("kind, blocks", cases())
def test_readme_snippet_runs(kind, blocks, tmp_path):
    if kind == "run":
        finished(python(blocks[0], tmp_path, "snippet"), "the block")
        return
    prefill_code, decode_code = blocks
    assert README_PORT in prefill_code and README_PORT in decode_code
    port = str(free_port())
    prefill = python(prefill_code.replace(README_PORT, port), tmp_path, "prefill")
    try:
        # Its first line says it serves (what a user waits for before starting the decoder).
        first = []
        reader = threading.Thread(target=lambda: first.append(prefill.stdout.readline()),
                                  daemon=True)
        reader.start()
        reader.join(60)
        assert first and first[0], "the prefill block printed nothing within 60 s"
        assert prefill.poll() is None, f"the prefill block exited at once:\n{first[0]}"
        assert listening(int(port)), first[0]
        finished(python(decode_code.replace(README_PORT, port), tmp_path, "decode"),
                 "the decode block")
        assert prefill.poll() is None, "the prefill block ended before Ctrl-C"
        prefill.send_signal(signal.SIGINT)             # Ctrl-C
        finished(prefill, "the prefill block (after Ctrl-C)")
    finally:
        if prefill.poll() is None:
            prefill.kill()
            prefill.communicate()


def test_a_decoder_that_cannot_link_says_why(tmp_path):
    """The Quick start's decode block with nothing listening: the error names
    the refused connection, not only "not linked"."""
    decode_code = next(code for kind, _, code in snippets() if kind == "decode")
    proc = python(decode_code.replace(README_PORT, str(free_port())), tmp_path, "decode")
    out, _ = proc.communicate(timeout=DEADLINE_S)
    assert proc.returncode == 1, out
    last = out.strip().splitlines()[-1]
    assert "LLM_NOT_YET_LINK" in last and "Connection refused" in last, out

