"""Scatter/gather I/O between sockets (or any fd) and raw memory, for the
TCP and shared-memory transports. Needs no RDMA library: importing this
module never loads libibverbs.

Each call takes numpy arrays of addresses and lengths and loops in C with
the GIL released: writev/readv with up to IOV_MAX pieces per system call,
partial transfers resumed, a poll() deadline on a non-blocking fd."""
import numpy as np

cimport numpy as cnp
from pyverbs_kv.arrays cimport as_u64, data_of
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport errno, EAGAIN, EINTR
from libc.stdint cimport uint64_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy
from pyverbs_kv.clock cimport now_s

cdef extern from "sys/uio.h" nogil:
    struct iovec:
        void *iov_base
        size_t iov_len
    ssize_t writev(int fd, const iovec *iov, int iovcnt)
    ssize_t readv(int fd, const iovec *iov, int iovcnt)

from pyverbs_kv.posix_poll cimport pollfd, poll, POLLIN, POLLOUT

DEF IOV_BATCH = 1024        # IOV_MAX on Linux

cnp.import_array()


cdef inline double now_ms() noexcept nogil:
    return now_s() * 1000.0


cdef int wait_ready(int fd, short events, double deadline) noexcept nogil:
    """0 when ready, -1 on timeout, -2 on a poll error (errno set)."""
    cdef pollfd pfd
    cdef int rc, remaining
    pfd.fd = fd
    pfd.events = events
    while True:
        remaining = <int>(deadline - now_ms())
        if remaining <= 0:
            return -1
        rc = poll(&pfd, 1, remaining)
        if rc > 0:
            return 0
        if rc == 0:
            return -1
        if errno != EINTR:
            return -2


cdef int transfer(int fd, bint sending, const uint64_t *addrs, const uint64_t *lens,
                  Py_ssize_t n, double deadline, uint64_t *done) noexcept nogil:
    """Move every piece; 0 on success, -1 timeout, -2 error (errno), -3 EOF."""
    cdef iovec iov[IOV_BATCH]
    cdef Py_ssize_t next_piece = 0
    cdef int count = 0, first = 0, i, rc
    cdef ssize_t moved
    cdef size_t left
    while True:
        # Refill the window with pieces not yet moved.
        if first == count:
            if next_piece >= n:
                return 0
            count = 0
            first = 0
            while count < IOV_BATCH and next_piece < n:
                if lens[next_piece]:
                    iov[count].iov_base = <void *><uintptr_t>addrs[next_piece]
                    iov[count].iov_len = lens[next_piece]
                    count += 1
                next_piece += 1
            continue
        if sending:
            moved = writev(fd, &iov[first], count - first)
        else:
            moved = readv(fd, &iov[first], count - first)
        if moved < 0:
            if errno == EINTR:
                continue
            if errno == EAGAIN:           # == EWOULDBLOCK on Linux
                rc = wait_ready(fd, POLLOUT if sending else POLLIN, deadline)
                if rc != 0:
                    return rc
                continue
            return -2
        if moved == 0 and not sending:
            return -3
        done[0] += moved
        left = <size_t>moved
        while left and first < count:
            if left >= iov[first].iov_len:
                left -= iov[first].iov_len
                first += 1
            else:
                iov[first].iov_base = <char *>iov[first].iov_base + left
                iov[first].iov_len -= left
                left = 0


cdef uint64_t _move(int fd, const uint64_t *addrs, const uint64_t *lens, Py_ssize_t count,
                    int timeout_ms, bint sending) except? 0:
    """Move every piece within ``timeout_ms``; returns the byte count, or
    raises TimeoutError, ConnectionError (EOF) or OSError."""
    cdef uint64_t done = 0, total = 0
    cdef double deadline = now_ms() + timeout_ms
    cdef int rc
    cdef Py_ssize_t i
    if count == 0:
        return 0
    with nogil:
        rc = transfer(fd, sending, addrs, lens, count, deadline, &done)
        if rc != 0:
            for i in range(count):
                total += lens[i]
    if rc == 0:
        return done
    what = "send" if sending else "recv"
    if rc == -1:
        raise TimeoutError(f"{what}: {done} of {total} bytes moved within {timeout_ms} ms")
    if rc == -3:
        raise ConnectionError(f"{what}: the peer closed the connection after {done} of "
                              f"{total} bytes")
    raise OSError(errno, f"{what}: {done} of {total} bytes moved")


