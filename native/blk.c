/*
 * blk.c - the C I/O thread of one virtio-blk device: steps 1-4 of DESIGN.md's
 * "Request flow" without the GIL.
 *
 * One loop: take what Python handed back, pop every available chain of
 * every queue and parse it (exactly as pykvm/virtio/blk.py does: same checks,
 * same statuses), submit the I/O as one batch, reap completions, write the
 * status bytes and used elements, and interrupt where event idx says so
 * (with irq_coalesce_ns, at most once per that time while the engine holds
 * more requests; see pykvm_blk_irq_wait).
 * While work keeps coming it polls (kicks suppressed: VIRTQ_USED_F_NO_NOTIFY
 * or a stale avail_event); after an adaptive while without work it re-enables
 * kicks and sleeps in epoll on the kick eventfds, the engine's notifier and
 * a wake eventfd (Python: stop, punted requests finished).
 *
 * Tokens are (queue << 16) | head; each queue keeps a table of requests in
 * flight indexed by head, holding the status byte's host address, the used
 * length and the I/O vector the engine works on.
 */
#include <endian.h>
#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/uio.h>

#define PYKVM_BLK_EXTENT_WRITABLE 1
#define PYKVM_BLK_PUNT_SERVE 1
#define PYKVM_BLK_PUNT_LOG 2
#define PYKVM_BLK_PUNT_FATAL 3
#define PYKVM_BLK_PUNT_ERROR 4
#define PYKVM_BLK_PUNT_POWER 5

struct pykvm_blk_extent {
    uint64_t offset;
    uint64_t length;
    uint64_t host_offset;
    int32_t fd;
    uint32_t flags;
};

struct pykvm_blk_queue {
    struct pykvm_vq *vq;
    int32_t kick_fd;
    int32_t call_fd;
    uint32_t *isr;
    uint32_t isr_bit;
};

struct pykvm_blk_config {
    const struct pykvm_mem_region *regions;
    uint32_t nregions;
    struct pykvm_blk_queue *queues;
    uint32_t nqueues;
    const char *engine;
    uint64_t capacity;
    uint64_t features;
    uint32_t align;
    int32_t flush_fd;
    uint8_t read_only;
    uint8_t write_cache;
    uint8_t no_flush;
    uint8_t serial[20];
    uint32_t poll_max_ns;
    uint32_t irq_coalesce_ns;
    const struct pykvm_blk_extent *map;
    uint32_t nmap;
    struct pykvm_throttle *throttle;
    struct pykvm_inject *inject;
    struct pykvm_trace *trace;
    struct pykvm_wlog *wlog;
    uint32_t seg_max;
    uint32_t size_max;
};

struct pykvm_blk_counters {
    uint64_t requests;
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t errors;
    uint64_t submitted;
    uint64_t flushes;
    uint64_t batches;
    uint64_t completions;
    uint64_t completion_batches;
    uint64_t interrupts;
    uint64_t interrupts_suppressed;
    uint64_t punts;
    uint64_t poll_hits;
    uint64_t sleeps;
    uint64_t interrupts_deferred;
    uint64_t throttled;
    uint64_t injected;
};

struct pykvm_blk_punt {
    int32_t kind;
    uint32_t queue;
    uint16_t head;
    uint32_t used_len;
    uint32_t nreadable;
    uint32_t nsegs;
    struct pykvm_vq_seg *segs;
    char message[256];
    int32_t error;
};

/* virtio-blk (5.2.6), the values of pykvm/virtio/blk.py */
#define BLK_T_IN 0
#define BLK_T_OUT 1
#define BLK_T_FLUSH 4
#define BLK_T_GET_ID 8
#define BLK_T_DISCARD 11
#define BLK_T_WRITE_ZEROES 13
#define BLK_T_SECURE_ERASE 14
#define BLK_S_OK 0
#define BLK_S_IOERR 1
#define BLK_S_UNSUPP 2
#define BLK_SECTOR 512
#define BLK_HEADER 16
#define BLK_ID_BYTES 20
/* A guest request's limits; blk.h declares them, blk.py has the same (MAX_REQUEST_BYTES,
 * MAX_SEGMENTS; tests/unit/test_fastpath_blk.py checks that they agree) */
#define PYKVM_BLK_MAX_REQUEST_BYTES (256ull << 20)
#define PYKVM_BLK_MAX_SEGMENTS 1024

#define REQ_FREE 0
#define REQ_IO 1        /* with the engine */
#define REQ_PYTHON 2    /* with Python (punted, or waiting for its log line) */
#define REQ_HELD 3      /* mapped, waiting for its throttle group (b->held) */
#define REQ_DELAYED 4   /* mapped, waiting out a blkdebug delay or hang (b->delayed) */
#define REQ_DONE_HELD 5 /* done, its completion held by a blkdebug rule (b->holds) */
#define OP_FLUSH_AFTER 0xFF  /* writethrough: the flush after a write */

#define REQ_INLINE_IOV 8
#define TAG_ENGINE 0xFFFF0001u
#define TAG_WAKE 0xFFFF0002u
#define TAG_ROUTE 0xFFFF0003u   /* an NBD connection's socket: replies to read */
#define BLK_ROUTES 8
#define POLL_GROW_START_NS 4000

struct blk_req {
    uint8_t state;
    uint8_t op;
    uint8_t then_flush;
    uint8_t *status;
    uint32_t used_len;
    uint32_t nbytes;
    int32_t fd;                 /* the data's host fd (the flush after a write goes there) */
    uint64_t map_gen;           /* the mapping table it was mapped with */
    int64_t result;             /* of the write, while its flush runs */
    uint32_t niov;
    struct iovec *iov;
    struct iovec small[REQ_INLINE_IOV];
    /* REQ_HELD: the guest offset, and the chain in case it must be punted
     * once its time comes (the mapping table changed meanwhile) */
    uint64_t offset;
    struct pykvm_vq_seg *held_segs;
    uint32_t held_nsegs, held_nreadable;
    /* blkdebug (inject.h): what the rule that fired asks of the rest of the
     * request, and for REQ_DELAYED, until when (UINT64_MAX: a hang, released
     * when the engine's release generation moves past hang_gen) */
    uint8_t inj_action;
    int16_t rule;
    int32_t inj_value;
    uint32_t inj_order;
    uint64_t inj_seed;
    uint64_t inj_timeout_ns;
    uint64_t inj_order_list;
    uint32_t inj_order_n;
    uint32_t inj_release_after;
    uint64_t due_ns;
    uint64_t hang_gen;
    /* blklogwrites: a write's FUA (writethrough), a flush's ticket */
    uint8_t wlog_fua;
    uint64_t wlog_ticket;
    /* the trace record's fields */
    uint8_t type;
    uint64_t sector;
    uint64_t submit_ns;
};

struct blk_queue {
    struct pykvm_vq *vq;
    int kick_fd;
    int call_fd;                /* read and written atomically: Python may change it */
    uint32_t *isr;
    uint32_t isr_bit;
    uint32_t index;             /* in this thread's queues (punts, forwarding, completion);
                                   the virtqueue's own number, for messages: vq->index */
    struct pykvm_vq_chain chain;
    struct blk_req *reqs;       /* by head */
    uint32_t nreqs;
    uint8_t broken;             /* fatal error: no more pops */
    uint8_t kicks_on;           /* available buffer notifications enabled */
    uint64_t irq_ns;            /* when the last interrupt was sent */
    uint64_t irq_due_ns;        /* a deferred decision is due then; 0: none */
};

struct blk_return {
    uint32_t queue;
    uint16_t head;
    uint32_t used_len;
};

struct pykvm_blk {
    pthread_t thread;
    int started;
    struct pykvm_mem_region *regions;
    struct pykvm_vq_mem mem;
    struct blk_queue *queues;
    uint32_t nqueues;
    struct pykvm_aio *aio;
    int epfd, wake_fd, punt_fd, forward_fd;
    /* NBD sockets in epfd (pykvm_aio_watch): fd and connection generation */
    int route_fd[BLK_ROUTES];
    uint32_t route_gen[BLK_ROUTES];
    uint32_t nroute;
    uint64_t capacity, features;
    uint32_t align;
    uint32_t seg_max, size_max;
    int flush_fd;
    uint8_t read_only, no_flush, write_cache;
    uint8_t serial[BLK_ID_BYTES];
    uint64_t poll_max_ns, poll_ns;
    uint64_t irq_coalesce_ns;
    /* mapping table, and the one Python handed over next */
    struct pykvm_blk_extent *map;
    uint32_t nmap;
    uint64_t map_gen;
    struct pykvm_blk_extent *next_map;
    uint32_t next_nmap;
    uint64_t next_gen;
    int map_changed;
    /* requests with the engine that were mapped with a table older than
     * map_gen; when none is left, drained_gen = map_gen (under lock, with
     * drained_cond broadcast) */
    uint32_t old_in_flight;
    uint64_t drained_gen;
    pthread_cond_t drained_cond;
    /* submissions not yet taken by the engine, and a reap buffer */
    struct pykvm_aio_req *sub;
    uint32_t nsub, subcap;
    struct pykvm_aio_done *done;
    uint32_t donecap;
    /* Python <-> C, under lock */
    pthread_mutex_t lock;
    struct pykvm_blk_punt *punts;
    uint32_t punt_head, npunts, puntcap;
    struct blk_return *returns;
    uint32_t nreturns, returncap;
    int have_returns;
    uint64_t forwarded;
    int stopping;
    int quiescing;              /* no more pops: pykvm_blk_quiesce waits for quiet */
    int quiet;                  /* every request taken is back in the used ring (under lock) */
    /* throttling: the group asked before a read or write goes to the engine;
     * those that wait are held in order per direction (reads, writes), as
     * tokens in a ring of every head's capacity; held_due[d]: when the first
     * one asks again (0: none held) */
    struct pykvm_throttle *throttle;
    uint32_t *held[2];
    uint32_t held_first[2], held_n[2], held_cap;
    uint64_t held_due[2];
    /* blkdebug: the rule engine; requests waiting out a delay or a hang, and
     * completions held, as tokens (each ring holds every head); how held
     * completions go back (the first held one's rule decides) */
    struct pykvm_inject *inject;
    uint32_t *delayed, ndelayed;
    uint32_t *holds, nholds, hold_count, hold_order;
    uint64_t hold_seed, hold_due;
    uint64_t hold_list;         /* order given: positions, 4 bits each */
    uint32_t hold_list_n, hold_after, hold_seen;  /* release after hold_after completions */
    int release_all;            /* Python: let held completions go now */
    int power_cut;              /* a power-cut rule fired (Python was told) */
    struct pykvm_trace *trace;
    /* blklogwrites: the disk's log (writelog.h), shared with Python and the
     * disk's other threads; each write and flush is reported as its used
     * element is about to be published */
    struct pykvm_wlog *wlog;
    struct pykvm_blk_counters c;
    /* host errors (blk_failed): a flush failed once, so every later one
     * goes to Python, which fails it; paused by Python (werror/rerror=stop):
     * the thread parks (blk_park), parked says it does (under lock) */
    uint8_t flush_failed;
    int paused;
    int parked;
    /* engine results reaped while parked: failures go to Python at once
     * (they join the request that stopped the disk), the rest wait here */
    struct pykvm_aio_done *parked_done;
    uint32_t nparked_done;
};

/* Counters: written by the I/O thread only, read by Python at any time. */
#define CNT_ADD(b, field, n) \
    __atomic_store_n(&(b)->c.field, (b)->c.field + (n), __ATOMIC_RELAXED)

static uint64_t blk_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void blk_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* -- the mapping table ---------------------------------------------------- */

