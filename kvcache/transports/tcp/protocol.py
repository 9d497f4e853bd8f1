"""The wire protocol between engines over TCP: versioned,
length-prefixed frames with a JSON header validated against a schema per
message type, and a binary payload (descriptor tables, data). Never pickle.

Frame: magic "KVC1", version u16, type u16, request id u64, header length
u32, payload length u64 (network order), then the header, then the payload.
"""
import json
import struct
from enum import IntEnum

import numpy as np

MAGIC = b"KVC1"
VERSION = 5
FRAME = struct.Struct("!4sHHQIQ")
MAX_HEADER_BYTES = 1 << 20
MAX_PAYLOAD_BYTES = 1 << 40
MAX_DESCRIPTORS = 1 << 22
MAX_REGIONS = 1 << 16
MAX_NOTIFY_BYTES = 4 << 20          # a notification's message, carried as payload
ADDRESS_SPACE = 1 << 64

# Descriptors as sent to the target, in three little-endian uint64 columns
# (which region, where, how long): each column is sent straight from, and
# read straight into, a contiguous array.
DESC_COLUMNS = 3
DESC_BYTES = DESC_COLUMNS * 8


def descriptor_columns(raw, count):
    """(regions, addrs, lengths) views of a received descriptor table."""
    columns = np.frombuffer(raw, dtype="<u8").reshape(DESC_COLUMNS, count)
    return columns[0], columns[1], columns[2]


class ProtocolError(Exception):
    """The peer sent something that is not this protocol; the connection is
    dropped."""


class MsgType(IntEnum):
    HELLO = 1          # initiator -> listener: who I am, my regions
    HELLO_ACK = 2      # listener -> initiator: accepted (or why not), its regions
    READY = 3          # initiator -> listener: ready-ACK, the link may carry data
    LANE = 4           # first frame of a data lane: {"token"} granted by "engine.lane"
    WRITE = 10         # payload: descriptor table, then the data
    READ = 11          # payload: descriptor table; the reply carries the data
    REPLY = 12         # the answer to a request with the same id
    CALL = 20          # a control RPC: {"method", "params"}
    NOTIFY = 21        # {"name"}; payload: the message bytes (at most MAX_NOTIFY_BYTES)
    BYE = 30           # orderly unlink


def _regions(value):
    """A region table: [[id, addr, length], ...], each region non-empty and
    ending below 2**64, none overlapping another."""
    if not isinstance(value, list) or len(value) > MAX_REGIONS:
        return False
    if not all(isinstance(r, list) and len(r) == 3 and all(_is_int(v) for v in r)
               and 0 < r[0] < ADDRESS_SPACE and 0 < r[1] and 0 < r[2]
               and r[1] + r[2] < ADDRESS_SPACE for r in value):
        return False
    spans = sorted((r[1], r[1] + r[2]) for r in value)
    return all(spans[i][1] <= spans[i + 1][0] for i in range(len(spans) - 1))


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


_INT, _STR = _is_int, (lambda v: isinstance(v, str) and len(v) <= 4096)
_HEX = (lambda v: isinstance(v, str) and len(v) <= 128
        and all(c in "0123456789abcdef" for c in v))
_LIST_STR = (lambda v: isinstance(v, list) and len(v) <= 16 and all(_STR(x) for x in v))
_DICT = (lambda v: isinstance(v, dict))

SCHEMAS = {
    MsgType.HELLO: {"name": _STR, "cluster_id": _INT, "role": _STR, "regions": _regions,
                    "transports": _LIST_STR, "listen": _STR},
    MsgType.HELLO_ACK: {"status": _INT, "message": _STR, "name": _STR, "cluster_id": _INT,
                        "role": _STR, "regions": _regions, "transport": _STR},
    MsgType.READY: {},
    MsgType.LANE: {"token": _STR},
    MsgType.WRITE: {"count": _INT, "bytes": _INT},
    MsgType.READ: {"count": _INT, "bytes": _INT},
    MsgType.REPLY: {"status": _INT, "message": _STR},
    MsgType.CALL: {"method": _STR, "params": _DICT},
    MsgType.NOTIFY: {"name": _STR},
    MsgType.BYE: {},
}


# Fields a header may carry; checked when present. The handshake's
# challenge-response (kvcache.engine.auth): nonces and HMAC proofs, hex.
OPTIONAL = {
    MsgType.HELLO: {"nonce": _HEX},
    MsgType.HELLO_ACK: {"nonce": _HEX, "proof": _HEX},
    MsgType.READY: {"proof": _HEX},
}


def encode(msg_type, req_id, header, payload_len=0):
    """Frame header plus JSON header bytes."""
    body = json.dumps(header, separators=(",", ":")).encode()
    if len(body) > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {len(body)} bytes exceeds {MAX_HEADER_BYTES}")
    return FRAME.pack(MAGIC, VERSION, int(msg_type), req_id, len(body), payload_len) + body


def decode_frame(raw):
    """(msg_type, req_id, header_len, payload_len) from FRAME.size bytes."""
    magic, version, msg_type, req_id, header_len, payload_len = FRAME.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}")
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}, this side speaks {VERSION}")
    try:
        msg_type = MsgType(msg_type)
    except ValueError:
        raise ProtocolError(f"unknown message type {msg_type}") from None
    if header_len > MAX_HEADER_BYTES:
        raise ProtocolError(f"header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if payload_len > MAX_PAYLOAD_BYTES:
        raise ProtocolError(f"payload length {payload_len} exceeds {MAX_PAYLOAD_BYTES}")
    return msg_type, req_id, header_len, payload_len


def decode_header(msg_type, raw):
    """The JSON header, checked against the schema of its message type."""
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"{msg_type.name} header is not JSON: {exc}") from None
    if not isinstance(header, dict):
        raise ProtocolError(f"{msg_type.name} header is not an object")
    for field, check in SCHEMAS[msg_type].items():
        if field not in header or not check(header[field]):
            raise ProtocolError(f"{msg_type.name} header field {field!r} missing or invalid")
    for field, check in OPTIONAL.get(msg_type, {}).items():
        if field in header and not check(header[field]):
            raise ProtocolError(f"{msg_type.name} header field {field!r} invalid")
    return header


def check_descriptor_payload(header, payload_len, with_data):
    """Count and byte total of a WRITE/READ request, checked against the
    payload length it announced."""
    count, total = header["count"], header["bytes"]
    if not 0 < count <= MAX_DESCRIPTORS:
        raise ProtocolError(f"descriptor count {count} outside 1..{MAX_DESCRIPTORS}")
    expected = count * DESC_BYTES + (total if with_data else 0)
    if payload_len != expected:
        raise ProtocolError(f"payload of {payload_len} bytes, expected {expected}")
    return count, total
