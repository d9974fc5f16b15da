/*
 * blk.h - the C I/O thread of one virtio-blk device (the fast path).
 *
 * Python negotiates, validates the queues and, at DRIVER_OK, hands over the
 * guest memory table, the activated queues (struct pykvm_vq), their kick
 * and call eventfds, and a mapping table: virtual disk range -> host fd and
 * offset (one extent for a raw image). The thread pops chains, parses each
 * request exactly as pykvm/virtio/blk.py does, submits the I/O to an
 * engine of aio.h with token (queue << 16) | head, writes the status byte
 * and the used element, and signals the call eventfd when event idx says so.
 *
 * What it does not serve goes to Python through the punt queue (an eventfd
 * plus pykvm_blk_next_punt): requests it cannot map (unmapped or
 * non-writable ranges, misaligned O_DIRECT buffers, discard and write
 * zeroes, flush when Python owns metadata), the log line of a bad request or
 * an I/O error (C decided the status; Python logs, then hands the element
 * back with pykvm_blk_complete), and fatal errors (DEVICE_NEEDS_RESET).
 */

#define PYKVM_BLK_EXTENT_WRITABLE 1
/* A guest request's limits (blk.c; blk.py MAX_REQUEST_BYTES, MAX_SEGMENTS) */
#define PYKVM_BLK_MAX_REQUEST_BYTES 268435456
#define PYKVM_BLK_MAX_SEGMENTS 1024

/* Virtual disk bytes [offset, offset+length) live in fd at host_offset. */
struct pykvm_blk_extent {
    uint64_t offset;
    uint64_t length;
    uint64_t host_offset;
    int32_t fd;
    uint32_t flags;             /* PYKVM_BLK_EXTENT_WRITABLE: writes may go there in place */
};

struct pykvm_blk_queue {
    struct pykvm_vq *vq;        /* activated; owned by the caller, used by the thread until stop */
    int32_t kick_fd;            /* the queue's kick eventfd (ioeventfd) */
    int32_t call_fd;            /* eventfd to write for an interrupt; -1: forward to Python */
    uint32_t *isr;              /* NULL, or a word that gets isr_bit (atomically) before call_fd */
    uint32_t isr_bit;
};

struct pykvm_blk_config {
    const struct pykvm_mem_region *regions;
    uint32_t nregions;
    struct pykvm_blk_queue *queues;
    uint32_t nqueues;
    const char *engine;         /* threads | native | io_uring */
    uint64_t capacity;          /* in 512-byte sectors */
    uint64_t features;          /* negotiated */
    uint32_t align;             /* O_DIRECT: offsets, lengths, buffers; 1 when cached */
    int32_t flush_fd;           /* fdatasync target of a guest flush; -1: Python flushes */
    uint8_t read_only;
    uint8_t write_cache;        /* writeback (off: each write is followed by a flush) */
    uint8_t no_flush;           /* cache=unsafe: guest flushes are no-ops */
    uint8_t serial[20];         /* GET_ID, zero-padded */
    uint32_t poll_max_ns;       /* adaptive polling limit before sleeping; 0: never poll */
    uint32_t irq_coalesce_ns;   /* at most one interrupt per queue in this time while the
                                   engine has requests; 0: an interrupt per round */
    const struct pykvm_blk_extent *map;
    uint32_t nmap;
    struct pykvm_throttle *throttle;  /* NULL, or the disk's throttle group (throttle.h),
                                         which must outlive the thread */
    struct pykvm_inject *inject;      /* NULL, or a blkdebug node's rule engine (inject.h),
                                         which must outlive the thread */
    struct pykvm_trace *trace;        /* NULL, or this thread's trace ring (trace.h) */
    struct pykvm_wlog *wlog;          /* NULL, or the disk's write log (writelog.h), shared
                                         with Python and the disk's other threads, which
                                         must outlive the thread */
    uint32_t seg_max;           /* data buffers a request may have (config seg_max); 0: the
                                   limit PYKVM_BLK_MAX_SEGMENTS alone */
    uint32_t size_max;          /* bytes of one data buffer at most (config size_max); 0: any */
};

struct pykvm_blk_counters {
    uint64_t requests;              /* chains popped */
    uint64_t bytes_read;
    uint64_t bytes_written;
    uint64_t errors;                /* requests completed with IOERR / UNSUPP */
    uint64_t submitted;             /* engine requests */
    uint64_t flushes;               /* fdatasyncs: guest flushes, writethrough writes */
    uint64_t batches;               /* engine submit calls */
    uint64_t completions;           /* engine completions */
    uint64_t completion_batches;    /* reaps that found completions */
    uint64_t interrupts;
    uint64_t interrupts_suppressed;
    uint64_t punts;                 /* requests served by Python */
    uint64_t poll_hits;             /* work found while polling, no sleep needed */
    uint64_t sleeps;                /* waits on the eventfds */
    uint64_t interrupts_deferred;   /* decisions put off by irq_coalesce_ns */
    uint64_t throttled;             /* reads and writes that waited for their throttle group */
    uint64_t injected;              /* requests a blkdebug rule fired on */
};

