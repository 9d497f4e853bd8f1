"""The state of a link to one peer, with only legal transitions.

    IDLE -> CONNECTING -> LINKED -> UNLINKING -> IDLE
    any state -> FAILED (peer died, timed out, lied); FAILED -> CONNECTING
    (re-link) or IDLE (unlink).

Transfers hold the link while they run: unlinking a link with transfers in
flight is LLM_LINK_BUSY unless forced."""
import threading
from enum import Enum

from kvcache.status import LLMException, LLMStatusCode


class LinkState(Enum):
    IDLE = "idle"
    CONNECTING = "connecting"
    LINKED = "linked"
    UNLINKING = "unlinking"
    FAILED = "failed"


_LEGAL = {
    LinkState.IDLE: {LinkState.CONNECTING},
    LinkState.CONNECTING: {LinkState.LINKED, LinkState.FAILED, LinkState.IDLE},
    LinkState.LINKED: {LinkState.UNLINKING, LinkState.FAILED},
    LinkState.UNLINKING: {LinkState.IDLE, LinkState.FAILED},
    LinkState.FAILED: {LinkState.CONNECTING, LinkState.IDLE, LinkState.FAILED},
}


class Link:
    def __init__(self, name):
        self.name = name
        self.state = LinkState.IDLE
        self.reason = ""
        self.in_flight = 0
        self._cond = threading.Condition()

    def transition(self, new_state, reason=""):
        with self._cond:
            if new_state not in _LEGAL[self.state]:
                raise LLMException(LLMStatusCode.LLM_FAILED,
                                   f"link {self.name}: illegal transition {self.state.name} -> "
                                   f"{new_state.name}")
            self.state = new_state
            if reason or new_state != LinkState.FAILED:
                self.reason = reason
            self._cond.notify_all()

    def fail(self, reason):
        """Move to FAILED from wherever the link is (idempotent)."""
        with self._cond:
            if self.state == LinkState.IDLE:
                return
            self.state = LinkState.FAILED
            self.reason = reason
            self._cond.notify_all()

    def require_linked(self):
        """LLM_LINK_FAILED / LLM_NOT_YET_LINK unless the link is LINKED."""
        with self._cond:
            self._require_linked()

    def _require_linked(self):
        if self.state != LinkState.LINKED:
            code = (LLMStatusCode.LLM_LINK_FAILED if self.state == LinkState.FAILED
                    else LLMStatusCode.LLM_NOT_YET_LINK)
            detail = f": {self.reason}" if self.reason else ""
            raise LLMException(code, f"link {self.name} is {self.state.name}{detail}")

    def begin_transfer(self):
        with self._cond:
            self._require_linked()
            self.in_flight += 1

    def end_transfer(self):
        with self._cond:
            self.in_flight -= 1
            self._cond.notify_all()

    def wait_leaves(self, state, timeout_s):
        """Wait until the link is no longer in ``state``; False at the deadline."""
        with self._cond:
            return self._cond.wait_for(lambda: self.state != state, timeout_s)

    def begin_unlink(self, force=False):
        """LINKED -> UNLINKING; FAILED passes straight through. Returns True
        when the peer should be told (the link was healthy)."""
        with self._cond:
            if self.state == LinkState.FAILED:
                return False
            if self.state != LinkState.LINKED:
                raise LLMException(LLMStatusCode.LLM_PROCESSING_LINK if
                                   self.state == LinkState.CONNECTING else
                                   LLMStatusCode.LLM_NOT_YET_LINK,
                                   f"link {self.name} is {self.state.name}")
            if self.in_flight and not force:
                raise LLMException(LLMStatusCode.LLM_LINK_BUSY,
                                   f"link {self.name} has {self.in_flight} transfers in flight")
            self.state = LinkState.UNLINKING
            self._cond.notify_all()
            return True