static int pykvm_blk_map_lookup(const struct pykvm_blk_extent *map, uint32_t n, uint64_t offset,
                                uint64_t length, int write, int32_t *fd, uint64_t *host_offset)
{
    const struct pykvm_blk_extent *e, *end = map + n;
    uint32_t lo = 0, hi = n;
    uint64_t covered;

    /* the last extent starting at or before offset (the table is sorted) */
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;

        if (map[mid].offset <= offset)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (!lo)
        return 0;
    e = map + lo - 1;
    if (offset - e->offset >= e->length || (write && !(e->flags & PYKVM_BLK_EXTENT_WRITABLE)))
        return 0;
    *fd = e->fd;
    *host_offset = e->host_offset + (offset - e->offset);
    /* the range may go on into following extents that continue this one in
     * the same file (a raw image split only for its flags) */
    covered = e->length - (offset - e->offset);
    while (covered < length) {
        const struct pykvm_blk_extent *next = e + 1;

        if (next == end || next->offset != e->offset + e->length || next->fd != e->fd ||
            next->host_offset != e->host_offset + e->length ||
            (write && !(next->flags & PYKVM_BLK_EXTENT_WRITABLE)))
            return 0;
        e = next;
        covered += e->length;
    }
    return 1;
}

static struct pykvm_blk_extent *blk_copy_map(const struct pykvm_blk_extent *map, uint32_t n)
{
    struct pykvm_blk_extent *copy = malloc(sizeof(*copy) * (n ? n : 1));

    if (copy && n)
        memcpy(copy, map, sizeof(*copy) * n);
    return copy;
}

static uint64_t pykvm_blk_set_map(struct pykvm_blk *b, const struct pykvm_blk_extent *map,
                                  uint32_t n)
{
    struct pykvm_blk_extent *copy = blk_copy_map(map, n);
    uint64_t gen;

    if (!copy)
        return 0;
    pthread_mutex_lock(&b->lock);
    free(b->next_map);
    b->next_map = copy;
    b->next_nmap = n;
    gen = ++b->next_gen;
    __atomic_store_n(&b->map_changed, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&b->lock);
    eventfd_write(b->wake_fd, 1);
    return gen;
}

static uint64_t pykvm_blk_map_generation(const struct pykvm_blk *b)
{
    return __atomic_load_n(&b->drained_gen, __ATOMIC_ACQUIRE);
}

/* CLOCK_REALTIME timeout_ms from now, for pthread_cond_timedwait. */
static void blk_deadline(struct timespec *until, uint32_t timeout_ms)
{
    clock_gettime(CLOCK_REALTIME, until);
    until->tv_sec += timeout_ms / 1000;
    until->tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
    if (until->tv_nsec >= 1000000000L) {
        until->tv_sec++;
        until->tv_nsec -= 1000000000L;
    }
}

static int pykvm_blk_wait_map(struct pykvm_blk *b, uint64_t gen, uint32_t timeout_ms)
{
    struct timespec until;
    int done;

    blk_deadline(&until, timeout_ms);
    pthread_mutex_lock(&b->lock);
    while (b->drained_gen < gen && !b->stopping)
        if (pthread_cond_timedwait(&b->drained_cond, &b->lock, &until) == ETIMEDOUT)
            break;
    done = b->drained_gen >= gen;
    pthread_mutex_unlock(&b->lock);
    return done;
}

/* Take no more chains; wait until every request taken so far (with the
 * engine or with Python) is back in the used ring, its interrupt decided. 1
 * when that happened within timeout_ms. A vhost-user ring stop needs it: the
 * index it reports must not count requests that are never returned. */
static int pykvm_blk_quiesce(struct pykvm_blk *b, uint32_t timeout_ms)
{
    struct timespec until;
    int quiet;

    blk_deadline(&until, timeout_ms);
    __atomic_store_n(&b->quiescing, 1, __ATOMIC_RELEASE);
    eventfd_write(b->wake_fd, 1);
    pthread_mutex_lock(&b->lock);
    while (!b->quiet && !b->stopping)
        if (pthread_cond_timedwait(&b->drained_cond, &b->lock, &until) == ETIMEDOUT)
            break;
    quiet = b->quiet;
    pthread_mutex_unlock(&b->lock);
    return quiet;
}

/* Called with the lock held. */
static void blk_publish_drained(struct pykvm_blk *b)
{
    __atomic_store_n(&b->drained_gen, b->map_gen, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&b->drained_cond);
}

static void blk_apply_map(struct pykvm_blk *b)
{
    pthread_mutex_lock(&b->lock);
    if (b->next_map) {
        free(b->map);
        b->map = b->next_map;
        b->nmap = b->next_nmap;
        b->next_map = NULL;
        __atomic_store_n(&b->map_gen, b->next_gen, __ATOMIC_RELEASE);
        /* every request with the engine now was mapped with an older table */
        b->old_in_flight = 0;
        for (uint32_t i = 0; i < b->nqueues; i++) {
            const struct blk_queue *q = &b->queues[i];

            for (uint32_t h = 0; h < q->nreqs; h++)
                if (q->reqs[h].state == REQ_IO && q->reqs[h].map_gen < b->map_gen)
                    b->old_in_flight++;
        }
        if (!b->old_in_flight)
            blk_publish_drained(b);
    }
    __atomic_store_n(&b->map_changed, 0, __ATOMIC_RELAXED);
    pthread_mutex_unlock(&b->lock);
}

/* A request leaves the engine for good (completed, failed or dropped). */
static void blk_io_done(struct pykvm_blk *b, struct blk_req *req)
{
    if (req->map_gen < b->map_gen && b->old_in_flight) {
        req->map_gen = b->map_gen;
        pthread_mutex_lock(&b->lock);
        if (!--b->old_in_flight)
            blk_publish_drained(b);
        pthread_mutex_unlock(&b->lock);
    }
}

/* -- to Python: punts, log lines, fatal errors, forwarded interrupts --------- */

/* Queue a punt entry (the lock is taken here); 0, or -1 out of memory. */
static int blk_punt_push(struct pykvm_blk *b, const struct pykvm_blk_punt *p)
{
    int rc = 0;

    pthread_mutex_lock(&b->lock);
    if (b->npunts == b->puntcap) {
        uint32_t cap = b->puntcap ? 2 * b->puntcap : 16;
        struct pykvm_blk_punt *grown = malloc(sizeof(*grown) * cap);

        if (!grown) {
            rc = -1;
            goto out;
        }
        for (uint32_t i = 0; i < b->npunts; i++)
            grown[i] = b->punts[(b->punt_head + i) % b->puntcap];
        free(b->punts);
        b->punts = grown;
        b->puntcap = cap;
        b->punt_head = 0;
    }
    b->punts[(b->punt_head + b->npunts) % b->puntcap] = *p;
    b->npunts++;
out:
    pthread_mutex_unlock(&b->lock);
    if (!rc)
        eventfd_write(b->punt_fd, 1);
    return rc;
}

static int pykvm_blk_next_punt(struct pykvm_blk *b, struct pykvm_blk_punt *out)
{
    int got = 0;

    pthread_mutex_lock(&b->lock);
    if (b->npunts) {
        *out = b->punts[b->punt_head];
        b->punt_head = (b->punt_head + 1) % b->puntcap;
        b->npunts--;
        got = 1;
    }
    pthread_mutex_unlock(&b->lock);
    return got;
}

static void pykvm_blk_punt_release(struct pykvm_blk_punt *p)
{
    free(p->segs);
    p->segs = NULL;
    p->nsegs = 0;
}

static int pykvm_blk_punt_fd(const struct pykvm_blk *b)
{
    return b->punt_fd;
}

static int blk_fatal(struct pykvm_blk *b, struct blk_queue *q, const char *message)
{
    struct pykvm_blk_punt p = {.kind = PYKVM_BLK_PUNT_FATAL, .queue = q->index};

    q->broken = 1;
    snprintf(p.message, sizeof(p.message), "%s", message);
    if (blk_punt_push(b, &p) < 0)
        fprintf(stderr, "pykvm: virtio-blk fast path: %s (device stopped)\n", message);
    return 0;
}

/* The request stays with Python until its log line is out: Python logs
 * it, then hands the used element back (pykvm_blk_complete). */
static void blk_log_then_complete(struct pykvm_blk *b, struct blk_queue *q, uint16_t head,
                                  uint32_t used_len, const char *message)
{
    struct pykvm_blk_punt p = {.kind = PYKVM_BLK_PUNT_LOG, .queue = q->index, .head = head,
                               .used_len = used_len};

    snprintf(p.message, sizeof(p.message), "%s", message);
    q->reqs[head].state = REQ_PYTHON;
    if (blk_punt_push(b, &p) < 0) {
        q->reqs[head].state = REQ_FREE;  /* no memory for the message: complete it silently */
        pykvm_vq_add_used(q->vq, &b->mem, head, used_len);
    }
}

static int pykvm_blk_forward_fd(const struct pykvm_blk *b)
{
    return b->forward_fd;
}

static uint64_t pykvm_blk_take_forwarded(struct pykvm_blk *b)
{
    return __atomic_exchange_n(&b->forwarded, 0, __ATOMIC_ACQ_REL);
}

static void pykvm_blk_set_call_fd(struct pykvm_blk *b, uint32_t queue, int32_t fd)
{
    if (queue < b->nqueues)
        __atomic_store_n(&b->queues[queue].call_fd, fd, __ATOMIC_RELEASE);
}

static void pykvm_blk_set_write_cache(struct pykvm_blk *b, int on)
{
    __atomic_store_n(&b->write_cache, (uint8_t)!!on, __ATOMIC_RELAXED);
}

static void pykvm_blk_counters(const struct pykvm_blk *b, struct pykvm_blk_counters *out)
{
    const uint64_t *src = (const uint64_t *)&b->c;
    uint64_t *dst = (uint64_t *)out;

    for (size_t i = 0; i < sizeof(*out) / sizeof(uint64_t); i++)
        dst[i] = __atomic_load_n(&src[i], __ATOMIC_RELAXED);
}

static void pykvm_isr_set(uint32_t *word, uint32_t bits)
{
    __atomic_fetch_or(word, bits, __ATOMIC_SEQ_CST);
}

static uint32_t pykvm_isr_ack(uint32_t *word, uint32_t bits)
{
    return __atomic_fetch_and(word, ~bits, __ATOMIC_SEQ_CST) & bits;
}

static uint32_t pykvm_isr_load(const uint32_t *word)
{
    return __atomic_load_n(word, __ATOMIC_SEQ_CST);
}

/* -- from Python: punted requests finished ------------------------------------ */

static void pykvm_blk_complete(struct pykvm_blk *b, uint32_t queue, uint16_t head,
                               uint32_t used_len)
{
    pthread_mutex_lock(&b->lock);
    if (b->nreturns == b->returncap) {
        uint32_t cap = b->returncap ? 2 * b->returncap : 16;
        struct blk_return *grown = realloc(b->returns, sizeof(*grown) * cap);

        if (!grown) {
            pthread_mutex_unlock(&b->lock);
            return;  /* the request stays in flight until reset */
        }
        b->returns = grown;
        b->returncap = cap;
    }
    b->returns[b->nreturns++] = (struct blk_return){queue, head, used_len};
    __atomic_store_n(&b->have_returns, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&b->lock);
    eventfd_write(b->wake_fd, 1);
}

static void blk_hold_tick(struct pykvm_blk *b);

