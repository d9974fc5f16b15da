/*
 * nbd.c - an NBD connection over libnbd's asynchronous C API (nbd.h).
 *
 * Threads. Submitters (a C engine's caller, the Python path's workers) issue
 * libnbd commands themselves; replies are read, and the completion callbacks
 * run, in whichever thread calls nbd_aio_notify_read: an I/O thread that
 * attached itself (it polls the socket in its own epoll set and reads while
 * it runs: no thread hop between the reply and the used ring), else the pump
 * thread. The pump also sends what libnbd could not (POLLOUT), notices a
 * dead connection and reconnects. Three locks besides libnbd's own:
 *   c->mu   the handle pointer, the connection state, the pending list and
 *           `users` (submitters inside a libnbd call on c->h); never held
 *           across a libnbd call, so that no lock order meets libnbd's own
 *   c->lk   a leaf: an op's part count and error, the orphan list (taken in
 *           libnbd's callbacks, which run under libnbd's handle lock)
 *   c->rd   the reader: one thread at a time looks at the socket and reads
 *           from it (nbd_read); held across nbd_aio_notify_read, so the
 *           callbacks run under it (they never take it, nor c->mu)
 * An op (one request) becomes one libnbd command per part of at most
 * block_max bytes. A part is accounted in its .free callback, which libnbd
 * calls exactly once, also when the command fails to start or the
 * connection dies: a part whose .callback never ran failed in transport.
 * An op with a transport failure is an orphan: the pump retries it on the
 * next connection, or fails it with EIO once reconnect-delay has passed.
 */
#include <inttypes.h>
#include <libnbd.h>
#include <time.h>

/* as in nbd.h (the cffi header) */
struct pykvm_nbd_info {
    uint64_t size;
    int32_t read_only;
    int32_t can_flush;
    int32_t can_fua;
    int32_t can_trim;
    int32_t can_zero;
    int32_t can_fast_zero;
    int32_t can_multi_conn;
    int32_t can_block_status;
    uint32_t block_min;
    uint32_t block_pref;
    uint32_t block_max;
    int32_t connected;
    uint64_t reconnects;
    uint64_t requests;
    uint64_t failed;
};

#define PYKVM_NBD_MAX_PAYLOAD 33554432
#define PYKVM_NBD_TRIM 0x100
#define PYKVM_NBD_FUA 0x200

#define NBD_ROUTES 64
#define NBD_DRIVERS 8           /* I/O threads polling one connection themselves */
#define NBD_RETRY_MS 1000       /* between reconnection attempts */

enum nbd_state { NBD_READY, NBD_DOWN, NBD_STOPPED };

typedef void (*nbd_done_fn)(void *ctx, uint64_t token, int64_t result);

struct nbd_op {
    struct pykvm_nbd *c;
    struct nbd_op *next;
    uint64_t token;
    int32_t op;
    int32_t mode;
    uint64_t offset;
    uint64_t length;            /* read/write: bytes of the vector; fallocate: its length */
    struct iovec *iov;          /* the caller's vector (kept alive by the caller) */
    uint32_t iovcnt;
    char *bounce;               /* one buffer for a vector of several pieces */
    nbd_done_fn done;
    void *ctx;
    uint32_t parts;             /* parts not yet freed by libnbd */
    int error;                  /* first server error of a part */
    int transport;              /* a part never completed: the connection went */
    int foreign;                /* its submitter does not read replies itself */
    uint64_t lost_ns;           /* when a connection first failed it (0: never) */
};

struct nbd_part {
    struct nbd_op *op;
    int called;
};

struct pykvm_nbd {
    char *uri;
    uint32_t delay_ms;
    uint32_t connect_ms;
    uint32_t timeout_ms;        /* request-timeout: in flight without a reply that long */
    uint64_t progress_ns;       /* a reply last came, or nothing was in flight (atomic) */
    pthread_mutex_t mu;
    pthread_cond_t idle;        /* users reached 0 */
    struct nbd_handle *h;
    enum nbd_state state;
    uint32_t users;
    uint64_t lost_ns;           /* when the connection went (NBD_DOWN) */
    int failing;                /* down past reconnect-delay: fail at once */
    struct nbd_op *pending, **pending_tail;
    pthread_mutex_t lk;
    struct nbd_op *orphans;
    pthread_mutex_t rd;         /* nbd_read: one reader of the socket at a time */
    int wake;                   /* eventfd: the pump re-reads the direction, the lists */
    pthread_t pump;
    /* I/O threads that poll the socket for replies themselves (nbd_attach):
     * while there is one, the pump leaves POLLIN to them; their engines'
     * notifiers are told when a new socket replaces the old one */
    uint32_t drivers;
    int driver_fd[NBD_DRIVERS];
    uint32_t gen;               /* counts connections: a socket's identity beyond its fd */
    uint32_t refs;              /* the owner and each engine that sent to it (under mu) */
    uint32_t foreign;           /* requests in flight whose submitter does not read
                                 * replies (atomic): the pump reads for them */
    struct pykvm_nbd_info info;
};

static struct {
    pthread_mutex_t mu;
    int fd[NBD_ROUTES];
    struct pykvm_nbd *c[NBD_ROUTES];
    int n;
} nbd_routes = {.mu = PTHREAD_MUTEX_INITIALIZER};

