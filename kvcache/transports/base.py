"""The transport interface (after Mooncake's Transport): the engine hands a
transport checked, merged descriptor arrays; the transport moves the bytes.

Every transport has the engine's control channel to the peer for its own
set-up messages, and is told of every memory region the engine registers so
it can prepare it once (an RDMA MR, a shared mapping)."""
from abc import ABC, abstractmethod


class Transport(ABC):
    name = "abstract"

    def register_region(self, region_id, addr, length, share=None):
        """A region was registered with the engine (default: nothing to do).
        ``share`` is (fd, offset) when the memory can be mapped by another
        process on this host (the buffer pool's memfd)."""

    def unregister_region(self, region_id):
        """A region was unregistered."""

    def attach_peer(self, peer, timeout_ms):
        """The link to ``peer`` is up: set up the data path (default: none)."""

    def detach_peer(self, peer):
        """The link to ``peer`` is going away."""

    @abstractmethod
    def write(self, peer, local, remote, lengths, regions, timeout_ms):
        """Copy local[i] -> remote[i] for every i; ``regions`` are the remote
        region ids the remote pieces lie in. Raises LLMException."""

    @abstractmethod
    def read(self, peer, local, remote, lengths, regions, timeout_ms):
        """Copy remote[i] -> local[i] for every i."""

    def close(self):
        """Release what the transport holds."""
