"""pyverbs_kv.sgio: scatter/gather between sockets and raw memory."""
import socket
import threading

import numpy as np
import pytest

from pyverbs_kv import sgio


def addr(a):
    return a.ctypes.data


def test_gather_send_scatter_receive_over_a_socket_pair():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    src = np.random.default_rng(0).integers(0, 256, 3000 * 1024, dtype=np.uint8)
    dst = np.zeros_like(src)
    # 3000 pieces (more than IOV_MAX) in permuted order, sent and received
    # in one call each, with a reader running concurrently.
    order = np.random.default_rng(1).permutation(3000).astype(np.uint64)
    src_addrs = addr(src) + order * 1024
    dst_addrs = addr(dst) + np.arange(3000, dtype=np.uint64) * 1024
    lengths = np.full(3000, 1024, dtype=np.uint64)
    got = {}
    reader = threading.Thread(target=lambda: got.update(
        n=sgio.recv_pieces(b.fileno(), dst_addrs, lengths, 5000)))
    reader.start()
    assert sgio.send_pieces(a.fileno(), src_addrs, lengths, 5000) == src.size
    reader.join(10)
    assert got["n"] == src.size
    np.testing.assert_array_equal(dst.reshape(3000, 1024), src.reshape(3000, 1024)[order])


def test_receive_times_out_and_reports_progress():
    a, b = socket.socketpair()
    b.settimeout(5)
    buf = np.zeros(100, dtype=np.uint8)
    a.sendall(b"x" * 40)
    with pytest.raises(TimeoutError, match="40 of 100 bytes"):
        sgio.recv_pieces(b.fileno(), [addr(buf)], [100], 200)


def test_receive_reports_a_peer_that_closes_early():
    a, b = socket.socketpair()
    b.settimeout(5)
    buf = np.zeros(100, dtype=np.uint8)
    a.sendall(b"y" * 10)
    a.close()
    with pytest.raises(ConnectionError, match="10 of 100"):
        sgio.recv_pieces(b.fileno(), [addr(buf)], [100], 2000)


def test_copy_pieces_is_a_gather_scatter_memcpy():
    src = np.arange(4096, dtype=np.uint8)
    dst = np.zeros(4096, dtype=np.uint8)
    n = sgio.copy_pieces([addr(dst) + 100, addr(dst)], [addr(src), addr(src) + 1000],
                         [50, 60])
    assert n == 110
    np.testing.assert_array_equal(dst[100:150], src[:50])
    np.testing.assert_array_equal(dst[:60], src[1000:1060])
    assert not dst[60:100].any() and not dst[150:].any()


def test_mismatched_arrays_are_rejected():
    with pytest.raises(ValueError):
        sgio.copy_pieces([1, 2], [3], [4])


def test_prefix_buffers_go_out_first_in_the_same_call():
    a, b = socket.socketpair()
    a.settimeout(5)
    b.settimeout(5)
    column = np.arange(5, dtype="<u8")
    data = np.frombuffer(b"payload!", dtype=np.uint8)
    sent = sgio.send_pieces(a.fileno(), [addr(data)], [data.size], 5000,
                            (b"head", column, bytearray(b"!")))
    assert sent == 4 + 40 + 1 + 8
    got = b.recv(1024)
    assert got == b"head" + column.tobytes() + b"!" + b"payload!"
    with pytest.raises(ValueError, match="at most 8 prefix buffers"):
        sgio.send_pieces(a.fileno(), [], [], 5000, (b"x",) * 9)
    with pytest.raises(TypeError):
        sgio.send_pieces(a.fileno(), [], [], 5000, ("not a buffer",))