static uint64_t nbd_now_ns(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void nbd_wake(struct pykvm_nbd *c)
{
    eventfd_write(c->wake, 1);
}

/* The live handle, borrowed (users) so that nbd_lost waits before closing it;
 * NULL while the connection is down. nbd_unborrow gives it back. */
static struct nbd_handle *nbd_borrow(struct pykvm_nbd *c)
{
    struct nbd_handle *h = NULL;

    pthread_mutex_lock(&c->mu);
    if (c->state == NBD_READY) {
        h = c->h;
        c->users++;
    }
    pthread_mutex_unlock(&c->mu);
    return h;
}

static void nbd_unborrow(struct pykvm_nbd *c)
{
    pthread_mutex_lock(&c->mu);
    if (--c->users == 0)
        pthread_cond_broadcast(&c->idle);
    pthread_mutex_unlock(&c->mu);
}

/* -- finishing ops ------------------------------------------------------------------- */

static void nbd_op_free(struct nbd_op *op)
{
    free(op->bounce);
    free(op->iov);
    free(op);
}

/* A request whose submitter will not read the reply itself starts or ends
 * (the first one makes the pump poll for replies even with drivers attached:
 * an attached thread may be parked). */
static void nbd_foreign(struct pykvm_nbd *c, int delta)
{
    if (__atomic_add_fetch(&c->foreign, (uint32_t)delta, __ATOMIC_ACQ_REL) == 1 && delta > 0)
        nbd_wake(c);
}

static void nbd_op_complete(struct nbd_op *op, int64_t result)
{
    if (op->foreign)
        nbd_foreign(op->c, -1);
    if (result < 0)
        __atomic_add_fetch(&op->c->info.failed, 1, __ATOMIC_RELAXED);
    op->done(op->ctx, op->token, result);
    nbd_op_free(op);
}

static void nbd_op_finish(struct nbd_op *op)
{
    struct pykvm_nbd *c = op->c;

    if (op->transport) {
        pthread_mutex_lock(&c->lk);
        op->next = c->orphans;
        c->orphans = op;
        pthread_mutex_unlock(&c->lk);
        nbd_wake(c);
        return;
    }
    if (op->error) {
        nbd_op_complete(op, -op->error);
        return;
    }
    if (op->op == PYKVM_AIO_READ && op->bounce) {
        size_t pos = 0;

        for (uint32_t i = 0; i < op->iovcnt; i++) {
            memcpy(op->iov[i].iov_base, op->bounce + pos, op->iov[i].iov_len);
            pos += op->iov[i].iov_len;
        }
    }
    nbd_op_complete(op, op->op == PYKVM_AIO_READ || op->op == PYKVM_AIO_WRITE ?
                    (int64_t)op->length : 0);
}

static int nbd_part_done(void *user_data, int *error)
{
    struct nbd_part *p = user_data;

    /* libnbd retires the commands of a connection that died with ENOTCONN (a
     * server cannot send it): a transport failure, to retry on the next one */
    if (*error == ENOTCONN)
        return 1;
    p->called = 1;
    __atomic_store_n(&p->op->c->progress_ns, nbd_now_ns(), __ATOMIC_RELAXED);
    if (*error) {
        pthread_mutex_lock(&p->op->c->lk);
        if (!p->op->error)
            p->op->error = *error;
        pthread_mutex_unlock(&p->op->c->lk);
    }
    return 1;   /* retire the command */
}

static void nbd_part_free(void *user_data)
{
    struct nbd_part *p = user_data;
    struct nbd_op *op = p->op;
    int last;

    pthread_mutex_lock(&op->c->lk);
    if (!p->called)
        op->transport = 1;
    last = --op->parts == 0;
    pthread_mutex_unlock(&op->c->lk);
    free(p);
    if (last)
        nbd_op_finish(op);
}

/* -- issuing ------------------------------------------------------------------------- */

/* One libnbd command for [off, off+n) of the op; -1 when it did not start
 * (its part is then already freed and accounted). */
static int nbd_issue_part(struct nbd_handle *h, struct nbd_op *op, uint64_t off, uint64_t n,
                          char *buf)
{
    struct nbd_part *p = calloc(1, sizeof(*p));
    nbd_completion_callback cb = {.callback = nbd_part_done, .free = nbd_part_free};
    int64_t rc;

    if (!p) {
        pthread_mutex_lock(&op->c->lk);
        if (!op->error)
            op->error = ENOMEM;
        int last = --op->parts == 0;
        pthread_mutex_unlock(&op->c->lk);
        if (last)
            nbd_op_finish(op);
        return -1;
    }
    p->op = op;
    cb.user_data = p;
    __atomic_add_fetch(&op->c->info.requests, 1, __ATOMIC_RELAXED);
    switch (op->op) {
    case PYKVM_AIO_READ:
        rc = nbd_aio_pread(h, buf, n, off, cb, 0);
        break;
    case PYKVM_AIO_WRITE:
        rc = nbd_aio_pwrite(h, buf, n, off, cb,
                            (op->mode & PYKVM_NBD_FUA) ? LIBNBD_CMD_FLAG_FUA : 0);
        break;
    case PYKVM_AIO_FLUSH:
        rc = nbd_aio_flush(h, cb, 0);
        break;
    default:
        if (op->mode & PYKVM_NBD_TRIM)
            rc = nbd_aio_trim(h, n, off, cb, 0);
        else
            rc = nbd_aio_zero(h, n, off, cb,
                              (op->mode & FALLOC_FL_PUNCH_HOLE) ? 0 : LIBNBD_CMD_FLAG_NO_HOLE);
        break;
    }
    return rc < 0 ? -1 : 0;
}

/* Issue every part of op on h (a handle the caller may use). */
static void nbd_issue(struct pykvm_nbd *c, struct nbd_handle *h, struct nbd_op *op)
{
    uint64_t max = c->info.block_max, n = op->length, pos = 0;
    char *data = op->bounce ? op->bounce : op->iovcnt ? op->iov[0].iov_base : NULL;
    uint32_t parts;

    op->error = 0;
    op->transport = 0;
    if (op->op == PYKVM_AIO_FLUSH || n == 0)
        parts = 1;
    else
        parts = (uint32_t)((n + max - 1) / max);
    op->parts = parts;
    for (uint32_t i = 0; i < parts; i++) {
        uint64_t k = op->op == PYKVM_AIO_FLUSH ? 0 : (n - pos < max ? n - pos : max);

        if (nbd_issue_part(h, op, op->offset + pos, k, data ? data + pos : NULL) < 0) {
            /* the rest never starts: account it here */
            uint32_t rest = parts - i - 1;
            int last;

            if (!rest)
                return;
            pthread_mutex_lock(&c->lk);
            op->parts -= rest;
            last = op->parts == 0;
            pthread_mutex_unlock(&c->lk);
            if (last)
                nbd_op_finish(op);
            return;
        }
        pos += k;
    }
}

/* Send op now, keep it for the next connection, or fail it (past the delay). */
static void nbd_start(struct pykvm_nbd *c, struct nbd_op *op)
{
    struct nbd_handle *h = NULL;
    int kept = 0;

    pthread_mutex_lock(&c->mu);
    if (c->state == NBD_READY) {
        h = c->h;
        c->users++;
    } else if (c->state == NBD_DOWN && !c->failing) {
        op->next = NULL;
        *c->pending_tail = op;
        c->pending_tail = &op->next;
        kept = 1;
    }
    pthread_mutex_unlock(&c->mu);
    if (h) {
        int blocked;

        nbd_issue(c, h, op);
        /* libnbd sent what it could; only output left waiting for the socket
         * changes what the pump must poll for (POLLOUT) */
        blocked = (nbd_aio_get_direction(h) & LIBNBD_AIO_DIRECTION_WRITE) != 0;
        nbd_unborrow(c);
        if (blocked)
            nbd_wake(c);
    } else if (!kept) {
        nbd_op_complete(op, -EIO);
    }
}

/* 0 to send r (of len bytes), 1 when it is done already, or -errno. */
static int nbd_check(struct pykvm_nbd *c, const struct pykvm_aio_req *r, uint64_t len)
{
    if (r->op > PYKVM_AIO_FALLOCATE)
        return -EINVAL;
    if (r->op != PYKVM_AIO_FLUSH && (r->offset > c->info.size || len > c->info.size - r->offset))
        return -EINVAL;
    if (r->op != PYKVM_AIO_READ && r->op != PYKVM_AIO_FLUSH && c->info.read_only)
        return -EROFS;
    if (r->op == PYKVM_AIO_FLUSH && !c->info.can_flush)
        return 1;   /* nothing to make durable beyond what the server does */
    if (r->op == PYKVM_AIO_WRITE && (r->mode & PYKVM_NBD_FUA) && !c->info.can_fua)
        return -EOPNOTSUPP;  /* the caller asks nbd_route_fua first */
    if (r->op == PYKVM_AIO_FALLOCATE) {
        if ((r->mode & PYKVM_NBD_TRIM) ? !c->info.can_trim : !c->info.can_zero)
            return -EOPNOTSUPP;
    }
    if (c->info.block_min > 1 && r->op != PYKVM_AIO_FLUSH &&
        (r->offset % c->info.block_min || len % c->info.block_min))
        return -EINVAL;
    return 0;
}

/* Start one AIO request on c; done(ctx, token, result) once it has finished
 * (possibly before this returns). `driven`: the submitter's thread reads the
 * connection's replies itself (nbd_drive). */
static void nbd_submit(struct pykvm_nbd *c, const struct pykvm_aio_req *r, nbd_done_fn done,
                       void *ctx, int driven)
{
    int data = r->op == PYKVM_AIO_READ || r->op == PYKVM_AIO_WRITE;
    uint64_t len = data ? 0 : r->op == PYKVM_AIO_FLUSH ? 0 : r->length;
    struct nbd_op *op;
    int rc;

    for (uint32_t i = 0; data && i < r->iovcnt; i++)
        len += r->iov[i].iov_len;
    rc = nbd_check(c, r, len);
    if (rc) {
        done(ctx, r->token, rc > 0 ? 0 : rc);
        return;
    }
    op = calloc(1, sizeof(*op));
    if (!op) {
        done(ctx, r->token, -ENOMEM);
        return;
    }
    op->c = c;
    op->token = r->token;
    op->op = r->op;
    op->mode = r->mode;
    op->offset = r->offset;
    op->length = len;
    op->done = done;
    op->ctx = ctx;
    if (data) {
        op->iovcnt = r->iovcnt;
        op->iov = malloc(sizeof(*op->iov) * (r->iovcnt ? r->iovcnt : 1));
        if (!op->iov) {
            nbd_op_free(op);
            done(ctx, r->token, -ENOMEM);
            return;
        }
        memcpy(op->iov, r->iov, sizeof(*op->iov) * r->iovcnt);
        if (r->iovcnt > 1) {
            size_t pos = 0;

            op->bounce = malloc(op->length ? op->length : 1);
            if (!op->bounce) {
                nbd_op_free(op);
                done(ctx, r->token, -ENOMEM);
                return;
            }
            if (r->op == PYKVM_AIO_WRITE)
                for (uint32_t i = 0; i < r->iovcnt; i++) {
                    memcpy(op->bounce + pos, r->iov[i].iov_base, r->iov[i].iov_len);
                    pos += r->iov[i].iov_len;
                }
        }
    }
    op->foreign = !driven;
    if (op->foreign)
        nbd_foreign(c, 1);
    nbd_start(c, op);
}

/* -- connecting ---------------------------------------------------------------------- */

static struct nbd_handle *nbd_dial(const char *uri, uint32_t timeout_ms, char *err,
                                   size_t errlen)
{
    struct nbd_handle *h = nbd_create();
    uint64_t deadline = nbd_now_ns() + (uint64_t)timeout_ms * 1000000ull;

    if (!h) {
        snprintf(err, errlen, "%s", nbd_get_error());
        return NULL;
    }
    if (nbd_add_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) < 0 ||
        nbd_set_pread_initialize(h, false) < 0 || nbd_aio_connect_uri(h, uri) < 0)
        goto fail;
    while (nbd_aio_is_connecting(h) > 0) {
        uint64_t now = nbd_now_ns();

        if (now >= deadline) {
            snprintf(err, errlen, "no answer from the server within %u s", timeout_ms / 1000);
            nbd_close(h);
            return NULL;
        }
        if (nbd_poll(h, (int)((deadline - now) / 1000000 + 1 < 100 ?
                              (deadline - now) / 1000000 + 1 : 100)) < 0)
            goto fail;
    }
    if (nbd_aio_is_ready(h) > 0)
        return h;
fail:
    snprintf(err, errlen, "%s", nbd_get_error() ? nbd_get_error() : "handshake failed");
    nbd_close(h);
    return NULL;
}

