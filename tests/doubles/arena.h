/* What the accelerator runtime test doubles (fake_ascendcl.c, fake_cudart.c)
 * share: two arenas of never-reused addresses, one whose memory stands for
 * device memory and one for pinned host memory, so that any pointer is known
 * to be device, pinned host (live or freed) or plain host memory; streams whose
 * copies run only when the stream is synchronised; per-call counters; the last
 * failure's text. One lock guards it all: the bindings call without the GIL. */
#ifndef FAKE_ARENA_H
#define FAKE_ARENA_H

#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#define ARENA_BYTES (1ULL << 32)        /* reserved, not committed (MAP_NORESERVE) */
#define ARENA_LIMIT (1ULL << 28)        /* an allocation above this fails as out of memory */
#define MAX_ALLOCS 65536
#define MAX_STREAMS 64
#define MAX_PENDING 1024
#define FAKE_DEVICES 2
#define POISON 0xdb

struct block { uintptr_t base; size_t size; int live; int device; };
struct arena {
    char *base;
    size_t used;
    size_t align;
    int nblocks;
    struct block blocks[MAX_ALLOCS];
};
struct copy { void *dst; const void *src; size_t n; };
struct stream {
    int live;
    int npending;
    struct copy pending[MAX_PENDING];
};

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static struct arena dev_arena = {.align = 512}, host_arena = {.align = 64};
static struct stream streams[MAX_STREAMS];
static __thread char last_msg[512];
static __thread int has_msg;

/* Call counters, read by the tests through the exported *_calls(name). */
#define MAX_NAMES 40
static struct { const char *name; long n; } calls[MAX_NAMES];

static void count_call(const char *name)
{
    for (int i = 0; i < MAX_NAMES; i++) {
        if (calls[i].name == NULL) {
            calls[i].name = name;
        }
        if (strcmp(calls[i].name, name) == 0) {
            calls[i].n++;
            return;
        }
    }
}

static long calls_of(const char *name)
{
    long n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < MAX_NAMES && calls[i].name; i++)
        if (strcmp(calls[i].name, name) == 0)
            n = calls[i].n;
    pthread_mutex_unlock(&lock);
    return n;
}

/* How long each copy takes, in microseconds (0: no delay), so that the tests can
 * see whether the binding holds the GIL while the runtime works. */
static long copy_delay_us;

static void copy_delay(void)
{
    if (copy_delay_us > 0)
        usleep((useconds_t)copy_delay_us);
}

static void reset_calls(void)
{
    pthread_mutex_lock(&lock);
    memset(calls, 0, sizeof(calls));
    pthread_mutex_unlock(&lock);
}

static void set_msg(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(last_msg, sizeof(last_msg), fmt, ap);
    va_end(ap);
    has_msg = 1;
}

