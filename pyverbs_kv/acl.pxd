# The AscendCL runtime (acl/acl_base.h, acl/acl_rt.h) as its types are declared
# there; the functions are reached through pointers dlsym'd at first use.
from libc.stdint cimport int32_t, uint32_t
from pyverbs_kv.accel cimport AccelObject, Memory, PinnedMemory

ctypedef int aclError
ctypedef void *aclrtStream
ctypedef int aclrtMemMallocPolicy
ctypedef int aclrtMemcpyKind

ctypedef aclError (*aclInit_t)(const char *configPath) noexcept nogil
ctypedef aclError (*aclFinalize_t)() noexcept nogil
ctypedef aclError (*aclrtSetDevice_t)(int32_t deviceId) noexcept nogil
ctypedef aclError (*aclrtResetDevice_t)(int32_t deviceId) noexcept nogil
ctypedef aclError (*aclrtGetDevice_t)(int32_t *deviceId) noexcept nogil
ctypedef aclError (*aclrtGetDeviceCount_t)(uint32_t *count) noexcept nogil
ctypedef aclError (*aclrtMalloc_t)(void **devPtr, size_t size,
                                   aclrtMemMallocPolicy policy) noexcept nogil
ctypedef aclError (*aclrtFree_t)(void *devPtr) noexcept nogil
ctypedef aclError (*aclrtMallocHost_t)(void **hostPtr, size_t size) noexcept nogil
ctypedef aclError (*aclrtFreeHost_t)(void *hostPtr) noexcept nogil
ctypedef aclError (*aclrtMemcpy_t)(void *dst, size_t destMax, const void *src, size_t count,
                                   aclrtMemcpyKind kind) noexcept nogil
ctypedef aclError (*aclrtMemset_t)(void *devPtr, size_t maxCount, int32_t value,
                                   size_t count) noexcept nogil
ctypedef aclError (*aclrtCreateStream_t)(aclrtStream *stream) noexcept nogil
ctypedef aclError (*aclrtDestroyStream_t)(aclrtStream stream) noexcept nogil
ctypedef aclError (*aclrtSynchronizeStream_t)(aclrtStream stream) noexcept nogil
ctypedef aclError (*aclrtMemcpyAsync_t)(void *dst, size_t destMax, const void *src,
                                        size_t count, aclrtMemcpyKind kind,
                                        aclrtStream stream) noexcept nogil
ctypedef const char *(*aclGetRecentErrMsg_t)() noexcept nogil


cdef class Context(AccelObject):
    cdef readonly int device_id
    cdef bint opened
    cdef object _threads
    cdef check_open(self)


cdef class DeviceBuffer(Memory):
    cdef readonly Context ctx


cdef class HostBuffer(PinnedMemory):
    cdef readonly Context ctx


cdef class Stream(AccelObject):
    cdef aclrtStream stream
    cdef readonly Context ctx
    cdef check_open(self)
