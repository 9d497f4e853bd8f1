"""The receiving side of layer-wise transfers: which layers of which
transfer have landed here, as the sender announced them.

The sender announces a layer with a control call (``cache.layers``) on the
link's channel once its write of that layer completed: on TCP the target
answered the write after placing the bytes, on shared memory the copy
returned, on RDMA the write's completion came back. The announcement is
therefore never ahead of the data, and nothing here polls cache memory.
This is our extension: llm_datadist tells the receiver nothing."""
import collections
import threading
import time

from kvcache import checks
from kvcache.engine.link import LinkState
from kvcache.engine.rpc import is_int
from kvcache.status import LLMException, LLMStatusCode

NOTIFY_METHOD = "cache.layers"
MAX_ID_CHARS = 256
MAX_KEPT = 4096                # transfers remembered at once; the oldest go first
MAX_PER_PEER = 1024            # unfinished transfers one sender may have announced
MAX_LAYERS = 4096              # layer notices one transfer may send
LINK_CHECK_S = 0.1             # how often a waiter looks at the sender's link


def checked_transfer_id(value):
    """A transfer id: an int in 0..2**64-1 or a string of 1..256 characters."""
    if isinstance(value, str):
        if not 0 < len(value) <= MAX_ID_CHARS:
            raise checks.invalid(f"transfer_id must be 1..{MAX_ID_CHARS} characters, "
                                 f"got {len(value)}")
        return value
    return checks.integer(value, "transfer_id", 0, (1 << 64) - 1)


def _is_id(value):
    return (isinstance(value, str) and 0 < len(value) <= MAX_ID_CHARS) or \
        (is_int(value) and 0 <= value < 1 << 64)


SCHEMA = {"transfer_id": _is_id, "layer": lambda v: is_int(v) and v >= -1,
          "final": lambda v: isinstance(v, bool), "status": is_int,
          "message": lambda v: isinstance(v, str) and len(v) <= 4096}


class LayerArrivals:
    """What arrived of one transfer: ``layers`` (destination layer indices,
    in arrival order), ``arrived_at`` (time.monotonic() of each, seconds),
    ``final`` (the sender announced its last layer, or its failure),
    ``status`` (LLMStatusCode: LLM_SUCCESS unless the sender failed),
    ``src_cluster_id``."""

    def __init__(self, transfer_id, peer):
        self.transfer_id = transfer_id
        self.src_cluster_id = peer.cluster_id
        self.layers = []
        self.arrived_at = []
        self.final = False
        self.status = LLMStatusCode.LLM_SUCCESS
        self.message = ""
        self._peer = peer

    def _copy(self):
        copy = LayerArrivals(self.transfer_id, self._peer)
        copy.layers, copy.arrived_at = list(self.layers), list(self.arrived_at)
        copy.final, copy.status, copy.message = self.final, self.status, self.message
        return copy

    def __repr__(self):
        return (f"LayerArrivals({self.transfer_id!r}, layers={self.layers}, "
                f"final={self.final}, status={self.status.name})")


class LayerNotifications:
    """Announcements received, by transfer id (at most MAX_KEPT transfers
    are remembered; a transfer waited for as a whole is forgotten)."""

    def __init__(self):
        self._items = collections.OrderedDict()
        self._cond = threading.Condition()

    def serve(self, peer, params):
        """The ``cache.layers`` handler (the link's responder thread). A
        transfer id belongs to the peer that announced it first until its
        final notice: another sender's notice for it is refused, so no peer
        can announce layers of a transfer it does not make. More than
        MAX_LAYERS notices of one transfer, or more than MAX_PER_PEER
        unfinished transfers of one sender, are refused too."""
        now = time.monotonic()
        with self._cond:
            key = params["transfer_id"]
            item = self._items.get(key)
            if item is not None and not item.final and item._peer is not peer:
                raise LLMException(LLMStatusCode.LLM_PARAM_INVALID,
                                   f"transfer {key!r} is being announced by cluster "
                                   f"{item.src_cluster_id}, not by this link")
            if item is None or item.final:      # an id used again starts afresh
                unfinished = sum(1 for other in self._items.values()
                                 if other._peer is peer and not other.final)
                if unfinished >= MAX_PER_PEER:
                    raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                                       f"{unfinished} transfers of this sender are unfinished "
                                       f"(at most {MAX_PER_PEER})")
                item = self._items[key] = LayerArrivals(key, peer)
                self._items.move_to_end(key)
                while len(self._items) > MAX_KEPT:
                    self._items.popitem(last=False)
            layer = params["layer"]
            if layer >= 0:
                # A layer may come twice (two configs of one task naming the
                # same source layer), but never without bound.
                if len(item.layers) >= MAX_LAYERS:
                    raise LLMException(LLMStatusCode.LLM_OUT_OF_MEMORY,
                                       f"transfer {key!r}: more than {MAX_LAYERS} layer "
                                       "notices")
                item.layers.append(layer)
                item.arrived_at.append(now)
            if params["final"]:
                item.final = True
                item.status = _status(params["status"])
                item.message = params["message"]
            self._cond.notify_all()
        return {}

    def wait(self, transfer_id, layer_index=None, timeout_ms=1000):
        """Block until destination layer ``layer_index`` of the transfer has
        arrived (None: until the transfer's last layer has, which also
        forgets the transfer). Returns a LayerArrivals snapshot. Raises
        LLM_TIMEOUT at the deadline; the sender's status when it reported
        the transfer failed; LLM_LINK_FAILED when the sender's link ended
        before the transfer did."""
        deadline = time.monotonic() + timeout_ms / 1000
        with self._cond:
            while True:
                item = self._items.get(transfer_id)
                if item is not None:
                    if item.final and item.status != LLMStatusCode.LLM_SUCCESS:
                        raise LLMException(item.status, f"transfer {transfer_id!r} failed at "
                                                        f"the sender: {item.message}")
                    if layer_index is None and item.final:
                        del self._items[transfer_id]
                        return item._copy()
                    if layer_index is not None and layer_index in item.layers:
                        return item._copy()
                    if not item.final and item._peer.state != LinkState.LINKED:
                        raise LLMException(LLMStatusCode.LLM_LINK_FAILED,
                                           f"the link to cluster {item.src_cluster_id} ended "
                                           f"before transfer {transfer_id!r} did")
                left = deadline - time.monotonic()
                if left <= 0:
                    what = "its last layer" if layer_index is None else f"layer {layer_index}"
                    raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                                       f"transfer {transfer_id!r}: {what} not arrived within "
                                       f"{timeout_ms} ms")
                self._cond.wait(min(left, LINK_CHECK_S))


def _status(code):
    try:
        return LLMStatusCode(code)
    except ValueError:
        return LLMStatusCode.LLM_FAILED
