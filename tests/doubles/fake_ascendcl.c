/* A test double of libascendcl.so for machines without an Ascend NPU: the ACL
 * symbols pyverbs_kv.acl binds, with ACL's signatures and error codes, over
 * host memory (arena.h). Strict where a real device would fail or corrupt
 * silently: calls before aclInit, a copy kind that does not match the
 * pointers, use after free, double free, a stream destroyed with unsynchronised
 * copies. aclGetRecentErrMsg gives the reason. Extra fake_acl_* symbols let the
 * tests read what happened.
 *
 * Build: cc -shared -fPIC -O1 -o libascendcl.so fake_ascendcl.c -lpthread
 * (-DOMIT_aclrtMemcpyAsync leaves that symbol out, for the missing-symbol path). */
#include "arena.h"

typedef int aclError;
typedef void *aclrtStream;
typedef int aclrtMemMallocPolicy;
typedef int aclrtMemcpyKind;

#define ACL_SUCCESS 0
#define ACL_ERROR_INVALID_PARAM 100000
#define ACL_ERROR_UNINITIALIZE 100001
#define ACL_ERROR_REPEAT_INITIALIZE 100002
#define ACL_ERROR_REPEAT_FINALIZE 100037
#define ACL_ERROR_RT_PARAM_INVALID 107000
#define ACL_ERROR_RT_INVALID_DEVICEID 107001
#define ACL_ERROR_RT_CONTEXT_NULL 107002
#define ACL_ERROR_RT_INVALID_HANDLE 107017
#define ACL_ERROR_RT_FEATURE_NOT_SUPPORT 207000
#define ACL_ERROR_RT_MEMORY_ALLOCATION 207001
#define ACL_ERROR_RT_MEMORY_FREE 207002
#define ACL_ERROR_RT_NO_STREAM_RESOURCE 207008

static const char *kind_names[] = {"ACL_MEMCPY_HOST_TO_HOST", "ACL_MEMCPY_HOST_TO_DEVICE",
                                   "ACL_MEMCPY_DEVICE_TO_HOST", "ACL_MEMCPY_DEVICE_TO_DEVICE"};
static int initialized;
static int device_refs[FAKE_DEVICES];
static __thread int current_device = -1;

#define ENTER(name)                                   \
    pthread_mutex_lock(&lock);                        \
    count_call(name);                                 \
    aclError rc_ = ACL_SUCCESS;                       \
    const char *call_ = name;                         \
    (void)call_
#define FAIL(code, ...) do { set_msg(__VA_ARGS__); rc_ = (code); goto out; } while (0)
#define LEAVE out: __attribute__((unused)); pthread_mutex_unlock(&lock); return rc_
#define NEED_INIT() do { if (!initialized) \
    FAIL(ACL_ERROR_UNINITIALIZE, "%s: ACL is not initialised (call aclInit first)", call_); \
} while (0)
#define NEED_DEVICE() do { NEED_INIT(); if (current_device < 0) \
    FAIL(ACL_ERROR_RT_CONTEXT_NULL, "%s: no device set in this thread (aclrtSetDevice)", call_); \
} while (0)

aclError aclInit(const char *configPath)
{
    ENTER("aclInit");
    (void)configPath;
    if (initialized)
        FAIL(ACL_ERROR_REPEAT_INITIALIZE, "aclInit: ACL is already initialised");
    initialized = 1;
    LEAVE;
}

aclError aclFinalize(void)
{
    ENTER("aclFinalize");
    if (!initialized)
        FAIL(ACL_ERROR_REPEAT_FINALIZE, "aclFinalize: ACL is not initialised");
    initialized = 0;
    memset(device_refs, 0, sizeof(device_refs));
    current_device = -1;
    LEAVE;
}

aclError aclrtSetDevice(int32_t deviceId)
{
    ENTER("aclrtSetDevice");
    NEED_INIT();
    if (deviceId < 0 || deviceId >= FAKE_DEVICES)
        FAIL(ACL_ERROR_RT_INVALID_DEVICEID, "aclrtSetDevice: device %d does not exist "
             "(%d devices)", deviceId, FAKE_DEVICES);
    device_refs[deviceId]++;
    current_device = deviceId;
    LEAVE;
}

aclError aclrtResetDevice(int32_t deviceId)
{
    ENTER("aclrtResetDevice");
    NEED_INIT();
    if (deviceId < 0 || deviceId >= FAKE_DEVICES)
        FAIL(ACL_ERROR_RT_INVALID_DEVICEID, "aclrtResetDevice: device %d does not exist",
             deviceId);
    if (device_refs[deviceId] == 0)
        FAIL(ACL_ERROR_RT_PARAM_INVALID, "aclrtResetDevice: device %d was not set", deviceId);
    if (--device_refs[deviceId] == 0 && current_device == deviceId)
        current_device = -1;
    LEAVE;
}

