/*
 * writelog.c - the live write log (writelog.h says the order it keeps).
 *
 * State, under lock: flushes are numbered as they are submitted
 * (`submitted`); `resolved` flushes have had their entries written (or
 * failed); fstate[i] is the state of flush resolved + 1 + i. A completion
 * that comes while resolved < submitted is held, tagged with `submitted`,
 * and appended once resolved reaches its tag; held ones keep their order.
 */
#include <endian.h>
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/uio.h>

#include "writelog.h"

#define WLOG_MAGIC 0x6A736677736872ull
#define WLOG_VERSION 1
#define WLOG_END_MARK "dm-log-writes-end"
#define WLOG_ENTRY_HEAD 32      /* sector, nr_sectors, flags, data_len: u64 each */
#define WLOG_ZERO_BUF 65536
#define WLOG_IOV_BATCH 64
#define WLOG_BUF (1u << 20)     /* entries gathered before they go to the file */
#define WLOG_NBUF 8             /* buffers: one filled, the others queued or free */
#define WLOG_NONE UINT32_MAX

#define HOLD_WRITE 0
#define HOLD_ZEROES 1
#define HOLD_DISCARD 2

#define FLUSH_IN_FLIGHT 0
#define FLUSH_OK 1
#define FLUSH_FAILED 2

struct wlog_held {
    struct wlog_held *next;
    uint64_t tag;               /* flushes submitted when it completed */
    uint64_t offset, length;
    uint8_t kind;               /* HOLD_* */
    uint8_t fua;
    uint8_t data[];             /* HOLD_WRITE: the data, copied */
};

/* A buffer of whole entries, the log's bytes [start, start + len). */
struct wlog_buf {
    uint8_t *data;
    uint32_t len;
    uint8_t super;              /* the interval asks for the super block after it */
    uint64_t start;
    uint64_t entries;           /* the log's entries once it is in the file */
};

struct pykvm_wlog {
    pthread_mutex_t lock;
    int fd;
    int dfd;                    /* O_DIRECT on the same file, for the buffers; -1: none */
    uint32_t ss, interval;
    uint64_t entries, pos, since_super;
    uint64_t submitted, resolved;
    uint8_t *fstate;
    uint32_t fcap;
    struct wlog_held *held, **held_tail;
    uint64_t hold_max;
    struct pykvm_wlog_stats st;
    int warned;
    uint8_t *sector;            /* one entry's sector */
    uint8_t *zero;              /* WLOG_ZERO_BUF zero bytes */
    /* entries not yet in the file: buffer `cur` is being filled (WLOG_NONE:
     * none taken yet; under lock); a full one is queued for the writer
     * thread, which writes them out in order (and the super block after one
     * that asks). The queue, the free buffers, busy, stop and werr are under
     * qlock, which the thread takes alone: a caller that waits for it (a
     * free buffer, or everything written) keeps `lock`, so nothing else
     * changes the log's state meanwhile */
    struct wlog_buf bufs[WLOG_NBUF];
    uint32_t cur;
    pthread_mutex_t qlock;
    uint32_t queue[WLOG_NBUF], qhead, qn;
    uint32_t free_[WLOG_NBUF], nfree;
    int busy, stop, werr;
    pthread_t thread;
    pthread_cond_t work, idle;
    uint8_t *tsector;           /* the writer thread's super block sector */
};

static void wlog_fail(struct pykvm_wlog *w, int err)
{
    if (w->st.error)
        return;
    w->st.error = err;
    fprintf(stderr, "pykvm: blklogwrites: writing the log failed at byte %llu: %s (nothing "
            "more is logged)\n", (unsigned long long)w->pos, strerror(err));
}