cdef _arrays(addrs, lengths):
    cdef cnp.ndarray a = as_u64(addrs), n = as_u64(lengths)
    if cnp.PyArray_DIM(a, 0) != cnp.PyArray_DIM(n, 0):
        raise ValueError(f"{a.shape[0]} addresses but {n.shape[0]} lengths")
    return a, n


DEF MAX_PREFIX = 8


cdef uint64_t _stream(int fd, addrs, lengths, int timeout_ms, bint sending,
                      tuple prefix=()) except? 0:
    cdef cnp.ndarray a, n
    a, n = _arrays(addrs, lengths)
    cdef Py_buffer views[MAX_PREFIX]
    cdef Py_ssize_t k = len(prefix), held = 0, i, count = cnp.PyArray_DIM(a, 0)
    if k > MAX_PREFIX:
        raise ValueError(f"at most {MAX_PREFIX} prefix buffers, got {k}")
    if k == 0:
        return _move(fd, data_of(a), data_of(n), count, timeout_ms, sending)
    # The prefix buffers go first, in the same writev calls.
    cdef uint64_t *all_a = <uint64_t *>malloc(2 * (k + count) * sizeof(uint64_t))
    if all_a == NULL:
        raise MemoryError(f"an iovec table of {k + count} pieces")
    cdef uint64_t *all_n = all_a + k + count
    try:
        for i in range(k):
            PyObject_GetBuffer(prefix[i], &views[i], PyBUF_SIMPLE)
            held += 1
            all_a[i] = <uintptr_t>views[i].buf
            all_n[i] = <uint64_t>views[i].len
        if count:
            memcpy(all_a + k, data_of(a), count * sizeof(uint64_t))
            memcpy(all_n + k, data_of(n), count * sizeof(uint64_t))
        return _move(fd, all_a, all_n, k + count, timeout_ms, sending)
    finally:
        for i in range(held):
            PyBuffer_Release(&views[i])
        free(all_a)


def send_pieces(int fd, addrs, lengths, int timeout_ms, tuple prefix=()):
    """Write every [addrs[i], addrs[i] + lengths[i]) to ``fd`` in order,
    after the bytes of each contiguous buffer in ``prefix`` (a frame header,
    descriptor columns: at most 8). Returns the byte count; TimeoutError at
    the deadline, OSError on error."""
    return _stream(fd, addrs, lengths, timeout_ms, True, prefix)


def recv_pieces(int fd, addrs, lengths, int timeout_ms):
    """Read from ``fd`` straight into every [addrs[i], addrs[i] + lengths[i])
    in order. ConnectionError if the peer closes early."""
    return _stream(fd, addrs, lengths, timeout_ms, False)


def recv_exact(int fd, Py_ssize_t size, int timeout_ms):
    """Exactly ``size`` bytes from ``fd`` as bytes (a frame header), read in
    place. TimeoutError at the deadline, ConnectionError on EOF."""
    result = PyBytes_FromStringAndSize(NULL, size)
    if size == 0:
        return result
    cdef uint64_t addr = <uintptr_t>PyBytes_AS_STRING(result)
    cdef uint64_t length = <uint64_t>size
    _move(fd, &addr, &length, 1, timeout_ms, False)
    return result


def wait_readable(int fd, int timeout_ms):
    """Whether ``fd`` has bytes to read (or EOF) within ``timeout_ms``."""
    cdef int rc
    with nogil:
        rc = wait_ready(fd, POLLIN, now_ms() + timeout_ms)
    if rc == -2:
        raise OSError(errno, "poll")
    return rc == 0


def copy_pieces(dst_addrs, src_addrs, lengths):
    """memcpy every piece from src_addrs[i] to dst_addrs[i] (same-host
    shared memory). Returns the byte count."""
    cdef cnp.ndarray d = as_u64(dst_addrs), s, n
    s, n = _arrays(src_addrs, lengths)
    cdef Py_ssize_t i, count = cnp.PyArray_DIM(d, 0)
    if count != cnp.PyArray_DIM(s, 0):
        raise ValueError(f"{count} destinations but {s.shape[0]} sources")
    cdef const uint64_t *dv = data_of(d)
    cdef const uint64_t *sv = data_of(s)
    cdef const uint64_t *nv = data_of(n)
    cdef uint64_t total = 0
    with nogil:
        for i in range(count):
            memcpy(<void *><uintptr_t>dv[i], <const void *><uintptr_t>sv[i], nv[i])
            total += nv[i]
    return total