static void nbd_read_info(struct pykvm_nbd *c, struct nbd_handle *h)
{
    int64_t v;

    c->info.size = (uint64_t)nbd_get_size(h);
    c->info.read_only = nbd_is_read_only(h) == 1;
    c->info.can_flush = nbd_can_flush(h) == 1;
    c->info.can_fua = nbd_can_fua(h) == 1;
    c->info.can_trim = nbd_can_trim(h) == 1;
    c->info.can_zero = nbd_can_zero(h) == 1;
    c->info.can_fast_zero = nbd_can_fast_zero(h) == 1;
    c->info.can_multi_conn = nbd_can_multi_conn(h) == 1;
    c->info.can_block_status = nbd_can_meta_context(h, LIBNBD_CONTEXT_BASE_ALLOCATION) == 1;
    v = nbd_get_block_size(h, LIBNBD_SIZE_MINIMUM);
    c->info.block_min = v > 0 && v <= 65536 ? (uint32_t)v : 1;
    v = nbd_get_block_size(h, LIBNBD_SIZE_PREFERRED);
    c->info.block_pref = v > 0 && v <= PYKVM_NBD_MAX_PAYLOAD ? (uint32_t)v : 4096;
    v = nbd_get_block_size(h, LIBNBD_SIZE_MAXIMUM);
    /* the protocol's default, and a bound against a server's huge value */
    c->info.block_max = v > 0 && v < PYKVM_NBD_MAX_PAYLOAD ? (uint32_t)v : PYKVM_NBD_MAX_PAYLOAD;
    if (c->info.block_max < c->info.block_min)
        c->info.block_max = c->info.block_min;
    c->info.block_max -= c->info.block_max % c->info.block_min;
}