static int arena_ready(struct arena *a)
{
    if (a->base)
        return 1;
    void *p = mmap(NULL, ARENA_BYTES, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return 0;
    a->base = p;
    return 1;
}

static int in_arena(const struct arena *a, uintptr_t p)
{
    return a->base && p >= (uintptr_t)a->base && p < (uintptr_t)a->base + ARENA_BYTES;
}

/* The block holding p (blocks are in address order: bump allocation). */
static struct block *block_of(struct arena *a, uintptr_t p)
{
    int lo = 0, hi = a->nblocks - 1;
    while (lo <= hi) {
        int mid = (lo + hi) / 2;
        struct block *b = &a->blocks[mid];
        if (p < b->base)
            hi = mid - 1;
        else if (p >= b->base + b->size)
            lo = mid + 1;
        else
            return b;
    }
    return NULL;
}

static void *arena_alloc(struct arena *a, size_t size, int device)
{
    if (!arena_ready(a) || a->nblocks == MAX_ALLOCS || size > ARENA_LIMIT)
        return NULL;
    size_t start = (a->used + a->align - 1) & ~(a->align - 1);
    if (start + size > ARENA_BYTES)
        return NULL;
    struct block *b = &a->blocks[a->nblocks++];
    b->base = (uintptr_t)a->base + start;
    b->size = size;
    b->live = 1;
    b->device = device;
    a->used = start + size;
    return (void *)b->base;
}

enum span_state { SPAN_OK, SPAN_FREED, SPAN_OUTSIDE, SPAN_PAST_END };

/* Where [p, p+n) lies within arena a: a live block, a freed one, no block
 * (a gap or never allocated) or past the end of its block. */
static enum span_state span_in(struct arena *a, uintptr_t p, size_t n)
{
    struct block *b = block_of(a, p);
    if (b == NULL)
        return SPAN_OUTSIDE;
    if (!b->live)
        return SPAN_FREED;
    if (n > b->base + b->size - p)
        return SPAN_PAST_END;
    return SPAN_OK;
}

/* 0 when p starts a live block of a; else the message is set. */
static int arena_free(struct arena *a, void *p, const char *what, const char *freer)
{
    struct block *b = in_arena(a, (uintptr_t)p) ? block_of(a, (uintptr_t)p) : NULL;
    if (b == NULL || b->base != (uintptr_t)p) {
        set_msg("%s(%p): not an address %s returned", freer, p, what);
        return -1;
    }
    if (!b->live) {
        set_msg("%s(%p): double free, the block was already freed", freer, p);
        return -2;
    }
    b->live = 0;
    memset(p, POISON, b->size);     /* a stale reader sees garbage, not old data */
    return 0;
}

static long live_blocks(struct arena *a)
{
    long n = 0;
    pthread_mutex_lock(&lock);
    for (int i = 0; i < a->nblocks; i++)
        n += a->blocks[i].live;
    pthread_mutex_unlock(&lock);
    return n;
}

/* Checks one side of a copy: is_device says what the copy kind claims.
 * 0 when fine; else the message is set. */
static int check_side(const char *call, const char *side, const void *ptr, size_t n,
                      int is_device, const char *kind_name)
{
    uintptr_t p = (uintptr_t)ptr;
    if (ptr == NULL) {
        set_msg("%s: %s is NULL", call, side);
        return -1;
    }
    if (in_arena(&dev_arena, p)) {
        if (!is_device) {
            set_msg("%s: %s %p is device memory but the copy kind %s says host",
                    call, side, ptr, kind_name);
            return -1;
        }
        switch (span_in(&dev_arena, p, n)) {
        case SPAN_OK: return 0;
        case SPAN_FREED:
            set_msg("%s: %s %p is device memory that was freed (use after free)", call, side, ptr);
            return -1;
        case SPAN_PAST_END:
            set_msg("%s: %s %p + %zu bytes passes the end of its device block", call, side, ptr, n);
            return -1;
        default:
            set_msg("%s: %s %p is not in any device allocation", call, side, ptr);
            return -1;
        }
    }
    if (is_device) {
        set_msg("%s: %s %p is host memory but the copy kind %s says device",
                call, side, ptr, kind_name);
        return -1;
    }
    if (in_arena(&host_arena, p)) {
        switch (span_in(&host_arena, p, n)) {
        case SPAN_OK: return 0;
        case SPAN_FREED:
            set_msg("%s: %s %p is pinned host memory that was freed (use after free)",
                    call, side, ptr);
            return -1;
        default:
            set_msg("%s: %s %p + %zu bytes passes the end of its pinned host block",
                    call, side, ptr, n);
            return -1;
        }
    }
    return 0;                       /* plain (pageable) host memory */
}

static int is_device_ptr(const void *p) { return in_arena(&dev_arena, (uintptr_t)p); }

static struct stream *stream_of(void *handle)
{
    struct stream *s = handle;
    if (s < streams || s >= streams + MAX_STREAMS || !s->live)
        return NULL;
    return s;
}

static struct stream *stream_new(void)
{
    for (int i = 0; i < MAX_STREAMS; i++)
        if (!streams[i].live) {
            streams[i].live = 1;
            streams[i].npending = 0;
            return &streams[i];
        }
    return NULL;
}

/* Runs the queued copies; a side freed since it was queued fails the whole
 * synchronisation (as a device fault would) and the rest are dropped. */
static int stream_run(const char *call, struct stream *s)
{
    int rc = 0;
    for (int i = 0; i < s->npending; i++) {
        struct copy *c = &s->pending[i];
        int dst_dev = is_device_ptr(c->dst), src_dev = is_device_ptr(c->src);
        if (rc == 0 && (check_side(call, "queued copy dst", c->dst, c->n, dst_dev, "(queued)")
                        || check_side(call, "queued copy src", c->src, c->n, src_dev,
                                      "(queued)")))
            rc = -1;
        if (rc == 0) {
            copy_delay();
            memmove(c->dst, c->src, c->n);
        }
    }
    s->npending = 0;
    return rc;
}

#endif
