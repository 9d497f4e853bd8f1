"""TCP transport: one-sided WRITE/READ emulated by the remote engine's
reader thread over the link's connection. The initiator sends one frame:
the descriptor table (region, address, length per piece) and, for WRITE,
the data gathered straight from registered memory with writev. The target
checks every piece against its own live regions before touching memory,
then scatters the payload with readv (or gathers the READ reply). No Python
loop per block; the GIL is released in every system call."""
import numpy as np

from kvcache.protocol import DESC_DTYPE, MsgType
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.base import Transport


def _table(remote, lengths, regions):
    table = np.empty(remote.size, dtype=DESC_DTYPE)
    table["region"] = regions
    table["addr"] = remote
    table["length"] = lengths
    return table


def _check_reply(header, what, peer):
    if header["status"] != LLMStatusCode.LLM_SUCCESS:
        raise LLMException(header["status"], f"{what} on {peer.name} refused: "
                                             f"{header['message']}")


class TcpTransport(Transport):
    name = "tcp"

    def write(self, peer, local, remote, lengths, regions, timeout_ms):
        table = _table(remote, lengths, regions)
        addrs = np.concatenate(([table.ctypes.data], local))
        sizes = np.concatenate(([table.nbytes], lengths))
        header = peer.channel.call(MsgType.WRITE, {"count": int(table.size),
                                                   "bytes": int(lengths.sum())},
                                   pieces=(addrs, sizes), timeout_ms=timeout_ms)
        _check_reply(header, "WRITE", peer)

    def read(self, peer, local, remote, lengths, regions, timeout_ms):
        table = _table(remote, lengths, regions)
        header = peer.channel.call(MsgType.READ, {"count": int(table.size),
                                                  "bytes": int(lengths.sum())},
                                   pieces=([table.ctypes.data], [table.nbytes]),
                                   reply_into=(local, lengths), timeout_ms=timeout_ms)
        _check_reply(header, "READ", peer)
