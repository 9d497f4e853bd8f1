"""The decode instance: reserves block slots for a request, lets the prefill
push the prompt's KV cache into them, waits for the layers to land
(``wait_layers``: the prefill announces each layer after its write completed;
nothing polls memory), then generates greedily from the prefill's first token.

    python -m kvcache.demo.decode_server --cluster-id 2 [--transport shm] ...

``POST /kv/reserve`` {prompt, max_tokens} -> {request_id, transfer_id,
cluster_id, kv_address, block_ids}: slots for the prompt and the tokens to
come (its own ids, not the prefill's); unclaimed after ``--reserve-timeout-s``
they are freed. ``POST /kv/release`` {request_id}. ``POST /v1/completions``
{prompt, max_tokens, stream, kv_transfer_params: {request_id,
first_token_id}}: the OpenAI completion (or its event stream) of the first
token and those decoded after it. ``GET /health``."""
import argparse
import asyncio
import codecs
import itertools
import json
import logging
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from aiohttp import web

from kvcache import LLMException, LLMRole
from kvcache.demo import instance, serving
from kvcache.demo.tokenizer import EOS_ID, ByteTokenizer

log = logging.getLogger(__name__)
SWEEP_S = 1.0


class Reservation:
    def __init__(self, request_id, prompt_ids, max_tokens, table, expires):
        self.request_id = request_id
        self.prompt_ids = prompt_ids
        self.max_tokens = max_tokens
        self.table = table
        self.expires = expires
        self.claimed = False


class Decode:
    """The instance's state. Block tables are handed out on the event loop
    thread; model steps run on the one compute thread (requests interleave
    step by step); layer waits on their own threads."""

    def __init__(self, args):
        self.args = args
        self.instance = instance.Instance(LLMRole.DECODER, args, f"{args.kv_host}:0")
        self.tokenizer = ByteTokenizer()
        self.compute = ThreadPoolExecutor(1, thread_name_prefix="decode")
        self.waits = ThreadPoolExecutor(8, thread_name_prefix="decode-wait")
        self.reserved = {}
        self.ids = itertools.count(1)
        self.active = 0

    def close(self):
        self.waits.shutdown(wait=True)
        self.compute.shutdown(wait=True)
        self.instance.close()

    def reserve(self, prompt_ids, max_tokens):
        model = self.instance.model
        # Positions 0 .. prompt + max_tokens - 2 get K/V (the last token is never fed back).
        table = self.instance.blocks.allocate(
            model.blocks_needed(len(prompt_ids) + max_tokens - 1))
        request_id = f"{self.args.cluster_id}-{next(self.ids)}"
        self.reserved[request_id] = Reservation(
            request_id, prompt_ids, max_tokens, table,
            time.monotonic() + self.args.reserve_timeout_s)
        return {"request_id": request_id, "transfer_id": f"kv-{request_id}",
                "cluster_id": self.args.cluster_id,
                "kv_address": self.instance.dd.listen_address,
                "block_ids": table[:model.blocks_needed(len(prompt_ids))]}

    def release(self, request_id):
        held = self.reserved.pop(request_id, None)
        if held is not None:
            self.instance.blocks.free(held.table)
        return held is not None

    async def sweep(self):
        """Free reservations nobody claimed in time (a proxy that died
        between reserving and decoding)."""
        while True:
            await asyncio.sleep(SWEEP_S)
            now = time.monotonic()
            for held in [h for h in self.reserved.values()
                         if not h.claimed and h.expires < now]:
                log.warning("reservation %s expired unclaimed", held.request_id)
                self.release(held.request_id)

    def step(self, token, position, table):
        """One greedy step, as TinyLlama.decode takes it."""
        model = self.instance.model
        return int(model.forward([token], position, self.instance.kv, table)[-1].argmax())

    async def tokens(self, held, first):
        """The completion's tokens, one at a time: ``first`` (the
        prefill's), then greedy steps until max_tokens or EOS (the loop of
        TinyLlama.decode, so a single-process run gives the same tokens)."""
        loop = asyncio.get_running_loop()
        token, position = first, len(held.prompt_ids)
        yield token
        for step in range(held.max_tokens - 1):
            if token == EOS_ID:
                break
            token = await loop.run_in_executor(self.compute, self.step, token, position + step,
                                               held.table)
            yield token


async def reserve(request):
    decode = request.app["decode"]
    body = await serving.read_json(request)
    prompt, max_tokens, _ = serving.completion_request(body)
    try:
        answer = decode.reserve(decode.tokenizer.encode(prompt), max_tokens)
    except LLMException as exc:
        return serving.json_error(503, f"decode cluster {decode.args.cluster_id}: {exc}",
                                  "decode_error", code=exc.status_code.name)
    return web.json_response(answer)