/* -- reading replies ----------------------------------------------------------------- */

/* Read what the server has sent on h, if anything: libnbd is told the socket
 * is readable only when it is. Told with nothing to read, libnbd (1.14 and
 * later alike) leaves READY for REPLY.START, and its recv's EAGAIN keeps it
 * there; a command issued then is only queued (libnbd sends from READY), and
 * it stays queued until the next reply moves the state machine, which never
 * comes when nothing else is on the wire: the request hangs until
 * request-timeout drops the connection. The pump and an attached I/O thread
 * may both see the socket readable and race for one reply, so the look and
 * the read are one step under c->rd: what the holder sees stays readable
 * until it reads. One reply (or a piece of one) per call. */
static int nbd_read(struct pykvm_nbd *c, struct nbd_handle *h)
{
    struct pollfd pfd = {.fd = nbd_aio_get_fd(h), .events = POLLIN};
    int rc = 0;

    pthread_mutex_lock(&c->rd);
    if (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLIN | POLLHUP | POLLERR)))
        rc = nbd_aio_notify_read(h);
    pthread_mutex_unlock(&c->rd);
    return rc;
}

/* -- the pump ------------------------------------------------------------------------ */

/* The connection went: wait for the submitters inside libnbd, then close the
 * handle (libnbd frees every command in flight: they become orphans). */
