"""Control calls between linked engines: a handler per method, each with a
schema its parameters are checked against before it runs.

Methods whose name starts with a reserved prefix ("engine.", "tcp.",
"shm.", "rdma.", "cache.") are the package's own; users add handlers under
other names and cannot replace these."""
import threading

from kvcache.status import LLMException, LLMStatusCode

RESERVED_PREFIXES = ("engine.", "tcp.", "shm.", "rdma.", "cache.")


def is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def list_of(check, limit):
    return lambda v: isinstance(v, list) and len(v) <= limit and all(check(x) for x in v)


class Rpc:
    """Thread-safe table of handlers: handler(peer, params) -> dict."""

    def __init__(self):
        self._handlers = {}
        self._lock = threading.Lock()

    def serve(self, method, handler, schema=None, reserved=True):
        """Serve ``method``. ``schema``: {param: check(value) -> bool} (None:
        any parameters). Internal methods (``reserved``) must use a reserved
        prefix; user methods must not."""
        if not isinstance(method, str) or not method:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"method name must be a non-empty string, got {method!r}")
        if method.startswith(RESERVED_PREFIXES) != reserved:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                               f"method {method!r}: names starting with {RESERVED_PREFIXES} "
                               "are reserved for kvcache itself")
        if not callable(handler):
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, "handler must be callable")
        with self._lock:
            self._handlers[method] = (handler, schema)

    def dispatch(self, peer, method, params):
        """Run the handler of ``method``; its result dict, or LLMException
        (LLM_PARAM_INVALID for an unknown method or bad parameters)."""
        with self._lock:
            entry = self._handlers.get(method)
        if entry is None:
            raise LLMException(LLMStatusCode.LLM_PARAM_INVALID, f"unknown method {method!r}")
        handler, schema = entry
        for name, check in (schema or {}).items():
            if name not in params or not check(params[name]):
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"{method}: parameter {name!r} missing or invalid")
        result = handler(peer, params)
        if not isinstance(result, dict):
            raise LLMException(LLMStatusCode.LLM_FAILED,
                               f"{method}: the handler returned {type(result).__name__}, "
                               "not a dict")
        return result
