/*
 * aio.c - the engine interface of aio.h and what every engine shares: the
 * notifier eventfd, the in-flight count, requests finished on the spot.
 * The engines themselves: aio_threads.c, aio_linux.c, aio_uring.c.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/eventfd.h>
#include <sys/uio.h>

enum pykvm_aio_op {
    PYKVM_AIO_READ = 0,
    PYKVM_AIO_WRITE = 1,
    PYKVM_AIO_FLUSH = 2,
    PYKVM_AIO_FALLOCATE = 3
};

struct pykvm_aio_req {
    uint64_t token;
    int32_t op;
    int32_t fd;
    uint64_t offset;
    const struct iovec *iov;
    uint32_t iovcnt;
    int32_t mode;
    uint64_t length;
};

struct pykvm_aio_done {
    uint64_t token;
    int64_t result;
};

struct pykvm_aio;

#define AIO_CONNS 8

struct aio_ops {
    const char *name;
    int (*init)(struct pykvm_aio *aio, char *err, size_t errlen);
    int (*submit)(struct pykvm_aio *aio, const struct pykvm_aio_req *reqs, uint32_t n);
    int (*reap)(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max);
    uint32_t (*ready)(struct pykvm_aio *aio);
    void (*fini)(struct pykvm_aio *aio);
};

struct pykvm_aio {
    const struct aio_ops *ops;
    int notifier;
    uint32_t depth;
    uint32_t in_flight;         /* submitted, not yet reaped (submitter's thread only) */
    /* requests finished at submission (an op the engine lacks, done in place) */
    struct pykvm_aio_done *now;
    uint32_t nnow;
    void *priv;
    /* requests on a routed fd (an NBD connection, nbd.c), completed by its
     * threads: [depth] entries, under rmu */
    pthread_mutex_t rmu;
    struct pykvm_aio_done *rdone;
    uint32_t nrdone;
    /* the connections it has sent requests to; once its thread watches their
     * sockets (pykvm_aio_watch), it reads their replies itself */
    struct pykvm_nbd *conn[AIO_CONNS];     /* each holds a reference (nbd_get) */
    uint8_t attached[AIO_CONNS];            /* its replies are this thread's to read */
    uint32_t nconn;
    int watching;
};

/* nbd.c: the connection a key fd routes to (NULL: a plain file), and its
 * asynchronous submission */
struct pykvm_nbd;
static int nbd_routes_any(void);
static struct pykvm_nbd *nbd_route_find(int fd);
static void nbd_submit(struct pykvm_nbd *c, const struct pykvm_aio_req *r,
                       void (*done)(void *ctx, uint64_t token, int64_t result), void *ctx,
                       int driven);
static void nbd_get(struct pykvm_nbd *c);
static void nbd_put(struct pykvm_nbd *c);
static int nbd_attach(struct pykvm_nbd *c, int notifier);
static void nbd_detach(struct pykvm_nbd *c, int notifier);
static int nbd_watch(struct pykvm_nbd *c, uint32_t *gen);
static int nbd_route_fua(int fd);
static void nbd_drive(struct pykvm_nbd *c);

/* the engine whose thread is reading its connections' replies right now
 * (aio_drive): its completions need no wake-up */
static __thread struct pykvm_aio *aio_driving;

/* Do one request synchronously, as pykvm.aio.execute does: short reads and
 * writes are continued until done (a read stops at the end of the file).
 * Returns bytes done or -errno. */
static int64_t aio_execute(const struct pykvm_aio_req *r)
{
    if (r->op == PYKVM_AIO_READ || r->op == PYKVM_AIO_WRITE) {
        struct iovec local[64];
        struct iovec *iov = r->iovcnt <= 64 ? local : malloc(sizeof(*iov) * r->iovcnt);
        int cnt = (int)r->iovcnt;
        struct iovec *cur = iov;
        int64_t total = 0;
        off_t offset = (off_t)r->offset;

        if (!iov)
            return -ENOMEM;
        memcpy(iov, r->iov, sizeof(*iov) * r->iovcnt);
        while (cnt > 0) {
            ssize_t n = r->op == PYKVM_AIO_READ
                ? preadv(r->fd, cur, cnt > IOV_MAX ? IOV_MAX : cnt, offset)
                : pwritev(r->fd, cur, cnt > IOV_MAX ? IOV_MAX : cnt, offset);
            if (n < 0) {
                if (errno == EINTR)
                    continue;
                total = -errno;
                break;
            }
            if (n == 0) {
                if (r->op == PYKVM_AIO_WRITE)
                    total = -EIO;
                break;  /* a read at the end of the file */
            }
            total += n;
            offset += n;
            while (cnt > 0 && (size_t)n >= cur->iov_len) {
                n -= cur->iov_len;
                cur++;
                cnt--;
            }
            if (cnt > 0 && n) {
                cur->iov_base = (char *)cur->iov_base + n;
                cur->iov_len -= n;
            }
        }
        if (iov != local)
            free(iov);
        return total;
    }
    if (r->op == PYKVM_AIO_FLUSH)
        return fdatasync(r->fd) < 0 ? -errno : 0;
    if (r->op == PYKVM_AIO_FALLOCATE)
        return fallocate(r->fd, r->mode, (off_t)r->offset, (off_t)r->length) < 0 ? -errno : 0;
    return -EINVAL;
}

