/*
 * trace.c - the trace ring (trace.h): a single-producer, single-consumer
 * ring of fixed records; head and tail only grow, and each side publishes
 * its index with release and reads the other's with acquire.
 */
#include <stdint.h>
#include <stdlib.h>

#include "trace.h"

struct pykvm_trace {
    uint64_t head;              /* written by the producer */
    uint64_t tail;              /* written by the consumer */
    uint64_t dropped;
    uint32_t mask;
    struct pykvm_trace_rec *recs;
};

struct pykvm_trace *pykvm_trace_new(uint32_t order)
{
    struct pykvm_trace *t;

    if (order > 24)
        return NULL;
    t = calloc(1, sizeof(*t));
    if (!t)
        return NULL;
    t->mask = (1u << order) - 1;
    t->recs = calloc((size_t)t->mask + 1, sizeof(*t->recs));
    if (!t->recs) {
        free(t);
        return NULL;
    }
    return t;
}

void pykvm_trace_free(struct pykvm_trace *t)
{
    if (t)
        free(t->recs);
    free(t);
}

void pykvm_trace_push(struct pykvm_trace *t, const struct pykvm_trace_rec *rec)
{
    uint64_t head = t->head;

    if (head - __atomic_load_n(&t->tail, __ATOMIC_ACQUIRE) > t->mask) {
        __atomic_store_n(&t->dropped, t->dropped + 1, __ATOMIC_RELAXED);
        return;
    }
    t->recs[head & t->mask] = *rec;
    __atomic_store_n(&t->head, head + 1, __ATOMIC_RELEASE);
}

uint32_t pykvm_trace_drain(struct pykvm_trace *t, struct pykvm_trace_rec *out, uint32_t max)
{
    uint64_t tail = t->tail, head = __atomic_load_n(&t->head, __ATOMIC_ACQUIRE);
    uint32_t n = 0;

    while (tail != head && n < max)
        out[n++] = t->recs[tail++ & t->mask];
    __atomic_store_n(&t->tail, tail, __ATOMIC_RELEASE);
    return n;
}

uint64_t pykvm_trace_dropped(const struct pykvm_trace *t)
{
    return __atomic_load_n(&t->dropped, __ATOMIC_RELAXED);
}
