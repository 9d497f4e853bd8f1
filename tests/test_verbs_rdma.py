"""Real verbs on rxe0 (inside scripts/rdma-vm)."""
import gc
import os
import subprocess
import sys
import time

import numpy as np
import pytest

import pyverbs_kv as pv
from pyverbs_kv.enums import (IBV_QPS_ERR, IBV_WC_REM_ACCESS_ERR, IBV_WC_RECV_RDMA_WITH_IMM,
                              IBV_WR_SEND, IBV_WC_RECV, IBV_WC_SUCCESS, IBV_WC_WR_FLUSH_ERR)
from rdma_util import Endpoint, connected_pair, pattern

pytestmark = pytest.mark.rdma

NUM_BLOCKS = 1538
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def ctx():
    with pv.Context() as context:
        yield context


@pytest.fixture
def pd(ctx):
    return pv.PD(ctx)


def test_device_port_and_gid_queries(ctx, rdma_ip):
    assert "rxe0" in pv.get_device_list()
    attr = ctx.query_device()
    assert attr["max_qp_wr"] > 0 and attr["phys_port_cnt"] >= 1
    port = ctx.query_port(1)
    assert port["state_str"] == "active"
    assert port["link_layer"] == "Ethernet"
    assert port["active_mtu"] in pv.MTU_BYTES
    table = ctx.gid_table(1)
    mapped = [e for e in table if e.type == "RoCE v2" and e.ipv4 == rdma_ip]
    assert mapped, table
    assert mapped[0].netdev == "dum0" and mapped[0].ipv4_mapped
    index = ctx.pick_gid(1)
    assert index == mapped[0].index          # 1 on rxe; never the link-local v1 slot
    assert ctx.query_gid(1, index) == f"::ffff:{rdma_ip}"
    assert ctx.pick_gid(1, netdev="dum0") == index
    with pytest.raises(pv.VerbsError, match="no usable GID on netdev nosuch0"):
        ctx.pick_gid(1, netdev="nosuch0")
    with pytest.raises(pv.VerbsError, match="not found"):
        pv.Context("nosuch_dev")


def test_two_rc_qps_connect_and_exchange_a_send(ctx, pd):
    a, b = connected_pair(ctx, pd)
    buf = np.zeros(64, dtype=np.uint8)
    mr = pv.MR(pd, buf)
    buf[:5] = np.frombuffer(b"hello", dtype=np.uint8)
    b.qp.post_recv(mr.addr + 32, 32, mr.lkey, wr_id=7)
    a.qp.post_send(IBV_WR_SEND, mr.addr, 5, mr.lkey, wr_id=3)
    seen = {}
    deadline = time.monotonic() + 5
    while len(seen) < 2 and time.monotonic() < deadline:
        for cq in (a.cq, b.cq):
            for wc in cq.poll():
                seen[int(wc["wr_id"])] = wc
    assert seen[3]["status"] == IBV_WC_SUCCESS
    assert seen[7]["status"] == IBV_WC_SUCCESS and seen[7]["opcode"] == IBV_WC_RECV
    assert seen[7]["byte_len"] == 5
    assert bytes(buf[32:37]) == b"hello"


@pytest.mark.parametrize("block_size", [1024, 64 * 1024])
def test_write_batch_to_permuted_slots_then_read_back(ctx, pd, block_size):
    a, b = connected_pair(ctx, pd)
    num_slots = NUM_BLOCKS + 100
    src = pattern(NUM_BLOCKS, block_size, seed=block_size)
    dst = np.zeros((num_slots, block_size), dtype=np.uint8)
    back = np.zeros((NUM_BLOCKS, block_size), dtype=np.uint8)
    src_mr, dst_mr, back_mr = pv.MR(pd, src), pv.MR(pd, dst), pv.MR(pd, back)
    slots = np.random.default_rng(1).permutation(num_slots)[:NUM_BLOCKS]

    # 100 MB through Soft-RoCE under TCG: posting waits for send-queue credits.
    batch = a.qp.post_write_blocks(src_mr.addr, block_size, np.arange(NUM_BLOCKS),
                                   dst_mr.addr, block_size, slots, block_size,
                                   src_mr.lkey, dst_mr.rkey, timeout_ms=120_000)
    assert batch.num_descriptors == NUM_BLOCKS
    batch.wait(timeout_ms=120_000)
    assert batch.done
    np.testing.assert_array_equal(dst[slots], src)
    untouched = np.setdiff1d(np.arange(num_slots), slots)
    assert not dst[untouched].any()

    read = a.qp.post_read_blocks(back_mr.addr, block_size, np.arange(NUM_BLOCKS),
                                 dst_mr.addr, block_size, slots, block_size,
                                 back_mr.lkey, dst_mr.rkey, timeout_ms=120_000)
    read.wait(timeout_ms=120_000)
    np.testing.assert_array_equal(back, src)


