"""What the prefill and decode servers share: their options, the model and
its paged blocks cache in kvcache's buffer pool, OpenAI completion objects,
and running an aiohttp application on a socket until SIGTERM/SIGINT."""
import asyncio
import json
import signal
import socket
import time
import uuid

import torch
from aiohttp import web

from kvcache import (BlocksCacheKey, CacheDesc, DataType, LLMConfig, LLMDataDist, LLMException,
                     LLMRole)
from kvcache.demo.children import announce_ready, die_with_parent
from kvcache.demo.model import ModelConfig, TinyLlama
from kvcache.demo.paging import BlockAllocator, layer_views

MODEL_NAME = "tinyllama-demo"
TRANSPORTS = ("auto", "tcp", "shm", "rdma")
POOL_SLACK = 1 << 20                 # the pool's own alignment, beyond the cache


def model_config(text):
    """ModelConfig from a JSON object of its fields (argparse type)."""
    try:
        fields = json.loads(text)
        if not isinstance(fields, dict):
            raise ValueError("not a JSON object")
        return ModelConfig(**fields)
    except (ValueError, TypeError, LLMException) as exc:
        raise ValueError(f"bad model config {text!r}: {exc}") from None


def positive(text):
    """argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise ValueError(f"{value} is not positive")
    return value


def add_server_arguments(parser, role):
    parser.add_argument("--host", default="127.0.0.1",
                        help="HTTP address to listen on (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=0,
                        help="HTTP port (default 0: a free one, announced on stdout)")
    parser.add_argument("--kv-host", default="127.0.0.1",
                        help="address of the kvcache link listener (decode) (default 127.0.0.1)")
    parser.add_argument("--cluster-id", type=int, required=True,
                        help=f"kvcache cluster id of this {role} instance (unique per instance)")
    parser.add_argument("--transport", choices=TRANSPORTS, default="shm",
                        help="kvcache transport; both sides must use the same (default shm)")
    parser.add_argument("--model-config", type=model_config, default=ModelConfig(),
                        metavar="JSON", help="ModelConfig fields as a JSON object "
                        "(default {}: 4 layers, hidden 128)")
    parser.add_argument("--seed", type=int, default=0, help="weights seed (default 0)")
    parser.add_argument("--num-blocks", type=positive, default=256,
                        help="KV blocks of this instance's blocks cache (default 256)")
    parser.add_argument("--timeout-ms", type=positive, default=10000,
                        help="deadline of each transfer, layer wait and link (ms, default 10000)")
    parser.add_argument("--threads", type=positive, default=1,
                        help="torch threads (default 1; processes compared bit for bit must "
                        "use the same)")
    parser.add_argument("--parent-pid", type=int, default=None,
                        help="die with this process (set by kvcache.demo.run)")


def setup_process(args):
    if args.parent_pid is not None:
        die_with_parent(args.parent_pid)
    torch.set_num_threads(args.threads)


class Instance:
    """The model, an LLMDataDist of ``role`` and its blocks cache of
    ``args.num_blocks`` blocks (K of layer L at tensor 2L, V at 2L+1;
    offered to linked peers under BlocksCacheKey(cluster id)), with a
    BlockAllocator over it."""

    def __init__(self, role, args, listen):
        self.args = args
        self.model = TinyLlama(args.model_config, seed=args.seed)
        c = self.model.config
        desc = CacheDesc(2 * c.num_layers, DataType.DT_FLOAT, [args.num_blocks, *c.block_shape])
        self.dd = LLMDataDist(role, args.cluster_id)
        cfg = LLMConfig()
        cfg.listen_ip_info = listen
        cfg.transport = args.transport
        cfg.sync_kv_timeout = args.timeout_ms
        cfg.link_timeout = args.timeout_ms
        cfg.buf_pool_cfg = json.dumps(
            {"buf_pool_size": desc.num_tensors * desc.tensor_bytes + POOL_SLACK})
        self.dd.init(cfg.generate_options())
        try:
            self.cache = self.dd.cache_manager.allocate_blocks_cache(
                desc, BlocksCacheKey(args.cluster_id))
            self.kv = layer_views(self.cache, c.num_layers)
        except BaseException:
            self.dd.finalize()
            raise
        # A decode hands out its highest free ids, so its slots differ from
        # the prefill's lowest ones as they would between real instances.
        self.blocks = BlockAllocator(args.num_blocks, highest=role == LLMRole.DECODER)

    def close(self):
        self.dd.finalize()


def completion(text, token_ids, finish_reason, prompt_tokens, **extra):
    """An OpenAI ``text_completion`` object; ``token_ids`` (ours, as vLLM's
    return_token_ids) carries the tokens, since byte tokens need not be
    valid UTF-8 text."""
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
            "created": int(time.time()), "model": MODEL_NAME,
            "choices": [{"index": 0, "text": text, "token_ids": token_ids, "logprobs": None,
                         "finish_reason": finish_reason}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(token_ids),
                      "total_tokens": prompt_tokens + len(token_ids)}, **extra}


def error_body(message, kind="invalid_request_error", **extra):
    return {"error": {"message": message, "type": kind, **extra}}


def json_error(status, message, kind="invalid_request_error", **extra):
    return web.json_response(error_body(message, kind, **extra), status=status)


def bind(host, port):
    """A listening TCP socket (SO_REUSEADDR: a restarted server takes its
    port back at once)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def url_of(sock):
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


async def serve(app, host, port, ready_info):
    """Serve ``app`` until SIGTERM or SIGINT; announces READY with
    ``ready_info`` plus the URL once listening."""
    sock = bind(host, port)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    try:
        await web.SockSite(runner, sock).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        announce_ready({"url": url_of(sock), **ready_info})
        await stop.wait()
    finally:
        await runner.cleanup()
        sock.close()


async def read_json(request):
    """The request's JSON object body, or HTTPBadRequest saying why not."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError) as exc:
        raise web.HTTPBadRequest(text=json.dumps(error_body(f"body is not JSON: {exc}")),
                                 content_type="application/json") from None
    if not isinstance(body, dict):
        raise web.HTTPBadRequest(text=json.dumps(error_body("body must be a JSON object")),
                                 content_type="application/json")
    return body


def bad_request(message):
    return web.HTTPBadRequest(text=json.dumps(error_body(message)),
                              content_type="application/json")


def completion_request(body, max_tokens_limit=4096):
    """(prompt, max_tokens, stream) of an OpenAI completion request body,
    checked (HTTPBadRequest naming the field)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise bad_request("prompt must be a non-empty string")
    max_tokens = body.get("max_tokens", 16)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) \
            or not 1 <= max_tokens <= max_tokens_limit:
        raise bad_request(f"max_tokens must be an integer in 1..{max_tokens_limit}")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("stream must be true or false")
    return prompt, max_tokens, stream
