"""Our rdma_cm peer, speaking the protocol of rdmacm-utils' rdma_server /
rdma_client: the client sends 16 bytes, the server answers with 16 bytes.

    python tests/cm_peer.py server IP PORT     (prints "listening PORT")
    python tests/cm_peer.py client IP PORT
"""
import sys
import time

import numpy as np

import pyverbs_kv as pv
from pyverbs_kv.cm import CMID, EventChannel
from pyverbs_kv.enums import IBV_WC_SUCCESS, IBV_WR_SEND

MSG = 16


def wait_completions(cq, count, timeout_s=10.0):
    got = []
    deadline = time.monotonic() + timeout_s
    while len(got) < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"only {len(got)} of {count} completions")
        got.extend(cq.poll())
    for wc in got:
        if wc["status"] != IBV_WC_SUCCESS:
            raise RuntimeError(f"completion error {wc}")
    return got


class Resources:
    def __init__(self, cmid):
        ctx = cmid.context
        self.pd = pv.PD(ctx)
        self.cq = pv.CQ(ctx, 16)
        self.qp = cmid.create_qp(self.pd, self.cq, self.cq,
                                 pv.QPCap(max_send_wr=4, max_recv_wr=4))
        self.buf = np.zeros(2 * MSG, dtype=np.uint8)
        self.mr = pv.MR(self.pd, self.buf)

    def post_recv(self):
        self.qp.post_recv(self.mr.addr + MSG, MSG, self.mr.lkey, wr_id=2)

    def send(self, payload):
        self.buf[:MSG] = np.frombuffer(payload.ljust(MSG, b"\0")[:MSG], dtype=np.uint8)
        self.qp.post_send(IBV_WR_SEND, self.mr.addr, MSG, self.mr.lkey, wr_id=1)

    def received(self):
        return bytes(self.buf[MSG:])


def server(ip, port):
    channel = EventChannel()
    listener = CMID(channel)
    listener.bind(ip, port)
    listener.listen()
    print("listening", listener.local_port, flush=True)
    conn, private = listener.get_request(timeout_ms=30_000)
    res = Resources(conn)
    res.post_recv()
    conn.accept(private_data=b"welcome")
    wait_completions(res.cq, 1)
    res.send(b"pong:" + res.received()[:8])
    wait_completions(res.cq, 1)
    print("server got", res.received().rstrip(b"\0").decode(errors="replace"), flush=True)
    try:
        channel.wait_for(conn, pv.enums.RDMA_CM_EVENT_DISCONNECTED, 10_000)
    except pv.VerbsTimeout:
        conn.disconnect(wait=False)
    channel.close()


def client(ip, port):
    channel = EventChannel()
    cmid = CMID(channel)
    cmid.resolve_addr(ip, port, timeout_ms=5000)
    cmid.resolve_route(timeout_ms=5000)
    res = Resources(cmid)
    res.post_recv()
    reply = cmid.connect(private_data=b"hello-from-pyverbs-kv", timeout_ms=10_000)
    res.send(b"ping-1234567890")
    wait_completions(res.cq, 2)
    print("client got", res.received().rstrip(b"\0").decode(errors="replace"),
          "private", reply.rstrip(b"\0").decode(errors="replace"), flush=True)
    cmid.disconnect(timeout_ms=5000)
    channel.close()


if __name__ == "__main__":
    role, ip, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
    {"server": server, "client": client}[role](ip, port)