static int blk_take_returns(struct pykvm_blk *b)
{
    struct blk_return local[64];
    uint32_t n, total = 0;

    if (!__atomic_load_n(&b->have_returns, __ATOMIC_ACQUIRE))
        return 0;
    do {
        pthread_mutex_lock(&b->lock);
        n = b->nreturns < 64 ? b->nreturns : 64;
        memcpy(local, b->returns, sizeof(*local) * n);
        memmove(b->returns, b->returns + n, sizeof(*local) * (b->nreturns - n));
        b->nreturns -= n;
        if (!b->nreturns)
            __atomic_store_n(&b->have_returns, 0, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&b->lock);
        for (uint32_t i = 0; i < n; i++) {
            struct blk_queue *q;

            if (local[i].queue >= b->nqueues)
                continue;
            q = &b->queues[local[i].queue];
            if (local[i].head >= q->nreqs || q->reqs[local[i].head].state != REQ_PYTHON)
                continue;
            q->reqs[local[i].head].state = REQ_FREE;
            pykvm_vq_add_used(q->vq, &b->mem, local[i].head, local[i].used_len);
            blk_hold_tick(b);
        }
        total += n;
    } while (n == 64);
    return (int)total;
}

/* -- parsing: pykvm/virtio/blk.py, VirtioBlk._submit and its helpers ---------- */

static void blk_req_free_iov(struct blk_req *req)
{
    if (req->iov && req->iov != req->small)
        free(req->iov);
    req->iov = NULL;
    req->niov = 0;
}

/* The trace record of a request about to go back with `status`. */
static void blk_trace(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, uint8_t status)
{
    const struct blk_req *req = &q->reqs[head];
    struct pykvm_trace_rec rec;

    if (!b->trace)
        return;
    rec.submit_ns = req->submit_ns;
    rec.complete_ns = blk_now_ns();
    rec.sector = req->sector;
    rec.length = req->nbytes;
    rec.queue = q->vq->index;
    rec.head = head;
    rec.type = req->type;
    rec.status = status;
    rec.rule = req->rule;
    rec.path = PYKVM_TRACE_PATH_C;
    rec.pad = 0;
    pykvm_trace_push(b->trace, &rec);
}

/* A request the device answers with a status instead of serving it
 * (_BadRequest): the status byte now, the used element after the log line. */
static int blk_bad(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, uint8_t *status,
                   uint8_t value, const char *fmt, ...) __attribute__((format(printf, 6, 7)));

static int blk_bad(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, uint8_t *status,
                    uint8_t value, const char *fmt, ...)
{
    char why[200], message[256];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    snprintf(message, sizeof(message), "queue %u, chain %u: %s", q->vq->index, head, why);
    CNT_ADD(b, errors, 1);
    *status = value;
    blk_trace(b, q, head, value);
    blk_log_then_complete(b, q, head, 1, message);
    return 0;
}

static int blk_punt_segs(struct pykvm_blk *b, struct blk_queue *q, uint16_t head,
                         const struct pykvm_vq_seg *segs, uint32_t nreadable, uint32_t nsegs)
{
    struct pykvm_blk_punt p = {.kind = PYKVM_BLK_PUNT_SERVE, .queue = q->index,
                               .head = head, .nreadable = nreadable, .nsegs = nsegs};

    p.segs = malloc(sizeof(*p.segs) * (nsegs ? nsegs : 1));
    if (!p.segs)
        return blk_fatal(b, q, "internal error: out of memory handing a request to Python");
    memcpy(p.segs, segs, sizeof(*p.segs) * nsegs);
    q->reqs[head].state = REQ_PYTHON;
    if (blk_punt_push(b, &p) < 0) {
        free(p.segs);
        q->reqs[head].state = REQ_FREE;
        return blk_fatal(b, q, "internal error: out of memory handing a request to Python");
    }
    CNT_ADD(b, punts, 1);
    return 0;
}

static int blk_punt(struct pykvm_blk *b, struct blk_queue *q)
{
    const struct pykvm_vq_chain *ch = &q->chain;

    return blk_punt_segs(b, q, ch->head, ch->segs, ch->nreadable, ch->nsegs);
}

static int blk_complete_now(struct pykvm_blk *b, struct blk_queue *q, uint16_t head,
                             uint8_t *status, uint32_t used_len)
{
    *status = BLK_S_OK;
    blk_trace(b, q, head, BLK_S_OK);
    pykvm_vq_add_used(q->vq, &b->mem, head, used_len);
    blk_hold_tick(b);
    return 0;
}

static int blk_queue_io(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, int32_t op,
                        int32_t fd, uint64_t offset);

/* A guest flush goes to the engine (its fd in req->fd); a logged disk's
 * writer learns that it is submitted. */
static int blk_flush_go(struct pykvm_blk *b, struct blk_queue *q, uint16_t head)
{
    struct blk_req *req = &q->reqs[head];

    req->wlog_ticket = b->wlog ? pykvm_wlog_flush_start(b->wlog) : 0;
    return blk_queue_io(b, q, head, PYKVM_AIO_FLUSH, req->fd, 0);
}

/* blklogwrites: a request is about to go back to the guest with success (its
 * buffers still the guest's and unchanged): a write's data and a flush go to
 * the log. Frees the I/O vector that was kept for it. */
static void blk_wlog_publish(struct pykvm_blk *b, struct blk_req *req)
{
    if (b->wlog) {
        if (req->op == BLK_T_OUT || req->op == OP_FLUSH_AFTER)
            (void)pykvm_wlog_write(b->wlog, req->sector * BLK_SECTOR, req->iov, req->niov,
                                   req->wlog_fua);
        else if (req->op == BLK_T_FLUSH && req->wlog_ticket)
            pykvm_wlog_flush_done(b->wlog, req->wlog_ticket, 1);
    }
    blk_req_free_iov(req);
}

/* A flush the guest will not see succeed here (it failed, went to Python, or
 * the queues are reset): the log does not wait for it. */
static void blk_wlog_drop(struct pykvm_blk *b, struct blk_req *req)
{
    if (b->wlog && req->op == BLK_T_FLUSH && req->wlog_ticket)
        pykvm_wlog_flush_done(b->wlog, req->wlog_ticket, 0);
    req->wlog_ticket = 0;
}

static int blk_queue_io(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, int32_t op,
                        int32_t fd, uint64_t offset)
{
    struct blk_req *req = &q->reqs[head];
    struct pykvm_aio_req *r;

    if (b->nsub == b->subcap)
        return -1;  /* cannot happen: subcap covers every head of every queue */
    r = &b->sub[b->nsub++];
    if (op == PYKVM_AIO_FLUSH)
        CNT_ADD(b, flushes, 1);
    r->token = ((uint64_t)q->index << 16) | head;
    r->op = op;
    r->fd = fd;
    r->offset = offset;
    r->iov = req->iov;
    r->iovcnt = req->niov;
    r->mode = 0;
    r->length = 0;
    if (req->state != REQ_IO)
        req->map_gen = b->map_gen;  /* (the flush after a write keeps the write's) */
    req->state = REQ_IO;
    return 0;
}

/* Is every piece of an O_DIRECT request aligned? (BlockBackend._aligned) */
static int blk_aligned(const struct pykvm_blk *b, uint64_t offset, const struct iovec *iov,
                       uint32_t niov)
{
    uint64_t a = b->align;

    if (a <= 1)
        return 1;
    if (offset % a)
        return 0;
    for (uint32_t i = 0; i < niov; i++)
        if (iov[i].iov_len % a || (uintptr_t)iov[i].iov_base % a)
            return 0;
    return 1;
}

static int blk_rw_go(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, int32_t fd,
                     uint64_t host_offset);
static int blk_throttle_hold(struct pykvm_blk *b, struct blk_queue *q, uint16_t head,
                             uint64_t offset);
static int blk_inject(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, uint8_t *status,
                      uint32_t op, uint64_t offset);

static int blk_rw(struct pykvm_blk *b, struct blk_queue *q, uint32_t type, uint64_t sector,
                   uint8_t *status, uint32_t rout_first, uint32_t rout_skip, uint32_t rout_count,
                   uint32_t win_count)
{
    const struct pykvm_vq_chain *ch = &q->chain;
    uint16_t head = ch->head;
    struct blk_req *req = &q->reqs[head];
    uint64_t nbytes, nsect, offset, host_offset;
    uint32_t first, last, niov = 0, nbuf = 0;
    int32_t fd;

    if (type == BLK_T_IN) {
        if (rout_count)
            return blk_bad(b, q, head, status, BLK_S_IOERR,
                           "read request with device-readable data buffers");
        nbytes = ch->writable_len - 1;
        first = ch->nreadable;
        last = ch->nsegs;   /* the last one loses its status byte */
    } else {
        if (b->read_only)
            return blk_bad(b, q, head, status, BLK_S_IOERR, "write to a read-only disk");
        if (win_count)
            return blk_bad(b, q, head, status, BLK_S_IOERR,
                           "write request with device-writable data buffers");
        nbytes = ch->readable_len - BLK_HEADER;
        first = rout_first;
        last = ch->nreadable;
    }
    if (nbytes > PYKVM_BLK_MAX_REQUEST_BYTES)
        return blk_bad(b, q, head, status, BLK_S_IOERR, "request of %" PRIu64
                       " bytes exceeds %llu", nbytes, PYKVM_BLK_MAX_REQUEST_BYTES);
    /* its data buffers that are not empty, counted before an I/O vector is allocated */
    for (uint32_t i = first; i < last; i++) {
        uint64_t len = ch->segs[i].len;

        if (i == first && type == BLK_T_OUT)
            len -= rout_skip;
        if (i == ch->nsegs - 1)
            len -= 1;
        if (len > b->size_max)
            return blk_bad(b, q, head, status, BLK_S_IOERR, "a data buffer of more than "
                           "size_max %" PRIu32 " bytes", b->size_max);
        nbuf += len != 0;
    }
    if (nbuf > PYKVM_BLK_MAX_SEGMENTS)
        return blk_bad(b, q, head, status, BLK_S_IOERR, "request of %" PRIu32
                       " data buffers exceeds %d", nbuf, PYKVM_BLK_MAX_SEGMENTS);
    if (nbuf > b->seg_max)
        return blk_bad(b, q, head, status, BLK_S_IOERR, "request of %" PRIu32
                       " data buffers exceeds seg_max %" PRIu32, nbuf, b->seg_max);
    /* _check_range */
    if (nbytes % BLK_SECTOR)
        return blk_bad(b, q, head, status, BLK_S_IOERR,
                       "data length %" PRIu64 " is not a multiple of 512", nbytes);
    nsect = nbytes / BLK_SECTOR;
    if ((sector >= b->capacity && nbytes) || nsect > b->capacity || sector > b->capacity - nsect)
        return blk_bad(b, q, head, status, BLK_S_IOERR, "sectors [%" PRIu64 ", +%" PRIu64
                       ") beyond the capacity of %" PRIu64, sector, nsect, b->capacity);
    offset = sector * BLK_SECTOR;
    req->nbytes = (uint32_t)nbytes;

    /* the I/O vector: the data buffers that are not empty */
    req->iov = nbuf <= REQ_INLINE_IOV ? req->small : malloc(sizeof(struct iovec) * nbuf);
    if (!req->iov)
        return blk_fatal(b, q, "internal error: out of memory for an I/O vector");
    for (uint32_t i = first; i < last; i++) {
        const struct pykvm_vq_seg *s = &ch->segs[i];
        uint64_t hva = s->hva;
        uint64_t len = s->len;

        if (i == first && type == BLK_T_OUT) {
            hva += rout_skip;
            len -= rout_skip;
        }
        if (i == ch->nsegs - 1)
            len -= 1;  /* the status byte */
        if (!len)
            continue;
        req->iov[niov].iov_base = (void *)(uintptr_t)hva;
        req->iov[niov].iov_len = len;
        niov++;
    }
    req->niov = niov;
    if (!pykvm_blk_map_lookup(b->map, b->nmap, offset, nbytes, type == BLK_T_OUT, &fd,
                              &host_offset) ||
        !blk_aligned(b, host_offset, req->iov, niov)) {
        blk_req_free_iov(req);
        return blk_punt(b, q);
    }
    req->op = (uint8_t)type;
    req->status = status;
    if (b->inject && blk_inject(b, q, head, status, type == BLK_T_IN ? PYKVM_INJ_OP_READ
                                                                     : PYKVM_INJ_OP_WRITE, offset))
        return 0;
    if (b->throttle && blk_throttle_hold(b, q, head, offset))
        return 0;
    return blk_rw_go(b, q, head, fd, host_offset);
}

