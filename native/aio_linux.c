/*
 * aio_linux.c - aio=native: Linux AIO through the raw system calls
 * (io_setup/io_submit/io_getevents), completion eventfd by IOCB_FLAG_RESFD.
 *
 * It is asynchronous only on files opened with O_DIRECT (buffered requests
 * run inside io_submit), so the callers refuse it with a cached mode, as
 * QEMU does. Flushes are IOCB_CMD_FDSYNC; fallocate has no AIO command and
 * runs in place. Completions are read from the ring the kernel shares with
 * us (as QEMU's linux-aio does), falling back to io_getevents.
 * (Included by aio.c.)
 */
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <time.h>

#define AIO_RING_MAGIC 0xa10a10a1

/* The completion ring at the address of the context (fs/aio.c). */
struct linux_aio_ring {
    unsigned id;
    unsigned nr;
    unsigned head;
    unsigned tail;
    unsigned magic;
    unsigned compat_features;
    unsigned incompat_features;
    unsigned header_length;
    struct io_event io_events[];
};

struct linux_engine {
    aio_context_t ctx;
    struct iocb *iocbs;         /* one per slot; aio_data = slot index */
    struct iocb **batch;
    uint64_t *tokens;
    struct pykvm_aio_req *reqs;     /* a copy, to run one in place */
    uint32_t *free_slots;
    uint32_t nfree;
};

static int linux_init(struct pykvm_aio *aio, char *err, size_t errlen)
{
    struct linux_engine *l = calloc(1, sizeof(*l));
    uint32_t depth = aio->depth;

    if (!l) {
        snprintf(err, errlen, "aio=native: out of memory");
        return -1;
    }
    l->iocbs = calloc(depth, sizeof(*l->iocbs));
    l->batch = calloc(depth, sizeof(*l->batch));
    l->tokens = calloc(depth, sizeof(*l->tokens));
    l->reqs = calloc(depth, sizeof(*l->reqs));
    l->free_slots = calloc(depth, sizeof(*l->free_slots));
    if (!l->iocbs || !l->batch || !l->tokens || !l->reqs || !l->free_slots) {
        snprintf(err, errlen, "aio=native: out of memory");
        goto fail;
    }
    if (syscall(SYS_io_setup, depth, &l->ctx) < 0) {
        snprintf(err, errlen, "aio=native: io_setup(%u): %s%s", depth, strerror(errno),
                 errno == EAGAIN ? " (fs.aio-max-nr reached)" : "");
        goto fail;
    }
    for (uint32_t i = 0; i < depth; i++)
        l->free_slots[i] = depth - 1 - i;
    l->nfree = depth;
    aio->priv = l;
    return 0;
fail:
    free(l->iocbs);
    free(l->batch);
    free(l->tokens);
    free(l->reqs);
    free(l->free_slots);
    free(l);
    return -1;
}

