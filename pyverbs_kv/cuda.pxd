# The CUDA runtime (cuda_runtime_api.h, driver_types.h) as its types are
# declared there; the functions are reached through pointers dlsym'd at first use.
from pyverbs_kv.accel cimport AccelObject, Memory, PinnedMemory

ctypedef int cudaError_t
ctypedef void *cudaStream_t
ctypedef int cudaMemcpyKind

# cudaPointerAttributes since CUDA 10 (type, device, devicePointer, hostPointer);
# the tail leaves room for fields a newer runtime appends.
ctypedef struct cudaPointerAttributes:
    int type
    int device
    void *devicePointer
    void *hostPointer
    long reserved[16]

ctypedef cudaError_t (*cudaGetDeviceCount_t)(int *count) noexcept nogil
ctypedef cudaError_t (*cudaSetDevice_t)(int device) noexcept nogil
ctypedef cudaError_t (*cudaGetDevice_t)(int *device) noexcept nogil
ctypedef cudaError_t (*cudaMalloc_t)(void **devPtr, size_t size) noexcept nogil
ctypedef cudaError_t (*cudaFree_t)(void *devPtr) noexcept nogil
ctypedef cudaError_t (*cudaMallocHost_t)(void **ptr, size_t size) noexcept nogil
ctypedef cudaError_t (*cudaFreeHost_t)(void *ptr) noexcept nogil
ctypedef cudaError_t (*cudaMemcpy_t)(void *dst, const void *src, size_t count,
                                     cudaMemcpyKind kind) noexcept nogil
ctypedef cudaError_t (*cudaMemcpyAsync_t)(void *dst, const void *src, size_t count,
                                          cudaMemcpyKind kind, cudaStream_t stream) noexcept nogil
ctypedef cudaError_t (*cudaMemset_t)(void *devPtr, int value, size_t count) noexcept nogil
ctypedef cudaError_t (*cudaStreamCreate_t)(cudaStream_t *stream) noexcept nogil
ctypedef cudaError_t (*cudaStreamDestroy_t)(cudaStream_t stream) noexcept nogil
ctypedef cudaError_t (*cudaStreamSynchronize_t)(cudaStream_t stream) noexcept nogil
ctypedef const char *(*cudaGetErrorString_t)(cudaError_t error) noexcept nogil
ctypedef const char *(*cudaGetErrorName_t)(cudaError_t error) noexcept nogil
ctypedef cudaError_t (*cudaGetLastError_t)() noexcept nogil
ctypedef cudaError_t (*cudaPointerGetAttributes_t)(cudaPointerAttributes *attributes,
                                                   const void *ptr) noexcept nogil


cdef class Context(AccelObject):
    cdef readonly int device_id
    cdef bint opened
    cdef check_open(self)
    cdef int bind(self) except -1


cdef class DeviceBuffer(Memory):
    cdef readonly Context ctx


cdef class HostBuffer(PinnedMemory):
    cdef readonly Context ctx


cdef class Stream(AccelObject):
    cdef cudaStream_t stream
    cdef readonly Context ctx
    cdef check_open(self)