/* A mapped read or write (op, status, nbytes and iov set) goes to the engine. */
static int blk_rw_go(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, int32_t fd,
                     uint64_t host_offset)
{
    struct blk_req *req = &q->reqs[head];
    uint32_t type = req->op;
    uint64_t nbytes = req->nbytes;

    req->fd = fd;
    if (type == BLK_T_IN) {
        req->used_len = (uint32_t)nbytes + 1;
        req->then_flush = 0;
        CNT_ADD(b, bytes_read, nbytes);
    } else {
        req->used_len = 1;
        req->then_flush = !__atomic_load_n(&b->write_cache, __ATOMIC_RELAXED) && !b->no_flush;
        req->wlog_fua = req->then_flush;
        CNT_ADD(b, bytes_written, nbytes);
    }
    if (blk_queue_io(b, q, head, type == BLK_T_IN ? PYKVM_AIO_READ : PYKVM_AIO_WRITE, fd,
                     host_offset) < 0) {
        blk_req_free_iov(req);
        return blk_fatal(b, q, "internal error: submission queue full");
    }
    if (req->then_flush && pykvm_aio_can_fua(fd)) {
        /* writethrough on an NBD server that takes FUA: one round trip, the
         * write itself durable, instead of a write and a flush */
        b->sub[b->nsub - 1].mode = PYKVM_NBD_FUA;
        req->then_flush = 0;
    }
    return 0;
}

/* -- throttling: pykvm/block/throttle.py's rule (throttle.c), and the held requests -- */

/* Keep the chain of a mapped request that waits (throttled or delayed), in
 * case it must be punted once its time comes: 0 out of memory. */
static int blk_keep_chain(struct blk_queue *q, uint16_t head, uint64_t offset, uint8_t state)
{
    const struct pykvm_vq_chain *ch = &q->chain;
    struct blk_req *req = &q->reqs[head];

    req->held_segs = malloc(sizeof(*req->held_segs) * (ch->nsegs ? ch->nsegs : 1));
    if (!req->held_segs)
        return 0;
    memcpy(req->held_segs, ch->segs, sizeof(*req->held_segs) * ch->nsegs);
    req->held_nsegs = ch->nsegs;
    req->held_nreadable = ch->nreadable;
    req->offset = offset;
    req->state = state;
    return 1;
}

/* Ask the group for the mapped read or write at head (nothing held in its
 * direction yet) or queue it behind those held: 1 when it waits. */
static int blk_throttle_hold(struct pykvm_blk *b, struct blk_queue *q, uint16_t head,
                             uint64_t offset)
{
    struct blk_req *req = &q->reqs[head];
    int d = req->op == BLK_T_OUT;
    uint64_t due = 0;

    if (!b->held_n[d]) {
        uint64_t now = blk_now_ns();
        int64_t wait = pykvm_throttle_admit(b->throttle, d, req->nbytes, (int64_t)now);

        if (!wait)
            return 0;
        due = now + (uint64_t)wait;
    }
    if (b->held_n[d] == b->held_cap)
        return 0;  /* cannot happen: the ring holds every head of every queue */
    if (!blk_keep_chain(q, head, offset, REQ_HELD))
        return 0;  /* no memory to keep it: it goes now rather than fail */
    if (due)
        b->held_due[d] = due;  /* the first one held: when it asks again */
    b->held[d][(b->held_first[d] + b->held_n[d]) % b->held_cap] =
        ((uint32_t)q->index << 16) | head;
    b->held_n[d]++;
    CNT_ADD(b, throttled, 1);
    return 1;
}

/* A held request's time has come: map it again (the table may have changed
 * while it waited) and submit it, or punt it when it no longer maps. */
static void blk_throttle_resume(struct pykvm_blk *b, struct blk_queue *q, uint16_t head)
{
    struct blk_req *req = &q->reqs[head];
    struct pykvm_vq_seg *segs = req->held_segs;
    uint64_t host_offset;
    int32_t fd;

    req->held_segs = NULL;
    if (!pykvm_blk_map_lookup(b->map, b->nmap, req->offset, req->nbytes, req->op == BLK_T_OUT,
                              &fd, &host_offset) ||
        !blk_aligned(b, host_offset, req->iov, req->niov)) {
        blk_req_free_iov(req);
        blk_punt_segs(b, q, head, segs, req->held_nreadable, req->held_nsegs);
    } else {
        blk_rw_go(b, q, head, fd, host_offset);
    }
    free(segs);
}

/* Release what may go now, in order per direction (``force``: all of it,
 * accounted without asking: the thread is quiescing); the number released. */
static int blk_throttle_release(struct pykvm_blk *b, int force)
{
    int work = 0;

    for (int d = 0; d < 2; d++) {
        uint64_t now;

        if (!b->held_n[d])
            continue;
        now = blk_now_ns();
        if (!force && now < b->held_due[d])
            continue;
        while (b->held_n[d]) {
            uint32_t token = b->held[d][b->held_first[d]];
            struct blk_queue *q = &b->queues[token >> 16];
            uint16_t head = (uint16_t)(token & 0xFFFF);

            if (force) {
                pykvm_throttle_account(b->throttle, d, q->reqs[head].nbytes, (int64_t)now);
            } else {
                int64_t wait = pykvm_throttle_admit(b->throttle, d, q->reqs[head].nbytes,
                                                    (int64_t)now);

                if (wait) {
                    b->held_due[d] = now + (uint64_t)wait;
                    break;
                }
            }
            b->held_first[d] = (b->held_first[d] + 1) % b->held_cap;
            b->held_n[d]--;
            blk_throttle_resume(b, q, head);
            work++;
        }
        if (!b->held_n[d])
            b->held_due[d] = 0;
    }
    return work;
}

/* The earliest time a held request asks again, 0 when none is held. */
static uint64_t blk_throttle_due(const struct pykvm_blk *b)
{
    uint64_t r = b->held_due[0], w = b->held_due[1];

    return !r ? w : !w ? r : r < w ? r : w;
}

/* Stopping: held requests are dropped with the rest (the queues are reset). */
static void blk_throttle_drop(struct pykvm_blk *b)
{
    for (int d = 0; d < 2; d++) {
        while (b->held_n[d]) {
            uint32_t token = b->held[d][b->held_first[d]];
            struct blk_req *req = &b->queues[token >> 16].reqs[token & 0xFFFF];

            b->held_first[d] = (b->held_first[d] + 1) % b->held_cap;
            b->held_n[d]--;
            free(req->held_segs);
            req->held_segs = NULL;
            blk_req_free_iov(req);
            req->state = REQ_FREE;
        }
        b->held_due[d] = 0;
    }
}

/* -- blkdebug: pykvm/block/filters/blkdebug.py's rules (inject.c) applied ---------- */

/* An injected outcome: the request goes back now with `value`. */
static int blk_inject_done(struct pykvm_blk *b, struct blk_queue *q, uint16_t head,
                           uint8_t *status, uint8_t value, uint32_t used_len)
{
    struct blk_req *req = &q->reqs[head];

    blk_req_free_iov(req);
    if (value != BLK_S_OK)
        CNT_ADD(b, errors, 1);
    *status = value;
    req->state = REQ_FREE;
    blk_trace(b, q, head, value);
    pykvm_vq_add_used(q->vq, &b->mem, head, used_len);
    return 1;
}

/* Keep only the first `keep` bytes of the I/O vector (a torn write, a short read). */
static void blk_tear(struct blk_req *req, uint64_t keep)
{
    uint64_t pos = 0;
    uint32_t i;

    for (i = 0; i < req->niov && pos < keep; i++) {
        if (pos + req->iov[i].iov_len > keep)
            req->iov[i].iov_len = keep - pos;
        pos += req->iov[i].iov_len;
    }
    req->niov = i;
}

/* Flip the rule's bits in what a read returned (the image is untouched). */
static void blk_corrupt(struct blk_req *req)
{
    uint64_t pos[64];
    uint32_t left = req->inj_value > 0 ? (uint32_t)req->inj_value : 0;
    uint64_t seed = req->inj_seed;

    while (left) {
        uint32_t n = left < 64 ? left : 64;

        pykvm_inject_flip_positions(seed++, n, req->nbytes, pos);
        for (uint32_t k = 0; k < n; k++) {
            uint64_t byte = pos[k] / 8, at = 0;

            for (uint32_t i = 0; i < req->niov; i++) {
                if (byte < at + req->iov[i].iov_len) {
                    ((uint8_t *)req->iov[i].iov_base)[byte - at] ^= (uint8_t)(1u << (pos[k] % 8));
                    break;
                }
                at += req->iov[i].iov_len;
            }
        }
        left -= n;
    }
}

/* A mapped request (or a flush) waits until req->due_ns, or, for a hang,
 * until the engine's release generation moves. The chain is kept in case
 * it no longer maps once its time comes. */
static int blk_delay(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, uint64_t offset)
{
    if (b->ndelayed == b->subcap || !blk_keep_chain(q, head, offset, REQ_DELAYED))
        return 0;  /* no memory to keep it: it goes now */
    b->delayed[b->ndelayed++] = ((uint32_t)q->index << 16) | head;
    return 1;
}

/* 1 when a rule took care of the request (it went back, or it waits); 0:
 * serve it, as the rule changed it (a torn write, a read to corrupt, a
 * completion to hold). */