/* A request finished during submission: reaped with the next batch. */
static void aio_complete_now(struct pykvm_aio *aio, uint64_t token, int64_t result)
{
    aio->now[aio->nnow].token = token;
    aio->now[aio->nnow].result = result;
    aio->nnow++;
    aio->in_flight++;
    eventfd_write(aio->notifier, 1);
}

static int aio_reap_now(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max)
{
    uint32_t n = aio->nnow < max ? aio->nnow : max;

    memcpy(out, aio->now, sizeof(*out) * n);
    memmove(aio->now, aio->now + n, sizeof(*out) * (aio->nnow - n));
    aio->nnow -= n;
    aio->in_flight -= n;
    if (aio->nnow)
        eventfd_write(aio->notifier, 1);  /* more to reap: stay readable */
    return (int)n;
}

static void aio_clear_notifier(struct pykvm_aio *aio)
{
    eventfd_t v;

    (void)eventfd_read(aio->notifier, &v);  /* non-blocking: EAGAIN when clear */
}

#include "aio_threads.c"
#include "aio_linux.c"
#include "aio_uring.c"

static const struct aio_ops *const aio_engines[] = {
    &aio_threads_ops,
    &aio_linux_ops,
    &aio_uring_ops,
};

static struct pykvm_aio *pykvm_aio_open(const char *engine, uint32_t depth, char *err,
                                        size_t errlen)
{
    const struct aio_ops *ops = NULL;
    struct pykvm_aio *aio;

    for (size_t i = 0; i < sizeof(aio_engines) / sizeof(aio_engines[0]); i++)
        if (!strcmp(aio_engines[i]->name, engine))
            ops = aio_engines[i];
    if (!ops) {
        snprintf(err, errlen, "unknown AIO engine '%s' (threads, native or io_uring)", engine);
        return NULL;
    }
    if (!depth || depth > 65536) {
        snprintf(err, errlen, "AIO depth %u is not in [1, 65536]", depth);
        return NULL;
    }
    aio = calloc(1, sizeof(*aio));
    if (!aio) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    aio->ops = ops;
    aio->depth = depth;
    aio->now = calloc(depth, sizeof(*aio->now));
    aio->rdone = calloc(depth, sizeof(*aio->rdone));
    pthread_mutex_init(&aio->rmu, NULL);
    aio->notifier = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (!aio->now || !aio->rdone || aio->notifier < 0) {
        snprintf(err, errlen, "aio=%s: %s", engine, strerror(aio->now ? errno : ENOMEM));
        goto fail;
    }
    if (ops->init(aio, err, errlen) < 0)
        goto fail;
    return aio;
fail:
    if (aio->notifier >= 0)
        close(aio->notifier);
    free(aio->now);
    free(aio->rdone);
    free(aio);
    return NULL;
}

static const char *pykvm_aio_name(const struct pykvm_aio *aio)
{
    return aio->ops->name;
}

static int pykvm_aio_notifier(const struct pykvm_aio *aio)
{
    return aio->notifier;
}

/* A routed request finished (on an NBD connection's thread, or at once). */
static void aio_routed_done(void *ctx, uint64_t token, int64_t result)
{
    struct pykvm_aio *aio = ctx;

    int first;

    pthread_mutex_lock(&aio->rmu);
    aio->rdone[aio->nrdone].token = token;
    aio->rdone[aio->nrdone].result = result;
    first = aio->nrdone++ == 0;
    pthread_mutex_unlock(&aio->rmu);
    /* one wake-up per batch: the reaper takes the whole list (or stays
     * readable); none when the reaper's own thread read the reply */
    if (first && aio_driving != aio)
        eventfd_write(aio->notifier, 1);
}

/* Remember a connection this engine sends to; whether this thread reads its
 * replies (past AIO_CONNS, or NBD_DRIVERS engines on c, the pump does). */
static int aio_note_conn(struct pykvm_aio *aio, struct pykvm_nbd *c)
{
    uint32_t i;

    for (i = 0; i < aio->nconn; i++)
        if (aio->conn[i] == c)
            return aio->attached[i];
    if (aio->nconn == AIO_CONNS)
        return 0;
    nbd_get(c);
    aio->conn[i] = c;
    aio->attached[i] = aio->watching && nbd_attach(c, aio->notifier) == 0;
    aio->nconn++;
    return aio->attached[i];
}

