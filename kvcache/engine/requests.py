"""Asynchronous transfers and received notifications."""
import collections
import threading
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

from kvcache.status import LLMException, LLMStatusCode

MAX_QUEUED_NOTIFICATIONS = 4096


class TransferRequest:
    """An asynchronous transfer (``TransferEngine.transfer_async``)."""

    def __init__(self, future):
        self._future = future

    def status(self):
        """'pending', 'done' or 'failed' (a request the engine's close
        cancelled before it started is 'failed')."""
        if not self._future.done():
            return "pending"
        if self._future.cancelled():
            return "failed"
        return "failed" if self._future.exception() is not None else "done"

    def wait(self, timeout_ms=None):
        """Block until finished (``timeout_ms``: LLM_TIMEOUT if it is not by
        then; the transfer goes on); returns the bytes moved or re-raises
        the transfer's LLMException."""
        try:
            return self._future.result(None if timeout_ms is None else timeout_ms / 1000)
        except FutureTimeout:
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"transfer not finished within {timeout_ms} ms") from None
        except CancelledError:
            raise LLMException(LLMStatusCode.LLM_ENGINE_FINALIZED,
                               "the engine closed before the transfer started") from None


class Notifications:
    """Received (peer name, name, message bytes), oldest first; at most
    MAX_QUEUED_NOTIFICATIONS are kept (the oldest are dropped first)."""

    def __init__(self):
        self._items = collections.deque(maxlen=MAX_QUEUED_NOTIFICATIONS)
        self._lock = threading.Lock()

    def add(self, peer_name, name, message):
        with self._lock:
            self._items.append((peer_name, name, message))

    def take(self):
        with self._lock:
            items = list(self._items)
            self._items.clear()
        return items