static int blk_inject(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, uint8_t *status,
                      uint32_t op, uint64_t offset)
{
    struct blk_req *req = &q->reqs[head];
    struct pykvm_inject_hit hit;
    uint64_t keep;

    if (!pykvm_inject_check(b->inject, op, offset, req->nbytes, (int32_t)q->vq->index,
                            PYKVM_INJ_GUEST, &hit))
        return 0;
    /* what an action does not apply to (the rules file refuses it) does nothing */
    if ((op == PYKVM_INJ_OP_GET_ID && hit.action != PYKVM_INJ_ERROR &&
         hit.action != PYKVM_INJ_STATUS) ||
        ((hit.action == PYKVM_INJ_ZERO || hit.action == PYKVM_INJ_CORRUPT) &&
         op != PYKVM_INJ_OP_READ) ||
        (hit.action == PYKVM_INJ_TORN && op != PYKVM_INJ_OP_WRITE) ||
        (hit.action == PYKVM_INJ_SHORT && op != PYKVM_INJ_OP_READ) ||
        (hit.action == PYKVM_INJ_DROP && op != PYKVM_INJ_OP_WRITE && op != PYKVM_INJ_OP_FLUSH))
        return 0;
    CNT_ADD(b, injected, 1);
    req->rule = (int16_t)hit.rule;
    req->status = status;
    switch (hit.action) {
    case PYKVM_INJ_ERROR:
        return blk_inject_done(b, q, head, status, BLK_S_IOERR, 1);
    case PYKVM_INJ_STATUS:
        return blk_inject_done(b, q, head, status, (uint8_t)hit.value, 1);
    case PYKVM_INJ_DROP:
        return blk_inject_done(b, q, head, status, BLK_S_OK, 1);
    case PYKVM_INJ_ZERO:
        for (uint32_t i = 0; i < req->niov; i++)
            memset(req->iov[i].iov_base, 0, req->iov[i].iov_len);
        return blk_inject_done(b, q, head, status, BLK_S_OK, req->nbytes + 1);
    case PYKVM_INJ_TORN:
        keep = (uint64_t)(hit.value > 0 ? hit.value : 0) * BLK_SECTOR / b->align * b->align;
        if (!keep)
            return blk_inject_done(b, q, head, status, BLK_S_OK, 1);
        if (keep < req->nbytes) {
            blk_tear(req, keep);
            req->inj_action = PYKVM_INJ_TORN;   /* blk_failed: `keep` bytes are the whole */
            req->inj_value = (int32_t)keep;
        }
        return 0;
    case PYKVM_INJ_SHORT:
        /* the engine reads only `keep` bytes, as a host read that returns
         * short: blk_failed sees less than the request and hands it to Python */
        keep = (uint64_t)(hit.value > 0 ? hit.value : 0) * BLK_SECTOR / b->align * b->align;
        if (keep && keep < req->nbytes)
            blk_tear(req, keep);
        return 0;
    case PYKVM_INJ_CORRUPT:
    case PYKVM_INJ_HOLD:
        req->inj_action = (uint8_t)hit.action;
        req->inj_value = hit.value;
        req->inj_seed = hit.seed;
        req->inj_order = hit.order;
        req->inj_timeout_ns = hit.timeout_ns;
        req->inj_order_list = hit.order_list;
        req->inj_order_n = hit.order_n;
        req->inj_release_after = hit.release_after;
        return 0;
    case PYKVM_INJ_POWER_CUT:
        /* the request never lands nor completes; Python stops the VM (once) */
        req->inj_action = PYKVM_INJ_POWER_CUT;
        req->due_ns = UINT64_MAX;
        if (!b->power_cut) {
            struct pykvm_blk_punt p = {.kind = PYKVM_BLK_PUNT_POWER, .queue = q->index,
                                       .head = head, .error = hit.rule};

            b->power_cut = 1;
            snprintf(p.message, sizeof(p.message), "%d %d %d %llu", hit.rule, hit.value,
                     (int)hit.order, (unsigned long long)hit.seed);
            blk_punt_push(b, &p);
        }
        return blk_delay(b, q, head, offset);
    case PYKVM_INJ_DELAY:
    case PYKVM_INJ_HANG:
        req->due_ns = hit.action == PYKVM_INJ_HANG ? UINT64_MAX : blk_now_ns() + hit.delay_ns;
        req->hang_gen = pykvm_inject_release_gen(b->inject);
        return blk_delay(b, q, head, offset);
    default:
        return 0;
    }
}

/* A delayed request's time has come: a flush goes to the engine; a read or
 * write goes on as a throttled one does when its time comes (mapped again,
 * or punted). (It is not throttled then: it was not yet.) */
static void blk_delay_resume(struct pykvm_blk *b, struct blk_queue *q, uint16_t head)
{
    struct blk_req *req = &q->reqs[head];

    if (req->op != BLK_T_FLUSH) {
        blk_throttle_resume(b, q, head);
        return;
    }
    free(req->held_segs);
    req->held_segs = NULL;
    if (blk_flush_go(b, q, head) < 0)
        blk_fatal(b, q, "internal error: submission queue full");
}

/* Resume the delayed requests that are due (``force``: all of them, and the
 * hung ones: the thread is quiescing); the number resumed. */
static int blk_delay_release(struct pykvm_blk *b, int force)
{
    uint64_t now = blk_now_ns(), gen = pykvm_inject_release_gen(b->inject);
    int work = 0;

    for (uint32_t i = 0; i < b->ndelayed;) {
        uint32_t token = b->delayed[i];
        struct blk_queue *q = &b->queues[token >> 16];
        struct blk_req *req = &q->reqs[token & 0xFFFF];

        if (req->inj_action == PYKVM_INJ_POWER_CUT) {
            if (force) {        /* the power is off: it never lands, nor comes back */
                b->delayed[i] = b->delayed[--b->ndelayed];
                free(req->held_segs);
                req->held_segs = NULL;
                blk_req_free_iov(req);
                req->state = REQ_FREE;
            } else {
                i++;
            }
            continue;
        }
        if (force || req->due_ns <= now || (req->due_ns == UINT64_MAX && req->hang_gen != gen)) {
            b->delayed[i] = b->delayed[--b->ndelayed];
            blk_delay_resume(b, q, (uint16_t)(token & 0xFFFF));
            work++;
        } else {
            i++;
        }
    }
    return work;
}

/* The earliest delayed request's time (hangs have none), 0 when none. */
static uint64_t blk_delay_due(const struct pykvm_blk *b)
{
    uint64_t due = 0;

    for (uint32_t i = 0; i < b->ndelayed; i++) {
        uint32_t token = b->delayed[i];
        uint64_t d = b->queues[token >> 16].reqs[token & 0xFFFF].due_ns;

        if (d != UINT64_MAX && (!due || d < due))
            due = d;
    }
    if (b->hold_due && (!due || b->hold_due < due))
        due = b->hold_due;
    return due;
}

/* Held completions go back to the guest, in the order the first held one's
 * rule asks for. */
static int blk_release_holds(struct pykvm_blk *b)
{
    uint32_t n = b->nholds;

    if (b->hold_order == PYKVM_INJ_ORDER_RANDOM)
        pykvm_inject_shuffle(b->hold_seed, b->holds, n);
    if (b->hold_order == PYKVM_INJ_ORDER_GIVEN) {
        /* the positions named, in their order (past those held: skipped), then
         * the ones not named, as they came */
        uint32_t out[PYKVM_INJ_MAX_ORDER_LIST], m = 0, named = 0;

        for (uint32_t k = 0; k < b->hold_list_n; k++) {
            uint32_t at = (uint32_t)(b->hold_list >> (4 * k)) & 15;

            if (at < n && at < PYKVM_INJ_MAX_ORDER_LIST && !(named >> at & 1)) {
                named |= 1u << at;
                out[m++] = b->holds[at];
            }
        }
        for (uint32_t k = 0; k < n && k < PYKVM_INJ_MAX_ORDER_LIST; k++)
            if (!(named >> k & 1))
                out[m++] = b->holds[k];
        memcpy(b->holds, out, sizeof(*out) * m);
        b->hold_order = PYKVM_INJ_ORDER_FIFO;
    }
    for (uint32_t k = 0; k < n; k++) {
        uint32_t token = b->holds[b->hold_order == PYKVM_INJ_ORDER_REVERSE ? n - 1 - k : k];
        struct blk_queue *q = &b->queues[token >> 16];
        uint16_t head = (uint16_t)(token & 0xFFFF);
        struct blk_req *req = &q->reqs[head];

        blk_wlog_publish(b, req);
        *req->status = BLK_S_OK;
        req->state = REQ_FREE;
        blk_trace(b, q, head, BLK_S_OK);
        pykvm_vq_add_used(q->vq, &b->mem, head, req->used_len);
    }
    b->nholds = 0;
    b->hold_due = 0;
    return (int)n;
}

/* A completion that was not held: with release-after, one more counted. */
static void blk_hold_tick(struct pykvm_blk *b)
{
    if (b->nholds && b->hold_after && ++b->hold_seen >= b->hold_after)
        blk_release_holds(b);
}

/* A request done with success whose rule holds its completion. */
static void blk_hold(struct pykvm_blk *b, struct blk_queue *q, uint16_t head)
{
    struct blk_req *req = &q->reqs[head];

    if (!b->nholds) {
        b->hold_count = req->inj_value > 0 ? (uint32_t)req->inj_value : 1;
        b->hold_order = req->inj_order;
        b->hold_seed = req->inj_seed;
        b->hold_due = req->inj_timeout_ns ? blk_now_ns() + req->inj_timeout_ns : 0;
        b->hold_list = req->inj_order_list;
        b->hold_list_n = req->inj_order_n;
        b->hold_after = req->inj_release_after;
        b->hold_seen = 0;
    }
    req->state = REQ_DONE_HELD;
    b->holds[b->nholds++] = ((uint32_t)q->index << 16) | head;
    if (b->nholds >= b->hold_count)
        blk_release_holds(b);
}

/* blkdebug's work in a round: due delays and hangs released, held
 * completions whose time came (quiescing: everything goes now). */
static int blk_inject_round(struct pykvm_blk *b, int quiescing)
{
    int work = 0;

    if (b->ndelayed)
        work += blk_delay_release(b, quiescing);
    if (b->nholds && (quiescing || __atomic_exchange_n(&b->release_all, 0, __ATOMIC_ACQ_REL) ||
                      (b->hold_due && blk_now_ns() >= b->hold_due)))
        work += blk_release_holds(b);
    return work;
}

/* Python: hung requests (after pykvm_inject_release) and held completions go now. */
static void pykvm_blk_release(struct pykvm_blk *b)
{
    __atomic_store_n(&b->release_all, 1, __ATOMIC_RELEASE);
    eventfd_write(b->wake_fd, 1);
}

/* Stopping: delayed requests and held completions are dropped with the rest. */
static void blk_inject_drop(struct pykvm_blk *b)
{
    for (uint32_t i = 0; i < b->ndelayed; i++) {
        uint32_t token = b->delayed[i];
        struct blk_req *req = &b->queues[token >> 16].reqs[token & 0xFFFF];

        free(req->held_segs);
        req->held_segs = NULL;
        blk_req_free_iov(req);
        req->state = REQ_FREE;
    }
    for (uint32_t i = 0; i < b->nholds; i++) {
        uint32_t token = b->holds[i];
        struct blk_req *req = &b->queues[token >> 16].reqs[token & 0xFFFF];

        blk_req_free_iov(req);
        blk_wlog_drop(b, req);
        req->state = REQ_FREE;
    }
    b->ndelayed = b->nholds = 0;
    b->hold_due = 0;
}

static int blk_get_id(struct pykvm_blk *b, struct blk_queue *q, uint8_t *status)
{
    const struct pykvm_vq_chain *ch = &q->chain;
    uint64_t n = ch->writable_len - 1 < BLK_ID_BYTES ? ch->writable_len - 1 : BLK_ID_BYTES;
    uint64_t pos = 0;

    for (uint32_t i = ch->nreadable; i < ch->nsegs && pos < n; i++) {
        uint64_t len = ch->segs[i].len - (i == ch->nsegs - 1 ? 1 : 0);
        uint64_t chunk = n - pos < len ? n - pos : len;

        memcpy((void *)(uintptr_t)ch->segs[i].hva, b->serial + pos, chunk);
        pos += chunk;
    }
    return blk_complete_now(b, q, ch->head, status, (uint32_t)n + 1);
}