static void nbd_lost(struct pykvm_nbd *c, const char *why)
{
    struct nbd_handle *old;

    pthread_mutex_lock(&c->mu);
    if (c->state != NBD_READY) {
        pthread_mutex_unlock(&c->mu);
        return;
    }
    c->state = NBD_DOWN;
    c->info.connected = 0;
    c->lost_ns = nbd_now_ns();
    c->failing = c->delay_ms == 0;
    old = c->h;
    c->h = NULL;
    while (c->users)
        pthread_cond_wait(&c->idle, &c->mu);
    pthread_mutex_unlock(&c->mu);
    if (c->delay_ms)
        fprintf(stderr, "pykvm: nbd: lost the connection to %s (%s); requests wait up to "
                "%u s for it to come back (reconnect-delay)\n", c->uri, why, c->delay_ms / 1000);
    else
        fprintf(stderr, "pykvm: nbd: lost the connection to %s (%s); requests fail until it "
                "comes back (reconnect-delay=0)\n", c->uri, why);
    nbd_close(old);
}

/* Orphans (ops whose connection went): keep them for the next connection, or
 * fail them (up: a command failed to start on a live connection; down past
 * the delay). */
static void nbd_adopt_orphans(struct pykvm_nbd *c)
{
    struct nbd_op *op, *next, *fail = NULL;

    pthread_mutex_lock(&c->lk);
    op = c->orphans;
    c->orphans = NULL;
    pthread_mutex_unlock(&c->lk);
    if (!op)
        return;
    uint64_t now = nbd_now_ns();

    pthread_mutex_lock(&c->mu);
    for (; op; op = next) {
        next = op->next;
        /* reconnect-delay counts from the first loss: a server that accepts
         * every new connection and hangs on each does not keep it forever */
        if (!op->lost_ns)
            op->lost_ns = now;
        if (c->state == NBD_DOWN && !c->failing &&
            now - op->lost_ns <= (uint64_t)c->delay_ms * 1000000ull) {
            op->next = NULL;
            *c->pending_tail = op;
            c->pending_tail = &op->next;
        } else {
            op->next = fail;
            fail = op;
        }
    }
    pthread_mutex_unlock(&c->mu);
    for (op = fail; op; op = next) {
        next = op->next;
        nbd_op_complete(op, -EIO);
    }
}

static struct nbd_op *nbd_take_pending(struct pykvm_nbd *c)
{
    struct nbd_op *op = c->pending;

    c->pending = NULL;
    c->pending_tail = &c->pending;
    return op;
}

static void nbd_fail_list(struct nbd_op *op)
{
    struct nbd_op *next;

    for (; op; op = next) {
        next = op->next;
        nbd_op_complete(op, -EIO);
    }
}

/* Requests in flight and no reply for request-timeout: a server that hangs
 * (mid-reply, or before it) is dropped as a dead one. Seen by the pump at
 * least once a second, so an idle moment is at most that stale. */
static int nbd_stalled(struct pykvm_nbd *c, struct nbd_handle *h)
{
    uint64_t now = nbd_now_ns();

    if (nbd_aio_in_flight(h) <= 0) {
        __atomic_store_n(&c->progress_ns, now, __ATOMIC_RELAXED);
        return 0;
    }
    uint64_t last = __atomic_load_n(&c->progress_ns, __ATOMIC_RELAXED);

    /* a reply may have come since `now` was read */
    return now > last && now - last > (uint64_t)c->timeout_ms * 1000000ull;
}