def test_read_batch_with_address_arrays(ctx, pd):
    a, b = connected_pair(ctx, pd)
    block = 4096
    remote = pattern(300, block, seed=3)
    local = np.zeros_like(remote)
    remote_mr, local_mr = pv.MR(pd, remote), pv.MR(pd, local)
    order = np.random.default_rng(3).permutation(300)
    local_addrs = local_mr.addr + np.arange(300, dtype=np.uint64) * block
    remote_addrs = remote_mr.addr + order.astype(np.uint64) * block
    lengths = np.full(300, block, dtype=np.uint32)
    a.qp.post_read_batch(local_addrs, lengths, local_mr.lkey, remote_addrs,
                         remote_mr.rkey).wait(60_000)
    np.testing.assert_array_equal(local, remote[order])


def test_contiguous_runs_merge_into_fewer_work_requests(ctx, pd):
    a, b = connected_pair(ctx, pd)
    block = 1024
    src = pattern(64, block, seed=5)
    dst = np.zeros((64, block), dtype=np.uint8)
    src_mr, dst_mr = pv.MR(pd, src), pv.MR(pd, dst)
    # Two runs contiguous on both sides (0..31 -> 32..63, 32..63 -> 0..31).
    local_ids = np.arange(64)
    remote_ids = np.concatenate([np.arange(32, 64), np.arange(0, 32)])
    batch = a.qp.post_write_blocks(src_mr.addr, block, local_ids, dst_mr.addr, block,
                                   remote_ids, block, src_mr.lkey, dst_mr.rkey)
    assert (batch.num_descriptors, batch.num_wrs) == (64, 2)
    batch.wait(10_000)
    np.testing.assert_array_equal(dst[remote_ids], src)


def test_batch_larger_than_the_send_queue_keeps_credits(ctx, pd):
    a, b = connected_pair(ctx, pd, max_send_wr=64)
    block = 512
    n = 3000
    src = pattern(n, block, seed=9)
    dst = np.zeros((n, block), dtype=np.uint8)
    src_mr, dst_mr = pv.MR(pd, src), pv.MR(pd, dst)
    slots = np.random.default_rng(9).permutation(n)
    batch = a.qp.post_write_blocks(src_mr.addr, block, np.arange(n), dst_mr.addr, block,
                                   slots, block, src_mr.lkey, dst_mr.rkey,
                                   signal_every=1000, chain=64, timeout_ms=60_000)
    adjacent = int(np.count_nonzero(np.diff(slots) == 1))    # merged pairs
    assert batch.num_wrs == n - adjacent
    batch.wait(60_000)
    np.testing.assert_array_equal(dst[slots], src)


def test_write_with_immediate_notifies_after_the_data(ctx, pd):
    a, b = connected_pair(ctx, pd)
    block = 2048
    src = pattern(100, block, seed=11)
    dst = np.zeros_like(src)
    src_mr, dst_mr = pv.MR(pd, src), pv.MR(pd, dst)
    b.qp.post_recv(0, 0, 0, wr_id=99)
    a.qp.post_write_blocks(src_mr.addr, block, np.arange(100), dst_mr.addr, block,
                           np.arange(100)[::-1], block, src_mr.lkey, dst_mr.rkey,
                           notify_imm=0xC0FFEE).wait(30_000)
    deadline = time.monotonic() + 10
    wcs = b.cq.poll()
    while not len(wcs) and time.monotonic() < deadline:
        wcs = b.cq.poll()
    assert len(wcs) == 1
    assert wcs[0]["opcode"] == IBV_WC_RECV_RDMA_WITH_IMM
    assert wcs[0]["imm_data"] == 0xC0FFEE
    np.testing.assert_array_equal(dst[::-1], src)


