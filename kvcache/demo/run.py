"""The disaggregated demo end to end: start prefill and decode servers and
the proxy on 127.0.0.1 (free ports), send prompts through the proxy with an
HTTP client, print the completions and what moved per request, and check
that the tokens equal a single-process run of the same model (exit 1 when
they do not).

    python -m kvcache.demo.run [--prefill N] [--decode M] [--transport shm|tcp|rdma]
    kvcache demo [same options]

``Cluster`` (the servers as children of this process) and ``complete`` (one
request through the proxy) are what tests use. Importing this module loads
neither torch nor aiohttp (the ``kvcache`` command builds its parser from it)."""
import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time

from kvcache.demo.children import Child, ChildFailed
from kvcache.status import LLMException, LLMStatusCode

TRANSPORTS = ("auto", "tcp", "shm", "rdma")
PROMPTS = ["The capital of France is", "Disaggregated serving moves the KV cache",
           "def fibonacci(n):", "Once upon a time, in a data center far away,"]
PREFILL_CLUSTERS, DECODE_CLUSTERS = 100, 200
DEMO_MODEL = '{"num_layers": 8, "hidden_size": 256, "intermediate_size": 688, ' \
             '"num_heads": 8, "num_kv_heads": 4, "head_dim": 32}'


class Cluster:
    """``prefills`` prefill and ``decodes`` decode servers and a proxy, as
    children of this process (each dies with it), logs in a temporary
    directory. ``start()`` raises ChildFailed with the child's log as soon
    as one fails to come up. ``proxy_url``; ``decode(i)`` / ``prefill(i)``
    (Child: ``process``, ``info``); ``restart_decode(i)`` starts decode i
    again on its HTTP port; ``stop()``."""

    def __init__(self, prefills=1, decodes=1, transport="shm", model_config_json="{}",
                 seed=0, num_blocks=256, timeout_s=60.0, threads=1):
        self.transport = transport
        self.timeout_s = timeout_s
        self.logs = tempfile.mkdtemp(prefix="kvcache-demo-")
        common = ["--transport", transport, "--model-config", model_config_json,
                  "--seed", str(seed), "--num-blocks", str(num_blocks),
                  "--timeout-ms", str(int(timeout_s * 1000)), "--threads", str(threads)]
        self.prefills = [self._new(f"prefill-{i}", "kvcache.demo.prefill_server",
                                   ["--cluster-id", str(PREFILL_CLUSTERS + i), *common])
                         for i in range(prefills)]
        self.decodes = [self._new(f"decode-{i}", "kvcache.demo.decode_server",
                                  ["--cluster-id", str(DECODE_CLUSTERS + i), *common])
                        for i in range(decodes)]
        self.proxy = None

    def _new(self, name, module, argv):
        return Child(name, [module, *argv], os.path.join(self.logs, f"{name}.log"))

    @property
    def proxy_url(self):
        return self.proxy.info["url"]

    def start(self):
        try:
            servers = self.prefills + self.decodes
            for child in servers:
                child.start()
            for child in servers:
                child.wait_ready(self.timeout_s)
            argv = ["kvcache.demo.proxy", "--timeout-s", str(self.timeout_s)]
            for child in self.prefills:
                argv += ["--prefill", child.info["url"]]
            for child in self.decodes:
                argv += ["--decode", child.info["url"]]
            self.proxy = self._new("proxy", argv[0], argv[1:]).start()
            self.proxy.wait_ready(self.timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def restart_decode(self, index):
        """Start decode ``index`` again (after it died) on the same HTTP
        port, so the proxy reaches it where it was."""
        old = self.decodes[index]
        if old.process.poll() is None:
            old.stop()
        port = old.info["url"].rsplit(":", 1)[1]
        child = Child(old.name, [*old.argv, "--port", port], old.log_path).start()
        self.decodes[index] = child
        child.wait_ready(self.timeout_s)
        return child

    def stop(self):
        for child in [self.proxy, *self.prefills, *self.decodes]:
            if child is not None:
                child.stop()

    def remove_logs(self):
        shutil.rmtree(self.logs, ignore_errors=True)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
        self.remove_logs()


class Completion:
    """One answer through the proxy: ``status`` (HTTP), ``token_ids``,
    ``text``, ``finish_reason``, ``kv_transfer``, ``error`` (the message of
    an error answer or event), ``chunks`` (stream events), ``ttft_ms`` (the
    client's: request sent to first token received)."""

    def __init__(self, status):
        self.status = status
        self.token_ids, self.text, self.chunks = [], "", 0
        self.finish_reason = self.kv_transfer = self.error = None
        self.ttft_ms = None
        self.done = False


async def complete(session, url, prompt, max_tokens, stream=False):
    """POST one completion to the proxy at ``url`` with aiohttp; returns a
    Completion (an error answer included: see ``status`` and ``error``)."""
    sent = time.monotonic()
    async with session.post(url + "/v1/completions", json={
            "prompt": prompt, "max_tokens": max_tokens, "stream": stream}) as resp:
        out = Completion(resp.status)
        if resp.status != 200 or not stream:
            body = await resp.json(content_type=None)
            out.ttft_ms = 1000 * (time.monotonic() - sent)
            if resp.status != 200:
                out.error = body.get("error", {}).get("message", str(body))
                return out
            choice = body["choices"][0]
            out.token_ids, out.text = choice["token_ids"], choice["text"]
            out.finish_reason, out.kv_transfer = choice["finish_reason"], body["kv_transfer"]
            out.done = True
            return out
        if not resp.headers.get("Content-Type", "").startswith("text/event-stream"):
            raise LLMException(LLMStatusCode.LLM_FAILED, "stream answered without "
                               f"text/event-stream: {resp.headers.get('Content-Type')}")
        async for line in resp.content:
            line = line.strip()
            if not line.startswith(b"data: "):
                continue
            if line == b"data: [DONE]":
                out.done = True
                break
            chunk = json.loads(line[6:])
            if "error" in chunk:
                out.error = chunk["error"]["message"]
                break
            out.chunks += 1
            choice = chunk["choices"][0]
            if out.ttft_ms is None and choice["token_ids"]:
                out.ttft_ms = 1000 * (time.monotonic() - sent)
            out.token_ids += choice["token_ids"]
            out.text += choice["text"]
            out.finish_reason = choice["finish_reason"] or out.finish_reason
            out.kv_transfer = chunk.get("kv_transfer", out.kv_transfer)
        return out


def reference(config_json, seed, prompts, max_tokens, threads=1):
    """The same model in this one process: the tokens each prompt gets."""
    import torch

    from kvcache.demo.model import TinyLlama
    from kvcache.demo.instance import model_config
    from kvcache.demo.tokenizer import EOS_ID, ByteTokenizer
    before = torch.get_num_threads()
    torch.set_num_threads(threads)          # as the servers run (bit-equal GEMMs)
    try:
        model = TinyLlama(model_config(config_json), seed=seed)
        tokenizer = ByteTokenizer()
        answers = []
        for prompt in prompts:
            ids = tokenizer.encode(prompt)
            table = list(range(model.blocks_needed(len(ids) + max_tokens)))
            kv = model.new_kv(len(table))
            answers.append(model.generate(ids, max_tokens, kv, table, eos_id=EOS_ID))
        return answers
    finally:
        torch.set_num_threads(before)


def describe(index, prompt, answer, expected):
    kv = answer.kv_transfer or {}
    p = kv.get("prefill") or {}
    d = kv.get("decode") or {}
    how = f"streamed in {answer.chunks} events" if answer.chunks else "one answer"
    same = "identical to the single-process run" if answer.token_ids == expected \
        else f"DIFFERS from the single-process run {expected}"
    lines = [f"[{index}] {prompt!r} -> {kv.get('prefill_instance')} -> "
             f"{kv.get('decode_instance')}",
             f"    completion {answer.text!r}",
             f"    {len(answer.token_ids)} tokens ({how}), {same}"]
    if p:
        lines.append(
            f"    moved {p['bytes'] / 1024:.1f} KiB over {p['transport']} ({p['link']} link): "
            f"{p['blocks']} blocks x {2 * p['layers']} tensors of {p['block_bytes']} B, "
            f"{p['descriptors']} descriptors -> {p['descriptors_merged']} after merging, "
            f"prefill blocks {p['src_block_ids']} -> decode blocks {p['dst_block_ids']}")
        lines.append(
            f"    prefill compute {p['compute_ms']:.2f} ms; sending {p['send_ms']:.2f} ms "
            f"({p['gbps']:.3f} GB/s), {p['hidden_ms']:.2f} ms hidden behind compute "
            f"({p['hidden_pct']:.0f}%), tail after the last layer {p['tail_ms']:.2f} ms")
    client = (f"{answer.ttft_ms:.1f} ms at the client" if answer.chunks
              else f"the whole answer in {answer.ttft_ms:.1f} ms at the client")
    lines.append(f"    time to first token {kv.get('ttft_ms', 0):.1f} ms at the proxy, "
                 f"{client}; decode waited "
                 f"{d.get('wait_ms', 0):.2f} ms for {d.get('layers_arrived', 0)} layers, "
                 f"decoded in {d.get('decode_ms', 0):.1f} ms")
    return "\n".join(lines)


async def _send_all(url, prompts, max_tokens, timeout_s):
    import aiohttp
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout_s)) as s:
        return [await complete(s, url, prompt, max_tokens, stream=i % 2 == 1)
                for i, prompt in enumerate(prompts)]


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m kvcache.demo.run",
                                     description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def add_arguments(parser):
    """The demo's options (this module's and ``kvcache demo``'s)."""
    parser.add_argument("--prefill", type=int, default=1, metavar="N",
                        help="prefill instances (default 1)")
    parser.add_argument("--decode", type=int, default=1, metavar="M",
                        help="decode instances (default 1; the proxy picks round-robin)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="shm",
                        help="kvcache transport between prefill and decode (default shm)")
    parser.add_argument("--prompt", action="append", default=None,
                        help="a prompt (repeat for several; default: four built in)")
    parser.add_argument("--max-tokens", type=int, default=24,
                        help="tokens generated per prompt (default 24)")
    parser.add_argument("--model-config", default=DEMO_MODEL, metavar="JSON",
                        help=f"ModelConfig fields as JSON (default {DEMO_MODEL})")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--num-blocks", type=int, default=256,
                        help="KV blocks per instance (default 256)")
    parser.add_argument("--timeout-s", type=float, default=60.0,
                        help="deadline of start-up and of each request (s, default 60)")


