"""The RDMA transport inside the Soft-RoCE VM: engines in one process over
real RC QPs (the multi-process kill test is in test_kv_faults.py)."""
import subprocess
import time

import numpy as np
import pytest

from kvcache import LLMException, LLMStatusCode, TransferEngine

pytestmark = pytest.mark.rdma


def rdma_resources():
    out = subprocess.run(["rdma", "resource", "show"], capture_output=True, text=True,
                         check=True).stdout.split()
    return {k: int(out[i + 1]) for i, k in enumerate(out) if k in ("qp", "mr", "pd", "cq")}


def test_engine_write_read_and_notify_over_rdma():
    with TransferEngine("a", transport="rdma") as a, TransferEngine("b", transport="rdma") as b:
        src = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
        dst = np.zeros(1 << 20, dtype=np.uint8)
        a.register_memory(src.ctypes.data, src.nbytes)
        b.register_memory(dst.ctypes.data, dst.nbytes)
        peer = a.connect(b.address)
        order = np.random.default_rng(1).permutation(256).astype(np.uint64)
        local = src.ctypes.data + np.arange(256, dtype=np.uint64) * 4096
        remote = dst.ctypes.data + order * 4096
        assert a.transfer_sync(peer, "write", local, remote, [4096] * 256) == 1 << 20
        np.testing.assert_array_equal(dst.reshape(256, 4096)[order], src.reshape(256, 4096))
        a.notify(peer, "done", b"layer-0")
        assert b.get_notifications() == [("a", "done", b"layer-0")]
        back = np.zeros_like(src)
        a.register_memory(back.ctypes.data, back.nbytes)
        a.transfer_sync(peer, "read", back.ctypes.data + np.arange(256, dtype=np.uint64) * 4096,
                        remote, [4096] * 256)
        np.testing.assert_array_equal(back, src)
        # The inbound side initiates too, over the same QPs.
        b_peer = b.peers()[0]
        dst[:] = 7
        b.transfer_sync(b_peer, "write", [dst.ctypes.data], [src.ctypes.data], [100])
        assert (src[:100] == 7).all()


def test_one_transfer_across_several_registered_regions():
    # Pieces from two local regions to two remote ones: four memory-key pairs,
    # interleaved, in one transfer.
    with TransferEngine("a", transport="rdma") as a, TransferEngine("b", transport="rdma") as b:
        rng = np.random.default_rng(4)
        srcs = [rng.integers(0, 256, 64 * 1024, dtype=np.uint8) for _ in range(2)]
        dsts = [np.zeros(64 * 1024, dtype=np.uint8) for _ in range(2)]
        for src in srcs:
            a.register_memory(src.ctypes.data, src.nbytes)
        for dst in dsts:
            b.register_memory(dst.ctypes.data, dst.nbytes)
        peer = a.connect(b.address)
        which_src, which_dst = rng.integers(0, 2, 64), rng.integers(0, 2, 64)
        slot_src, slot_dst = rng.permutation(64), rng.permutation(64)
        local = [srcs[w].ctypes.data + int(s) * 1024 for w, s in zip(which_src, slot_src)]
        remote = [dsts[w].ctypes.data + int(s) * 1024 for w, s in zip(which_dst, slot_dst)]
        a.transfer_sync(peer, "write", local, remote, [1024] * 64)
        for ws, ss, wd, sd in zip(which_src, slot_src, which_dst, slot_dst):
            np.testing.assert_array_equal(dsts[wd].reshape(64, 1024)[sd],
                                          srcs[ws].reshape(64, 1024)[ss])


def test_unregistered_memory_is_refused_before_posting():
    with TransferEngine("a", transport="rdma") as a, TransferEngine("b", transport="rdma") as b:
        mine = np.zeros(8192, dtype=np.uint8)
        theirs = np.zeros(8192, dtype=np.uint8)
        a.register_memory(mine.ctypes.data, 4096)
        b.register_memory(theirs.ctypes.data, 4096)
        peer = a.connect(b.address)
        with pytest.raises(LLMException) as err:
            a.transfer_sync(peer, "write", [mine.ctypes.data + 4000], [theirs.ctypes.data],
                            [200])
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        with pytest.raises(LLMException) as err:
            a.transfer_sync(peer, "write", [mine.ctypes.data], [theirs.ctypes.data + 4096],
                            [10], remote_regions=[1])
        # Refused by the initiator's check against the peer's table, which
        # stands in for the owner's own check on one-sided transports.
        assert err.value.status_code == LLMStatusCode.LLM_PARAM_INVALID
        assert "remote (b) piece 0" in str(err.value)
        assert not theirs.any()
        a.transfer_sync(peer, "write", [mine.ctypes.data], [theirs.ctypes.data], [10])


def test_a_hundred_link_unlink_cycles_leak_no_qps_or_mrs():
    with TransferEngine("server", transport="rdma") as server:
        buf = np.zeros(1 << 16, dtype=np.uint8)
        server.register_memory(buf.ctypes.data, buf.nbytes)
        with TransferEngine("client", transport="rdma") as client:
            mine = np.ones(1 << 16, dtype=np.uint8)
            client.register_memory(mine.ctypes.data, mine.nbytes)
            before = rdma_resources()
            for i in range(100):
                peer = client.connect(server.address)
                client.transfer_sync(peer, "write", [mine.ctypes.data + i], [buf.ctypes.data],
                                     [64])
                client.disconnect(peer)
                deadline = time.monotonic() + 5
                while server.peers() and time.monotonic() < deadline:
                    time.sleep(0.01)
            assert rdma_resources() == before
        assert buf[:64].all()
