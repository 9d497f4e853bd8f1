"""The disaggregated demo end to end, with real processes and sockets: the
`kvcache demo` command (shm 1P1D, tcp 2P2D) checking every token against a
single-process run; the proxy driven by an HTTP client (aiohttp), streamed
and not; a decode instance SIGKILLed mid-request and restarted; start-up
errors of a server coming back at once; every entry point's --help."""
import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

aiohttp = pytest.importorskip("aiohttp")

from kvcache.demo.children import Child, ChildFailed  # noqa: E402
from kvcache.demo.run import Cluster, complete, reference  # noqa: E402
from kvcache.status import LLMStatusCode  # noqa: E402
from tests.helpers import wait_until, watchdog  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = "{}"                          # ModelConfig(): 4 layers, hidden 128
PROMPTS = ["The capital of France is", "Disaggregated serving moves the KV cache"]
MAX_TOKENS = 8


def demo(*args, timeout=240):
    return subprocess.run([sys.executable, "-m", "kvcache", "demo", "--model-config", SMALL,
                           "--max-tokens", str(MAX_TOKENS), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


@pytest.mark.parametrize("transport,prefills,decodes", [("shm", 1, 1), ("tcp", 2, 2)])
def test_demo_tokens_equal_a_single_process_run(transport, prefills, decodes):
    out = demo("--transport", transport, "--prefill", str(prefills), "--decode", str(decodes),
               *[a for p in PROMPTS * 2 for a in ("--prompt", p)])
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"OK: {2 * len(PROMPTS)} requests served disaggregated" in out.stdout
    routes = re.findall(r"-> (prefill-\d) -> (decode-\d)", out.stdout)
    # Round-robin over each pool, request by request.
    assert routes == [(f"prefill-{i % prefills}", f"decode-{i % decodes}") for i in range(4)]
    assert out.stdout.count("identical to the single-process run") == 2 * len(PROMPTS) + 1
    assert f"over {transport} (new link)" in out.stdout


@pytest.fixture(scope="module")
def cluster():
    with Cluster(transport="shm", model_config_json=SMALL, timeout_s=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected():
    return reference(SMALL, 0, PROMPTS, MAX_TOKENS)


def ask(url, prompt, max_tokens=MAX_TOKENS, stream=False):
    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            return await complete(session, url, prompt, max_tokens, stream)
    return asyncio.run(go())


def post_raw(url, body, stream=False):
    """(status, content type, body text) of one POST."""
    async def go():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            async with session.post(url + "/v1/completions", data=body,
                                    headers={"Content-Type": "application/json"}) as resp:
                return resp.status, resp.headers.get("Content-Type", ""), await resp.text()
    return asyncio.run(go())


def test_proxy_answers_an_openai_completion(cluster, expected):
    status, ctype, text = post_raw(cluster.proxy_url, json.dumps(
        {"prompt": PROMPTS[0], "max_tokens": MAX_TOKENS}))
    assert status == 200 and ctype.startswith("application/json"), text
    body = json.loads(text)
    assert body["object"] == "text_completion" and body["model"] == "tinyllama-demo"
    choice = body["choices"][0]
    assert choice["token_ids"] == expected[0]
    assert choice["finish_reason"] == "length" and choice["index"] == 0
    assert body["usage"] == {"prompt_tokens": len(PROMPTS[0]) + 1,
                             "completion_tokens": MAX_TOKENS,
                             "total_tokens": len(PROMPTS[0]) + 1 + MAX_TOKENS}
    kv = body["kv_transfer"]
    p, d = kv["prefill"], kv["decode"]
    assert (kv["prefill_instance"], kv["decode_instance"]) == ("prefill-0", "decode-0")
    layers, blocks = p["layers"], p["blocks"]
    assert layers == 4 and blocks == 2                     # 25 tokens in 16-token blocks
    assert p["transport"] == "shm"
    assert p["bytes"] == 2 * layers * blocks * 16 * 2 * 16 * 4
    assert p["descriptors"] == 2 * layers * blocks
    assert p["descriptors_merged"] == 2 * layers               # consecutive on both sides
    assert p["src_block_ids"] == [0, 1]
    assert p["dst_block_ids"] == d["block_ids"][:blocks]       # the decode's own slots
    assert set(p["dst_block_ids"]).isdisjoint(p["src_block_ids"])
    assert d["layers_arrived"] == layers and d["wait_ms"] >= 0
    # Every layer was ready before it was sent, sent in order, and the
    # figures add up.
    for ready, start, end in p["layers_ms"]:
        assert ready <= start <= end
    starts = [s for _, s, _ in p["layers_ms"]]
    assert starts == sorted(starts)
    assert 0 <= p["hidden_ms"] <= p["send_ms"] and p["gbps"] > 0
    assert kv["ttft_ms"] > 0


def test_proxy_streams_server_sent_events(cluster, expected):
    status, ctype, text = post_raw(cluster.proxy_url, json.dumps(
        {"prompt": PROMPTS[1], "max_tokens": MAX_TOKENS, "stream": True}))
    assert status == 200 and ctype.startswith("text/event-stream"), text
    events = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected[1]
    assert [c["choices"][0]["finish_reason"] for c in chunks] == [None] * MAX_TOKENS + ["length"]
    assert chunks[-1]["kv_transfer"]["prefill"]["layers"] == 4
    streamed = ask(cluster.proxy_url, PROMPTS[1], stream=True)
    whole = ask(cluster.proxy_url, PROMPTS[1])
    assert streamed.done and streamed.token_ids == whole.token_ids == expected[1]
    assert streamed.text == whole.text and streamed.chunks == MAX_TOKENS + 1


def test_proxy_refuses_bad_requests_naming_the_field(cluster):
    for body, word in [("{}", "prompt"), ('{"prompt": "x", "max_tokens": 0}', "max_tokens"),
                       ('{"prompt": "x", "stream": "yes"}', "stream"), ("[1", "JSON")]:
        status, _, text = post_raw(cluster.proxy_url, body)
        assert status == 400, (body, text)
        assert word in json.loads(text)["error"]["message"]


def test_a_decode_killed_mid_request_is_named_and_a_restarted_one_serves(cluster, expected):
    decode = cluster.decodes[0]
    health = decode.info["url"] + "/health"

    async def kill_while_decoding():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            request = asyncio.create_task(
                complete(session, cluster.proxy_url, PROMPTS[0], max_tokens=3000))
            deadline = time.monotonic() + 30
            while True:                   # until the decode is generating
                assert time.monotonic() < deadline and not request.done()
                async with session.get(health) as resp:
                    if (await resp.json())["active"]:
                        break
                await asyncio.sleep(0.01)
            decode.kill(signal.SIGKILL)
            return await request

    with watchdog(120):
        answer = asyncio.run(kill_while_decoding())
        assert answer.status == 502, (answer.status, answer.error)
        assert "decode-0" in answer.error and decode.info["url"] in answer.error
        decode.process.wait(10)
        down = ask(cluster.proxy_url, PROMPTS[0])        # nothing listens there now
        assert down.status == 502 and "decode-0" in down.error
        cluster.restart_decode(0)
        again = ask(cluster.proxy_url, PROMPTS[0])
        assert again.status == 200, again.error
        assert again.token_ids == expected[0]
        assert again.kv_transfer["prefill"]["link"] == "new"   # relinked to the new decode


def test_a_server_failing_at_start_up_is_reported_at_once():
    c = Cluster(prefills=1, decodes=0, transport="shm", num_blocks=0, timeout_s=60)
    started = time.monotonic()
    with pytest.raises(ChildFailed) as err:
        c.start()
    assert time.monotonic() - started < 30
    assert "exited with" in str(err.value) and "--num-blocks" in str(err.value)
    for child in c.prefills + c.decodes:
        wait_until(lambda: child.process.poll() is not None, 10, "children stopped")
    c.remove_logs()


ORPHAN_PARENT = """
import sys, time
from kvcache.demo.run import Cluster
c = Cluster(transport="tcp", model_config_json="{}", timeout_s=60).start()
print(c.logs, *[x.process.pid for x in [c.proxy, *c.prefills, *c.decodes]], flush=True)
time.sleep(600)
"""


def _gone(pid):
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def test_servers_die_with_their_parent():
    parent = subprocess.Popen([sys.executable, "-c", ORPHAN_PARENT], stdout=subprocess.PIPE,
                              text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    try:
        with watchdog(90):
            logs, *pids = parent.stdout.readline().split()
        pids = [int(p) for p in pids]
        assert len(pids) == 3
        assert not any(_gone(pid) for pid in pids)
        parent.kill()                     # SIGKILL: no clean-up of its own runs
        parent.wait(10)
        for pid in pids:
            wait_until(lambda: _gone(pid), 20, f"server {pid} gone after its parent")
        shutil.rmtree(logs)
    finally:
        parent.kill()
        parent.wait(10)


def test_every_entry_point_has_help():
    modules = ["kvcache.demo.prefill_server", "kvcache.demo.decode_server",
               "kvcache.demo.proxy", "kvcache.demo.run"]
    runs = [subprocess.Popen([sys.executable, "-m", m, "--help"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=ROOT) for m in modules]
    for module, run in zip(modules, runs):
        out, err = run.communicate(timeout=60)
        assert run.returncode == 0 and "usage:" in out and "--" in out, (module, err)


@pytest.mark.rdma
def test_demo_over_rdma():
    # Soft-RoCE under emulation: importing torch alone takes a while there.
    out = demo("--transport", "rdma", "--prompt", PROMPTS[0], "--timeout-s", "400", timeout=800)
    print(out.stdout)                     # the figures over verbs, in the lane's log
    assert out.returncode == 0, out.stdout + out.stderr
    assert "over rdma (new link)" in out.stdout and "OK: 1 requests" in out.stdout


BROKEN_CHILD = """
import os, sys, time
if sys.argv[1] == "silent":
    os.close(1)                           # stdout ends, the process stays
else:
    print("READY {not json", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode, says", [("silent", "closed its stdout"),
                                        ("garbled", "not a JSON object")])
def test_a_child_ending_stdout_alive_or_garbling_ready_is_a_start_up_error(tmp_path, monkeypatch,
                                                                          mode, says):
    (tmp_path / "broken_child.py").write_text(BROKEN_CHILD)
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    child = Child("broken", ["broken_child", mode], str(tmp_path / "log")).start()
    try:
        with pytest.raises(ChildFailed) as err:
            child.wait_ready(30)
        assert err.value.status_code == LLMStatusCode.LLM_FAILED and says in str(err.value)
        assert child.process.wait(10) is not None          # killed, not left running
    finally:
        child.kill()
        child.process.wait(10)
