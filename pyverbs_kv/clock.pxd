# The monotonic clock every deadline is measured on.
from posix.time cimport clock_gettime, timespec, CLOCK_MONOTONIC


cdef inline double now_s() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9