/* pwritev all of iov (modified) at pos; 0 or -errno. */
static int wlog_pwritev_all(int fd, struct iovec *iov, int n, uint64_t pos)
{
    while (n > 0) {
        ssize_t done = pwritev(fd, iov, n > WLOG_IOV_BATCH ? WLOG_IOV_BATCH : n, (off_t)pos);

        if (done < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (!done)
            return -EIO;
        pos += (uint64_t)done;
        while (n > 0 && (size_t)done >= iov->iov_len) {
            done -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + done;
            iov->iov_len -= (size_t)done;
        }
    }
    return 0;
}

static void wlog_super_sector(const struct pykvm_wlog *w, uint8_t *sector, uint64_t entries)
{
    uint64_t magic = htole64(WLOG_MAGIC), version = htole64(WLOG_VERSION);
    uint64_t nr = htole64(entries);
    uint32_t ss = htole32(w->ss);

    memset(sector, 0, w->ss);
    memcpy(sector, &magic, 8);
    memcpy(sector + 8, &version, 8);
    memcpy(sector + 16, &nr, 8);
    memcpy(sector + 24, &ss, 4);
}

/* The writer thread: full buffers to the file, in the order they were queued. */
static void *wlog_thread(void *arg)
{
    struct pykvm_wlog *w = arg;

    pthread_mutex_lock(&w->qlock);
    for (;;) {
        struct wlog_buf *b;
        struct iovec v;
        uint32_t i;
        int err;

        while (!w->qn && !w->stop)
            pthread_cond_wait(&w->work, &w->qlock);
        if (!w->qn)
            break;
        i = w->queue[w->qhead];
        w->qhead = (w->qhead + 1) % WLOG_NBUF;
        w->qn--;
        w->busy = 1;
        b = &w->bufs[i];
        pthread_mutex_unlock(&w->qlock);
        v.iov_base = b->data;
        v.iov_len = b->len;
        err = 0;
        if (!w->werr && w->dfd >= 0) {
            /* no copy into the page cache (on a small host that copy costs
             * the guest a CPU); the file system refuses it: buffered from now */
            err = wlog_pwritev_all(w->dfd, &v, 1, b->start);
            if (err == -EINVAL) {
                fprintf(stderr, "pykvm: blklogwrites: the log's file system refuses O_DIRECT "
                        "writes of %u-byte sectors: the log goes through the page cache\n",
                        w->ss);
                w->dfd = -1;
                v.iov_base = b->data;
                v.iov_len = b->len;
                err = 0;
            }
        }
        if (!w->werr && w->dfd < 0 && !err)
            err = wlog_pwritev_all(w->fd, &v, 1, b->start);
        if (!err && b->super) {
            wlog_super_sector(w, w->tsector, b->entries);
            v.iov_base = w->tsector;
            v.iov_len = w->ss;
            err = wlog_pwritev_all(w->fd, &v, 1, 0);
        }
        pthread_mutex_lock(&w->qlock);
        if (err && !w->werr)
            w->werr = -err;
        b->len = 0;
        b->super = 0;
        w->free_[w->nfree++] = i;
        w->busy = 0;
        pthread_cond_broadcast(&w->idle);
    }
    pthread_mutex_unlock(&w->qlock);
    return NULL;
}

/* The buffer being filled goes to the writer thread. */
static void wlog_queue_cur(struct pykvm_wlog *w)
{
    if (w->cur == WLOG_NONE || !w->bufs[w->cur].len)
        return;
    pthread_mutex_lock(&w->qlock);
    w->queue[(w->qhead + w->qn) % WLOG_NBUF] = w->cur;
    w->qn++;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->qlock);
    w->cur = WLOG_NONE;
}

/* Room for `total` (<= WLOG_BUF) bytes at the log's end in the buffer being
 * filled, once the writer thread has freed one if need be; NULL after an
 * error. */
static uint8_t *wlog_room(struct pykvm_wlog *w, uint64_t total)
{
    struct wlog_buf *b;
    int err;

    if (w->cur != WLOG_NONE && w->bufs[w->cur].len + total > WLOG_BUF)
        wlog_queue_cur(w);
    if (w->cur == WLOG_NONE) {
        pthread_mutex_lock(&w->qlock);
        if (!w->nfree && !w->werr)
            w->st.waits++;
        while (!w->nfree && !w->werr)
            pthread_cond_wait(&w->idle, &w->qlock);
        err = w->werr;
        if (!err) {
            w->cur = w->free_[--w->nfree];
            w->bufs[w->cur].len = 0;
        }
        pthread_mutex_unlock(&w->qlock);
        if (err)
            wlog_fail(w, err);
    }
    if (w->st.error)
        return NULL;
    b = &w->bufs[w->cur];
    if (!b->len)
        b->start = w->pos;
    return b->data + b->len;
}

