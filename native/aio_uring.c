/*
 * aio_uring.c - aio=io_uring, with liburing (Debian's liburing-dev).
 *
 * One ring per engine, `depth` submission entries; the notifier eventfd is
 * registered with the ring, so every posted completion makes it readable.
 * A batch is one io_uring_submit (one system call); completions are read
 * straight from the shared completion ring. The ops used are probed at open:
 * READV, WRITEV and FSYNC are required, FALLOCATE runs in place when the
 * kernel lacks it. user_data carries the caller's token.
 * Built only when liburing's header is present (PYKVM_HAVE_LIBURING, set by
 * native/build.py); otherwise opening it says so.
 * (Included by aio.c.)
 */
#ifdef PYKVM_HAVE_LIBURING
#include <liburing.h>

struct uring_engine {
    struct io_uring ring;
    int have_fallocate;
};

static int uring_init(struct pykvm_aio *aio, char *err, size_t errlen)
{
    struct uring_engine *u = calloc(1, sizeof(*u));
    struct io_uring_probe *probe;
    static const struct { int op; const char *name; } needed[] = {
        {IORING_OP_READV, "READV"}, {IORING_OP_WRITEV, "WRITEV"}, {IORING_OP_FSYNC, "FSYNC"},
    };
    int rc;

    if (!u) {
        snprintf(err, errlen, "aio=io_uring: out of memory");
        return -1;
    }
    rc = io_uring_queue_init(aio->depth, &u->ring, 0);
    if (rc < 0) {
        snprintf(err, errlen, "aio=io_uring: io_uring_setup: %s%s", strerror(-rc),
                 rc == -EPERM ? " (kernel.io_uring_disabled?)" :
                 rc == -ENOSYS ? " (kernel without io_uring)" : "");
        free(u);
        return -1;
    }
    probe = io_uring_get_probe_ring(&u->ring);
    if (!probe) {
        snprintf(err, errlen, "aio=io_uring: cannot probe the supported operations");
        goto fail;
    }
    for (size_t i = 0; i < sizeof(needed) / sizeof(needed[0]); i++) {
        if (!io_uring_opcode_supported(probe, needed[i].op)) {
            snprintf(err, errlen, "aio=io_uring: the kernel lacks IORING_OP_%s", needed[i].name);
            io_uring_free_probe(probe);
            goto fail;
        }
    }
    u->have_fallocate = io_uring_opcode_supported(probe, IORING_OP_FALLOCATE);
    io_uring_free_probe(probe);
    rc = io_uring_register_eventfd(&u->ring, aio->notifier);
    if (rc < 0) {
        snprintf(err, errlen, "aio=io_uring: registering the eventfd: %s", strerror(-rc));
        goto fail;
    }
    aio->priv = u;
    return 0;
fail:
    io_uring_queue_exit(&u->ring);
    free(u);
    return -1;
}

/* Hand the queued entries to the kernel (one system call). Entries it does
 * not take now (EBUSY, EAGAIN) stay queued for the next submit or reap. */
static void uring_flush(struct uring_engine *u)
{
    int rc;

    do
        rc = io_uring_submit(&u->ring);
    while (rc == -EINTR);
}

static int uring_submit(struct pykvm_aio *aio, const struct pykvm_aio_req *reqs, uint32_t n)
{
    struct uring_engine *u = aio->priv;
    uint32_t taken = 0, queued = 0;

    for (; taken < n; taken++) {
        const struct pykvm_aio_req *r = &reqs[taken];
        struct io_uring_sqe *sqe;

        if (r->op == PYKVM_AIO_FALLOCATE && !u->have_fallocate) {
            aio_complete_now(aio, r->token, aio_execute(r));
            continue;
        }
        if (r->op < PYKVM_AIO_READ || r->op > PYKVM_AIO_FALLOCATE) {
            aio_complete_now(aio, r->token, -EINVAL);
            continue;
        }
        sqe = io_uring_get_sqe(&u->ring);
        if (!sqe)
            break;
        switch (r->op) {
        case PYKVM_AIO_READ:
            io_uring_prep_readv(sqe, r->fd, r->iov, r->iovcnt, r->offset);
            break;
        case PYKVM_AIO_WRITE:
            io_uring_prep_writev(sqe, r->fd, r->iov, r->iovcnt, r->offset);
            break;
        case PYKVM_AIO_FLUSH:
            io_uring_prep_fsync(sqe, r->fd, IORING_FSYNC_DATASYNC);
            break;
        default:
            io_uring_prep_fallocate(sqe, r->fd, r->mode, (off_t)r->offset, (off_t)r->length);
            break;
        }
        io_uring_sqe_set_data64(sqe, r->token);
        queued++;
    }
    aio->in_flight += queued;
    if (queued)
        uring_flush(u);
    return (int)taken;
}

static int uring_reap(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max)
{
    struct uring_engine *u = aio->priv;
    struct io_uring_cqe *cqes[64];
    uint32_t n = 0;

    if (io_uring_sq_ready(&u->ring))
        uring_flush(u);
    while (n < max) {
        unsigned want = max - n < 64 ? max - n : 64;
        unsigned got = io_uring_peek_batch_cqe(&u->ring, cqes, want);

        for (unsigned i = 0; i < got; i++) {
            out[n].token = io_uring_cqe_get_data64(cqes[i]);
            out[n].result = cqes[i]->res;
            n++;
        }
        io_uring_cq_advance(&u->ring, got);
        if (got < want)
            break;
    }
    aio->in_flight -= n;
    if (n == max && io_uring_cq_ready(&u->ring))
        eventfd_write(aio->notifier, 1);  /* stopped at max: stay readable */
    return (int)n;
}

static uint32_t uring_ready(struct pykvm_aio *aio)
{
    struct uring_engine *u = aio->priv;

    return io_uring_cq_ready(&u->ring);
}

static void uring_fini(struct pykvm_aio *aio)
{
    struct uring_engine *u = aio->priv;

    io_uring_unregister_eventfd(&u->ring);
    io_uring_queue_exit(&u->ring);
    free(u);
}

#else  /* no liburing at build time */

static int uring_init(struct pykvm_aio *aio, char *err, size_t errlen)
{
    snprintf(err, errlen, "aio=io_uring: pykvm was built without liburing (install liburing-dev "
             "and reinstall)");
    return -1;
}

static int uring_submit(struct pykvm_aio *aio, const struct pykvm_aio_req *reqs, uint32_t n)
{
    return -ENOSYS;
}

static int uring_reap(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max)
{
    return 0;
}

static uint32_t uring_ready(struct pykvm_aio *aio)
{
    return 0;
}

static void uring_fini(struct pykvm_aio *aio)
{
}

#endif

static const struct aio_ops aio_uring_ops = {
    .name = "io_uring",
    .init = uring_init,
    .submit = uring_submit,
    .reap = uring_reap,
    .ready = uring_ready,
    .fini = uring_fini,
};