static int linux_submit(struct pykvm_aio *aio, const struct pykvm_aio_req *reqs, uint32_t n)
{
    struct linux_engine *l = aio->priv;
    uint32_t taken = 0, nbatch = 0;

    while (taken < n) {
        const struct pykvm_aio_req *r = &reqs[taken];
        struct iocb *cb;
        uint32_t slot;

        if (r->op == PYKVM_AIO_FALLOCATE || (r->op != PYKVM_AIO_READ &&
                                             r->op != PYKVM_AIO_WRITE &&
                                             r->op != PYKVM_AIO_FLUSH)) {
            /* no AIO command: done here (in-flight requests have no order) */
            aio_complete_now(aio, r->token, aio_execute(r));
            taken++;
            continue;
        }
        slot = l->free_slots[--l->nfree];
        cb = &l->iocbs[slot];
        memset(cb, 0, sizeof(*cb));
        cb->aio_data = slot;
        cb->aio_fildes = (uint32_t)r->fd;
        cb->aio_flags = IOCB_FLAG_RESFD;
        cb->aio_resfd = (uint32_t)aio->notifier;
        if (r->op == PYKVM_AIO_FLUSH) {
            cb->aio_lio_opcode = IOCB_CMD_FDSYNC;
        } else {
            cb->aio_lio_opcode = r->op == PYKVM_AIO_READ ? IOCB_CMD_PREADV : IOCB_CMD_PWRITEV;
            cb->aio_buf = (uint64_t)(uintptr_t)r->iov;
            cb->aio_nbytes = r->iovcnt;
            cb->aio_offset = (int64_t)r->offset;
        }
        l->tokens[slot] = r->token;
        l->reqs[slot] = *r;
        l->batch[nbatch++] = cb;
        taken++;
    }
    while (nbatch) {
        long rc = syscall(SYS_io_submit, l->ctx, (long)nbatch, l->batch);

        if (rc < 0 && errno == EINTR)
            continue;
        if (rc > 0) {
            aio->in_flight += (uint32_t)rc;
        } else {
            /* the first iocb was refused (or the kernel is full, which the
             * depth given to io_setup rules out): it completes here */
            struct iocb *cb = l->batch[0];
            uint32_t slot = (uint32_t)cb->aio_data;
            int64_t result = rc < 0 && errno != EAGAIN ? -errno
                                                       : aio_execute(&l->reqs[slot]);

            aio_complete_now(aio, l->tokens[slot], result);
            l->free_slots[l->nfree++] = slot;
            rc = 1;
        }
        memmove(l->batch, l->batch + rc, sizeof(*l->batch) * (nbatch - rc));
        nbatch -= (uint32_t)rc;
    }
    return (int)taken;
}

static int linux_reap(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max)
{
    struct linux_engine *l = aio->priv;
    struct linux_aio_ring *ring = (struct linux_aio_ring *)(uintptr_t)l->ctx;
    uint32_t n = 0;

    if (ring->magic == AIO_RING_MAGIC && !ring->incompat_features) {
        unsigned head = ring->head;
        unsigned tail = __atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE);

        while (head != tail && n < max) {
            struct io_event *ev = &ring->io_events[head];
            uint32_t slot = (uint32_t)ev->data;

            out[n].token = l->tokens[slot];
            out[n].result = ev->res;
            l->free_slots[l->nfree++] = slot;
            n++;
            head = (head + 1) % ring->nr;
        }
        __atomic_store_n(&ring->head, head, __ATOMIC_RELEASE);
        if (head != tail)
            eventfd_write(aio->notifier, 1);  /* stopped at max: stay readable */
    } else {
        struct io_event events[64];
        struct timespec zero = {0, 0};
        long got = syscall(SYS_io_getevents, l->ctx, 0L, (long)(max < 64 ? max : 64), events,
                           &zero);

        for (long i = 0; i < got; i++) {
            uint32_t slot = (uint32_t)events[i].data;

            out[n].token = l->tokens[slot];
            out[n].result = events[i].res;
            l->free_slots[l->nfree++] = slot;
            n++;
        }
        if (got == 64)
            eventfd_write(aio->notifier, 1);
    }
    aio->in_flight -= n;
    return (int)n;
}

static uint32_t linux_ready(struct pykvm_aio *aio)
{
    struct linux_engine *l = aio->priv;
    struct linux_aio_ring *ring = (struct linux_aio_ring *)(uintptr_t)l->ctx;

    if (ring->magic != AIO_RING_MAGIC || ring->incompat_features)
        return 0;
    return (__atomic_load_n(&ring->tail, __ATOMIC_ACQUIRE) - ring->head + ring->nr) % ring->nr;
}

static void linux_fini(struct pykvm_aio *aio)
{
    struct linux_engine *l = aio->priv;

    syscall(SYS_io_destroy, l->ctx);
    free(l->iocbs);
    free(l->batch);
    free(l->tokens);
    free(l->reqs);
    free(l->free_slots);
    free(l);
}

static const struct aio_ops aio_linux_ops = {
    .name = "native",
    .init = linux_init,
    .submit = linux_submit,
    .reap = linux_reap,
    .ready = linux_ready,
    .fini = linux_fini,
};