/* Every entry so far is in the file. */
static void wlog_sync(struct pykvm_wlog *w)
{
    int err;

    wlog_queue_cur(w);
    pthread_mutex_lock(&w->qlock);
    while (w->qn || w->busy)
        pthread_cond_wait(&w->idle, &w->qlock);
    err = w->werr;
    pthread_mutex_unlock(&w->qlock);
    if (err)
        wlog_fail(w, err);
}

/* The super block, now: after the entries it counts are in the file. */
static void wlog_super(struct pykvm_wlog *w)
{
    struct iovec v = {w->sector, w->ss};
    int err;

    wlog_sync(w);
    if (w->st.error)
        return;
    wlog_super_sector(w, w->sector, w->entries);
    err = wlog_pwritev_all(w->fd, &v, 1, 0);
    if (err)
        wlog_fail(w, -err);
    w->since_super = 0;
}

/* One entry (its head sector, then `data`) appended: copied into a buffer
 * (the data is captured as this returns) that the writer thread writes out,
 * or, larger than a buffer, written out at once; the super block after it
 * when the flags ask (now) or the interval (after its buffer). */
static void wlog_entry(struct pykvm_wlog *w, uint64_t sector, uint64_t nr, uint64_t flags,
                       const char *name, const struct iovec *data, uint32_t ndata)
{
    uint64_t head[4] = {htole64(sector), htole64(nr), htole64(flags), 0};
    uint64_t total = w->ss;
    uint8_t *at;
    size_t nlen = 0;

    if (w->st.error)
        return;
    for (uint32_t i = 0; i < ndata; i++)
        total += data[i].iov_len;
    if (total > WLOG_BUF) {
        struct iovec small[1 + WLOG_IOV_BATCH], *v = small;
        int err;

        wlog_sync(w);
        if (w->st.error)
            return;
        if (ndata + 1 > 1 + WLOG_IOV_BATCH && !(v = malloc(sizeof(*v) * (ndata + 1)))) {
            wlog_fail(w, ENOMEM);
            return;
        }
        at = w->sector;
        v[0].iov_base = w->sector;
        v[0].iov_len = w->ss;
        memcpy(v + 1, data, sizeof(*data) * ndata);
        memset(at, 0, w->ss);
        memcpy(at, head, sizeof(head));
        err = wlog_pwritev_all(w->fd, v, (int)ndata + 1, w->pos);
        if (v != small)
            free(v);
        if (err) {
            wlog_fail(w, -err);
            return;
        }
    } else {
        at = wlog_room(w, total);
        if (!at)
            return;
        memset(at, 0, w->ss);
        if (name) {
            nlen = strnlen(name, w->ss - WLOG_ENTRY_HEAD - 1);
            head[3] = htole64(nlen);
            memcpy(at + WLOG_ENTRY_HEAD, name, nlen);
        }
        memcpy(at, head, sizeof(head));
        at += w->ss;
        for (uint32_t i = 0; i < ndata; i++) {
            memcpy(at, data[i].iov_base, data[i].iov_len);
            at += data[i].iov_len;
        }
        w->bufs[w->cur].len += (uint32_t)total;
    }
    w->pos += total;
    w->entries++;
    w->since_super++;
    if (w->cur != WLOG_NONE)
        w->bufs[w->cur].entries = w->entries;
    if (flags & (PYKVM_WLOG_FUA | PYKVM_WLOG_MARK) || (total > WLOG_BUF &&
                                                       w->since_super >= w->interval)) {
        wlog_super(w);
    } else if (w->since_super >= w->interval) {
        w->bufs[w->cur].super = 1;
        w->since_super = 0;
    }
}

/* Write-zeroes as writes of zeroes, one entry per PYKVM_WLOG_ZERO_CHUNK. */
static void wlog_zeroes_now(struct pykvm_wlog *w, uint64_t offset, uint64_t length,
                            uint64_t flags)
{
    struct iovec v[PYKVM_WLOG_ZERO_CHUNK / WLOG_ZERO_BUF];

    while (length && !w->st.error) {
        uint64_t n = length < PYKVM_WLOG_ZERO_CHUNK ? length : PYKVM_WLOG_ZERO_CHUNK;
        uint32_t k = 0;

        for (uint64_t left = n; left; k++) {
            v[k].iov_base = w->zero;
            v[k].iov_len = left < WLOG_ZERO_BUF ? left : WLOG_ZERO_BUF;
            left -= v[k].iov_len;
        }
        wlog_entry(w, offset / w->ss, n / w->ss, flags, NULL, v, k);
        offset += n;
        length -= n;
    }
}