static int blk_submit_chain(struct pykvm_blk *b, struct blk_queue *q)
{
    const struct pykvm_vq_chain *ch = &q->chain;
    uint16_t head = ch->head;
    const struct pykvm_vq_seg *last;
    uint8_t *status, hdr[BLK_HEADER];
    uint32_t nwritable = ch->nsegs - ch->nreadable, need = BLK_HEADER, k = 0, skip = 0;
    uint32_t rout_count, win_count, type;
    uint64_t sector;
    struct blk_req *req;
    char message[200];

    CNT_ADD(b, requests, 1);
    if (q->reqs[head].state != REQ_FREE) {
        snprintf(message, sizeof(message), "queue %u, chain %u: the driver made it available "
                 "again while the device still owns it", q->vq->index, head);
        return blk_fatal(b, q, message);
    }
    if (!nwritable || !ch->segs[ch->nsegs - 1].len) {
        snprintf(message, sizeof(message), "queue %u, chain %u: no writable status byte",
                 q->vq->index, head);
        return blk_fatal(b, q, message);
    }
    last = &ch->segs[ch->nsegs - 1];
    status = (uint8_t *)(uintptr_t)(last->hva + last->len - 1);
    req = &q->reqs[head];
    req->type = 0xFF;   /* (no header yet) */
    req->sector = 0;
    req->nbytes = 0;
    req->rule = -1;
    req->inj_action = PYKVM_INJ_NONE;
    if (b->trace)
        req->submit_ns = blk_now_ns();
    win_count = nwritable - 1 + (last->len > 1);
    /* _split(readable, 16): the header, then what follows it */
    while (need && k < ch->nreadable) {
        uint32_t len = ch->segs[k].len;

        if (len > need) {
            memcpy(hdr + BLK_HEADER - need, (const void *)(uintptr_t)ch->segs[k].hva, need);
            skip = need;
            need = 0;
            break;
        }
        memcpy(hdr + BLK_HEADER - need, (const void *)(uintptr_t)ch->segs[k].hva, len);
        need -= len;
        k++;
    }
    if (need)
        return blk_bad(b, q, head, status, BLK_S_IOERR, "request header shorter than 16 bytes");
    rout_count = ch->nreadable - k;
    memcpy(&type, hdr, 4);
    type = le32toh(type);
    memcpy(&sector, hdr + 8, 8);
    sector = le64toh(sector);
    req->type = (uint8_t)type;
    req->sector = sector;
    if (type != BLK_T_IN && type != BLK_T_OUT && type != BLK_T_FLUSH && type != BLK_T_GET_ID &&
        type != BLK_T_DISCARD && type != BLK_T_WRITE_ZEROES && type != BLK_T_SECURE_ERASE)
        return blk_bad(b, q, head, status, BLK_S_UNSUPP, "unsupported request type 0x%x", type);
    if (type == BLK_T_IN || type == BLK_T_OUT)
        return blk_rw(b, q, type, sector, status, k, skip, rout_count, win_count);
    if ((rout_count && type != BLK_T_DISCARD && type != BLK_T_WRITE_ZEROES &&
         type != BLK_T_SECURE_ERASE) ||
        (win_count && type != BLK_T_GET_ID))
        return blk_bad(b, q, head, status, BLK_S_IOERR,
                       "type %u request with unexpected data buffers", type);
    if (type == BLK_T_FLUSH) {
        if (b->flush_fd < 0 || __atomic_load_n(&b->flush_failed, __ATOMIC_ACQUIRE))
            return blk_punt(b, q);
        req->op = BLK_T_FLUSH;
        req->status = status;
        req->used_len = 1;
        req->nbytes = 0;
        req->then_flush = 0;
        req->wlog_ticket = 0;   /* (blk_flush_go takes one) */
        req->niov = 0;
        req->iov = NULL;
        req->fd = b->flush_fd;
        if (b->inject && blk_inject(b, q, head, status, PYKVM_INJ_OP_FLUSH, 0))
            return 0;
        if (b->no_flush) {
            if (req->inj_action == PYKVM_INJ_HOLD) {
                blk_hold(b, q, head);
                return 0;
            }
            return blk_complete_now(b, q, head, status, 1);
        }
        if (blk_flush_go(b, q, head) < 0)
            return blk_fatal(b, q, "internal error: submission queue full");
        return 0;
    }
    if (type == BLK_T_GET_ID) {
        req->niov = 0;
        req->iov = NULL;
        if (b->inject && blk_inject(b, q, head, status, PYKVM_INJ_OP_GET_ID, 0))
            return 0;
        return blk_get_id(b, q, status);
    }
    /* discard, write zeroes, secure erase: BlockBackend (holes, fallbacks, overwrites) */
    return blk_punt(b, q);
}

/* Pop and parse everything available on q; the number of chains. */
static int blk_pop_all(struct pykvm_blk *b, struct blk_queue *q)
{
    struct pykvm_vq_error err;
    int n = 0;

    while (!q->broken) {
        int rc = pykvm_vq_pop(q->vq, &b->mem, &q->chain, &err);

        if (rc < 0) {
            blk_fatal(b, q, err.message);
            break;
        }
        if (!rc)
            break;
        blk_submit_chain(b, q);
        n++;
    }
    return n;
}

/* -- the engine -------------------------------------------------------------- */

static void blk_flush_submissions(struct pykvm_blk *b)
{
    while (b->nsub) {
        int n = pykvm_aio_submit(b->aio, b->sub, b->nsub);

        if (n < 0) {
            /* the engine itself failed: these requests complete with the error */
            for (uint32_t i = 0; i < b->nsub; i++) {
                struct pykvm_aio_req *r = &b->sub[i];
                struct blk_queue *q = &b->queues[r->token >> 16];
                struct blk_req *req = &q->reqs[r->token & 0xFFFF];
                char message[200];

                snprintf(message, sizeof(message), "I/O error: %s", strerror(-n));
                blk_io_done(b, req);
                blk_req_free_iov(req);
                CNT_ADD(b, errors, 1);
                *req->status = BLK_S_IOERR;
                blk_trace(b, q, (uint16_t)(r->token & 0xFFFF), BLK_S_IOERR);
                blk_log_then_complete(b, q, (uint16_t)(r->token & 0xFFFF), req->used_len,
                                      message);
            }
            b->nsub = 0;
            return;
        }
        if (!n)
            return;  /* full: retried after the next reap */
        CNT_ADD(b, batches, 1);
        CNT_ADD(b, submitted, (uint64_t)n);
        memmove(b->sub, b->sub + n, sizeof(*b->sub) * (b->nsub - n));
        b->nsub -= (uint32_t)n;
    }
}

/* Zero what a short read did not fill (the end of the file: zeroes). */
static void blk_zero_tail(struct blk_req *req, uint64_t done)
{
    uint64_t pos = 0;

    for (uint32_t i = 0; i < req->niov; i++) {
        uint64_t len = req->iov[i].iov_len;

        if (pos + len > done) {
            uint64_t start = done > pos ? done - pos : 0;

            memset((char *)req->iov[i].iov_base + start, 0, len - start);
        }
        pos += len;
    }
}

/* -- host errors: Python applies the disk's werror/rerror ---------------------- */

/* Hand the request at head back to Python as a fresh chain (walked again
 * from the descriptor table: the driver still owns nothing of it), with
 * kind PUNT_SERVE (Python does the I/O again) or PUNT_ERROR (it failed with
 * error: Python decides the status, or pauses and retries it). */
static void blk_punt_again(struct pykvm_blk *b, struct blk_queue *q, uint16_t head,
                           int32_t kind, int32_t error)
{
    struct pykvm_blk_punt p = {.kind = kind, .queue = q->index, .head = head, .error = error};
    struct pykvm_vq_error err;

    q->reqs[head].state = REQ_FREE;
    if (pykvm_vq_resubmit(q->vq, &b->mem, head, &q->chain, &err) < 0) {
        blk_fatal(b, q, err.message);
        return;
    }
    q->vq->in_flight--;  /* the same request: counted once, when popped */
    p.nreadable = q->chain.nreadable;
    p.nsegs = q->chain.nsegs;
    p.segs = malloc(sizeof(*p.segs) * (p.nsegs ? p.nsegs : 1));
    if (!p.segs) {
        blk_fatal(b, q, "internal error: out of memory handing a request to Python");
        return;
    }
    memcpy(p.segs, q->chain.segs, sizeof(*p.segs) * p.nsegs);
    q->reqs[head].state = REQ_PYTHON;
    if (blk_punt_push(b, &p) < 0) {
        free(p.segs);
        q->reqs[head].state = REQ_FREE;
        blk_fatal(b, q, "internal error: out of memory handing a request to Python");
        return;
    }
    CNT_ADD(b, punts, 1);
}

/* An engine result C does not complete itself: 1 when the request went to
 * Python. A failure (and a writethrough write once a flush has failed: its
 * flush would prove nothing) is PUNT_ERROR; a failed flush also sets
 * flush_failed. A short read or write is done again by Python, which
 * continues it, or zero-fills a read at the end of the file. */
static int blk_failed(struct pykvm_blk *b, struct blk_queue *q, uint16_t head, int64_t result)
{
    struct blk_req *req = &q->reqs[head];
    int flush = req->op == BLK_T_FLUSH || req->op == OP_FLUSH_AFTER;

    if (result < 0 && flush)
        __atomic_store_n(&b->flush_failed, 1, __ATOMIC_RELEASE);
    if (result < 0 && req->op == BLK_T_FLUSH)
        blk_wlog_drop(b, req);      /* Python fails it, or does it again */
    if (result >= 0 && req->op == BLK_T_OUT && req->then_flush &&
        __atomic_load_n(&b->flush_failed, __ATOMIC_ACQUIRE))
        result = -EIO;
    if (result >= 0 && (flush || (uint64_t)result >= (req->inj_action == PYKVM_INJ_TORN ?
                                                      (uint64_t)req->inj_value : req->nbytes) ||
                        req->op == OP_FLUSH_AFTER))
        return 0;
    blk_io_done(b, req);
    blk_req_free_iov(req);
    blk_punt_again(b, q, head, result < 0 ? PYKVM_BLK_PUNT_ERROR : PYKVM_BLK_PUNT_SERVE,
                   result < 0 ? (int32_t)-result : 0);
    return 1;
}

static int pykvm_blk_flush_failed(const struct pykvm_blk *b)
{
    return __atomic_load_n(&b->flush_failed, __ATOMIC_ACQUIRE);
}

static void pykvm_blk_set_flush_failed(struct pykvm_blk *b)
{
    __atomic_store_n(&b->flush_failed, 1, __ATOMIC_RELEASE);
}

/* Pause (1) or resume (0) the thread: paused, it pops nothing, reaps
 * nothing and adds no used element. Pausing returns once the thread is
 * parked (or after 5 s). */
static void pykvm_blk_pause(struct pykvm_blk *b, int on)
{
    struct timespec until;

    pthread_mutex_lock(&b->lock);
    if (!on)
        b->parked = 0;  /* (paused again: parked once more, by blk_park) */
    __atomic_store_n(&b->paused, !!on, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&b->lock);
    eventfd_write(b->wake_fd, 1);
    if (!on)
        return;
    blk_deadline(&until, 5000);
    pthread_mutex_lock(&b->lock);
    while (!b->parked && !b->stopping && b->paused)
        if (pthread_cond_timedwait(&b->drained_cond, &b->lock, &until) == ETIMEDOUT)
            break;
    pthread_mutex_unlock(&b->lock);
}

/* While parked: take the engine's results; a failed (or short) one goes
 * to Python now, a good one waits in parked_done for the end of the pause. */
static void blk_park_reap(struct pykvm_blk *b)
{
    if (!b->parked_done)
        b->parked_done = malloc(sizeof(*b->parked_done) * b->donecap);
    while (b->parked_done && b->nparked_done < b->donecap) {
        struct pykvm_aio_done *out = b->parked_done + b->nparked_done;
        int n = pykvm_aio_reap(b->aio, out, b->donecap - b->nparked_done);

        if (n <= 0)
            break;
        for (int i = 0; i < n; i++) {
            struct blk_queue *q = &b->queues[(out[i].token >> 16) % b->nqueues];
            uint16_t head = (uint16_t)(out[i].token & 0xFFFF);

            if (head < q->nreqs && q->reqs[head].state == REQ_IO &&
                (out[i].result < 0 || q->reqs[head].op == BLK_T_FLUSH ||
                 (uint64_t)out[i].result < q->reqs[head].nbytes) &&
                blk_failed(b, q, head, out[i].result))
                continue;
            b->parked_done[b->nparked_done++] = out[i];
        }
    }
}

static void blk_finish(struct pykvm_blk *b, uint64_t token, int64_t result);