def run(args):
    """The demo; returns the exit status (0: every completion matched).
    LLMException: bad options (LLM_PARAM_INVALID), aiohttp missing
    (LLM_FEATURE_NOT_ENABLED)."""
    try:
        import aiohttp  # noqa: F401
    except ImportError:
        raise LLMException(LLMStatusCode.LLM_FEATURE_NOT_ENABLED, "the demo needs aiohttp: "
                           "pip install 'pyverbs-kv[demo]'") from None
    from kvcache.demo.instance import model_config
    if args.prefill < 1 or args.decode < 1 or args.max_tokens < 1:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           "--prefill, --decode and --max-tokens must be at least 1")
    try:
        model_config(args.model_config)
    except ValueError as exc:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, str(exc)) from None
    prompts = args.prompt or PROMPTS
    started = time.monotonic()
    expected = reference(args.model_config, args.seed, prompts, args.max_tokens)
    print(f"single-process reference: {len(prompts)} prompts, {args.max_tokens} tokens each, "
          f"{time.monotonic() - started:.1f} s")
    cluster = Cluster(args.prefill, args.decode, args.transport, args.model_config, args.seed,
                      args.num_blocks, args.timeout_s)
    try:
        cluster.start()
        print(f"{args.prefill} prefill + {args.decode} decode servers over {args.transport}, "
              f"proxy at {cluster.proxy_url} (logs in {cluster.logs})")
        answers = asyncio.run(_send_all(cluster.proxy_url, prompts, args.max_tokens,
                                        args.timeout_s))
    except ChildFailed as exc:
        print(f"kvcache demo: {exc}", file=sys.stderr)
        return 1
    finally:
        cluster.stop()
    failed = 0
    for i, (prompt, answer, want) in enumerate(zip(prompts, answers, expected)):
        if answer.status != 200 or not answer.done:
            print(f"[{i}] {prompt!r}: HTTP {answer.status}: {answer.error}")
            failed += 1
            continue
        print(describe(i, prompt, answer, want))
        failed += answer.token_ids != want
    if failed:
        print(f"FAILED: {failed} of {len(prompts)} requests did not match the single-process "
              f"run (logs in {cluster.logs})")
        return 1
    cluster.remove_logs()
    print(f"OK: {len(prompts)} requests served disaggregated, every token identical to the "
          f"single-process run ({time.monotonic() - started:.1f} s)")
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except LLMException as exc:
        print(f"kvcache demo: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:            # the servers were stopped on the way out
        print("kvcache demo: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
