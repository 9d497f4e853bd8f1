"""The HTTP side the servers and the proxy share: OpenAI completion objects
and errors, checking a completion request, and running an aiohttp
application on a socket until SIGTERM/SIGINT (no torch here: the proxy
loads no model)."""
import asyncio
import json
import signal
import socket
import time
import uuid

from aiohttp import web

from kvcache.demo.children import announce_ready

MODEL_NAME = "tinyllama-demo"


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