static void *nbd_pump(void *arg)
{
    struct pykvm_nbd *c = arg;
    uint64_t next_try = 0;
    sigset_t all;

    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, NULL);
    for (;;) {
        enum nbd_state state;
        struct nbd_handle *h;
        eventfd_t v;

        uint32_t drivers;

        pthread_mutex_lock(&c->mu);
        state = c->state;
        h = c->h;
        drivers = c->drivers;
        pthread_mutex_unlock(&c->mu);
        if (state == NBD_STOPPED)
            break;
        if (state == NBD_READY) {
            /* h stays valid: only this thread replaces or closes it */
            unsigned dir = nbd_aio_get_direction(h);
            struct pollfd pfd[2] = {
                {.fd = nbd_aio_get_fd(h),
                 .events = (short)(((dir & LIBNBD_AIO_DIRECTION_READ) &&
                                    (!drivers || __atomic_load_n(&c->foreign, __ATOMIC_ACQUIRE))
                                    ? POLLIN : 0) |
                                   ((dir & LIBNBD_AIO_DIRECTION_WRITE) ? POLLOUT : 0))},
                {.fd = c->wake, .events = POLLIN},
            };
            int rc = 0;

            if (poll(pfd, 2, 1000) < 0 && errno != EINTR)
                continue;
            if (pfd[1].revents)
                (void)eventfd_read(c->wake, &v);
            if (pfd[0].revents & (POLLIN | POLLHUP | POLLERR))
                rc = nbd_read(c, h);    /* an attached thread may have read it since */
            else if (pfd[0].revents & POLLOUT)
                rc = nbd_aio_notify_write(h);
            if (rc < 0 || nbd_aio_is_dead(h) > 0 || nbd_aio_is_closed(h) > 0)
                nbd_lost(c, nbd_get_error() ? nbd_get_error() : "server closed the connection");
            else if (c->timeout_ms && nbd_stalled(c, h)) {
                char why[80];

                snprintf(why, sizeof(why), "no reply within request-timeout=%u",
                         c->timeout_ms / 1000);
                nbd_lost(c, why);
            }
            nbd_adopt_orphans(c);
            continue;
        }
        /* down: reconnect, and fail what waited longer than the delay */
        uint64_t now = nbd_now_ns();
        struct nbd_op *expired = NULL;

        nbd_adopt_orphans(c);
        pthread_mutex_lock(&c->mu);
        if (!c->failing && now >= c->lost_ns + (uint64_t)c->delay_ms * 1000000ull) {
            c->failing = 1;
            expired = nbd_take_pending(c);
        }
        pthread_mutex_unlock(&c->mu);
        if (expired) {
            fprintf(stderr, "pykvm: nbd: %s did not come back within reconnect-delay=%u: "
                    "requests fail with EIO until it does\n", c->uri, c->delay_ms / 1000);
            nbd_fail_list(expired);
        }
        if (now >= next_try) {
            char err[256];
            struct nbd_handle *nh = nbd_dial(c->uri, c->connect_ms, err, sizeof(err));

            next_try = nbd_now_ns() + NBD_RETRY_MS * 1000000ull;
            if (nh && (uint64_t)nbd_get_size(nh) != c->info.size) {
                fprintf(stderr, "pykvm: nbd: %s came back with another size (%" PRId64
                        " bytes, was %" PRIu64 "): not reconnecting\n", c->uri,
                        nbd_get_size(nh), c->info.size);
                nbd_close(nh);
                nh = NULL;
            }
            if (nh) {
                struct nbd_op *op, *next;

                pthread_mutex_lock(&c->mu);
                if (c->state == NBD_STOPPED) {
                    pthread_mutex_unlock(&c->mu);
                    nbd_close(nh);
                    break;
                }
                int tell[NBD_DRIVERS];
                uint32_t ntell;

                c->h = nh;
                c->gen++;
                __atomic_store_n(&c->progress_ns, nbd_now_ns(), __ATOMIC_RELAXED);
                c->state = NBD_READY;
                c->info.connected = 1;
                c->info.reconnects++;
                c->failing = 0;
                op = nbd_take_pending(c);
                c->users++;
                ntell = c->drivers;
                memcpy(tell, c->driver_fd, sizeof(tell));
                pthread_mutex_unlock(&c->mu);
                fprintf(stderr, "pykvm: nbd: reconnected to %s\n", c->uri);
                for (; op; op = next) {
                    next = op->next;
                    nbd_issue(c, nh, op);
                }
                nbd_unborrow(c);
                /* attached I/O threads watch the old socket: wake them to
                 * take the new one (nbd_watch) */
                for (uint32_t i = 0; i < ntell; i++)
                    eventfd_write(tell[i], 1);
                continue;
            }
        }
        struct pollfd wfd = {.fd = c->wake, .events = POLLIN};

        if (poll(&wfd, 1, 100) > 0)
            (void)eventfd_read(c->wake, &v);
    }
    return NULL;
}

/* -- I/O threads driving the connection ---------------------------------------------- */

/* An engine whose thread polls `notifier` makes the connection's replies its
 * own to read: 0, or -ENOSPC when NBD_DRIVERS already do. */
static int nbd_attach(struct pykvm_nbd *c, int notifier)
{
    int rc = -ENOSPC;

    pthread_mutex_lock(&c->mu);
    if (c->drivers < NBD_DRIVERS) {
        c->driver_fd[c->drivers++] = notifier;
        rc = 0;
    }
    pthread_mutex_unlock(&c->mu);
    nbd_wake(c);    /* the pump stops polling for replies */
    return rc;
}

static void nbd_free(struct pykvm_nbd *c)
{
    close(c->wake);
    free(c->uri);
    free(c);
}

/* An engine that sends to c holds a reference until it closes. */
static void nbd_get(struct pykvm_nbd *c)
{
    pthread_mutex_lock(&c->mu);
    c->refs++;
    pthread_mutex_unlock(&c->mu);
}

/* Drop a reference (an engine's, or the owner's at close). */
static void nbd_put(struct pykvm_nbd *c)
{
    int last;

    pthread_mutex_lock(&c->mu);
    last = --c->refs == 0;
    pthread_mutex_unlock(&c->mu);
    if (last)
        nbd_free(c);
}

