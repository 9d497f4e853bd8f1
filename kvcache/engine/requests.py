"""Asynchronous transfers and received notifications."""
import collections
import threading
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FutureTimeout

from kvcache.config import env_int
from kvcache.status import LLMException, LLMStatusCode

MAX_QUEUED_NOTIFICATIONS = 4096          # from all peers together
MAX_NOTIFY_QUEUE_BYTES = 1 << 30
MAX_PEER_NOTIFICATIONS = 1024
MAX_PEER_NOTIFY_BYTES = 64 << 20


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
    """Received (peer name, name, message bytes), oldest first, until taken.
    Bounded per peer (KVCACHE_PEER_MAX_NOTIFICATIONS messages and
    KVCACHE_PEER_MAX_NOTIFY_BYTES bytes) and in all (MAX_QUEUED_NOTIFICATIONS,
    MAX_NOTIFY_QUEUE_BYTES): what is queued is kept, and a notification past
    a bound is refused (``add`` says why; the sender gets the refusal)."""

    def __init__(self):
        self._items = collections.deque()
        self._per_peer = collections.Counter()       # peer name -> notifications queued
        self._bytes = collections.Counter()          # peer name -> bytes queued
        self._lock = threading.Lock()
        self.max_per_peer = max(1, env_int("KVCACHE_PEER_MAX_NOTIFICATIONS",
                                           MAX_PEER_NOTIFICATIONS))
        self.max_bytes_per_peer = max(1, env_int("KVCACHE_PEER_MAX_NOTIFY_BYTES",
                                                 MAX_PEER_NOTIFY_BYTES))

    def add(self, peer_name, name, message):
        """Queue a notification; None, or why it was refused (full)."""
        size = len(message) + len(name)
        with self._lock:
            count, held = self._per_peer[peer_name], self._bytes[peer_name]
            if count >= self.max_per_peer or held + size > self.max_bytes_per_peer:
                return (f"{count} notifications ({held} bytes) from {peer_name} are not taken "
                        f"yet (at most {self.max_per_peer}, {self.max_bytes_per_peer} bytes)")
            total = sum(self._bytes.values())
            if len(self._items) >= MAX_QUEUED_NOTIFICATIONS or \
                    total + size > MAX_NOTIFY_QUEUE_BYTES:
                return (f"{len(self._items)} notifications ({total} bytes) are not taken yet "
                        f"(at most {MAX_QUEUED_NOTIFICATIONS}, {MAX_NOTIFY_QUEUE_BYTES} bytes)")
            self._items.append((peer_name, name, message))
            self._per_peer[peer_name] += 1
            self._bytes[peer_name] += size
        return None

    def take(self):
        with self._lock:
            items = list(self._items)
            self._items.clear()
            self._per_peer.clear()
            self._bytes.clear()
        return items