/* While paused: say so, and wait for resume or stop. 1 when it waited. */
static int blk_park(struct pykvm_blk *b)
{
    if (!__atomic_load_n(&b->paused, __ATOMIC_ACQUIRE))
        return 0;
    /* the engine's requests come back first (failures handed over) */
    blk_park_reap(b);
    while (b->parked_done && pykvm_aio_in_flight(b->aio) && b->nparked_done < b->donecap &&
           !__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE)) {
        struct pollfd pfd = {.fd = pykvm_aio_notifier(b->aio), .events = POLLIN};

        blk_park_reap(b);
        if (pykvm_aio_in_flight(b->aio))
            poll(&pfd, 1, 10);
    }
    pthread_mutex_lock(&b->lock);
    b->parked = 1;
    pthread_cond_broadcast(&b->drained_cond);
    pthread_mutex_unlock(&b->lock);
    while (__atomic_load_n(&b->paused, __ATOMIC_ACQUIRE) &&
           !__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE)) {
        struct pollfd pfd[2] = {{.fd = b->wake_fd, .events = POLLIN},
                                {.fd = pykvm_aio_notifier(b->aio), .events = POLLIN}};
        eventfd_t v;

        if (poll(pfd, 2, 100) > 0 && pfd[0].revents)
            (void)eventfd_read(b->wake_fd, &v);
        blk_park_reap(b);
    }
    for (uint32_t i = 0; i < b->nparked_done; i++)
        blk_finish(b, b->parked_done[i].token, b->parked_done[i].result);
    b->nparked_done = 0;
    return 1;
}

static void blk_finish(struct pykvm_blk *b, uint64_t token, int64_t result)
{
    uint32_t qi = (uint32_t)(token >> 16);
    uint16_t head = (uint16_t)(token & 0xFFFF);
    struct blk_queue *q;
    struct blk_req *req;

    if (qi >= b->nqueues)
        return;
    q = &b->queues[qi];
    if (head >= q->nreqs || q->reqs[head].state != REQ_IO)
        return;
    req = &q->reqs[head];
    if (__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE)) {
        blk_io_done(b, req);
        blk_req_free_iov(req);
        blk_wlog_drop(b, req);
        req->state = REQ_FREE;  /* being reset: the result is dropped */
        return;
    }
    if (blk_failed(b, q, head, result))
        return;
    if (req->op == BLK_T_OUT && req->then_flush && result >= 0) {
        /* writethrough: the write completes once it is flushed */
        req->op = OP_FLUSH_AFTER;
        req->result = result;
        if (!b->wlog)
            blk_req_free_iov(req);  /* (logged: the data goes to the log once it is durable) */
        if (blk_queue_io(b, q, head, PYKVM_AIO_FLUSH, req->fd, 0) < 0)
            blk_fatal(b, q, "internal error: submission queue full");
        return;
    }
    blk_io_done(b, req);
    if (req->op == OP_FLUSH_AFTER && result >= 0)
        result = req->result;
    if (req->op == BLK_T_IN && result >= 0 && (uint64_t)result < req->nbytes) {
        blk_zero_tail(req, (uint64_t)result);
        result = req->nbytes;
    }
    if (req->inj_action == PYKVM_INJ_CORRUPT && result >= 0)
        blk_corrupt(req);
    if (result < 0 || !b->wlog)
        blk_req_free_iov(req);      /* (logged: kept for blk_wlog_publish) */
    if (result < 0) {
        char message[200];

        snprintf(message, sizeof(message), "I/O error: %s", strerror((int)-result));
        CNT_ADD(b, errors, 1);
        *req->status = BLK_S_IOERR;
        blk_trace(b, q, head, BLK_S_IOERR);
        blk_log_then_complete(b, q, head, req->used_len, message);
        return;
    }
    if (req->inj_action == PYKVM_INJ_HOLD) {
        blk_hold(b, q, head);
        return;
    }
    blk_wlog_publish(b, req);
    *req->status = BLK_S_OK;
    blk_trace(b, q, head, BLK_S_OK);
    req->state = REQ_FREE;
    pykvm_vq_add_used(q->vq, &b->mem, head, req->used_len);
    blk_hold_tick(b);
}

static int blk_reap(struct pykvm_blk *b)
{
    int total = 0;

    for (;;) {
        int n = pykvm_aio_reap(b->aio, b->done, b->donecap);

        if (n <= 0)
            break;
        CNT_ADD(b, completion_batches, 1);
        CNT_ADD(b, completions, (uint64_t)n);
        for (int i = 0; i < n; i++)
            blk_finish(b, b->done[i].token, b->done[i].result);
        total += n;
        if ((uint32_t)n < b->donecap)
            break;
    }
    return total;
}

/* -- notifications -------------------------------------------------------------- */

static void blk_signal(struct pykvm_blk *b, struct blk_queue *q)
{
    int fd = __atomic_load_n(&q->call_fd, __ATOMIC_ACQUIRE);

    if (fd < 0) {
        __atomic_fetch_or(&b->forwarded, 1ull << (q->index & 63), __ATOMIC_ACQ_REL);
        eventfd_write(b->forward_fd, 1);
        return;
    }
    if (q->isr)
        __atomic_fetch_or(q->isr, q->isr_bit, __ATOMIC_SEQ_CST);
    eventfd_write(fd, 1);
}

/* Whether an interrupt decision waits: irq_coalesce_ns after the queue's last
 * interrupt, while the engine holds requests (they will complete soon, and the
 * driver then takes them all with one interrupt). Waiting never outlasts the
 * engine's work, so a lone request is never delayed. */
static int pykvm_blk_irq_wait(uint32_t in_flight, uint64_t since_irq_ns, uint64_t coalesce_ns)
{
    return in_flight > 0 && since_irq_ns < coalesce_ns;
}

/* Interrupt decisions for what was added to the used rings (`now` 0, when
 * stopping: no decision waits). */
static void blk_notify(struct pykvm_blk *b, uint64_t now)
{
    uint32_t in_flight = b->irq_coalesce_ns && now ? pykvm_aio_in_flight(b->aio) + b->nsub : 0;

    for (uint32_t i = 0; i < b->nqueues; i++) {
        struct blk_queue *q = &b->queues[i];

        if (q->vq->used_idx == q->vq->signalled_used) {
            q->irq_due_ns = 0;
            continue;  /* nothing added since the last decision */
        }
        if (pykvm_blk_irq_wait(in_flight, now - q->irq_ns, b->irq_coalesce_ns)) {
            if (!q->irq_due_ns) {
                q->irq_due_ns = q->irq_ns + b->irq_coalesce_ns;
                CNT_ADD(b, interrupts_deferred, 1);
            }
            continue;
        }
        q->irq_due_ns = 0;
        if (pykvm_vq_needs_notification(q->vq, &b->mem)) {
            CNT_ADD(b, interrupts, 1);
            blk_signal(b, q);
            q->irq_ns = now;
        } else {
            CNT_ADD(b, interrupts_suppressed, 1);
        }
    }
}

/* The earliest deferred interrupt decision, 0 when none is. */
static uint64_t blk_irq_due(const struct pykvm_blk *b)
{
    uint64_t due = 0;

    for (uint32_t i = 0; i < b->nqueues; i++) {
        uint64_t d = b->queues[i].irq_due_ns;

        if (d && (!due || d < due))
            due = d;
    }
    return due;
}

/* Suppress kicks while polling. */
static void blk_kicks_off(struct pykvm_blk *b)
{
    for (uint32_t i = 0; i < b->nqueues; i++) {
        struct blk_queue *q = &b->queues[i];

        if (q->kicks_on && !q->broken) {
            pykvm_vq_set_notification(q->vq, &b->mem, 0, NULL);
            q->kicks_on = 0;
        }
    }
}

/* Before sleeping: ask for kicks again. 1 when chains arrived meanwhile. */
static int blk_kicks_on(struct pykvm_blk *b)
{
    int pending = 0;

    for (uint32_t i = 0; i < b->nqueues; i++) {
        struct blk_queue *q = &b->queues[i];
        struct pykvm_vq_error err;
        int rc;

        if (q->broken)
            continue;
        rc = pykvm_vq_set_notification(q->vq, &b->mem, 1, &err);
        q->kicks_on = 1;
        if (rc < 0)
            blk_fatal(b, q, err.message);
        else if (rc > 0)
            pending = 1;
    }
    return pending;
}

/* -- the thread --------------------------------------------------------------------- */

/* One round of work: the number of things done. */
static int blk_round(struct pykvm_blk *b, int engine_fired)
{
    int work = 0;

    if (__atomic_load_n(&b->map_changed, __ATOMIC_ACQUIRE))
        blk_apply_map(b);
    work += blk_take_returns(b);
    if (b->throttle)
        work += blk_throttle_release(b, __atomic_load_n(&b->quiescing, __ATOMIC_ACQUIRE));
    if (b->inject)
        work += blk_inject_round(b, __atomic_load_n(&b->quiescing, __ATOMIC_ACQUIRE));
    if (!__atomic_load_n(&b->quiescing, __ATOMIC_ACQUIRE))
        for (uint32_t i = 0; i < b->nqueues; i++)
            work += blk_pop_all(b, &b->queues[i]);
    blk_flush_submissions(b);
    if (engine_fired || pykvm_aio_ready(b->aio)) {
        work += blk_reap(b);
        blk_flush_submissions(b);  /* flushes after writes, and what did not fit */
    }
    blk_notify(b, b->irq_coalesce_ns ? blk_now_ns() : 1);
    return work;
}

static void blk_adapt_poll(struct pykvm_blk *b, uint64_t block_ns)
{
    /* QEMU's rule (util/aio-posix.c): grow while polling a bit longer would
     * have caught the event, shrink when the wait was longer than the limit. */
    if (block_ns <= b->poll_ns)
        return;
    if (block_ns > b->poll_max_ns) {
        b->poll_ns /= 2;
    } else if (b->poll_ns < b->poll_max_ns) {
        b->poll_ns = b->poll_ns ? b->poll_ns * 2 : POLL_GROW_START_NS;
        if (b->poll_ns > b->poll_max_ns)
            b->poll_ns = b->poll_max_ns;
    }
}

/* While quiescing: once no request is out (with the engine, waiting to be
 * submitted, or with Python), decide the interrupts and say so. */
static void blk_check_quiet(struct pykvm_blk *b)
{
    if (b->nsub)
        return;
    for (uint32_t i = 0; i < b->nqueues; i++)
        for (uint32_t h = 0; h < b->queues[i].nreqs; h++)
            if (b->queues[i].reqs[h].state != REQ_FREE)
                return;
    blk_notify(b, 0);
    pthread_mutex_lock(&b->lock);
    b->quiet = 1;
    pthread_cond_broadcast(&b->drained_cond);
    pthread_mutex_unlock(&b->lock);
}

/* Keep epfd watching the sockets of the NBD connections the engine sends to
 * (their replies are read in this thread, by the engine's reap). */
static void blk_watch_routes(struct pykvm_blk *b)
{
    int fds[BLK_ROUTES];
    uint32_t gens[BLK_ROUTES];
    int n = pykvm_aio_watch(b->aio, fds, gens, BLK_ROUTES);

    for (uint32_t i = 0; i < BLK_ROUTES; i++) {
        int fd = (int)i < n ? fds[i] : -1;
        uint32_t gen = (int)i < n ? gens[i] : 0;

        if (i >= b->nroute && fd < 0)
            continue;
        if (i < b->nroute && fd == b->route_fd[i] && gen == b->route_gen[i])
            continue;
        if (i < b->nroute && b->route_fd[i] >= 0)   /* gone already if it was closed */
            (void)epoll_ctl(b->epfd, EPOLL_CTL_DEL, b->route_fd[i], NULL);
        if (fd >= 0) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = TAG_ROUTE};

            if (epoll_ctl(b->epfd, EPOLL_CTL_ADD, fd, &ev) < 0 && errno == EEXIST)
                (void)epoll_ctl(b->epfd, EPOLL_CTL_MOD, fd, &ev);
        }
        b->route_fd[i] = fd;
        b->route_gen[i] = gen;
    }
    b->nroute = n > 0 ? (uint32_t)n : 0;
}