static void wlog_append_held(struct pykvm_wlog *w, struct wlog_held *h)
{
    uint64_t flags = h->fua ? PYKVM_WLOG_FUA : 0;

    if (h->kind == HOLD_WRITE) {
        struct iovec v = {h->data, h->length};

        wlog_entry(w, h->offset / w->ss, h->length / w->ss, flags, NULL, &v, 1);
        w->st.held_bytes -= h->length;
    } else if (h->kind == HOLD_ZEROES) {
        wlog_zeroes_now(w, h->offset, h->length, flags);
    } else {
        wlog_entry(w, h->offset / w->ss, (h->length + w->ss - 1) / w->ss,
                   PYKVM_WLOG_DISCARD, NULL, NULL, 0);
    }
}

/* The held ones whose flushes are resolved (all: up_to = UINT64_MAX) go to the log. */
static void wlog_release(struct pykvm_wlog *w, uint64_t up_to)
{
    while (w->held && w->held->tag <= up_to) {
        struct wlog_held *h = w->held;

        w->held = h->next;
        wlog_append_held(w, h);
        free(h);
    }
    if (!w->held)
        w->held_tail = &w->held;
}

static int wlog_flush_in_flight(const struct pykvm_wlog *w)
{
    return w->resolved < w->submitted;
}

/* Hold a completion behind the flushes in flight; past hold_max (or out of
 * memory) it is appended at once instead, after the ones held before it. */
static void wlog_hold(struct pykvm_wlog *w, uint8_t kind, uint64_t offset, uint64_t length,
                      int fua, const struct iovec *iov, uint32_t niov)
{
    uint64_t bytes = kind == HOLD_WRITE ? length : 0;
    struct wlog_held *h = NULL;

    if (w->st.held_bytes + bytes > w->hold_max) {
        if (!w->warned) {
            w->warned = 1;
            fprintf(stderr, "pykvm: blklogwrites: more than %llu bytes of writes completed "
                    "while a flush was in flight: they are logged before that flush's entry "
                    "(still legal: they completed)\n", (unsigned long long)w->hold_max);
        }
        w->st.forced++;
    } else {
        h = malloc(sizeof(*h) + bytes);
    }
    if (!h) {
        wlog_release(w, UINT64_MAX);
        if (kind == HOLD_WRITE)
            wlog_entry(w, offset / w->ss, length / w->ss, fua ? PYKVM_WLOG_FUA : 0, NULL,
                       iov, niov);
        else if (kind == HOLD_ZEROES)
            wlog_zeroes_now(w, offset, length, fua ? PYKVM_WLOG_FUA : 0);
        else
            wlog_entry(w, offset / w->ss, (length + w->ss - 1) / w->ss, PYKVM_WLOG_DISCARD,
                       NULL, NULL, 0);
        return;
    }
    h->next = NULL;
    h->tag = w->submitted;
    h->offset = offset;
    h->length = length;
    h->kind = kind;
    h->fua = (uint8_t)!!fua;
    for (uint64_t i = 0, pos = 0; i < niov; pos += iov[i].iov_len, i++)
        memcpy(h->data + pos, iov[i].iov_base, iov[i].iov_len);
    *w->held_tail = h;
    w->held_tail = &h->next;
    w->st.held++;
    w->st.held_bytes += bytes;
    if (w->st.held_bytes > w->st.held_peak)
        w->st.held_peak = w->st.held_bytes;
}

static void wlog_free(struct pykvm_wlog *w)
{
    pthread_cond_destroy(&w->work);
    pthread_cond_destroy(&w->idle);
    pthread_mutex_destroy(&w->qlock);
    pthread_mutex_destroy(&w->lock);
    for (uint32_t i = 0; i < WLOG_NBUF; i++)
        free(w->bufs[i].data);
    free(w->tsector);
    free(w->sector);
    free(w->zero);
    free(w->fstate);
    free(w);
}