static void nbd_detach(struct pykvm_nbd *c, int notifier)
{
    pthread_mutex_lock(&c->mu);
    for (uint32_t i = 0; i < c->drivers; i++)
        if (c->driver_fd[i] == notifier) {
            c->driver_fd[i] = c->driver_fd[--c->drivers];
            break;
        }
    pthread_mutex_unlock(&c->mu);
    nbd_wake(c);    /* the pump may have to read replies again */
}

/* The socket an attached thread polls for readability and its generation
 * (a new connection may reuse the fd number); -1 while there is none. */
static int nbd_watch(struct pykvm_nbd *c, uint32_t *gen)
{
    int fd = -1;

    pthread_mutex_lock(&c->mu);
    if (c->state == NBD_READY)
        fd = nbd_aio_get_fd(c->h);
    *gen = c->gen;
    pthread_mutex_unlock(&c->mu);
    return fd;
}

/* Read what the server has sent, in this thread: the completion callbacks run
 * here. Never blocks (called on every round, readable or not: nbd_read looks
 * first); a dead connection is left to the pump, which is woken. */
static void nbd_drive(struct pykvm_nbd *c)
{
    struct nbd_handle *h = NULL;
    int rc = 0, dead;

    h = nbd_borrow(c);
    if (!h)
        return;
    if (nbd_aio_get_direction(h) & LIBNBD_AIO_DIRECTION_READ)
        rc = nbd_read(c, h);
    dead = rc < 0 || nbd_aio_is_dead(h) > 0 || nbd_aio_is_closed(h) > 0;
    nbd_unborrow(c);
    if (dead)
        nbd_wake(c);
}

/* -- the interface ------------------------------------------------------------------- */

static struct pykvm_nbd *pykvm_nbd_open(const char *uri, uint32_t reconnect_delay_ms,
                                        uint32_t connect_timeout_ms, uint32_t request_timeout_ms,
                                        char *err, size_t errlen)
{
    struct pykvm_nbd *c = calloc(1, sizeof(*c));

    if (!c) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    c->uri = strdup(uri);
    c->delay_ms = reconnect_delay_ms;
    c->connect_ms = connect_timeout_ms ? connect_timeout_ms : 10000;
    c->timeout_ms = request_timeout_ms;
    c->wake = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    c->pending_tail = &c->pending;
    c->refs = 1;
    if (!c->uri || c->wake < 0) {
        snprintf(err, errlen, "%s", strerror(c->uri ? errno : ENOMEM));
        goto fail;
    }
    c->h = nbd_dial(uri, c->connect_ms, err, errlen);
    if (!c->h)
        goto fail;
    nbd_read_info(c, c->h);
    c->info.connected = 1;
    c->progress_ns = nbd_now_ns();
    pthread_mutex_init(&c->mu, NULL);
    pthread_mutex_init(&c->lk, NULL);
    pthread_mutex_init(&c->rd, NULL);
    pthread_cond_init(&c->idle, NULL);
    c->state = NBD_READY;
    if (pthread_create(&c->pump, NULL, nbd_pump, c) != 0) {
        snprintf(err, errlen, "cannot start the connection's thread");
        nbd_close(c->h);
        goto fail;
    }
    return c;
fail:
    if (c->wake >= 0)
        close(c->wake);
    free(c->uri);
    free(c);
    return NULL;
}

static void pykvm_nbd_get_info(struct pykvm_nbd *c, struct pykvm_nbd_info *info)
{
    pthread_mutex_lock(&c->mu);
    *info = c->info;
    pthread_mutex_unlock(&c->mu);
}

struct nbd_waiter {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int done;
    int64_t result;
};

static void nbd_waiter_done(void *ctx, uint64_t token, int64_t result)
{
    struct nbd_waiter *w = ctx;

    pthread_mutex_lock(&w->mu);
    w->result = result;
    w->done = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int64_t pykvm_nbd_sync(struct pykvm_nbd *c, int32_t op, uint64_t offset,
                              const struct iovec *iov, uint32_t iovcnt, int32_t mode,
                              uint64_t length)
{
    struct nbd_waiter w = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};
    struct pykvm_aio_req r = {.op = op, .offset = offset, .iov = iov, .iovcnt = iovcnt,
                              .mode = mode, .length = length};

    nbd_submit(c, &r, nbd_waiter_done, &w, 0);
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    return w.result;
}

struct nbd_extents {
    uint64_t *out;
    uint32_t max, n;
    uint64_t pos, end;
    int error;
};

static int nbd_extent_cb(void *user_data, const char *context, uint64_t offset,
                         uint32_t *entries, size_t nr_entries, int *error)
{
    struct nbd_extents *e = user_data;

    if (strcmp(context, LIBNBD_CONTEXT_BASE_ALLOCATION) != 0)
        return 0;
    if (offset != e->pos) {
        e->error = EPROTO;
        return 0;
    }
    for (size_t i = 0; i + 1 < nr_entries && e->n < e->max && e->pos < e->end; i += 2) {
        uint64_t len = entries[i];

        if (len == 0) {
            e->error = EPROTO;
            break;
        }
        if (len > e->end - e->pos)
            len = e->end - e->pos;    /* an extent past the range: clipped */
        e->out[2 * e->n] = len;
        e->out[2 * e->n + 1] = entries[i + 1];
        e->n++;
        e->pos += len;
    }
    return 0;
}

