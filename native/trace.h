/*
 * trace.h - per-request trace records: a lock-free ring per C I/O thread
 * (one producer: the thread; one consumer: Python, pykvm/block/trace.py),
 * so tracing costs the hot loop one record copy and no Python object.
 * A full ring drops the record and counts it.
 */

#define PYKVM_TRACE_PATH_C 1
#define PYKVM_TRACE_PATH_PYTHON 2

struct pykvm_trace_rec {
    uint64_t submit_ns;         /* CLOCK_MONOTONIC, when the chain was popped */
    uint64_t complete_ns;       /* when its used element was written */
    uint64_t sector;
    uint32_t length;            /* data bytes */
    uint32_t queue;
    uint16_t head;
    uint8_t type;               /* the virtio-blk request type */
    uint8_t status;             /* the status byte written */
    int16_t rule;               /* the blkdebug rule that fired, -1: none */
    uint8_t path;               /* PYKVM_TRACE_PATH_* */
    uint8_t pad;
};

struct pykvm_trace;

/* A ring of 2^order records; NULL out of memory. */
struct pykvm_trace *pykvm_trace_new(uint32_t order);
void pykvm_trace_free(struct pykvm_trace *t);
/* The producer's side (the I/O thread; also callable from Python). */
void pykvm_trace_push(struct pykvm_trace *t, const struct pykvm_trace_rec *rec);
/* The consumer's side: up to max records into out; the number taken. */
uint32_t pykvm_trace_drain(struct pykvm_trace *t, struct pykvm_trace_rec *out, uint32_t max);
uint64_t pykvm_trace_dropped(const struct pykvm_trace *t);
