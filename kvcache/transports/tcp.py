"""TCP transport: one-sided WRITE/READ emulated by the remote engine's
reader thread over the link's connection. The initiator sends one frame:
the descriptor table (columns of regions, addresses, lengths) and, for
WRITE, the data gathered straight from registered memory, all in writev. The target
checks every piece against its own live regions before touching memory,
then scatters the payload with readv (or gathers the READ reply). No Python
loop per block; the GIL is released in every system call."""
import numpy as np

from kvcache.protocol import MsgType
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.base import Transport


def _columns(remote, lengths, regions):
    """The descriptor table as its three wire columns (no copy when the
    arrays already are contiguous uint64)."""
    return tuple(np.ascontiguousarray(a, dtype="<u8") for a in (regions, remote, lengths))


def _check_reply(header, what, peer):
    if header["status"] != LLMStatusCode.LLM_SUCCESS:
        raise LLMException(header["status"], f"{what} on {peer.name} refused: "
                                             f"{header['message']}")


class TcpTransport(Transport):
    name = "tcp"

    def write(self, peer, local, remote, lengths, regions, timeout_ms):
        header = peer.channel.call(MsgType.WRITE, {"count": int(lengths.size),
                                                   "bytes": int(lengths.sum())},
                                   pieces=(local, lengths), timeout_ms=timeout_ms,
                                   prefix=_columns(remote, lengths, regions))
        _check_reply(header, "WRITE", peer)

    def read(self, peer, local, remote, lengths, regions, timeout_ms):
        header = peer.channel.call(MsgType.READ, {"count": int(lengths.size),
                                                  "bytes": int(lengths.sum())},
                                   reply_into=(local, lengths), timeout_ms=timeout_ms,
                                   prefix=_columns(remote, lengths, regions))
        _check_reply(header, "READ", peer)
