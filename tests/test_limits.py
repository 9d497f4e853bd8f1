"""Bounds a misbehaving peer cannot push a listener past: handshakes at
once, links, a whole handshake's deadline, and memory for a descriptor table
that is announced but never sent. Real sockets on 127.0.0.1."""
import socket
import time

import pytest

from helpers import wait_until
from kvcache import LLMException, LLMStatusCode, TransferEngine
from kvcache.engine import links
from kvcache.transports.tcp.protocol import MAX_DESCRIPTORS, MsgType, encode
from test_inputs import (HELLO_ACK, READY, closed_by_other_side, hello, port_of,
                         recv_wire_frame, wire_frame)


def _linked_socket(server, name):
    """A socket linked to ``server`` by a handshake made by hand."""
    s = socket.create_connection(("127.0.0.1", port_of(server.address)), timeout=5)
    s.sendall(wire_frame(1, 0, hello(name, "tcp", [])))
    frame = recv_wire_frame(s)
    assert frame is not None and frame[0] == HELLO_ACK and frame[2]["status"] == 0, frame
    s.sendall(wire_frame(READY, 0, {}))
    return s


def _data_bytes():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmData")


def test_a_trickled_handshake_is_dropped_at_the_handshake_deadline():
    with TransferEngine("listener", handshake_timeout_ms=1000) as a:
        s = socket.create_connection(("127.0.0.1", port_of(a.address)), timeout=5)
        frame = encode(MsgType.HELLO, 0, {"name": "slow", "cluster_id": 0, "role": "mix",
                                          "regions": [], "transports": ["tcp"], "listen": ""})
        started = time.monotonic()
        try:
            for byte in frame:                      # one byte every 0.2 s, never finished
                s.sendall(bytes([byte]))
                time.sleep(0.2)
                if time.monotonic() - started > 3:
                    break
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert closed_by_other_side(s, 1)
        assert time.monotonic() - started < 2.5       # 1 s deadline, not per byte
        s.close()


def test_handshakes_at_once_are_capped_and_idle_ones_end_at_their_deadline(monkeypatch):
    monkeypatch.setattr(links, "MAX_HANDSHAKES", 4)
    with TransferEngine("listener", handshake_timeout_ms=1000) as a, \
            TransferEngine("real", listen=None) as b:
        idle = [socket.create_connection(("127.0.0.1", port_of(a.address)), timeout=5)
                for _ in range(4)]
        wait_until(lambda: len(a.links.listener._threads) == 4, 5, "four handshakes")
        with pytest.raises(LLMException) as err:     # over the cap: dropped at once
            b.connect(a.address, timeout_ms=2000)
        assert err.value.status_code == LLMStatusCode.LLM_LINK_FAILED
        wait_until(lambda: not a.links.listener._threads, 5, "idle handshakes to end")
        b.connect(a.address, timeout_ms=2000)        # a real peer links once they are gone
        for s in idle:
            s.close()


def test_links_past_the_cap_are_refused_with_a_status(monkeypatch):
    monkeypatch.setattr(links, "MAX_LINKS", 2)
    with TransferEngine("listener") as a:
        peers = [TransferEngine(f"p{i}", listen=None) for i in range(3)]
        try:
            peers[0].connect(a.address)
            peers[1].connect(a.address)
            with pytest.raises(LLMException) as err:
                peers[2].connect(a.address)
            assert err.value.status_code == LLMStatusCode.LLM_CLUSTER_NUM_EXCEED_LIMIT
            peers[0].close()
            wait_until(lambda: len(a.peers()) == 1, 5, "a link to end")
            peers[2].connect(a.address)              # room again
        finally:
            for p in peers:
                p.close()


def test_an_announced_table_never_sent_costs_no_memory():
    # 8 links each announce a READ of 2**22 descriptors (96 MiB of table)
    # and send nothing more; the listener must not allocate for them.
    with TransferEngine("server") as server:
        liars = [_linked_socket(server, f"liar-{i}") for i in range(8)]
        wait_until(lambda: len(server.peers()) == 8, 5, "eight links")
        time.sleep(0.2)
        before = _data_bytes()                      # links and their threads made
        for s in liars:
            s.sendall(encode(MsgType.READ, 1, {"count": MAX_DESCRIPTORS, "bytes": 1},
                             payload_len=MAX_DESCRIPTORS * 24))
            s.sendall(b"\0" * 24)                  # one descriptor's worth, then silence
        time.sleep(0.5)
        grown = _data_bytes() - before
        assert grown < 32 << 20, f"memory (VmData) grew by {grown >> 20} MiB"
        for s in liars:
            s.close()
