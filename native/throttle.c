/*
 * throttle.c - leaky-bucket I/O limits (QEMU's throttling.* rule), the twin
 * of pykvm/block/throttle.py. Each step below is one step of that module's
 * docstring, with the same floating-point operations in the same order, so
 * both twins give the same answers to the nanosecond (tests/unit/
 * test_throttle.py feeds them the same arrivals and compares).
 */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define PYKVM_THROTTLE_BPS_TOTAL 0
#define PYKVM_THROTTLE_BPS_READ 1
#define PYKVM_THROTTLE_BPS_WRITE 2
#define PYKVM_THROTTLE_OPS_TOTAL 3
#define PYKVM_THROTTLE_OPS_READ 4
#define PYKVM_THROTTLE_OPS_WRITE 5
#define PYKVM_THROTTLE_BUCKETS 6
/* a wait is never longer than this (2^62 ns, about 146 years) */
#define THROTTLE_WAIT_MAX 4611686018427387904.0

struct pykvm_throttle_bucket {
    double rate;
    double burst_rate;
    double burst_seconds;
    double level;
    double burst_level;
};

struct pykvm_throttle {
    struct pykvm_throttle_bucket buckets[PYKVM_THROTTLE_BUCKETS];
    uint64_t iops_size;
    int64_t previous_ns;
    pthread_mutex_t lock;
};

/* the buckets a direction fills and waits on: bytes then operations,
 * total then the direction's own */
static const int throttle_used[2][4] = {
    {PYKVM_THROTTLE_BPS_TOTAL, PYKVM_THROTTLE_BPS_READ,
     PYKVM_THROTTLE_OPS_TOTAL, PYKVM_THROTTLE_OPS_READ},
    {PYKVM_THROTTLE_BPS_TOTAL, PYKVM_THROTTLE_BPS_WRITE,
     PYKVM_THROTTLE_OPS_TOTAL, PYKVM_THROTTLE_OPS_WRITE},
};

static struct pykvm_throttle *pykvm_throttle_new(void)
{
    struct pykvm_throttle *t = calloc(1, sizeof(*t));

    if (t)
        pthread_mutex_init(&t->lock, NULL);
    return t;
}

static void pykvm_throttle_free(struct pykvm_throttle *t)
{
    if (!t)
        return;
    pthread_mutex_destroy(&t->lock);
    free(t);
}

static void pykvm_throttle_lock(struct pykvm_throttle *t)
{
    pthread_mutex_lock(&t->lock);
}

static void pykvm_throttle_unlock(struct pykvm_throttle *t)
{
    pthread_mutex_unlock(&t->lock);
}

/* Step 1: every bucket leaks for the time since the last leak (time that
 * goes backwards, another thread's older clock reading, leaks nothing). */
static void throttle_leak(struct pykvm_throttle *t, int64_t now_ns)
{
    double delta;

    if (now_ns <= t->previous_ns)
        return;
    delta = (double)(now_ns - t->previous_ns);
    t->previous_ns = now_ns;
    for (int i = 0; i < PYKVM_THROTTLE_BUCKETS; i++) {
        struct pykvm_throttle_bucket *k = &t->buckets[i];
        double level;

        if (k->rate == 0.0)
            continue;
        level = k->level - k->rate * delta / 1e9;
        k->level = level > 0.0 ? level : 0.0;
        if (k->burst_seconds > 1.0) {
            level = k->burst_level - k->burst_rate * delta / 1e9;
            k->burst_level = level > 0.0 ? level : 0.0;
        }
    }
}

static int64_t throttle_ns(double units, double rate)
{
    double wait = units * 1e9 / rate;

    return wait < THROTTLE_WAIT_MAX ? (int64_t)wait : (int64_t)THROTTLE_WAIT_MAX;
}

/* Step 2: how long one bucket makes a request wait. */
static int64_t throttle_bucket_wait(const struct pykvm_throttle_bucket *k)
{
    double over;

    if (k->rate == 0.0)
        return 0;
    over = k->level - k->burst_rate * k->burst_seconds;
    if (over > 0.0)
        return throttle_ns(over, k->rate);
    if (k->burst_seconds > 1.0) {
        over = k->burst_level - k->burst_rate / 10.0;
        if (over > 0.0)
            return throttle_ns(over, k->burst_rate);
    }
    return 0;
}

/* Step 3: a request that goes fills its direction's buckets. */
static void throttle_fill(struct pykvm_throttle *t, int is_write, uint64_t nbytes)
{
    double ops = 1.0;

    if (t->iops_size && nbytes > t->iops_size)
        ops = (double)nbytes / (double)t->iops_size;
    for (int j = 0; j < 4; j++) {
        struct pykvm_throttle_bucket *k = &t->buckets[throttle_used[!!is_write][j]];
        double units = j < 2 ? (double)nbytes : ops;

        if (k->rate == 0.0)
            continue;
        k->level += units;
        if (k->burst_seconds > 1.0)
            k->burst_level += units;
    }
}

static int64_t pykvm_throttle_admit(struct pykvm_throttle *t, int is_write, uint64_t nbytes,
                                    int64_t now_ns)
{
    int64_t wait = 0;

    pthread_mutex_lock(&t->lock);
    throttle_leak(t, now_ns);
    for (int j = 0; j < 4; j++) {
        int64_t w = throttle_bucket_wait(&t->buckets[throttle_used[!!is_write][j]]);

        if (w > wait)
            wait = w;
    }
    if (!wait)
        throttle_fill(t, is_write, nbytes);
    pthread_mutex_unlock(&t->lock);
    return wait;
}

static void pykvm_throttle_account(struct pykvm_throttle *t, int is_write, uint64_t nbytes,
                                   int64_t now_ns)
{
    pthread_mutex_lock(&t->lock);
    throttle_leak(t, now_ns);
    throttle_fill(t, is_write, nbytes);
    pthread_mutex_unlock(&t->lock);
}