/* Read the replies waiting on the connections this engine's thread watches. */
static void aio_drive(struct pykvm_aio *aio)
{
    if (!aio->watching)
        return;
    aio_driving = aio;
    for (uint32_t i = 0; i < aio->nconn; i++)
        if (aio->attached[i])
            nbd_drive(aio->conn[i]);
    aio_driving = NULL;
}

static int pykvm_aio_watch(struct pykvm_aio *aio, int *fds, uint32_t *gens, uint32_t max)
{
    uint32_t n = 0;

    if (!aio->watching) {
        aio->watching = 1;
        for (uint32_t i = 0; i < aio->nconn; i++)
            aio->attached[i] = nbd_attach(aio->conn[i], aio->notifier) == 0;
    }
    for (uint32_t i = 0; i < aio->nconn && n < max; i++)
        if (aio->attached[i]) {
            fds[n] = nbd_watch(aio->conn[i], &gens[n]);
            n++;
        }
    return (int)n;
}

static int pykvm_aio_submit(struct pykvm_aio *aio, const struct pykvm_aio_req *reqs, uint32_t n)
{
    uint32_t room = aio->depth - aio->in_flight, done = 0;

    if (n > room)
        n = room;
    if (!n)
        return 0;
    if (!nbd_routes_any())
        return aio->ops->submit(aio, reqs, n);
    /* runs of plain requests go to the engine, routed ones to their connection */
    while (done < n) {
        struct pykvm_nbd *c = nbd_route_find(reqs[done].fd);
        uint32_t run = 1;   /* reqs[done] is plain */

        if (c) {
            int driven = aio_note_conn(aio, c);

            aio->in_flight++;
            nbd_submit(c, &reqs[done], aio_routed_done, aio, driven);
            done++;
            continue;
        }
        while (done + run < n && !nbd_route_find(reqs[done + run].fd))
            run++;
        int m = aio->ops->submit(aio, reqs + done, run);

        if (m < 0)
            return done ? (int)done : m;
        done += (uint32_t)m;
        if ((uint32_t)m < run)
            break;
    }
    return (int)done;
}

static int aio_reap_routed(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max)
{
    uint32_t n;

    if (!__atomic_load_n(&aio->nrdone, __ATOMIC_ACQUIRE))
        return 0;
    pthread_mutex_lock(&aio->rmu);
    n = aio->nrdone < max ? aio->nrdone : max;
    memcpy(out, aio->rdone, sizeof(*out) * n);
    memmove(aio->rdone, aio->rdone + n, sizeof(*out) * (aio->nrdone - n));
    aio->nrdone -= n;
    if (aio->nrdone)
        eventfd_write(aio->notifier, 1);  /* more to reap: stay readable */
    pthread_mutex_unlock(&aio->rmu);
    aio->in_flight -= n;
    return (int)n;
}

static int pykvm_aio_reap(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max)
{
    int n;

    aio_clear_notifier(aio);
    n = aio_reap_now(aio, out, max);
    if ((uint32_t)n < max) {
        int m = aio->ops->reap(aio, out + n, max - n);

        if (m < 0)
            return n ? n : m;
        n += m;
    }
    if ((uint32_t)n < max) {
        aio_drive(aio);
        n += aio_reap_routed(aio, out + n, max - n);
    }
    return n;
}

static uint32_t pykvm_aio_ready(struct pykvm_aio *aio)
{
    aio_drive(aio);
    return aio->nnow + aio->ops->ready(aio) + __atomic_load_n(&aio->nrdone, __ATOMIC_ACQUIRE);
}

static int pykvm_aio_can_fua(int fd)
{
    return nbd_routes_any() && nbd_route_fua(fd);
}

static uint32_t pykvm_aio_in_flight(const struct pykvm_aio *aio)
{
    return aio->in_flight;
}

static void pykvm_aio_close(struct pykvm_aio *aio)
{
    struct pykvm_aio_done done[64];

    if (!aio)
        return;
    /* the connections' pumps read what is still to come */
    for (uint32_t i = 0; i < aio->nconn; i++)
        if (aio->attached[i]) {
            nbd_detach(aio->conn[i], aio->notifier);
            aio->attached[i] = 0;
        }
    aio->watching = 0;
    while (aio->in_flight) {
        struct pollfd pfd = {.fd = aio->notifier, .events = POLLIN};

        if (pykvm_aio_reap(aio, done, 64) == 0)
            poll(&pfd, 1, 100);
    }
    for (uint32_t i = 0; i < aio->nconn; i++)
        nbd_put(aio->conn[i]);
    aio->ops->fini(aio);
    close(aio->notifier);
    free(aio->now);
    free(aio->rdone);
    pthread_mutex_destroy(&aio->rmu);
    free(aio);
}
