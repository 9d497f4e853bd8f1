"""The target's side of TCP transfers: a WRITE or READ arriving on a
control channel or a data lane is checked, piece by piece, against the live
regions it names (``RegionRegistry.pin_named``) before a byte moves; the
regions stay pinned until the bytes have moved, so the owner cannot release
them underneath."""
import logging

from kvcache.status import LLMException
from kvcache.transports.tcp.framing import StreamClosed
from kvcache.transports.tcp.protocol import (DESC_BYTES, MsgType, ProtocolError,
                                             check_descriptor_payload, descriptor_columns)
from pyverbs_kv.pieces import length_total

log = logging.getLogger(__name__)

IDLE_POLL_MS = 500          # how often an idle lane server checks its link
_OK = {"status": 0, "message": ""}


TABLE_CHUNK = 1 << 20


def _recv_table(stream, count):
    """A descriptor table, read in chunks of at most 1 MiB: memory follows the
    bytes that arrive, not what a peer announces."""
    size = count * DESC_BYTES
    if size <= TABLE_CHUNK:
        return stream.recv_bytes(size)
    table = bytearray()
    while len(table) < size:
        table += stream.recv_bytes(min(TABLE_CHUNK, size - len(table)))
    return table


class DataTarget:
    """Serves WRITE/READ requests against ``regions`` (the engine's
    RegionRegistry). Called from many threads at once (a channel reader,
    lane threads)."""

    def __init__(self, regions):
        self.regions = regions

    def take(self, stream, msg_type, header, payload_len, peer):
        """Read one request of ``peer`` (its descriptor table, and a WRITE's
        data) from ``stream``. Returns (reply header, pieces to send back or None, what
        to run once the reply is sent or None)."""
        writing = msg_type == MsgType.WRITE
        count, total = check_descriptor_payload(header, payload_len, writing)
        named, addrs, lengths = descriptor_columns(_recv_table(stream, count), count)
        if length_total(lengths)[0] != total:
            raise ProtocolError("descriptor lengths do not add up to the announced bytes")
        try:
            ids = self.regions.pin_named(named, addrs, lengths, peer)
        except LLMException as exc:
            if writing:
                stream.discard(total)
            return {"status": int(exc.status_code), "message": str(exc)}, None, None
        if writing:
            try:
                stream.recv_payload(addrs, lengths)
            finally:
                self.regions.unpin(ids)
            return _OK, None, None
        return _OK, (addrs, lengths), lambda: self.regions.unpin(ids)

    def serve_lane(self, lane, peer):
        """Serve a data lane of ``peer`` in this thread while its link is up
        and the lane works; a lane strictly alternates request and reply, so the
        reply goes out from here."""
        try:
            lane.send_frame(MsgType.REPLY, 0, _OK)
            while peer.linked:
                if not lane.wait_readable(IDLE_POLL_MS):
                    continue
                msg_type, req_id, header, payload_len = lane.recv_frame()
                if msg_type not in (MsgType.WRITE, MsgType.READ):
                    raise ProtocolError(f"{msg_type.name} on a data lane")
                reply, pieces, after = self.take(lane, msg_type, header, payload_len, peer)
                try:
                    lane.send_frame(MsgType.REPLY, req_id, reply, pieces)
                finally:
                    if after is not None:
                        after()
        except (StreamClosed, ProtocolError) as exc:
            log.debug("data lane ended: %s", exc)
        finally:
            lane.close()
