"""Helpers for the verbs tests: connecting two RC QPs on one device."""
import random

import numpy as np

import pyverbs_kv as pv
from pyverbs_kv.enums import IBV_QPS_RTS


class Endpoint:
    """One side of a loopback RC connection with its own send CQ."""

    def __init__(self, ctx, pd, max_send_wr=512, cqe=None):
        self.ctx = ctx
        self.cq = pv.CQ(ctx, cqe or 2 * max_send_wr)
        self.qp = pv.QP(pd, self.cq, self.cq, cap=pv.QPCap(max_send_wr=max_send_wr,
                                                           max_recv_wr=64))
        self.psn = random.randrange(1 << 24)
        self.qp.to_init(1)

    def info(self):
        gid_index = self.ctx.pick_gid(1)
        return dict(qpn=self.qp.qp_num, psn=self.psn, gid=self.ctx.query_gid(1, gid_index),
                    mtu=self.ctx.query_port(1)["active_mtu"])

    def connect(self, remote):
        mine = self.info()
        self.qp.to_rtr(remote["qpn"], remote["psn"], remote["gid"], self.ctx.pick_gid(1),
                       path_mtu=min(mine["mtu"], remote["mtu"]))
        self.qp.to_rts(self.psn, timeout=10, retry_cnt=3)
        assert self.qp.query()["state"] == IBV_QPS_RTS

    def close(self):
        self.qp.close()
        self.cq.close()


def connected_pair(ctx, pd, **kwargs):
    a, b = Endpoint(ctx, pd, **kwargs), Endpoint(ctx, pd, **kwargs)
    a_info, b_info = a.info(), b.info()
    a.connect(b_info)
    b.connect(a_info)
    return a, b


def address_of(array):
    return array.__array_interface__["data"][0]


def pattern(num_blocks, block_size, seed):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(num_blocks, block_size), dtype=np.uint8)
