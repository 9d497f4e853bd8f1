"""Data lanes (kvcache.lane): transfers to a listening peer ride their own
connection, one per calling thread; to a peer that does not listen they go
over the control channel; lanes are granted only to live links and are
closed with them."""
import json
import socket
import threading

import numpy as np

from kvcache import LLMException, LLMStatusCode, TransferEngine
from kvcache.transports.tcp.protocol import FRAME, MsgType, decode_frame, encode

from helpers import wait_until
from test_kv_faults import _hand_made_peer, _recv_all


def _registered(engine, size=1 << 20, fill=0):
    buf = np.full(size, fill, dtype=np.uint8)
    engine.register_memory(buf.ctypes.data, buf.nbytes)
    return buf


def test_lane_to_a_listening_peer_and_the_channel_to_one_that_is_not():
    with TransferEngine("listens") as a, TransferEngine("silent", listen=None) as b:
        mem_a, mem_b = _registered(a, fill=1), _registered(b, fill=2)
        peer_a = b.connect(a.address)                  # b's view of a
        wait_until(lambda: a.peers())
        peer_b = a.peer("silent")
        addr_a, addr_b = mem_a.ctypes.data, mem_b.ctypes.data
        # b -> a: a listens, so b opens a lane.
        b.transfer_sync(peer_a, "write", [addr_b], [addr_a + 100], [50])
        b.transfer_sync(peer_a, "read", [addr_b + 1000], [addr_a + 2000], [30])
        assert mem_a[100:150].tolist() == [2] * 50 and mem_b[1000:1030].tolist() == [1] * 30
        pool = peer_a.data.lanes
        assert len(pool.idle) == 1 and not pool.unavailable
        assert len(peer_b.data.served) == 1
        # a -> b: b does not listen; the control channel carries it.
        a.transfer_sync(peer_b, "write", [addr_a + 300], [addr_b + 300], [40])
        a.transfer_sync(peer_b, "read", [addr_a + 5000], [addr_b + 5000], [20])
        assert mem_b[300:340].tolist() == [1] * 40 and mem_a[5000:5020].tolist() == [2] * 20
        assert peer_b.data.lanes.unavailable
        assert (mem_a[:100] == 1).all() and (mem_a[150:5000] == 1).all()


def test_each_calling_thread_holds_its_own_lane():
    with TransferEngine("target") as a, TransferEngine("caller", listen=None) as b:
        threads, rounds, piece = 4, 30, 4096
        mem_a = _registered(a, size=threads * piece)
        mem_b = _registered(b, size=threads * piece)
        peer = b.connect(a.address)
        barrier, errors = threading.Barrier(threads), []

        def work(t):
            try:
                barrier.wait(5)
                for r in range(rounds):
                    mem_b[t * piece:(t + 1) * piece] = (t * rounds + r) % 251
                    b.transfer_sync(peer, "write", [mem_b.ctypes.data + t * piece],
                                    [mem_a.ctypes.data + t * piece], [piece])
                    assert (mem_a[t * piece:(t + 1) * piece] == (t * rounds + r) % 251).all()
            except Exception as exc:            # reported below
                errors.append(exc)

        workers = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not errors, errors
        pool = peer.data.lanes
        assert not pool.busy and 1 <= len(pool.idle) <= threads


def _lane_socket(server, token):
    s = socket.create_connection(("127.0.0.1", int(server.address.rsplit(":", 1)[1])))
    s.settimeout(5)
    s.sendall(encode(MsgType.LANE, 0, {"token": token}))
    return s


def _reply(s):
    msg_type, req_id, header_len, payload_len = decode_frame(_recv_all(s, FRAME.size))
    assert msg_type == MsgType.REPLY
    return req_id, json.loads(_recv_all(s, header_len)), payload_len


def _closed_by_server(s):
    try:
        return s.recv(1) == b""
    except ConnectionResetError:
        return True


def test_lanes_are_granted_once_to_live_links_and_check_every_piece():
    with TransferEngine("server") as server:
        buf = _registered(server, size=4096)
        region = server.regions()[0][0]
        # A token the server never granted: dropped, the server stays up.
        with _lane_socket(server, "f" * 32) as s:
            assert _closed_by_server(s)
        liar = _hand_made_peer(server)
        liar.sendall(encode(MsgType.CALL, 7, {"method": "tcp.lane", "params": {}}))
        _, reply, _ = _reply(liar)
        grant = reply["result"]
        assert grant["port"] == int(server.address.rsplit(":", 1)[1])
        lane = _lane_socket(server, grant["token"])
        assert _reply(lane)[1]["status"] == 0
        # The token is spent.
        with _lane_socket(server, grant["token"]) as again:
            assert _closed_by_server(again)
        # A WRITE past the end of the region is refused, nothing written.
        columns = np.array([[region], [buf.ctypes.data + 4000], [200]], dtype="<u8")
        lane.sendall(encode(MsgType.WRITE, 1, {"count": 1, "bytes": 200}, 24 + 200)
                     + columns.tobytes() + b"\x07" * 200)
        req_id, reply, payload_len = _reply(lane)
        assert (req_id, payload_len) == (1, 0)
        assert reply["status"] == LLMStatusCode.LLM_PARAM_INVALID
        assert "not inside live region" in reply["message"]
        assert not buf.any()
        # The lane still serves a good one.
        columns = np.array([[region], [buf.ctypes.data + 10], [5]], dtype="<u8")
        lane.sendall(encode(MsgType.WRITE, 2, {"count": 1, "bytes": 5}, 24 + 5)
                     + columns.tobytes() + b"\x07" * 5)
        assert _reply(lane)[1]["status"] == 0
        assert buf[10:15].tolist() == [7] * 5 and buf.sum() == 35
        # The link ends: its lane is closed by the server.
        liar.close()
        assert _closed_by_server(lane)
        lane.close()


def test_unlinking_closes_the_lanes_on_both_sides():
    with TransferEngine("target") as a, TransferEngine("caller", listen=None) as b:
        mem_a, mem_b = _registered(a), _registered(b)
        peer = b.connect(a.address)
        b.transfer_sync(peer, "read", [mem_b.ctypes.data], [mem_a.ctypes.data], [8])
        pool = peer.data.lanes
        served = a.peer("caller").data.served
        assert len(served) == 1
        b.disconnect(peer)
        assert pool.closed and not pool.idle
        wait_until(lambda: not served)
        try:
            b.transfer_sync(peer, "read", [mem_b.ctypes.data], [mem_a.ctypes.data], [8])
            raise AssertionError("a transfer on an unlinked peer went through")
        except LLMException as exc:
            assert exc.status_code in (LLMStatusCode.LLM_NOT_YET_LINK,
                                       LLMStatusCode.LLM_LINK_FAILED)
