# poll(2), for waits with a deadline on non-blocking descriptors.
cdef extern from "poll.h" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long nfds, int timeout)
    enum: POLLIN
    enum: POLLOUT