def test_wrong_rkey_raises_completion_error_then_recreated_qp_works(ctx, pd):
    a, b = connected_pair(ctx, pd)
    src = pattern(16, 1024, seed=13)
    dst = np.zeros_like(src)
    src_mr, dst_mr = pv.MR(pd, src), pv.MR(pd, dst)
    started = time.monotonic()
    with pytest.raises(pv.CompletionError) as info:
        a.qp.post_write_blocks(src_mr.addr, 1024, np.arange(16), dst_mr.addr, 1024,
                               np.arange(16), 1024, src_mr.lkey,
                               dst_mr.rkey ^ 0x5A5A00).wait(20_000)
    assert time.monotonic() - started < 20
    err = info.value
    assert err.status == IBV_WC_REM_ACCESS_ERR
    assert "remote access error" in str(err) and f"{a.qp.qp_num:#x}" in str(err)
    assert not dst.any()
    assert a.qp.query()["state"] == IBV_QPS_ERR
    with pytest.raises(pv.CompletionError):        # stays failed until re-created
        a.qp.post_write_batch([src_mr.addr], [8], src_mr.lkey, [dst_mr.addr], dst_mr.rkey)
    a.close()
    b.close()
    a, b = connected_pair(ctx, pd)
    a.qp.post_write_blocks(src_mr.addr, 1024, np.arange(16), dst_mr.addr, 1024,
                           np.arange(16), 1024, src_mr.lkey, dst_mr.rkey).wait(20_000)
    np.testing.assert_array_equal(dst, src)


def test_qp_moved_to_error_flushes_and_reset_makes_it_usable(ctx, pd):
    a, b = connected_pair(ctx, pd)
    src = pattern(8, 256, seed=17)
    dst = np.zeros_like(src)
    src_mr, dst_mr = pv.MR(pd, src), pv.MR(pd, dst)
    a.qp.to_error()
    with pytest.raises(pv.CompletionError) as info:
        a.qp.post_write_blocks(src_mr.addr, 256, np.arange(8), dst_mr.addr, 256,
                               np.arange(8), 256, src_mr.lkey, dst_mr.rkey).wait(10_000)
    assert info.value.status == IBV_WC_WR_FLUSH_ERR
    # Bring both ends back through RESET -> INIT -> RTR -> RTS.
    for end in (a, b):
        end.qp.to_reset()
        end.qp.to_init(1)
    a_info, b_info = a.info(), b.info()
    a.connect(b_info)
    b.connect(a_info)
    a.qp.post_write_blocks(src_mr.addr, 256, np.arange(8), dst_mr.addr, 256,
                           np.arange(8), 256, src_mr.lkey, dst_mr.rkey).wait(10_000)
    np.testing.assert_array_equal(dst, src)


def test_bad_descriptors_are_rejected_before_posting(ctx, pd):
    a, b = connected_pair(ctx, pd)
    buf = np.zeros(4096, dtype=np.uint8)
    mr = pv.MR(pd, buf)
    with pytest.raises(ValueError, match="differ in length"):
        a.qp.post_write_batch([mr.addr, mr.addr], [8], mr.lkey, [mr.addr], mr.rkey)
    with pytest.raises(pv.VerbsError, match="descriptor 1 has length 0"):
        a.qp.post_write_batch([mr.addr, mr.addr], [8, 0], mr.lkey, [mr.addr, mr.addr],
                              mr.rkey)
    with pytest.raises(ValueError, match="empty batch"):
        a.qp.post_write_batch([], [], mr.lkey, [], mr.rkey)
    # The QP is still healthy after the rejected calls.
    a.qp.post_write_batch([mr.addr], [8], mr.lkey, [mr.addr + 1024], mr.rkey).wait(5000)


def test_completion_channel_event_and_timeout(ctx, pd):
    channel = pv.CompChannel(ctx)
    cq = pv.CQ(ctx, 16, channel)
    with pytest.raises(pv.VerbsTimeout):
        cq.req_notify()
        channel.get_event(100)
    a = Endpoint(ctx, pd)
    b = Endpoint(ctx, pd)
    b.qp.close()
    b.qp = pv.QP(pd, b.cq, cq)          # receives complete on the channel's CQ
    b.qp.to_init(1)
    a_info, b_info = a.info(), b.info()
    a.connect(b_info)
    b.connect(a_info)
    buf = np.zeros(64, dtype=np.uint8)
    mr = pv.MR(pd, buf)
    b.qp.post_recv(mr.addr, 64, mr.lkey, wr_id=5)
    a.qp.post_send(IBV_WR_SEND, mr.addr, 16, mr.lkey)
    wcs = cq.wait(5000)
    assert wcs[0]["wr_id"] == 5 and wcs[0]["status"] == IBV_WC_SUCCESS