#define PYKVM_BLK_PUNT_SERVE 1      /* Python parses and serves the chain */
#define PYKVM_BLK_PUNT_LOG 2        /* status written: log message, then complete */
#define PYKVM_BLK_PUNT_FATAL 3      /* DEVICE_NEEDS_RESET with message; queue stopped */
#define PYKVM_BLK_PUNT_POWER 5      /* a blkdebug power-cut rule fired (message says which) */
#define PYKVM_BLK_PUNT_ERROR 4      /* the chain's I/O failed with `error` (an errno): Python
                                       applies werror/rerror (status, or pause and retry) */

/* `queue` here and in the calls below: the position in cfg->queues (one
 * thread may serve a subset of a device's queues), not the virtqueue's number. */
struct pykvm_blk_punt {
    int32_t kind;
    uint32_t queue;
    uint16_t head;
    uint32_t used_len;          /* PUNT_LOG: the used element's len */
    uint32_t nreadable;
    uint32_t nsegs;
    struct pykvm_vq_seg *segs;  /* PUNT_SERVE, PUNT_ERROR: the chain (freed by
                                   pykvm_blk_punt_release) */
    char message[256];
    int32_t error;              /* PUNT_ERROR: the host errno */
};

struct pykvm_blk;

/* Start the I/O thread; NULL with a one-line reason in err. */
struct pykvm_blk *pykvm_blk_start(const struct pykvm_blk_config *cfg, char *err, size_t errlen);
/* Stop popping, wait for the engine's in-flight requests (results dropped:
 * the queues are being reset), join the thread, free everything. */
void pykvm_blk_stop(struct pykvm_blk *blk);

int pykvm_blk_punt_fd(const struct pykvm_blk *blk);
/* 1: *out holds the next punt (release it); 0: none left. */
int pykvm_blk_next_punt(struct pykvm_blk *blk, struct pykvm_blk_punt *out);
void pykvm_blk_punt_release(struct pykvm_blk_punt *p);
/* A punted request is finished (its status byte written): the I/O thread
 * adds the used element and decides on the interrupt. */
void pykvm_blk_complete(struct pykvm_blk *blk, uint32_t queue, uint16_t head, uint32_t used_len);

/* Queues to interrupt through Python (call_fd -1), as a bit mask; clears it. */
int pykvm_blk_forward_fd(const struct pykvm_blk *blk);
uint64_t pykvm_blk_take_forwarded(struct pykvm_blk *blk);
void pykvm_blk_set_call_fd(struct pykvm_blk *blk, uint32_t queue, int32_t fd);

void pykvm_blk_set_write_cache(struct pykvm_blk *blk, int on);

/* Host errors. A failed read, write or flush goes to Python as PUNT_ERROR; a
 * short read or write as PUNT_SERVE (Python does it again). Once a flush has
 * failed (here, or in Python: set_flush_failed) every later guest flush goes
 * to Python and a writethrough write is PUNT_ERROR EIO: after a failed
 * fdatasync a later successful one proves nothing. pause(1) parks the
 * thread (no pop, no reap, no used element) and returns once it is parked;
 * pause(0) lets it go on. */
int pykvm_blk_flush_failed(const struct pykvm_blk *blk);
void pykvm_blk_set_flush_failed(struct pykvm_blk *blk);
void pykvm_blk_pause(struct pykvm_blk *blk, int on);
/* Replace the mapping table (copied); returns its generation G (1, 2, ...).
 * pykvm_blk_map_generation reports G once the thread maps new requests
 * with table G (or a newer one) *and* every request it mapped with an older
 * table has left the engine: from then on nothing reads or writes a host
 * range that only an older table allowed, so Python may free or reuse it.
 * pykvm_blk_wait_map blocks (without the GIL) until that is so: 1, or 0
 * after timeout_ms or when the device stops. */
uint64_t pykvm_blk_set_map(struct pykvm_blk *blk, const struct pykvm_blk_extent *map,
                           uint32_t n);
uint64_t pykvm_blk_map_generation(const struct pykvm_blk *blk);
int pykvm_blk_wait_map(struct pykvm_blk *blk, uint64_t gen, uint32_t timeout_ms);
int pykvm_blk_quiesce(struct pykvm_blk *blk, uint32_t timeout_ms);
/* blkdebug: requests hung until released (after pykvm_inject_release) and
 * held completions go now. */
void pykvm_blk_release(struct pykvm_blk *blk);
/* 1 when [offset, offset+length) lies inside one extent (writable, for a
 * write): *fd and *host_offset say where; 0: punt it. */
int pykvm_blk_map_lookup(const struct pykvm_blk_extent *map, uint32_t n, uint64_t offset,
                         uint64_t length, int write, int32_t *fd, uint64_t *host_offset);

int pykvm_blk_irq_wait(uint32_t in_flight, uint64_t since_irq_ns, uint64_t coalesce_ns);
void pykvm_blk_counters(const struct pykvm_blk *blk, struct pykvm_blk_counters *out);

/* An interrupt status word shared with the C thread (virtio-MMIO's
 * InterruptStatus, when a transport keeps it in C memory): the thread ORs its
 * bit in before writing the call eventfd; Python sets and acknowledges bits
 * with these. isr_ack returns the bits that were set among `bits`. */
void pykvm_isr_set(uint32_t *word, uint32_t bits);
uint32_t pykvm_isr_ack(uint32_t *word, uint32_t bits);
uint32_t pykvm_isr_load(const uint32_t *word);
