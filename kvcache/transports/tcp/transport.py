"""TCP transport: one-sided WRITE/READ emulated by the remote engine over
TCP. The initiator sends one frame: the descriptor table (columns of
regions, addresses, lengths) and, for WRITE, the data gathered straight from
registered memory, all in writev. The target checks every piece against
its own live regions before touching memory (``target.DataTarget``), then
scatters the payload with readv (or gathers the READ reply). No Python loop
per block; the GIL is released in every system call.

Transfers go over data lanes (``lane``): a connection per calling thread,
the caller reading its own reply. To a peer that does not listen they go
over the link's control channel. A request carries at most
``MAX_DESCRIPTORS`` pieces: longer transfers are split here, so a target
never sees a request it must refuse for its size."""
import secrets
import threading

import numpy as np

from kvcache.status import LLMException, LLMStatusCode
from kvcache.transports.base import LinkData, Transport
from kvcache.transports.tcp.framing import StreamClosed, StreamTimeout, left_ms
from kvcache.transports.tcp.lane import Lane, LanePool
from kvcache.transports.tcp.protocol import MAX_DESCRIPTORS, MsgType, ProtocolError
from kvcache.transports.tcp.target import DataTarget
from pyverbs_kv.pieces import length_total


class TcpLink(LinkData):
    """A link's lanes: ours (initiator) and those the peer opened to us."""

    def __init__(self, lanes):
        self.lanes = lanes
        self.served = set()
        self.lock = threading.Lock()

    def close(self):
        if self.lanes is not None:
            self.lanes.close()
        with self.lock:
            served = list(self.served)
        for lane in served:
            lane.shutdown()             # its thread closes it


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

    def __init__(self):
        self._tokens = {}                   # one-time lane token -> peer
        self._lock = threading.Lock()

    def bind(self, ctx):
        super().bind(ctx)
        self.target = DataTarget(ctx.regions)
        ctx.serve("tcp.lane", self._rpc_lane, {})

    # --- links -------------------------------------------------------------------

    def attach_peer(self, peer, timeout_ms):
        try:
            peer.channel.sock.getpeername()
        except OSError as exc:                  # the link's connection just went
            raise StreamClosed(f"the link's connection is gone: {exc}") from None
        host = peer.channel.peer_address[0]
        grant = (lambda ms: self.engine.call(peer, "tcp.lane", {}, ms))
        return TcpLink(LanePool(peer.name, grant, host, self.engine.io_timeout_ms,
                                self.engine.tls))

    def detach_peer(self, peer):
        with self._lock:
            self._tokens = {t: p for t, p in self._tokens.items() if p is not peer}
        super().detach_peer(peer)

    # --- the target's side ---------------------------------------------------------

    def serve(self, channel, msg_type, req_id, header, payload_len):
        if msg_type not in (MsgType.WRITE, MsgType.READ):
            raise ProtocolError(f"unexpected {msg_type.name} on a linked channel")
        # What the queued reply holds until the peer reads it: the table,
        # and a READ's data (pinned, in flight).
        cost = payload_len + header["bytes"] if msg_type == MsgType.READ else 0
        channel.reserve(cost)
        reply, pieces, after = self.target.take(channel, msg_type, header, payload_len,
                                                channel.peer)
        channel.reply_later(req_id, lambda: (reply, pieces), after=after, reserved=cost)

    def _rpc_lane(self, peer, params):
        """Grant ``peer`` one data lane: a one-time token for our listener."""
        port = self.engine.listen_port()
        if not port:
            return {"port": 0}
        token = secrets.token_hex(16)
        with self._lock:
            self._tokens[token] = peer
        return {"port": port, "token": token}

    def accept(self, stream, msg_type, header):
        if msg_type != MsgType.LANE:
            raise ProtocolError(f"expected HELLO or LANE, got {msg_type.name}")
        with self._lock:
            peer = self._tokens.pop(header["token"], None)
        # The grant can come before the link's own set-up has finished.
        if peer is not None:
            peer.attached.wait(self.engine.io_timeout_ms / 1000)
        if peer is None or not peer.linked or peer.data is None:
            raise ProtocolError("a lane for no live link (unknown or used token)")
        lane = Lane(stream.sock, self.engine.io_timeout_ms)
        with peer.data.lock:
            peer.data.served.add(lane)
        try:
            self.target.serve_lane(lane, peer)
        finally:
            with peer.data.lock:
                peer.data.served.discard(lane)

    # --- the initiator's side --------------------------------------------------------

    def write(self, peer, local, remote, lengths, regions, deadline):
        self._request(MsgType.WRITE, peer, local, remote, lengths, regions, deadline)

    def read(self, peer, local, remote, lengths, regions, deadline):
        self._request(MsgType.READ, peer, local, remote, lengths, regions, deadline)

    def _request(self, msg_type, peer, local, remote, lengths, regions, deadline):
        for start in range(0, lengths.size, MAX_DESCRIPTORS):
            part = slice(start, start + MAX_DESCRIPTORS)
            self._one_request(msg_type, peer, local[part], remote[part], lengths[part],
                              regions[part], deadline)

    def _one_request(self, msg_type, peer, local, remote, lengths, regions, deadline):
        header = {"count": int(lengths.size), "bytes": length_total(lengths)[0]}
        columns = _columns(remote, lengths, regions)
        writing = msg_type == MsgType.WRITE
        try:
            lanes = peer.data.lanes
            lane = lanes.take(left_ms(deadline))
            if lane is None:
                reply = peer.channel.call(msg_type, header, timeout_ms=left_ms(deadline),
                                          prefix=columns,
                                          pieces=(local, lengths) if writing else None,
                                          reply_into=None if writing else (local, lengths))
            else:
                reply = self._over_lane(peer, lanes, lane, msg_type, header, columns, local,
                                        lengths, deadline)
        except StreamTimeout:
            peer.channel.close(f"no reply to {msg_type.name} before its deadline")
            raise LLMException(LLMStatusCode.LLM_TIMEOUT,
                               f"{msg_type.name} to {peer.name}: the deadline passed") from None
        _check_reply(reply, msg_type.name, peer)

    def _over_lane(self, peer, lanes, lane, msg_type, header, columns, local, lengths,
                   deadline):
        """One request and its reply on a lane we hold. A lane that fails
        or misses the deadline is closed, and so is the link: the peer is
        dead, stalled or lying, and a late reply must not land in memory
        the caller has taken back."""
        req_id = lane.next_id
        lane.next_id += 1
        try:
            lane.send_frame(msg_type, req_id, header, timeout_ms=left_ms(deadline),
                            prefix=columns,
                            pieces=(local, lengths) if msg_type == MsgType.WRITE else None)
            reply_type, reply_id, reply, payload_len = lane.recv_frame(left_ms(deadline))
            if reply_type != MsgType.REPLY or reply_id != req_id:
                raise ProtocolError(f"{reply_type.name} {reply_id} answering request {req_id}")
            if payload_len:
                if msg_type != MsgType.READ or payload_len != header["bytes"]:
                    raise ProtocolError(f"a {payload_len}-byte reply to {msg_type.name} of "
                                        f"{header['bytes']} bytes")
                lane.recv_payload(local, lengths, left_ms(deadline))
            elif msg_type == MsgType.READ and reply["status"] == LLMStatusCode.LLM_SUCCESS:
                raise ProtocolError("a READ answered without its data")
        except StreamTimeout:
            lanes.drop(lane)
            raise
        except (StreamClosed, ProtocolError) as exc:
            lanes.drop(lane)
            peer.channel.close(f"data lane failed: {exc}")
            raise StreamClosed(f"data lane: {exc}") from None
        lanes.give_back(lane)
        return reply