def test_close_in_any_order_leaves_everything_closed(ctx):
    pd = pv.PD(ctx)
    cq = pv.CQ(ctx, 64)
    qp = pv.QP(pd, cq, cq)
    mr = pv.MR(pd, bytearray(4096))
    cq.close()                 # closes the QP on it first
    with pytest.raises(pv.VerbsError, match="closed"):
        qp.qp_num
    mr.close()
    mr.close()                 # idempotent
    qp2 = pv.QP(pd, *(2 * [pv.CQ(ctx, 8)]))
    ctx.close()                # closes QP, CQ, PD
    with pytest.raises(pv.VerbsError, match="closed"):
        qp2.qp_num
    with pytest.raises(pv.VerbsError, match="closed"):
        pd.close() or pv.PD(ctx)


def _rdma_resources():
    out = subprocess.run(["rdma", "resource", "show"], capture_output=True, text=True,
                         check=True).stdout
    fields = out.split()
    return {name: int(fields[i + 1]) for i, name in enumerate(fields)
            if name in ("pd", "cq", "qp", "mr") and fields[i + 1].isdigit()}


def test_a_thousand_create_destroy_cycles_leak_nothing(ctx):
    gc.collect()              # what earlier tests left behind is not ours to count
    before = _rdma_resources()
    fds_before = len(os.listdir("/proc/self/fd"))
    buf = bytearray(1 << 16)
    for i in range(1000):
        pd = pv.PD(ctx)
        cq = pv.CQ(ctx, 32)
        qp = pv.QP(pd, cq, cq, cap=pv.QPCap(max_send_wr=16, max_recv_wr=4))
        mr = pv.MR(pd, buf)
        qp.to_init(1)
        # Vary the order in which things are closed.
        order = [(qp, mr, cq, pd), (pd,), (cq, pd), (mr, pd, cq)][i % 4]
        for obj in order:
            obj.close()
        for obj in (qp, mr, cq, pd):
            obj.close()
    gc.collect()
    assert _rdma_resources() == before
    assert len(os.listdir("/proc/self/fd")) <= fds_before
    buf.append(0)              # the MRs released their buffer exports


def test_registration_failure_names_the_memlock_limit(tmp_path):
    # Root bypasses RLIMIT_MEMLOCK through CAP_IPC_LOCK; drop it for the child.
    script = tmp_path / "reg.py"
    script.write_text(
        "import resource, numpy as np, pyverbs_kv as pv\n"
        "resource.setrlimit(resource.RLIMIT_MEMLOCK, (65536, 65536))\n"
        "ctx = pv.Context(); pd = pv.PD(ctx)\n"
        "try:\n"
        "    pv.MR(pd, np.ones(16 << 20, dtype=np.uint8))\n"
        "except pv.VerbsError as e:\n"
        "    print('ERR', e.call, e.errno, e)\n")
    out = subprocess.run(["setpriv", "--bounding-set=-ipc_lock", "--inh-caps=-ipc_lock",
                          sys.executable, str(script)], capture_output=True, text=True,
                         timeout=60, env=dict(os.environ, PYTHONPATH=ROOT))
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ERR ibv_reg_mr"), out.stdout
    assert "RLIMIT_MEMLOCK is 65536 bytes" in out.stdout
    assert "ulimit -l unlimited" in out.stdout


def test_batch_reports_its_posting_cost(ctx, pd):
    a, b = connected_pair(ctx, pd, max_send_wr=2048)
    src = pattern(1538, 64, seed=21)
    dst = np.zeros_like(src)
    src_mr, dst_mr = pv.MR(pd, src), pv.MR(pd, dst)
    batch = a.qp.post_write_blocks(src_mr.addr, 64, np.arange(1538), dst_mr.addr, 64,
                                   np.arange(1538)[::-1], 64, src_mr.lkey, dst_mr.rkey)
    batch.wait(30_000)
    assert 0 < batch.provider_seconds <= batch.post_seconds
