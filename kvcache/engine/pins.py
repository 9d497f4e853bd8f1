"""Pin counts per region id, under a lock their owner shares with the
state the pins guard (a region table), so checking a region and pinning it
is one step."""
import threading


class Pins:
    def __init__(self, lock):
        self.lock = lock
        self.released = threading.Condition(lock)
        self._counts = {}
        self._waiting = 0

    def add(self, ids):
        """Pin ``ids`` (the caller holds ``lock``)."""
        for i in ids:
            self._counts[i] = self._counts.get(i, 0) + 1

    def remove(self, ids):
        """Unpin ``ids`` (takes ``lock``) and wake whoever waits for them."""
        with self.lock:
            for i in ids:
                left = self._counts[i] - 1
                if left:
                    self._counts[i] = left
                else:
                    del self._counts[i]
            if self._waiting:
                self.released.notify_all()

    def wait_clear(self, ids, timeout_s):
        """Wait (the caller holds ``lock``) until none of ``ids`` is pinned;
        False at the deadline."""
        self._waiting += 1
        try:
            return self.released.wait_for(lambda: not any(self._counts.get(i) for i in ids),
                                          max(0.0, timeout_s))
        finally:
            self._waiting -= 1

    def count(self, ids):
        return sum(self._counts.get(i, 0) for i in ids)

    def snapshot(self):
        with self.lock:
            return dict(self._counts)