async def release(request):
    decode = request.app["decode"]
    body = await serving.read_json(request)
    return web.json_response({"released": decode.release(body.get("request_id"))})


async def complete(request):
    decode = request.app["decode"]
    body = await serving.read_json(request)
    prompt, max_tokens, stream = serving.completion_request(body)
    params = body.get("kv_transfer_params")
    if not isinstance(params, dict) or "request_id" not in params \
            or not isinstance(params.get("first_token_id"), int):
        raise serving.bad_request("a decode instance needs kv_transfer_params with request_id "
                                  "and first_token_id (the prefill's answer)")
    held = decode.reserved.get(params["request_id"])
    if held is None or held.claimed:
        return serving.json_error(404, f"decode cluster {decode.args.cluster_id}: no "
                                  f"reservation {params['request_id']!r}")
    prompt_ids = decode.tokenizer.encode(prompt)
    if prompt_ids != held.prompt_ids or max_tokens != held.max_tokens:
        raise serving.bad_request("prompt and max_tokens differ from the reservation's")
    held.claimed = True
    decode.active += 1
    try:
        return await _decode(request, decode, held, params, stream)
    finally:
        decode.active -= 1
        decode.release(held.request_id)


async def _decode(request, decode, held, params, stream):
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    cm = decode.instance.dd.cache_manager
    try:
        arrivals = await loop.run_in_executor(decode.waits, cm.wait_layers,
                                              f"kv-{held.request_id}", None,
                                              decode.args.timeout_ms)
    except LLMException as exc:
        return serving.json_error(503, f"decode cluster {decode.args.cluster_id}: the KV "
                                  f"cache did not arrive: {exc}", "decode_error",
                                  code=exc.status_code.name)
    waited = time.monotonic()
    stats = {"wait_ms": round(1000 * (waited - started), 3),
             "layers_arrived": len(arrivals.layers),
             "block_ids": list(held.table)}
    text = codecs.getincrementaldecoder("utf-8")(errors="replace")
    prompt_tokens = len(held.prompt_ids)
    if not stream:
        ids = [t async for t in decode.tokens(held, params["first_token_id"])]
        stats["decode_ms"] = round(1000 * (time.monotonic() - waited), 3)
        return web.json_response(serving.completion(
            decode.tokenizer.decode(ids), ids, _finish(ids, held), prompt_tokens,
            kv_transfer=stats))
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "Cache-Control": "no-cache"})
    await response.prepare(request)
    ids = []
    async for token in decode.tokens(held, params["first_token_id"]):
        ids.append(token)
        chunk = serving.completion(text.decode(bytes([token]) if token < 256 else b""),
                                   [token], None, prompt_tokens)
        del chunk["usage"]
        await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
    stats["decode_ms"] = round(1000 * (time.monotonic() - waited), 3)
    last = serving.completion(text.decode(b"", final=True), [], _finish(ids, held),
                              prompt_tokens, kv_transfer=stats)
    last["usage"]["completion_tokens"] = len(ids)
    last["usage"]["total_tokens"] = prompt_tokens + len(ids)
    await response.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
    await response.write_eof()
    return response


def _finish(ids, held):
    return "stop" if ids and ids[-1] == EOS_ID else "length"


async def health(request):
    decode = request.app["decode"]
    return web.json_response({"role": "decode", "cluster_id": decode.args.cluster_id,
                              "active": decode.active, "reserved": len(decode.reserved),
                              "free_blocks": decode.instance.blocks.free_count})


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m kvcache.demo.decode_server", description=__doc__.split("\n\n")[0],
        epilog="Prints 'READY {json}' on stdout once it listens; SIGTERM or Ctrl-C stops it.")
    instance.add_server_arguments(parser, "decode")
    parser.add_argument("--reserve-timeout-s", type=float, default=60.0,
                        help="free reserved slots not claimed within this (s, default 60)")
    return parser


async def amain(args):
    decode = Decode(args)
    sweeper = None
    try:
        app = web.Application()
        app["decode"] = decode
        app.router.add_post("/kv/reserve", reserve)
        app.router.add_post("/kv/release", release)
        app.router.add_post("/v1/completions", complete)
        app.router.add_get("/health", health)
        sweeper = asyncio.create_task(decode.sweep())
        await serving.serve(app, args.host, args.port,
                            {"role": "decode", "cluster_id": args.cluster_id,
                             "kv_address": decode.instance.dd.listen_address,
                             "transport": decode.instance.dd.transport})
    finally:
        if sweeper is not None:
            sweeper.cancel()
        decode.close()


def main(argv=None):
    return instance.run_server("decode", build_parser(), amain, argv)


if __name__ == "__main__":
    sys.exit(main())