/* epoll_wait for at most timeout_ns (0: no limit) */
static int blk_wait(struct pykvm_blk *b, struct epoll_event *events, int max, uint64_t timeout_ns)
{
    if (timeout_ns) {
        struct timespec ts = {.tv_sec = (time_t)(timeout_ns / 1000000000u),
                              .tv_nsec = (long)(timeout_ns % 1000000000u)};
        int n = epoll_pwait2(b->epfd, events, max, &ts, NULL);

        if (n >= 0 || errno != ENOSYS)
            return n;
        /* before Linux 5.11: whole milliseconds, rounded up */
        return epoll_wait(b->epfd, events, max, (int)((timeout_ns + 999999) / 1000000));
    }
    return epoll_wait(b->epfd, events, max, -1);
}

static void *blk_thread(void *arg)
{
    struct pykvm_blk *b = arg;
    struct epoll_event events[16];
    uint64_t idle_since = blk_now_ns();
    int engine_fired = 1;  /* chains and completions may predate the thread */

    while (!__atomic_load_n(&b->stopping, __ATOMIC_ACQUIRE)) {
        uint64_t now, due;
        int n;

        if (blk_park(b)) {
            engine_fired = 1;  /* what completed meanwhile is reaped now */
            continue;
        }
        int work = blk_round(b, engine_fired);
        int quiescing = __atomic_load_n(&b->quiescing, __ATOMIC_ACQUIRE);

        if (quiescing && !b->quiet)
            blk_check_quiet(b);
        if (work) {
            engine_fired = 0;
            if (b->poll_max_ns)
                blk_kicks_off(b);
            CNT_ADD(b, poll_hits, 1);
            idle_since = blk_now_ns();
            continue;
        }
        engine_fired = 0;
        now = blk_now_ns();
        if (now - idle_since < b->poll_ns) {
            blk_cpu_relax();
            continue;
        }
        /* about to sleep: kicks back on, and a last look (quiescing: chains
         * that wait are left for whoever starts the ring again) */
        if ((!quiescing && blk_kicks_on(b)) || pykvm_aio_ready(b->aio) || b->nsub)
            continue;
        due = blk_irq_due(b);
        if (b->throttle) {
            uint64_t held = blk_throttle_due(b);

            due = !due ? held : !held ? due : held < due ? held : due;
        }
        if (b->inject) {
            uint64_t held = blk_delay_due(b);

            due = !due ? held : !held ? due : held < due ? held : due;
        }
        if (due && due <= now)
            continue;  /* a deferred interrupt decision or a held request: blk_round */
        CNT_ADD(b, sleeps, 1);
        blk_watch_routes(b);
        n = blk_wait(b, events, 16, due ? due - now : 0);
        if (b->poll_max_ns)
            blk_adapt_poll(b, blk_now_ns() - idle_since);
        for (int i = 0; i < n; i++) {
            uint32_t tag = events[i].data.u32;
            eventfd_t v;

            if (tag == TAG_ENGINE || tag == TAG_ROUTE)
                engine_fired = 1;  /* reap reads it */
            else if (tag == TAG_WAKE)
                (void)eventfd_read(b->wake_fd, &v);
            else if (tag < b->nqueues)
                (void)eventfd_read(b->queues[tag].kick_fd, &v);
        }
        if (b->poll_max_ns && b->poll_ns)
            blk_kicks_off(b);
        idle_since = blk_now_ns();
    }
    blk_notify(b, 0);  /* no decision stays deferred */
    blk_throttle_drop(b);
    blk_inject_drop(b);
    /* stopping: let the engine finish what it has (results dropped) */
    while (pykvm_aio_in_flight(b->aio)) {
        struct pollfd pfd = {.fd = pykvm_aio_notifier(b->aio), .events = POLLIN};

        if (!blk_reap(b))
            poll(&pfd, 1, 100);
    }
    return NULL;
}

/* -- start and stop ------------------------------------------------------------------- */

static void blk_free(struct pykvm_blk *b)
{
    if (b->aio)
        pykvm_aio_close(b->aio);
    for (uint32_t i = 0; b->queues && i < b->nqueues; i++) {
        struct blk_queue *q = &b->queues[i];

        for (uint32_t h = 0; q->reqs && h < q->nreqs; h++) {
            blk_req_free_iov(&q->reqs[h]);
            free(q->reqs[h].held_segs);
        }
        free(q->reqs);
        free(q->chain.segs);
    }
    while (b->npunts) {
        struct pykvm_blk_punt p;

        pykvm_blk_next_punt(b, &p);
        pykvm_blk_punt_release(&p);
    }
    free(b->punts);
    free(b->returns);
    free(b->queues);
    free(b->regions);
    free(b->map);
    free(b->next_map);
    free(b->sub);
    free(b->done);
    free(b->parked_done);
    free(b->held[0]);
    free(b->held[1]);
    free(b->delayed);
    free(b->holds);
    if (b->epfd >= 0)
        close(b->epfd);
    if (b->wake_fd >= 0)
        close(b->wake_fd);
    if (b->punt_fd >= 0)
        close(b->punt_fd);
    if (b->forward_fd >= 0)
        close(b->forward_fd);
    pthread_cond_destroy(&b->drained_cond);
    pthread_mutex_destroy(&b->lock);
    free(b);
}

static struct pykvm_blk *pykvm_blk_start(const struct pykvm_blk_config *cfg, char *err,
                                         size_t errlen)
{
    struct pykvm_blk *b = calloc(1, sizeof(*b));
    uint32_t depth = 0;
    struct epoll_event ev;
    sigset_t all, old;

    if (!b) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    b->epfd = b->wake_fd = b->punt_fd = b->forward_fd = -1;
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->drained_cond, NULL);
    if (!cfg->nqueues || cfg->nqueues > 64) {
        snprintf(err, errlen, "%u queues (1 to 64 are supported)", cfg->nqueues);
        goto fail;
    }
    b->regions = malloc(sizeof(*b->regions) * (cfg->nregions ? cfg->nregions : 1));
    b->queues = calloc(cfg->nqueues, sizeof(*b->queues));
    b->map = blk_copy_map(cfg->map, cfg->nmap);
    if (!b->regions || !b->queues || !b->map)
        goto nomem;
    memcpy(b->regions, cfg->regions, sizeof(*b->regions) * cfg->nregions);
    b->mem.regions = b->regions;
    b->mem.nregions = cfg->nregions;
    b->nmap = cfg->nmap;
    b->nqueues = cfg->nqueues;
    for (uint32_t i = 0; i < cfg->nqueues; i++) {
        struct blk_queue *q = &b->queues[i];
        const struct pykvm_blk_queue *c = &cfg->queues[i];

        q->vq = c->vq;
        q->index = i;
        q->kick_fd = c->kick_fd;
        q->call_fd = c->call_fd;
        q->isr = c->isr;
        q->isr_bit = c->isr_bit;
        q->kicks_on = 1;
        q->broken = !c->vq->active;  /* not set up by the driver: never served */
        q->nreqs = c->vq->active ? c->vq->size : 0;
        q->chain.cap = pykvm_vq_chain_capacity(c->vq);
        q->chain.segs = calloc(q->chain.cap, sizeof(*q->chain.segs));
        q->reqs = calloc(q->nreqs ? q->nreqs : 1, sizeof(*q->reqs));
        if (!q->chain.segs || !q->reqs)
            goto nomem;
        depth += q->nreqs;
    }
    b->capacity = cfg->capacity;
    b->features = cfg->features;
    b->align = cfg->align ? cfg->align : 1;
    b->seg_max = cfg->seg_max && cfg->seg_max < PYKVM_BLK_MAX_SEGMENTS ? cfg->seg_max
                                                                      : PYKVM_BLK_MAX_SEGMENTS;
    b->size_max = cfg->size_max ? cfg->size_max : UINT32_MAX;
    b->flush_fd = cfg->flush_fd;
    b->read_only = cfg->read_only;
    b->write_cache = cfg->write_cache;
    b->no_flush = cfg->no_flush;
    memcpy(b->serial, cfg->serial, sizeof(b->serial));
    b->poll_max_ns = cfg->poll_max_ns;
    b->poll_ns = 0;
    b->irq_coalesce_ns = cfg->irq_coalesce_ns;
    depth = depth ? depth : 1;
    b->subcap = b->donecap = depth;
    b->sub = calloc(depth, sizeof(*b->sub));
    b->done = calloc(depth, sizeof(*b->done));
    if (!b->sub || !b->done)
        goto nomem;
    b->throttle = cfg->throttle;
    if (b->throttle) {
        b->held_cap = depth;
        b->held[0] = calloc(depth, sizeof(*b->held[0]));
        b->held[1] = calloc(depth, sizeof(*b->held[1]));
        if (!b->held[0] || !b->held[1])
            goto nomem;
    }
    b->inject = cfg->inject;
    b->trace = cfg->trace;
    b->wlog = cfg->wlog;
    if (b->inject) {
        b->delayed = calloc(depth, sizeof(*b->delayed));
        b->holds = calloc(depth, sizeof(*b->holds));
        if (!b->delayed || !b->holds)
            goto nomem;
    }
    b->aio = pykvm_aio_open(cfg->engine, depth, err, errlen);
    if (!b->aio)
        goto fail;
    b->epfd = epoll_create1(EPOLL_CLOEXEC);
    b->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    b->punt_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    b->forward_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (b->epfd < 0 || b->wake_fd < 0 || b->punt_fd < 0 || b->forward_fd < 0) {
        snprintf(err, errlen, "eventfd/epoll: %s", strerror(errno));
        goto fail;
    }
    ev.events = EPOLLIN;
    ev.data.u32 = TAG_ENGINE;
    if (epoll_ctl(b->epfd, EPOLL_CTL_ADD, pykvm_aio_notifier(b->aio), &ev) < 0)
        goto epoll_fail;
    ev.data.u32 = TAG_WAKE;
    if (epoll_ctl(b->epfd, EPOLL_CTL_ADD, b->wake_fd, &ev) < 0)
        goto epoll_fail;
    for (uint32_t i = 0; i < b->nqueues; i++) {
        if (b->queues[i].broken)
            continue;
        ev.data.u32 = i;
        if (epoll_ctl(b->epfd, EPOLL_CTL_ADD, b->queues[i].kick_fd, &ev) < 0)
            goto epoll_fail;
    }
    /* the thread takes no signals: Python's handlers run in the main thread */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    errno = pthread_create(&b->thread, NULL, blk_thread, b);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (errno) {
        snprintf(err, errlen, "cannot start the I/O thread: %s", strerror(errno));
        goto fail;
    }
    b->started = 1;
    return b;
epoll_fail:
    snprintf(err, errlen, "epoll_ctl: %s", strerror(errno));
    goto fail;
nomem:
    snprintf(err, errlen, "out of memory");
fail:
    blk_free(b);
    return NULL;
}

static void pykvm_blk_stop(struct pykvm_blk *b)
{
    if (!b)
        return;
    pthread_mutex_lock(&b->lock);
    __atomic_store_n(&b->stopping, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&b->drained_cond);
    pthread_mutex_unlock(&b->lock);
    eventfd_write(b->wake_fd, 1);
    if (b->started)
        pthread_join(b->thread, NULL);
    blk_free(b);
}