aclError aclrtGetDevice(int32_t *deviceId)
{
    ENTER("aclrtGetDevice");
    NEED_DEVICE();
    if (deviceId == NULL)
        FAIL(ACL_ERROR_INVALID_PARAM, "aclrtGetDevice: deviceId is NULL");
    *deviceId = current_device;
    LEAVE;
}

aclError aclrtGetDeviceCount(uint32_t *count)
{
    ENTER("aclrtGetDeviceCount");
    NEED_INIT();
    if (count == NULL)
        FAIL(ACL_ERROR_INVALID_PARAM, "aclrtGetDeviceCount: count is NULL");
    *count = FAKE_DEVICES;
    LEAVE;
}

aclError aclrtMalloc(void **devPtr, size_t size, aclrtMemMallocPolicy policy)
{
    ENTER("aclrtMalloc");
    NEED_DEVICE();
    /* The placement values 0-7, optionally or'ed with the bandwidth flags. */
    if (devPtr == NULL || size == 0 || (policy & ~0x1100) > 7)
        FAIL(ACL_ERROR_INVALID_PARAM, "aclrtMalloc: devPtr=%p size=%zu policy=%d invalid",
             (void *)devPtr, size, policy);
    *devPtr = arena_alloc(&dev_arena, size, current_device);
    if (*devPtr == NULL)
        FAIL(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMalloc: out of device memory for %zu bytes",
             size);
    LEAVE;
}

aclError aclrtFree(void *devPtr)
{
    ENTER("aclrtFree");
    NEED_INIT();
    int r = arena_free(&dev_arena, devPtr, "aclrtMalloc", "aclrtFree");
    if (r == -2)
        rc_ = ACL_ERROR_RT_MEMORY_FREE;
    else if (r)
        rc_ = ACL_ERROR_RT_PARAM_INVALID;
    LEAVE;
}

aclError aclrtMallocHost(void **hostPtr, size_t size)
{
    ENTER("aclrtMallocHost");
    NEED_DEVICE();
    if (hostPtr == NULL || size == 0)
        FAIL(ACL_ERROR_INVALID_PARAM, "aclrtMallocHost: hostPtr=%p size=%zu invalid",
             (void *)hostPtr, size);
    *hostPtr = arena_alloc(&host_arena, size, -1);
    if (*hostPtr == NULL)
        FAIL(ACL_ERROR_RT_MEMORY_ALLOCATION, "aclrtMallocHost: out of memory for %zu bytes",
             size);
    LEAVE;
}

aclError aclrtFreeHost(void *hostPtr)
{
    ENTER("aclrtFreeHost");
    NEED_INIT();
    int r = arena_free(&host_arena, hostPtr, "aclrtMallocHost", "aclrtFreeHost");
    if (r == -2)
        rc_ = ACL_ERROR_RT_MEMORY_FREE;
    else if (r)
        rc_ = ACL_ERROR_RT_PARAM_INVALID;
    LEAVE;
}

/* The checks aclrtMemcpy and aclrtMemcpyAsync share; 0 or an aclError. */
static aclError check_copy(const char *call, void *dst, size_t destMax, const void *src,
                           size_t count, aclrtMemcpyKind kind)
{
    if (kind < 0 || kind > 3) {
        set_msg("%s: %d is not an aclrtMemcpyKind", call, kind);
        return ACL_ERROR_INVALID_PARAM;
    }
    if (count > destMax) {
        set_msg("%s: count %zu exceeds destMax %zu", call, count, destMax);
        return ACL_ERROR_INVALID_PARAM;
    }
    int dst_dev = kind == 1 || kind == 3, src_dev = kind == 2 || kind == 3;
    if (check_side(call, "dst", dst, count, dst_dev, kind_names[kind])
        || check_side(call, "src", src, count, src_dev, kind_names[kind]))
        return ACL_ERROR_RT_PARAM_INVALID;
    return ACL_SUCCESS;
}

aclError aclrtMemcpy(void *dst, size_t destMax, const void *src, size_t count,
                     aclrtMemcpyKind kind)
{
    ENTER("aclrtMemcpy");
    NEED_DEVICE();
    rc_ = check_copy(call_, dst, destMax, src, count, kind);
    if (rc_ == ACL_SUCCESS) {
        copy_delay();
        memmove(dst, src, count);
    }
    LEAVE;
}

