"""The shared-memory transport: grants, mapping, fallback, unmapping."""
import ctypes
import mmap
import os
import socket
import threading

import numpy as np
import pytest

from helpers import wait_until
from kvcache import LLMException, LLMStatusCode, TransferEngine
from kvcache.bufpool import SharedMemory


def view(memory):
    return np.frombuffer((ctypes.c_uint8 * memory.size).from_address(memory.addr),
                         dtype=np.uint8)


@pytest.fixture
def engines():
    a, b = TransferEngine("a", transport="shm"), TransferEngine("b", transport="shm")
    memory = SharedMemory(1 << 20)
    b.register_memory(memory.addr, memory.size, share=(memory.fd, 0))
    src = np.random.default_rng(0).integers(0, 256, 1 << 20, dtype=np.uint8)
    a.register_memory(src.ctypes.data, src.nbytes)
    yield a, b, memory, src
    a.close()
    b.close()
    memory.close()


def test_shared_pieces_are_copied_through_the_mapping(engines):
    a, b, memory, src = engines
    peer = a.connect(b.address)
    order = np.random.default_rng(1).permutation(256).astype(np.uint64)
    a.transfer_sync(peer, "write", src.ctypes.data + np.arange(256, dtype=np.uint64) * 4096,
                    memory.addr + order * 4096, [4096] * 256)
    np.testing.assert_array_equal(view(memory).reshape(256, 4096)[order],
                                  src.reshape(256, 4096))
    # The peer's memory was mapped here (not sent over the socket).
    assert len(peer.data.table) == 1
    back = np.zeros(4096, dtype=np.uint8)
    a.register_memory(back.ctypes.data, back.nbytes)
    a.transfer_sync(peer, "read", [back.ctypes.data], [memory.addr + int(order[3]) * 4096],
                    [4096])
    np.testing.assert_array_equal(back, src[3 * 4096:4 * 4096])


def test_memory_the_peer_cannot_share_goes_over_tcp(engines, caplog):
    a, b, memory, src = engines
    private = np.zeros(1000, dtype=np.uint8)
    b.register_memory(private.ctypes.data, private.nbytes)
    peer = a.connect(b.address)
    with caplog.at_level("DEBUG", logger="kvcache.transports.shm"):
        a.transfer_sync(peer, "write", [src.ctypes.data, src.ctypes.data + 10],
                        [private.ctypes.data, memory.addr], [10, 20])
    np.testing.assert_array_equal(private[:10], src[:10])
    np.testing.assert_array_equal(view(memory)[:20], src[10:30])
    assert any("not in shared memory: TCP" in r.message for r in caplog.records)


def test_unlink_unmaps_the_peer_memory(engines):
    a, b, memory, src = engines
    peer = a.connect(b.address)
    a.transfer_sync(peer, "write", [src.ctypes.data], [memory.addr], [10])
    mappings = peer.data
    assert len(mappings.maps) == 2                  # the pool and its pin board
    a.disconnect(peer)
    assert mappings.maps == []


def test_the_grant_socket_gives_nothing_without_a_token(engines):
    a, b, memory, src = engines
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as s:
        s.settimeout(5)
        s.connect("\0" + b.transport.socket_name)
        s.sendall(b"not-a-token")
        data, fds, _, _ = socket.recv_fds(s, 4096, 8)
    assert data == b"" and fds == []
    peer = a.connect(b.address)                   # the server is unharmed
    a.transfer_sync(peer, "write", [src.ctypes.data], [memory.addr], [10])


def test_threads_copy_at_once_and_unlink_waits_for_their_copies(engines):
    a, b, memory, src = engines
    peer = a.connect(b.address)
    quarter = (1 << 20) // 4
    errors, rounds = [], [0] * 4

    def writer(t):
        base = np.arange(quarter // 4096, dtype=np.uint64) * 4096 + t * quarter
        try:
            while True:
                a.transfer_sync(peer, "write", src.ctypes.data + base, memory.addr + base,
                                np.full(base.size, 4096))
                rounds[t] += 1
        except LLMException as exc:
            errors.append(exc.status_code)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    wait_until(lambda: min(rounds) >= 3, 10, what="three rounds per thread")
    np.testing.assert_array_equal(view(memory), src)
    a.disconnect(peer, force=True)               # unmaps only after running copies end
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    assert set(errors) <= {LLMStatusCode.LLM_LINK_FAILED, LLMStatusCode.LLM_NOT_YET_LINK}
    assert len(errors) == 4


def test_memory_not_sealed_at_its_size_is_not_mapped(engines, caplog):
    # A peer could shrink such a file under our mapping, and the next copy
    # would die of SIGBUS: TCP carries it instead.
    a, b, memory, src = engines
    with pytest.raises(PermissionError):
        os.ftruncate(memory.fd, 4096)                   # the pool is sealed
    fd = os.memfd_create("unsealed")
    os.ftruncate(fd, 1 << 16)
    plain = mmap.mmap(fd, 1 << 16)
    plain_addr = np.frombuffer(plain, dtype=np.uint8).ctypes.data
    b.register_memory(plain_addr, 1 << 16, share=(fd, 0))
    peer = a.connect(b.address)
    with caplog.at_level("DEBUG", logger="kvcache.transports.shm"):
        a.transfer_sync(peer, "write", [src.ctypes.data, src.ctypes.data + 100],
                        [plain_addr, memory.addr], [100, 50])
    assert bytes(plain[:100]) == src[:100].tobytes()
    np.testing.assert_array_equal(view(memory)[:50], src[100:150])
    assert len(peer.data.table) == 1           # only the sealed pool
    assert any("not a memfd sealed" in r.message for r in caplog.records)
    a.disconnect(peer)
    b.close()
    os.close(fd)