struct pykvm_wlog *pykvm_wlog_new(int32_t fd, int32_t direct_fd, uint32_t sector_size,
                                  uint64_t entries, uint64_t pos, uint32_t super_interval,
                                  uint64_t hold_max)
{
    struct pykvm_wlog *w;
    int ok;

    if (sector_size < 512 || sector_size > 4096 || (sector_size & (sector_size - 1)) ||
        pos < sector_size)
        return NULL;
    w = calloc(1, sizeof(*w));
    if (!w)
        return NULL;
    w->sector = malloc(sector_size);
    w->zero = calloc(1, WLOG_ZERO_BUF);
    w->fcap = 16;
    w->fstate = calloc(w->fcap, 1);
    w->tsector = malloc(sector_size);
    ok = w->sector && w->zero && w->fstate && w->tsector;
    for (uint32_t i = 0; i < WLOG_NBUF; i++) {
        void *p = NULL;

        ok = ok && !posix_memalign(&p, 4096, WLOG_BUF);
        w->bufs[i].data = p;
        w->free_[w->nfree++] = WLOG_NBUF - 1 - i;
    }
    w->cur = WLOG_NONE;
    w->fd = fd;
    w->dfd = direct_fd;
    w->ss = sector_size;
    w->interval = super_interval ? super_interval : 1;
    w->entries = entries;
    w->pos = pos;
    w->hold_max = hold_max;
    w->held_tail = &w->held;
    pthread_mutex_init(&w->lock, NULL);
    pthread_mutex_init(&w->qlock, NULL);
    pthread_cond_init(&w->work, NULL);
    pthread_cond_init(&w->idle, NULL);
    if (ok) {
        sigset_t all, old;

        sigfillset(&all);
        pthread_sigmask(SIG_SETMASK, &all, &old);
        ok = !pthread_create(&w->thread, NULL, wlog_thread, w);
        pthread_sigmask(SIG_SETMASK, &old, NULL);
    }
    if (!ok) {
        wlog_free(w);
        return NULL;
    }
    wlog_super(w);
    return w;
}

int32_t pykvm_wlog_close(struct pykvm_wlog *w)
{
    int32_t err;

    if (!w)
        return 0;
    pthread_mutex_lock(&w->lock);
    wlog_release(w, UINT64_MAX);        /* never flushed: last, as dm-log-writes does */
    wlog_entry(w, 0, 0, PYKVM_WLOG_MARK, WLOG_END_MARK, NULL, 0);
    wlog_super(w);
    err = w->st.error;
    pthread_mutex_unlock(&w->lock);
    pthread_mutex_lock(&w->qlock);
    w->stop = 1;
    pthread_cond_signal(&w->work);
    pthread_mutex_unlock(&w->qlock);
    pthread_join(w->thread, NULL);
    wlog_free(w);
    return err;
}

static int wlog_aligned(const struct pykvm_wlog *w, uint64_t offset, uint64_t length)
{
    return !(offset % w->ss) && !(length % w->ss);
}

int32_t pykvm_wlog_write(struct pykvm_wlog *w, uint64_t offset, const struct iovec *iov,
                         uint32_t niov, int32_t fua)
{
    uint64_t length = 0;
    int32_t ret;

    for (uint32_t i = 0; i < niov; i++)
        length += iov[i].iov_len;
    if (!wlog_aligned(w, offset, length))
        return -EINVAL;
    pthread_mutex_lock(&w->lock);
    if (fua || !wlog_flush_in_flight(w))
        wlog_entry(w, offset / w->ss, length / w->ss, fua ? PYKVM_WLOG_FUA : 0, NULL, iov,
                   niov);
    else
        wlog_hold(w, HOLD_WRITE, offset, length, 0, iov, niov);
    ret = -w->st.error;
    pthread_mutex_unlock(&w->lock);
    return ret;
}

int32_t pykvm_wlog_write_buf(struct pykvm_wlog *w, uint64_t offset, const uint8_t *buf,
                             uint64_t length, int32_t fua)
{
    struct iovec v = {(void *)buf, length};

    return pykvm_wlog_write(w, offset, &v, 1, fua);
}