aclError aclrtMemset(void *devPtr, size_t maxCount, int32_t value, size_t count)
{
    ENTER("aclrtMemset");
    NEED_DEVICE();
    if (count > maxCount)
        FAIL(ACL_ERROR_INVALID_PARAM, "aclrtMemset: count %zu exceeds maxCount %zu", count,
             maxCount);
    if (check_side(call_, "devPtr", devPtr, count, 1, "(memset: device)")) {
        rc_ = ACL_ERROR_RT_PARAM_INVALID;
        goto out;
    }
    memset(devPtr, value, count);
    LEAVE;
}

aclError aclrtCreateStream(aclrtStream *stream)
{
    ENTER("aclrtCreateStream");
    NEED_DEVICE();
    if (stream == NULL)
        FAIL(ACL_ERROR_INVALID_PARAM, "aclrtCreateStream: stream is NULL");
    *stream = stream_new();
    if (*stream == NULL)
        FAIL(ACL_ERROR_RT_NO_STREAM_RESOURCE, "aclrtCreateStream: all %d streams in use",
             MAX_STREAMS);
    LEAVE;
}

aclError aclrtDestroyStream(aclrtStream stream)
{
    ENTER("aclrtDestroyStream");
    NEED_INIT();
    struct stream *s = stream_of(stream);
    if (s == NULL)
        FAIL(ACL_ERROR_RT_INVALID_HANDLE, "aclrtDestroyStream: %p is not a live stream", stream);
    if (s->npending)
        FAIL(ACL_ERROR_RT_PARAM_INVALID, "aclrtDestroyStream: %d copies were never "
             "synchronised (aclrtSynchronizeStream first)", s->npending);
    s->live = 0;
    LEAVE;
}

aclError aclrtSynchronizeStream(aclrtStream stream)
{
    ENTER("aclrtSynchronizeStream");
    NEED_INIT();
    struct stream *s = stream_of(stream);
    if (s == NULL)
        FAIL(ACL_ERROR_RT_INVALID_HANDLE, "aclrtSynchronizeStream: %p is not a live stream",
             stream);
    if (stream_run(call_, s))
        rc_ = ACL_ERROR_RT_PARAM_INVALID;
    LEAVE;
}

#ifndef OMIT_aclrtMemcpyAsync
aclError aclrtMemcpyAsync(void *dst, size_t destMax, const void *src, size_t count,
                          aclrtMemcpyKind kind, aclrtStream stream)
{
    ENTER("aclrtMemcpyAsync");
    NEED_DEVICE();
    struct stream *s = stream_of(stream);
    if (s == NULL)
        FAIL(ACL_ERROR_RT_INVALID_HANDLE, "aclrtMemcpyAsync: %p is not a live stream", stream);
    if (kind == 0)      /* as on Ascend EP: no asynchronous host-to-host copy */
        FAIL(ACL_ERROR_RT_FEATURE_NOT_SUPPORT,
             "aclrtMemcpyAsync: ACL_MEMCPY_HOST_TO_HOST is not supported asynchronously");
    rc_ = check_copy(call_, dst, destMax, src, count, kind);
    if (rc_ != ACL_SUCCESS)
        goto out;
    if (s->npending == MAX_PENDING)
        FAIL(ACL_ERROR_RT_PARAM_INVALID, "aclrtMemcpyAsync: more than %d copies queued",
             MAX_PENDING);
    s->pending[s->npending++] = (struct copy){dst, src, count};
    LEAVE;
}
#endif

const char *aclGetRecentErrMsg(void)
{
    pthread_mutex_lock(&lock);
    count_call("aclGetRecentErrMsg");
    pthread_mutex_unlock(&lock);
    if (!has_msg)
        return NULL;
    has_msg = 0;        /* as ACL: the message is handed out once */
    return last_msg;
}

/* For the tests (ctypes): calls made per symbol, live allocations, init state. */
long fake_acl_calls(const char *name) { return calls_of(name); }
void fake_acl_reset_calls(void) { reset_calls(); }
void fake_acl_set_copy_delay_us(long us) { copy_delay_us = us; }
long fake_acl_live_device_blocks(void) { return live_blocks(&dev_arena); }
long fake_acl_live_host_blocks(void) { return live_blocks(&host_arena); }
int fake_acl_initialized(void) { return initialized; }
int fake_acl_device_refs(int device) { return device >= 0 && device < FAKE_DEVICES
                                              ? device_refs[device] : -1; }