static int nbd_bs_done(void *user_data, int *error)
{
    struct nbd_waiter *w = user_data;

    pthread_mutex_lock(&w->mu);
    w->result = *error ? -*error : 0;
    pthread_mutex_unlock(&w->mu);
    return 1;
}

static void nbd_bs_free(void *user_data)
{
    struct nbd_waiter *w = user_data;

    pthread_mutex_lock(&w->mu);
    if (!w->done && w->result == 1)
        w->result = -EIO;     /* never completed: the connection went */
    w->done = 1;
    pthread_cond_signal(&w->cv);
    pthread_mutex_unlock(&w->mu);
}

static int pykvm_nbd_block_status(struct pykvm_nbd *c, uint64_t offset, uint64_t length,
                                  uint64_t *out, uint32_t max)
{
    struct nbd_waiter w = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER,
                           .result = 1};
    struct nbd_extents e = {.out = out, .max = max, .pos = offset, .end = offset + length};
    struct nbd_handle *h = NULL;
    int64_t rc;

    if (!c->info.can_block_status)
        return -EOPNOTSUPP;
    if (offset > c->info.size || length > c->info.size - offset || length > UINT32_MAX)
        return -EINVAL;
    h = nbd_borrow(c);
    if (!h)
        return -EIO;
    nbd_foreign(c, 1);
    rc = nbd_aio_block_status(h, length, offset,
                              (nbd_extent_callback){.callback = nbd_extent_cb, .user_data = &e},
                              (nbd_completion_callback){.callback = nbd_bs_done,
                                                        .user_data = &w, .free = nbd_bs_free},
                              0);
    nbd_unborrow(c);
    nbd_wake(c);
    pthread_mutex_lock(&w.mu);
    while (!w.done)
        pthread_cond_wait(&w.cv, &w.mu);
    pthread_mutex_unlock(&w.mu);
    nbd_foreign(c, -1);
    if (rc < 0 && w.result >= 0)
        return -EIO;
    if (w.result < 0)
        return (int)w.result;
    if (e.error)
        return -e.error;
    return (int)e.n;
}

static int nbd_routes_any(void)
{
    return __atomic_load_n(&nbd_routes.n, __ATOMIC_ACQUIRE) != 0;
}

static struct pykvm_nbd *nbd_route_find(int fd)
{
    struct pykvm_nbd *c = NULL;

    if (!__atomic_load_n(&nbd_routes.n, __ATOMIC_ACQUIRE))
        return NULL;
    pthread_mutex_lock(&nbd_routes.mu);
    for (int i = 0; i < nbd_routes.n; i++)
        if (nbd_routes.fd[i] == fd)
            c = nbd_routes.c[i];
    pthread_mutex_unlock(&nbd_routes.mu);
    return c;
}

/* Does fd route to a connection whose server takes FUA writes? */
static int nbd_route_fua(int fd)
{
    struct pykvm_nbd *c = nbd_route_find(fd);

    return c && c->info.can_fua;
}

static int pykvm_nbd_route(int key_fd, struct pykvm_nbd *c)
{
    int rc = -ENOSPC;

    pthread_mutex_lock(&nbd_routes.mu);
    if (nbd_routes.n < NBD_ROUTES) {
        nbd_routes.fd[nbd_routes.n] = key_fd;
        nbd_routes.c[nbd_routes.n] = c;
        __atomic_store_n(&nbd_routes.n, nbd_routes.n + 1, __ATOMIC_RELEASE);
        rc = 0;
    }
    pthread_mutex_unlock(&nbd_routes.mu);
    return rc;
}

static void pykvm_nbd_unroute(int key_fd)
{
    pthread_mutex_lock(&nbd_routes.mu);
    for (int i = 0; i < nbd_routes.n; i++)
        if (nbd_routes.fd[i] == key_fd) {
            nbd_routes.fd[i] = nbd_routes.fd[nbd_routes.n - 1];
            nbd_routes.c[i] = nbd_routes.c[nbd_routes.n - 1];
            __atomic_store_n(&nbd_routes.n, nbd_routes.n - 1, __ATOMIC_RELEASE);
            break;
        }
    pthread_mutex_unlock(&nbd_routes.mu);
}

static void pykvm_nbd_close(struct pykvm_nbd *c)
{
    struct nbd_handle *h;
    struct nbd_op *pending;

    if (!c)
        return;
    pthread_mutex_lock(&c->mu);
    c->state = NBD_STOPPED;
    h = c->h;
    c->h = NULL;
    while (c->users)
        pthread_cond_wait(&c->idle, &c->mu);
    pending = nbd_take_pending(c);
    pthread_mutex_unlock(&c->mu);
    nbd_wake(c);
    pthread_join(c->pump, NULL);
    if (h)
        nbd_close(h);        /* what was in flight becomes orphans */
    nbd_fail_list(pending);
    nbd_adopt_orphans(c);    /* stopped: they fail */
    nbd_put(c);              /* freed here, or by the last engine that sent to it */
}