int32_t pykvm_wlog_zeroes(struct pykvm_wlog *w, uint64_t offset, uint64_t length, int32_t fua)
{
    int32_t ret;

    if (!wlog_aligned(w, offset, length))
        return -EINVAL;
    pthread_mutex_lock(&w->lock);
    if (fua || !wlog_flush_in_flight(w))
        wlog_zeroes_now(w, offset, length, fua ? PYKVM_WLOG_FUA : 0);
    else
        wlog_hold(w, HOLD_ZEROES, offset, length, 0, NULL, 0);
    ret = -w->st.error;
    pthread_mutex_unlock(&w->lock);
    return ret;
}

int32_t pykvm_wlog_discard(struct pykvm_wlog *w, uint64_t offset, uint64_t length)
{
    int32_t ret;

    if (offset % w->ss)
        return -EINVAL;
    pthread_mutex_lock(&w->lock);
    if (!wlog_flush_in_flight(w))
        wlog_entry(w, offset / w->ss, (length + w->ss - 1) / w->ss, PYKVM_WLOG_DISCARD, NULL,
                   NULL, 0);
    else
        wlog_hold(w, HOLD_DISCARD, offset, length, 0, NULL, 0);
    ret = -w->st.error;
    pthread_mutex_unlock(&w->lock);
    return ret;
}

uint64_t pykvm_wlog_flush_start(struct pykvm_wlog *w)
{
    uint64_t ticket = 0;
    uint64_t n;

    pthread_mutex_lock(&w->lock);
    n = w->submitted - w->resolved;
    if (n >= w->fcap) {
        uint8_t *grown = realloc(w->fstate, (size_t)w->fcap * 2);

        if (!grown) {
            /* no room to track it: it is logged as if it completed at once
             * (ticket 0 is ignored by flush_done) */
            wlog_entry(w, 0, 0, PYKVM_WLOG_FLUSH, NULL, NULL, 0);
            pthread_mutex_unlock(&w->lock);
            return 0;
        }
        w->fstate = grown;
        w->fcap *= 2;
    }
    w->fstate[n] = FLUSH_IN_FLIGHT;
    ticket = ++w->submitted;
    pthread_mutex_unlock(&w->lock);
    return ticket;
}

void pykvm_wlog_flush_done(struct pykvm_wlog *w, uint64_t ticket, int32_t ok)
{
    char name[32];
    uint64_t n, k = 0;

    pthread_mutex_lock(&w->lock);
    if (ticket <= w->resolved || ticket > w->submitted) {
        pthread_mutex_unlock(&w->lock);
        return;
    }
    w->fstate[ticket - w->resolved - 1] = ok ? FLUSH_OK : FLUSH_FAILED;
    n = w->submitted - w->resolved;
    /* flush entries in submission order: the first ones that are done */
    while (k < n && w->fstate[k] != FLUSH_IN_FLIGHT) {
        if (w->fstate[k] == FLUSH_OK) {
            wlog_entry(w, 0, 0, PYKVM_WLOG_FLUSH, NULL, NULL, 0);
            w->st.flushes++;
            snprintf(name, sizeof(name), "flush-%llu", (unsigned long long)w->st.flushes);
            wlog_entry(w, 0, 0, PYKVM_WLOG_MARK, name, NULL, 0);
        }
        k++;
        wlog_release(w, w->resolved + k);
    }
    if (k) {
        memmove(w->fstate, w->fstate + k, n - k);
        w->resolved += k;
    }
    pthread_mutex_unlock(&w->lock);
}

int32_t pykvm_wlog_mark(struct pykvm_wlog *w, const char *name)
{
    int32_t ret;

    pthread_mutex_lock(&w->lock);
    wlog_entry(w, 0, 0, PYKVM_WLOG_MARK, name, NULL, 0);
    ret = -w->st.error;
    pthread_mutex_unlock(&w->lock);
    return ret;
}

void pykvm_wlog_stats(struct pykvm_wlog *w, struct pykvm_wlog_stats *out)
{
    pthread_mutex_lock(&w->lock);
    *out = w->st;
    out->entries = w->entries;
    out->log_bytes = w->pos;
    pthread_mutex_unlock(&w->lock);
}
