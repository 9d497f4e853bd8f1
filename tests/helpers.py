"""Small helpers for tests that race transfers against frees: polling with a
deadline, a watchdog for the main thread, freezing a peer process for a
while, and filling / comparing cache memory."""
import contextlib
import mmap
import multiprocessing as mp
import os
import shutil
import signal
import tempfile
import threading
import time
import traceback

import numpy as np


def wait_until(predicate, timeout_s=5.0, what="condition", interval_s=0.0002):
    """Poll ``predicate`` until it is true and return its value; TimeoutError
    after ``timeout_s``. The short sleep releases the GIL, so the engine's
    threads in this process keep running while we poll. The one poll loop
    of the test suite."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(f"{what} not reached within {timeout_s} s")
        time.sleep(interval_s)


def end_process(process, conn, message=("close",)):
    """End a child driven over ``conn``: ask it with ``message``, give it
    10 s, then kill it."""
    if process.is_alive():
        try:
            conn.send(message)
        except OSError:
            pass
        process.join(10)
    if process.is_alive():
        process.kill()
    process.join(10)


@contextlib.contextmanager
def watchdog(seconds):
    """Raise TimeoutError in the main thread if the block runs longer than
    ``seconds`` (a call that never returns fails the test instead of hanging
    the run). Only for the main thread; nests by replacing the outer one."""
    def expired(signum, frame):
        raise TimeoutError(f"test still running after {seconds} s (watchdog)")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


class Freeze:
    """Stop a PeerProcess (SIGSTOP) and continue it (SIGCONT) later, now or
    from a timer; ``resume`` is idempotent, so teardown can always call it."""

    def __init__(self, peer):
        self.peer = peer
        self.frozen_at = None
        self.resumed_at = None
        self._timer = None
        self._lock = threading.Lock()

    def stop(self):
        self.peer.kill(signal.SIGSTOP)
        self.frozen_at = time.monotonic()
        self.resumed_at = None
        return self

    def resume_after(self, seconds):
        """Continue the process ``seconds`` after it was stopped."""
        delay = max(0.0, self.frozen_at + seconds - time.monotonic())
        self._timer = threading.Timer(delay, self.resume)
        self._timer.daemon = True
        self._timer.start()
        return self

    def resume(self):
        with self._lock:
            if self._timer is not None and self._timer is not threading.current_thread():
                self._timer.cancel()
            if self.frozen_at is not None and self.resumed_at is None:
                if self.peer.process.is_alive():
                    self.peer.kill(signal.SIGCONT)
                self.resumed_at = time.monotonic()

    @property
    def frozen_s(self):
        """How long the process was (or has been) stopped."""
        end = self.resumed_at if self.resumed_at is not None else time.monotonic()
        return end - self.frozen_at


class Throttle:
    """Make a process slow but alive: a thread lets it run ``run_s`` out of
    every ``run_s + stop_s`` (SIGCONT / SIGSTOP). It still answers control
    calls (within ``stop_s``), while a transfer it runs crawls. ``release``
    leaves it running at full speed."""

    def __init__(self, peer, run_s=0.0005, stop_s=0.05):
        self.peer, self.run_s, self.stop_s = peer, run_s, stop_s
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self):
        try:
            while not self._done.is_set():
                self.peer.kill(signal.SIGSTOP)
                if self._done.wait(self.stop_s):
                    break
                self.peer.kill(signal.SIGCONT)
                time.sleep(self.run_s)
        except ProcessLookupError:
            pass
        finally:
            if self.peer.process.is_alive():
                self.peer.kill(signal.SIGCONT)

    def release(self):
        self._done.set()
        if self._thread is not threading.current_thread():
            self._thread.join(5)

    def release_after(self, seconds):
        """Release from a timer ``seconds`` from now (whatever the test is
        blocked in by then)."""
        timer = threading.Timer(seconds, self.release)
        timer.daemon = True
        timer.start()
        return self


class RawReader:
    """A process with a bare TransferEngine (no cache manager) that reads
    from a peer into a buffer this process can watch (a shared file
    mapping, ``buffer``). Having no cache manager, it answers a cache
    owner's "forget this cache" call at once (unknown method) instead of
    waiting for its own reads: the owner gets to free the cache while the
    read still runs. ``kill`` and ``process`` as PeerProcess has them, for
    Freeze and Throttle."""

    def __init__(self, transport, address, nbytes, timeout_ms):
        shm = "/dev/shm"
        directory = shm if os.path.isdir(shm) and shutil.disk_usage(shm).free > 4 * nbytes \
            else None
        fd, self.path = tempfile.mkstemp(prefix="kv-raw-reader-", dir=directory)
        try:
            os.ftruncate(fd, nbytes)
            self._map = mmap.mmap(fd, nbytes)
        finally:
            os.close(fd)
        self.buffer = np.frombuffer(self._map, dtype=np.uint8)
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_raw_reader_main,
                                   args=(child, transport, address, self.path, nbytes,
                                         timeout_ms), daemon=True)
        self.process.start()
        self.result(30)

    def read(self, remote_addrs, local_offsets, lengths):
        """Start reading piece i (lengths[i] bytes at remote_addrs[i]) into
        ``buffer[local_offsets[i]:]``; result() says how it ended."""
        self.conn.send(("read", np.asarray(remote_addrs, dtype=np.uint64),
                        np.asarray(local_offsets, dtype=np.uint64),
                        np.asarray(lengths, dtype=np.uint64)))

    def result(self, timeout):
        """None when the read succeeded, else its LLMStatusCode value."""
        if not self.conn.poll(timeout):
            raise TimeoutError(f"the raw reader did not answer in {timeout} s")
        kind, code, message = self.conn.recv()
        if kind == "crash":
            raise RuntimeError(f"raw reader failed:\n{message}")
        return code

    def kill(self, sig=signal.SIGKILL):
        os.kill(self.process.pid, sig)

    def close(self):
        if self.process.is_alive():
            os.kill(self.process.pid, signal.SIGCONT)      # a frozen one must hear "close"
        end_process(self.process, self.conn)
        self.buffer = None
        try:
            self._map.close()
        except BufferError:        # a view is still alive somewhere; the file goes anyway
            pass
        os.unlink(self.path)


def _raw_reader_main(conn, transport, address, path, nbytes, timeout_ms):
    from kvcache import LLMException, TransferEngine
    try:
        with open(path, "r+b") as f:
            mapping = mmap.mmap(f.fileno(), nbytes)
        base = np.frombuffer(mapping, dtype=np.uint8).ctypes.data
        engine = TransferEngine("raw-reader", listen="", transport=transport,
                                timeout_ms=timeout_ms)
        engine.register_memory(base, nbytes)
        peer = engine.connect(address)
    except BaseException:
        conn.send(("crash", None, traceback.format_exc()))
        return
    conn.send(("ok", None, ""))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            break
        if message[0] == "close":
            break
        _, remote, offsets, lengths = message
        try:
            engine.transfer_sync(peer, "read", np.uint64(base) + offsets, remote, lengths,
                                 timeout_ms=timeout_ms)
            conn.send(("ok", None, ""))
        except LLMException as exc:
            conn.send(("err", int(exc.status_code), str(exc)))
        except BaseException:
            conn.send(("crash", None, traceback.format_exc()))
    engine.close()


class Outcome:
    """The result of ``fn(*args)`` run on a thread: ``code`` is None for
    success, the LLMException's status code otherwise."""

    def __init__(self, fn, *args, **kwargs):
        self.code = None
        self.error = None
        self.ended_at = None
        self._thread = threading.Thread(target=self._run, args=(fn, args, kwargs), daemon=True)
        self._thread.start()

    def _run(self, fn, args, kwargs):
        try:
            fn(*args, **kwargs)
        except BaseException as exc:     # noqa: BLE001 - reported to the test
            self.error = exc
            self.code = getattr(exc, "status_code", "no status code")
        finally:
            self.ended_at = time.monotonic()

    def done(self):
        return not self._thread.is_alive()

    def join(self, timeout_s):
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise TimeoutError(f"the transfer thread still runs after {timeout_s} s")
        return self


def as_bytes(array):
    """A flat uint8 view of a numpy array (a cache tensor)."""
    return array.view(np.uint8).reshape(-1)


def block_view(cache, tensor, block):
    """uint8 view of one block (row) of one tensor of a local cache."""
    t = cache.numpy(tensor)
    return t.view(np.uint8).reshape(t.shape[0], -1)[block]


def fill_cache(cache, value):
    """Set every byte of a local cache to ``value``, last tensor first, each
    from its first block up. Transfers move tensor after tensor; with the
    destination blocks reversed, the block a running transfer writes last
    (the last tensor's block 0) is the first refilled, so a transfer still
    running when the refill starts is caught however fast it is."""
    for tensor in reversed(cache.tensors()):
        as_bytes(tensor)[:] = value


def bytes_not_equal(cache, value):
    """How many bytes of the cache differ from ``value``."""
    return sum(int(np.count_nonzero(as_bytes(t) != value)) for t in cache.tensors())
