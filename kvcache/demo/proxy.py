"""The proxy in front of prefill and decode instances: an OpenAI-style
``POST /v1/completions`` (``prompt``, ``max_tokens``, ``stream``), served
disaggregated as vLLM's disaggregated-prefill proxy serves it. Per request,
instances picked round-robin:

1. the decode instance reserves block slots (``/kv/reserve``);
2. the prefill instance runs the prompt with ``max_tokens=1`` and pushes its
   KV cache, layer by layer, into those slots (``kv_transfer_params``);
3. the decode instance waits for the layers and continues from the
   prefill's token, streamed or not.

    python -m kvcache.demo.proxy --prefill URL [--prefill URL ...] --decode URL ...

The answer is the decode's completion object (or event stream, ending in
``data: [DONE]``) with ``kv_transfer``: what moved and when (the prefill's
figures, the decode's wait, the instances, the time to first token). An
instance that fails or cannot be reached gives HTTP 502 (503 for its own
refusal) naming it; mid-stream, an ``error`` event instead of ``[DONE]``."""
import argparse
import asyncio
import itertools
import json
import logging
import sys
import time

import aiohttp
from aiohttp import web

from kvcache.demo import serving
from kvcache.lifeline import die_with_parent

log = logging.getLogger(__name__)


class UpstreamError(Exception):
    """An instance failed: ``status`` is the HTTP status to answer."""

    def __init__(self, status, message, instance):
        super().__init__(message)
        self.status = status
        self.instance = instance


class Instance:
    def __init__(self, role, index, url):
        self.name = f"{role}-{index}"
        self.url = url.rstrip("/")

    def __str__(self):
        return f"{self.name} ({self.url})"


class Proxy:
    def __init__(self, args):
        self.args = args
        self.prefills = [Instance("prefill", i, u) for i, u in enumerate(args.prefill)]
        self.decodes = [Instance("decode", i, u) for i, u in enumerate(args.decode)]
        self._next_prefill = itertools.cycle(self.prefills)
        self._next_decode = itertools.cycle(self.decodes)
        self.session = None

    async def start(self):
        self.session = aiohttp.ClientSession(
            timeout=aiohttp.ClientTimeout(total=self.args.timeout_s))

    async def close(self):
        if self.session is not None:
            await self.session.close()

    async def post(self, instance, path, body):
        """POST ``body`` as JSON; the answer's JSON, or UpstreamError naming
        the instance (its own error status and message when it answered one)."""
        try:
            async with self.session.post(instance.url + path, json=body) as resp:
                answer = await resp.json(content_type=None)
                if resp.status != 200:
                    message = answer.get("error", {}).get("message", answer) \
                        if isinstance(answer, dict) else answer
                    raise UpstreamError(503 if resp.status >= 500 else resp.status,
                                        f"{instance} answered {resp.status}: {message}",
                                        instance)
                return answer
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            raise UpstreamError(502, f"{instance} failed: {type(exc).__name__}: {exc}",
                                instance) from None

    async def release(self, decode, reservation):
        try:
            await self.post(decode, "/kv/release", {"request_id": reservation["request_id"]})
        except UpstreamError as exc:
            log.warning("could not release %s: %s", reservation["request_id"], exc)

    async def prepare(self, body):
        """Steps 1 and 2: (decode instance, the decode request body, the
        kv_transfer figures so far)."""
        prompt, max_tokens, stream = serving.completion_request(body)
        prefill, decode = next(self._next_prefill), next(self._next_decode)
        arrived = time.monotonic()
        reservation = await self.post(decode, "/kv/reserve",
                                      {"prompt": prompt, "max_tokens": max_tokens})
        try:
            answer = await self.post(prefill, "/v1/completions", {
                "prompt": prompt, "max_tokens": 1, "stream": False,
                "kv_transfer_params": {key: reservation[key] for key in
                                       ("cluster_id", "kv_address", "block_ids",
                                        "transfer_id")}})
        except BaseException:
            await self.release(decode, reservation)
            raise
        figures = {"prefill_instance": prefill.name, "decode_instance": decode.name,
                   "ttft_ms": round(1000 * (time.monotonic() - arrived), 3),
                   "prefill": answer.get("kv_transfer")}
        request = {"prompt": prompt, "max_tokens": max_tokens, "stream": stream,
                   "kv_transfer_params": {"request_id": reservation["request_id"],
                                          "first_token_id": answer["choices"][0]["token_ids"][0]}}
        return decode, request, figures


async def complete(request):
    proxy = request.app["proxy"]
    body = await serving.read_json(request)
    try:
        decode, decode_body, figures = await proxy.prepare(body)
        if not decode_body["stream"]:
            answer = await proxy.post(decode, "/v1/completions", decode_body)
            answer["kv_transfer"] = {**figures, "decode": answer.get("kv_transfer")}
            return web.json_response(answer)
        return await _stream(request, proxy, decode, decode_body, figures)
    except UpstreamError as exc:
        return serving.json_error(exc.status, str(exc), "upstream_error",
                                  instance=exc.instance.name)


async def _stream(request, proxy, decode, body, figures):
    try:
        upstream = await proxy.session.post(decode.url + "/v1/completions", json=body)
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        raise UpstreamError(502, f"{decode} failed: {type(exc).__name__}: {exc}",
                            decode) from None
    async with upstream:
        if upstream.status != 200:
            text = await upstream.text()
            raise UpstreamError(503 if upstream.status >= 500 else upstream.status,
                                f"{decode} answered {upstream.status}: {text[:500]}", decode)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                               "Cache-Control": "no-cache"})
        await response.prepare(request)
        done = False
        try:
            async for line in upstream.content:
                if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                    chunk = json.loads(line[6:])
                    if "kv_transfer" in chunk:
                        chunk["kv_transfer"] = {**figures, "decode": chunk["kv_transfer"]}
                    line = f"data: {json.dumps(chunk)}\n".encode()
                done = done or line.strip() == b"data: [DONE]"
                await response.write(line)
            if not done:
                raise aiohttp.ClientPayloadError("the stream ended before [DONE]")
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            error = serving.error_body(f"{decode} failed mid-stream: {type(exc).__name__}: "
                                       f"{exc}", "upstream_error", instance=decode.name)
            await response.write(f"data: {json.dumps(error)}\n\n".encode())
        await response.write_eof()
        return response


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m kvcache.demo.proxy", description=__doc__.split("\n\n")[0],
        epilog="Prints 'READY {json}' on stdout once it listens; SIGTERM or Ctrl-C stops it.")
    parser.add_argument("--prefill", action="append", required=True, metavar="URL",
                        help="a prefill instance's base URL (repeat for several)")
    parser.add_argument("--decode", action="append", required=True, metavar="URL",
                        help="a decode instance's base URL (repeat for several)")
    parser.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0, help="port (default 0: a free one)")
    parser.add_argument("--timeout-s", type=float, default=120.0,
                        help="deadline of each call to an instance (s, default 120)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="die with this process (set by kvcache.demo.run)")
    return parser


async def amain(args):
    proxy = Proxy(args)
    await proxy.start()
    try:
        app = web.Application()
        app["proxy"] = proxy
        app.router.add_post("/v1/completions", complete)
        await serving.serve(app, args.host, args.port, {"role": "proxy"})
    finally:
        await proxy.close()


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s proxy %(message)s")
    asyncio.run(amain(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
