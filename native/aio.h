/*
 * aio.h - AIO engines in C, one interface: submit a batch, get told by an
 * eventfd, reap completions (the shape of pykvm/aio's PythonEngine).
 *
 *   threads    a pthread pool doing preadv/pwritev/fdatasync/fallocate
 *   native     Linux AIO (io_submit, IOCB_FLAG_RESFD); asynchronous only with O_DIRECT
 *   io_uring   liburing: readv/writev/fsync(DATASYNC)/fallocate, eventfd registered
 *
 * A request carries an integer token chosen by the caller and completes as
 * (token, result): bytes done or -errno. No other value crosses over. One
 * thread at a time submits and reaps; the caller keeps each request's iovec
 * array and buffers alive until its token is reaped.
 */

enum pykvm_aio_op {
    PYKVM_AIO_READ = 0,
    PYKVM_AIO_WRITE = 1,
    PYKVM_AIO_FLUSH = 2,
    PYKVM_AIO_FALLOCATE = 3
};

struct iovec {
    void *iov_base;
    size_t iov_len;
};

struct pykvm_aio_req {
    uint64_t token;
    int32_t op;                 /* enum pykvm_aio_op */
    int32_t fd;
    uint64_t offset;
    const struct iovec *iov;    /* READ, WRITE */
    uint32_t iovcnt;
    int32_t mode;               /* FALLOCATE: FALLOC_FL_* flags */
    uint64_t length;            /* FALLOCATE */
};

struct pykvm_aio_done {
    uint64_t token;
    int64_t result;
};

struct pykvm_aio;

/* An engine by name, able to hold `depth` requests in flight; NULL with a
 * one-line reason in err when it cannot work here. */
struct pykvm_aio *pykvm_aio_open(const char *engine, uint32_t depth, char *err, size_t errlen);
const char *pykvm_aio_name(const struct pykvm_aio *aio);
/* The eventfd written when completions are ready (readable: reap). */
int pykvm_aio_notifier(const struct pykvm_aio *aio);
/* Hand over up to n requests; returns how many were taken (the first ones;
 * fewer when `depth` are in flight), or -errno. Never blocks on I/O. */
int pykvm_aio_submit(struct pykvm_aio *aio, const struct pykvm_aio_req *reqs, uint32_t n);
/* Up to max completions; never blocks. Clears the notifier first. */
int pykvm_aio_reap(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max);
/* Completions waiting to be reaped, seen without a system call (for polling);
 * once the thread watches NBD connections (pykvm_aio_watch), it also reads the
 * replies their sockets hold (one poll each to look). */
uint32_t pykvm_aio_ready(struct pykvm_aio *aio);
uint32_t pykvm_aio_in_flight(const struct pykvm_aio *aio);
/* Whether a WRITE on fd may carry PYKVM_NBD_FUA in its mode (nbd.h): fd is
 * routed to an NBD connection whose server offers FUA. Such a write is
 * durable when it completes: no flush after it is needed. */
int pykvm_aio_can_fua(int fd);
/* The sockets of the NBD connections this engine has sent requests to, for
 * the calling thread to poll for readability with its own fds; from the
 * first call on, reap and ready read those connections' replies in the
 * calling thread (nbd.h). fds[i] is -1 while connection i is down; gens[i]
 * changes when a new connection replaces the old (the fd number may be the
 * same). Call again before each sleep: the engine's notifier fires when a
 * socket was replaced. Returns how many were filled (at most max). */
int pykvm_aio_watch(struct pykvm_aio *aio, int *fds, uint32_t *gens, uint32_t max);
/* Waits for every request in flight (dropping their results), then frees. */
void pykvm_aio_close(struct pykvm_aio *aio);
