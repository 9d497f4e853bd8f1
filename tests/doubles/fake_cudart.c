/* A test double of libcudart for machines without a GPU: the CUDA runtime
 * symbols pyverbs_kv.cuda binds, with CUDA's signatures and error codes, over
 * host memory (arena.h). Strict where a real GPU would fail or corrupt
 * silently: a copy kind that does not match the pointers, use after free,
 * double free, a stream destroyed with unsynchronised copies. CUDA reports
 * only a code; fake_cudart_last_detail() says what the double detected, and the
 * other fake_cudart_* symbols let the tests read what happened.
 *
 * Build: cc -shared -fPIC -O1 -o libcudart.so fake_cudart.c -lpthread
 * (-DOMIT_cudaMemcpyAsync leaves that symbol out, for the missing-symbol path). */
#include "arena.h"

typedef int cudaError_t;
typedef void *cudaStream_t;
typedef int cudaMemcpyKind;

struct cudaPointerAttributes { int type; int device; void *devicePointer; void *hostPointer; };

#define cudaSuccess 0
#define cudaErrorInvalidValue 1
#define cudaErrorMemoryAllocation 2
#define cudaErrorInvalidMemcpyDirection 21
#define cudaErrorInvalidDevice 101
#define cudaErrorInvalidResourceHandle 400

static const char *kind_names[] = {"cudaMemcpyHostToHost", "cudaMemcpyHostToDevice",
                                   "cudaMemcpyDeviceToHost", "cudaMemcpyDeviceToDevice",
                                   "cudaMemcpyDefault"};
static __thread int current_device;
static __thread cudaError_t last_error;

#define ENTER(name)                                   \
    pthread_mutex_lock(&lock);                        \
    count_call(name);                                 \
    cudaError_t rc_ = cudaSuccess;                    \
    const char *call_ = name;                         \
    (void)call_
#define FAIL(code, ...) do { set_msg(__VA_ARGS__); rc_ = (code); goto out; } while (0)
#define LEAVE out: __attribute__((unused)); if (rc_) last_error = rc_; pthread_mutex_unlock(&lock); return rc_

cudaError_t cudaGetDeviceCount(int *count)
{
    ENTER("cudaGetDeviceCount");
    if (count == NULL)
        FAIL(cudaErrorInvalidValue, "cudaGetDeviceCount: count is NULL");
    *count = FAKE_DEVICES;
    LEAVE;
}

cudaError_t cudaSetDevice(int device)
{
    ENTER("cudaSetDevice");
    if (device < 0 || device >= FAKE_DEVICES)
        FAIL(cudaErrorInvalidDevice, "cudaSetDevice: device %d does not exist (%d devices)",
             device, FAKE_DEVICES);
    current_device = device;
    LEAVE;
}

cudaError_t cudaGetDevice(int *device)
{
    ENTER("cudaGetDevice");
    if (device == NULL)
        FAIL(cudaErrorInvalidValue, "cudaGetDevice: device is NULL");
    *device = current_device;
    LEAVE;
}

cudaError_t cudaMalloc(void **devPtr, size_t size)
{
    ENTER("cudaMalloc");
    if (devPtr == NULL)
        FAIL(cudaErrorInvalidValue, "cudaMalloc: devPtr is NULL");
    *devPtr = arena_alloc(&dev_arena, size ? size : 1, current_device);
    if (*devPtr == NULL)
        FAIL(cudaErrorMemoryAllocation, "cudaMalloc: out of device memory for %zu bytes", size);
    LEAVE;
}

cudaError_t cudaFree(void *devPtr)
{
    ENTER("cudaFree");
    if (devPtr != NULL && arena_free(&dev_arena, devPtr, "cudaMalloc", "cudaFree"))
        rc_ = cudaErrorInvalidValue;
    LEAVE;
}

cudaError_t cudaMallocHost(void **ptr, size_t size)
{
    ENTER("cudaMallocHost");
    if (ptr == NULL)
        FAIL(cudaErrorInvalidValue, "cudaMallocHost: ptr is NULL");
    *ptr = arena_alloc(&host_arena, size ? size : 1, current_device);
    if (*ptr == NULL)
        FAIL(cudaErrorMemoryAllocation, "cudaMallocHost: out of memory for %zu bytes", size);
    LEAVE;
}

cudaError_t cudaFreeHost(void *ptr)
{
    ENTER("cudaFreeHost");
    if (ptr != NULL && arena_free(&host_arena, ptr, "cudaMallocHost", "cudaFreeHost"))
        rc_ = cudaErrorInvalidValue;
    LEAVE;
}

/* The checks cudaMemcpy and cudaMemcpyAsync share; cudaMemcpyDefault takes
 * the kinds from the pointers, as with unified addressing. */
static cudaError_t check_copy(const char *call, void *dst, const void *src, size_t count,
                              cudaMemcpyKind kind)
{
    if (kind < 0 || kind > 4) {
        set_msg("%s: %d is not a cudaMemcpyKind", call, kind);
        return cudaErrorInvalidMemcpyDirection;
    }
    int dst_dev = kind == 1 || kind == 3, src_dev = kind == 2 || kind == 3;
    if (kind == 4) {
        dst_dev = is_device_ptr(dst);
        src_dev = is_device_ptr(src);
    }
    if (check_side(call, "dst", dst, count, dst_dev, kind_names[kind])
        || check_side(call, "src", src, count, src_dev, kind_names[kind]))
        return cudaErrorInvalidValue;
    return cudaSuccess;
}

