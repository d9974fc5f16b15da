/*
 * throttle.h - I/O limits as QEMU's -drive throttling.* options define them:
 * leaky buckets, the C twin of pykvm/block/throttle.py (whose module
 * docstring states the rule both follow, step for step).
 *
 * One struct pykvm_throttle is a throttle group: every device of the group
 * (their C I/O threads, and the Python path) asks the same state, under its
 * mutex. Python fills the buckets from a validated ThrottleConfig; nothing
 * here checks the configuration again.
 */

#define PYKVM_THROTTLE_BPS_TOTAL 0
#define PYKVM_THROTTLE_BPS_READ 1
#define PYKVM_THROTTLE_BPS_WRITE 2
#define PYKVM_THROTTLE_OPS_TOTAL 3
#define PYKVM_THROTTLE_OPS_READ 4
#define PYKVM_THROTTLE_OPS_WRITE 5
#define PYKVM_THROTTLE_BUCKETS 6

struct pykvm_throttle_bucket {
    double rate;                /* units (bytes or operations) per second; 0: no limit */
    double burst_rate;          /* units per second while bursting (the -max option, or rate/10) */
    double burst_seconds;       /* the -max-length option (1 without a burst) */
    double level;               /* units done, leaking at rate */
    double burst_level;         /* units done, leaking at burst_rate (burst_seconds > 1 only) */
};

struct pykvm_throttle {
    struct pykvm_throttle_bucket buckets[6];
    uint64_t iops_size;         /* a request larger than this counts as nbytes/iops_size ops */
    int64_t previous_ns;        /* the time of the last leak */
    ...;
};

/* A zeroed group (no limits) with its mutex; NULL out of memory. */
struct pykvm_throttle *pykvm_throttle_new(void);
void pykvm_throttle_free(struct pykvm_throttle *t);
/* 0: a request of nbytes in this direction may go now, and is accounted;
 * else the nanoseconds to wait before asking again (nothing accounted). */
int64_t pykvm_throttle_admit(struct pykvm_throttle *t, int is_write, uint64_t nbytes,
                             int64_t now_ns);
/* Account a request without asking (a drain lets held requests go at once). */
void pykvm_throttle_account(struct pykvm_throttle *t, int is_write, uint64_t nbytes,
                            int64_t now_ns);
/* The group's mutex, for the Python twin working on the same state. */
void pykvm_throttle_lock(struct pykvm_throttle *t);
void pykvm_throttle_unlock(struct pykvm_throttle *t);
