"""Logging set-up of the kvcache package, from the KVCACHE_DEBUG,
KVCACHE_DEBUG_FILE and KVCACHE_ERROR_FILE variables (kvcache.config says
what each means; FastDeploy reads the same three). Only the ``kvcache``
logger is configured, never the root logger, so other libraries' output is
unchanged. What is logged where: link events (linked, closed, failed, a
handshake refused) at INFO, each transfer at DEBUG."""
import logging
import sys
import threading

from kvcache.config import env_flag, env_str
from kvcache.status import LLMException, LLMStatusCode

LOGGER = "kvcache"
FORMAT = "%(asctime)s %(process)d %(levelname)s %(name)s: %(message)s"

# (path or "<stderr>", level) -> the handler installed for it; once per process.
_handlers = {}
_lock = threading.Lock()


def setup():
    """Apply the variables to the ``kvcache`` logger (called by every
    TransferEngine and RDMACommunicator, and by the ``kvcache`` command; a
    handler is installed once per process). KVCACHE_DEBUG on: level DEBUG
    and, when the application has configured no logging of its own (the
    root logger has no handler), a stderr handler. LLM_PARAM_INVALID for a
    KVCACHE_DEBUG that is no boolean or a file that cannot be opened."""
    logger = logging.getLogger(LOGGER)
    if env_flag("KVCACHE_DEBUG"):
        logger.setLevel(logging.DEBUG)
        if not logging.getLogger().handlers:
            _install(logger, ("<stderr>", logging.NOTSET),
                     lambda: logging.StreamHandler(sys.stderr))
    for name, level in (("KVCACHE_DEBUG_FILE", logging.NOTSET),
                        ("KVCACHE_ERROR_FILE", logging.ERROR)):
        path = env_str(name)
        if path:
            _install(logger, (path, level), lambda path=path, name=name: _file(name, path))


def _install(logger, key, make):
    with _lock:
        if key in _handlers:
            return
        handler = make()
        handler.setLevel(key[1])
        handler.setFormatter(logging.Formatter(FORMAT))
        logger.addHandler(handler)
        _handlers[key] = handler


def _file(name, path):
    try:
        return logging.FileHandler(path, encoding="utf-8")
    except OSError as exc:
        raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                           f"{name}={path!r} cannot be opened: {exc.strerror}") from None