cudaError_t cudaMemcpy(void *dst, const void *src, size_t count, cudaMemcpyKind kind)
{
    ENTER("cudaMemcpy");
    rc_ = check_copy(call_, dst, src, count, kind);
    if (rc_ == cudaSuccess) {
        copy_delay();
        memmove(dst, src, count);
    }
    LEAVE;
}

#ifndef OMIT_cudaMemcpyAsync
cudaError_t cudaMemcpyAsync(void *dst, const void *src, size_t count, cudaMemcpyKind kind,
                            cudaStream_t stream)
{
    ENTER("cudaMemcpyAsync");
    struct stream *s = stream_of(stream);
    if (s == NULL)      /* the double has no legacy default stream: be explicit */
        FAIL(cudaErrorInvalidResourceHandle, "cudaMemcpyAsync: %p is not a live stream",
             stream);
    rc_ = check_copy(call_, dst, src, count, kind);
    if (rc_ != cudaSuccess)
        goto out;
    if (s->npending == MAX_PENDING)
        FAIL(cudaErrorInvalidValue, "cudaMemcpyAsync: more than %d copies queued", MAX_PENDING);
    s->pending[s->npending++] = (struct copy){dst, src, count};
    LEAVE;
}
#endif

cudaError_t cudaMemset(void *devPtr, int value, size_t count)
{
    ENTER("cudaMemset");
    if (check_side(call_, "devPtr", devPtr, count, 1, "(memset: device)")) {
        rc_ = cudaErrorInvalidValue;
        goto out;
    }
    memset(devPtr, value, count);
    LEAVE;
}

cudaError_t cudaStreamCreate(cudaStream_t *stream)
{
    ENTER("cudaStreamCreate");
    if (stream == NULL)
        FAIL(cudaErrorInvalidValue, "cudaStreamCreate: stream is NULL");
    *stream = stream_new();
    if (*stream == NULL)
        FAIL(cudaErrorMemoryAllocation, "cudaStreamCreate: all %d streams in use", MAX_STREAMS);
    LEAVE;
}

cudaError_t cudaStreamDestroy(cudaStream_t stream)
{
    ENTER("cudaStreamDestroy");
    struct stream *s = stream_of(stream);
    if (s == NULL)
        FAIL(cudaErrorInvalidResourceHandle, "cudaStreamDestroy: %p is not a live stream",
             stream);
    if (s->npending)
        FAIL(cudaErrorInvalidValue, "cudaStreamDestroy: %d copies were never synchronised",
             s->npending);
    s->live = 0;
    LEAVE;
}

cudaError_t cudaStreamSynchronize(cudaStream_t stream)
{
    ENTER("cudaStreamSynchronize");
    struct stream *s = stream_of(stream);
    if (s == NULL)
        FAIL(cudaErrorInvalidResourceHandle, "cudaStreamSynchronize: %p is not a live stream",
             stream);
    if (stream_run(call_, s))
        rc_ = cudaErrorInvalidValue;
    LEAVE;
}

cudaError_t cudaPointerGetAttributes(struct cudaPointerAttributes *attributes, const void *ptr)
{
    ENTER("cudaPointerGetAttributes");
    if (attributes == NULL)
        FAIL(cudaErrorInvalidValue, "cudaPointerGetAttributes: attributes is NULL");
    memset(attributes, 0, sizeof(*attributes));
    uintptr_t p = (uintptr_t)ptr;
    struct arena *a = in_arena(&dev_arena, p) ? &dev_arena
                      : in_arena(&host_arena, p) ? &host_arena : NULL;
    struct block *b = a ? block_of(a, p) : NULL;
    if (b && b->live) {     /* else type 0: memory the runtime does not know (CUDA >= 11) */
        attributes->type = a == &dev_arena ? 2 : 1;
        attributes->device = b->device;
        attributes->devicePointer = (void *)ptr;
        attributes->hostPointer = a == &host_arena ? (void *)ptr : NULL;
    }
    LEAVE;
}

static const char *names[][2] = {
    {"cudaSuccess", "no error"},
    {"cudaErrorInvalidValue", "invalid argument"},
    {"cudaErrorMemoryAllocation", "out of memory"},
};

const char *cudaGetErrorName(cudaError_t error)
{
    if (error >= 0 && error <= 2)
        return names[error][0];
    switch (error) {
    case cudaErrorInvalidMemcpyDirection: return "cudaErrorInvalidMemcpyDirection";
    case cudaErrorInvalidDevice: return "cudaErrorInvalidDevice";
    case cudaErrorInvalidResourceHandle: return "cudaErrorInvalidResourceHandle";
    default: return "cudaErrorUnknown";
    }
}

const char *cudaGetErrorString(cudaError_t error)
{
    if (error >= 0 && error <= 2)
        return names[error][1];
    switch (error) {
    case cudaErrorInvalidMemcpyDirection: return "invalid copy direction for memcpy";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorInvalidResourceHandle: return "invalid resource handle";
    default: return "unknown error";
    }
}

cudaError_t cudaGetLastError(void)
{
    cudaError_t e = last_error;
    last_error = cudaSuccess;
    return e;
}

/* For the tests (ctypes). */
long fake_cudart_calls(const char *name) { return calls_of(name); }
void fake_cudart_reset_calls(void) { reset_calls(); }
void fake_cudart_set_copy_delay_us(long us) { copy_delay_us = us; }
long fake_cudart_live_device_blocks(void) { return live_blocks(&dev_arena); }
long fake_cudart_live_host_blocks(void) { return live_blocks(&host_arena); }
const char *fake_cudart_last_detail(void) { return has_msg ? last_msg : ""; }
