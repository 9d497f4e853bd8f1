"""TCP transport: one-sided WRITE/READ emulated by the remote engine over
TCP. The initiator sends one frame: the descriptor table (columns of
regions, addresses, lengths) and, for WRITE, the data gathered straight from
registered memory, all in writev. The target checks every piece against its
own live regions before touching memory, then scatters the payload with
readv (or gathers the READ reply). No Python loop per block; the GIL is
released in every system call.

Transfers go over data lanes (kvcache.lane): a connection per calling
thread, the caller reading its own reply. To a peer that does not listen
they go over the link's control channel."""
import time

import numpy as np

from kvcache.channel import ChannelClosed
from kvcache.lane import LanePool, LaneTimeout
from kvcache.protocol import MsgType, ProtocolError
from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.base import Transport
from pyverbs_kv.pieces import length_total


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

    def bind(self, engine):
        self.engine = engine

    def detach_peer(self, peer):
        lanes = peer.attachments.pop("tcp.lanes", None)
        if lanes is not None:
            lanes.close()

    def write(self, peer, local, remote, lengths, regions, timeout_ms):
        self._request(MsgType.WRITE, peer, local, remote, lengths, regions, timeout_ms)

    def read(self, peer, local, remote, lengths, regions, timeout_ms):
        self._request(MsgType.READ, peer, local, remote, lengths, regions, timeout_ms)

    def _request(self, msg_type, peer, local, remote, lengths, regions, timeout_ms):
        header = {"count": int(lengths.size), "bytes": length_total(lengths)[0]}
        columns = _columns(remote, lengths, regions)
        writing = msg_type == MsgType.WRITE
        lanes = peer.attachments.get("tcp.lanes")
        if lanes is None:
            lanes = peer.attachments.setdefault("tcp.lanes", LanePool(self.engine, peer))
        lane = lanes.take(timeout_ms)
        if lane is None:
            reply = peer.channel.call(msg_type, header, timeout_ms=timeout_ms, prefix=columns,
                                      pieces=(local, lengths) if writing else None,
                                      reply_into=None if writing else (local, lengths))
        else:
            reply = self._over_lane(lanes, lane, msg_type, header, columns, local, lengths,
                                    timeout_ms)
        _check_reply(reply, msg_type.name, peer)

    def _over_lane(self, lanes, lane, msg_type, header, columns, local, lengths, timeout_ms):
        """One request and its reply on a lane we hold. A lane that fails
        or misses the deadline is closed, and so is the link: the peer is
        dead, stalled or lying, and a late reply must not land in memory
        the caller has taken back."""
        deadline = time.monotonic() + timeout_ms / 1000
        req_id = lane.next_id
        lane.next_id += 1
        try:
            lane.send(msg_type, req_id, header, timeout_ms=timeout_ms, prefix=columns,
                      pieces=(local, lengths) if msg_type == MsgType.WRITE else None)
            reply_type, reply_id, reply, payload_len = lane.recv_frame(_left_ms(deadline))
            if reply_type != MsgType.REPLY or reply_id != req_id:
                raise ProtocolError(f"{reply_type.name} {reply_id} answering request {req_id}")
            if payload_len:
                if msg_type != MsgType.READ or payload_len != header["bytes"]:
                    raise ProtocolError(f"a {payload_len}-byte reply to {msg_type.name} of "
                                        f"{header['bytes']} bytes")
                lane.recv_payload(local, lengths, _left_ms(deadline))
            elif msg_type == MsgType.READ and reply["status"] == LLMStatusCode.LLM_SUCCESS:
                raise ProtocolError("a READ answered without its data")
        except LaneTimeout:
            lanes.drop(lane)
            lanes.peer.channel.close(f"no reply to {msg_type.name} within {timeout_ms} ms")
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"{msg_type.name} to {lanes.peer.name}: no reply within "
                               f"{timeout_ms} ms") from None
        except (ChannelClosed, ProtocolError) as exc:
            lanes.drop(lane)
            lanes.peer.channel.close(f"data lane failed: {exc}")
            raise ChannelClosed(f"data lane: {exc}") from None
        lanes.give_back(lane)
        return reply


def _left_ms(deadline):
    return max(1, int((deadline - time.monotonic()) * 1000))
