"""The transport contract (after Mooncake's Transport): the engine hands a
transport checked, merged descriptor arrays whose regions it has pinned on
our side; the transport moves the bytes before a deadline.

Threads: ``write``/``read`` run in many user threads at once, also on one
link; ``serve`` runs in a link's channel reader thread; ``accept`` in a
listener connection thread; region calls in whichever thread registers or
releases memory; ``attach_peer``/``detach_peer`` once per link, in the
thread that links or in the thread that noticed the link end."""
from abc import ABC, abstractmethod

from kvcache.transports.tcp.protocol import ProtocolError

# Addressable regions live at once at most; a region's id modulo SLOTS is
# its slot in the shared-memory transport's pin board, so the registry never
# gives two live regions the same slot.
SLOTS = 1 << 14


class LinkData:
    """What a transport keeps per link (``peer.data``); closed when the link
    ends. Transports subclass it."""

    def close(self):
        """Release what the link holds (default: nothing)."""


class Transport(ABC):
    name = "abstract"
    # Whether the side that owns the memory checks every piece itself right
    # before the bytes move (TCP). Where it does not, the initiator checks
    # each piece against its copy of the owner's table first.
    owner_checks = True
    # One-sided transports (RDMA) move bytes into peer memory without the
    # peer's CPU: releasing memory needs every peer to drop it first.
    one_sided = False
    # Whether peers map our memory (shared memory): the buffer pool then
    # gives each cache a memfd of its own, so a peer maps only what it may reach.
    maps_peer_memory = False

    def bind(self, ctx):
        """Called once by the engine before anything else. ``ctx`` (kept as
        ``self.engine``) gives the engine's name, io_timeout_ms, regions (the
        RegionRegistry), call(peer, method, params, timeout_ms), serve(method,
        handler, schema) for the transport's own control calls, and
        listen_port()."""
        self.engine = ctx

    def register_region(self, region_id, addr, length, share=None):
        """A top-level region was registered (an RDMA MR, a shareable
        mapping). ``share`` is (fd, offset) of a memfd holding the memory."""

    def unregister_region(self, region_id):
        """A top-level region was released (after every pin on it ended)."""

    def publish_region(self, region_id):
        """An addressable region became reachable by peers."""

    def retire_region(self, region_id):
        """An offered region (any generation) is released for good: every
        peer dropped it and no transfer uses it."""

    def withdraw_region(self, region_id, deadline):
        """Stop peers reaching a region; True once nothing of ours reaches it
        any more, False if that did not happen by ``deadline``
        (time.monotonic())."""
        return True

    def attach_peer(self, peer, timeout_ms):
        """The link to ``peer`` is up: set up the data path. Returns the
        link's LinkData."""
        return LinkData()

    def detach_peer(self, peer):
        """The link to ``peer`` ended: release its data path."""
        if peer.data is not None:
            peer.data.close()

    def serve(self, channel, msg_type, req_id, header, payload_len):
        """A data request (WRITE/READ) from ``channel.peer`` on the control
        channel. Transports without one raise ProtocolError."""
        raise ProtocolError(f"{msg_type.name} on a {self.name} link")

    def accept(self, stream, msg_type, header):
        """A connection on the listener whose first frame is not a HELLO
        (a data lane). Owns ``stream`` from here on."""
        raise ProtocolError(f"{msg_type.name} is not a first frame")

    def cut(self, peer):
        """Make sure nothing of ``peer``'s reaches our memory any more (it did
        not confirm dropping a region). Default: fail the link."""
        peer.channel.close("did not confirm a released region")

    @abstractmethod
    def write(self, peer, local, remote, lengths, regions, deadline):
        """Copy local[i] -> remote[i] for every i (uint64 arrays); ``regions``
        are the remote region ids the pieces lie in. Raises LLMException
        (LLM_TIMEOUT at ``deadline``, time.monotonic()) or StreamClosed."""

    @abstractmethod
    def read(self, peer, local, remote, lengths, regions, deadline):
        """Copy remote[i] -> local[i] for every i."""

    def close(self):
        """Release what the transport holds (its threads joined)."""
