/*
 * inject.h - the rule engine of the blkdebug node (pykvm/block/filters/blkdebug.py):
 * which request fails, waits, tears, lies or comes back out of order.
 *
 * One engine serves one disk on both paths: the C I/O threads ask it for
 * every request they serve, the Python path for every request it serves and
 * for qcow2's metadata writes. They must share it, not keep twins: "the 3rd
 * write", a state machine and a seeded probability count across both paths.
 * Calls take the engine's mutex; nothing here allocates after _new.
 *
 * Two kinds of rule, evaluated in this order for each request:
 * - QEMU's blkdebug rules. An event (read_aio, l2_update, ...) fires;
 *   every [inject-error] rule of that event whose state matches becomes
 *   active (the first such rule of an event replaces the active list), every
 *   [set-state] rule of it moves the state machine. A request then fails with
 *   the errno of the newest active rule whose sector (or none) it covers and
 *   whose iotype it has; a rule with once=on goes away after it fired.
 * - [fault] rules (beyond QEMU): op, byte range, queue, which matching
 *   requests (after N, every Nth, at most N times), a seeded probability,
 *   and an action: an errno or a virtio status, a delay, a hang until
 *   released, corrupted or zeroed read data, a torn or dropped write, or
 *   holding the completion to release it out of order. The first rule that
 *   fires wins.
 * Python validates rules (one line per bad key); nothing is checked again here.
 */

/* request kinds (bit numbers in a rule's op mask; QEMU's iotype names) */
#define PYKVM_INJ_OP_READ 0
#define PYKVM_INJ_OP_WRITE 1
#define PYKVM_INJ_OP_FLUSH 2
#define PYKVM_INJ_OP_DISCARD 3
#define PYKVM_INJ_OP_WRITE_ZEROES 4
#define PYKVM_INJ_OP_GET_ID 5

/* the events raised for guest requests (qcow2's are numbered after these) */
#define PYKVM_INJ_EV_READ_AIO 0
#define PYKVM_INJ_EV_WRITE_AIO 1
#define PYKVM_INJ_EV_FLUSH_TO_OS 2
#define PYKVM_INJ_EV_FLUSH_TO_DISK 3
#define PYKVM_INJ_EVENTS 64

#define PYKVM_INJ_RULE_INJECT_ERROR 1   /* QEMU's [inject-error] */
#define PYKVM_INJ_RULE_SET_STATE 2      /* QEMU's [set-state] */
#define PYKVM_INJ_RULE_FAULT 3          /* [fault] */

#define PYKVM_INJ_NONE 0        /* fault "pass": counted, moves the state, nothing else */
#define PYKVM_INJ_ERROR 1       /* value: errno */
#define PYKVM_INJ_STATUS 2      /* value: virtio status (IOERR 1, UNSUPP 2) */
#define PYKVM_INJ_DELAY 3       /* delay_ns */
#define PYKVM_INJ_HANG 4        /* until pykvm_inject_release */
#define PYKVM_INJ_CORRUPT 5     /* value: bits flipped in the data read */
#define PYKVM_INJ_TORN 6        /* value: sectors of the write that reach the image */
#define PYKVM_INJ_DROP 7        /* success, nothing done */
#define PYKVM_INJ_ZERO 8        /* a read returns zeroes, the image unread */
#define PYKVM_INJ_HOLD 9        /* value: completions to gather; order; timeout_ns */
#define PYKVM_INJ_POWER_CUT 10  /* value: keep (0 flushed, 1 all, 2 random); order: torn;
                                   from then on every request gets this hit: none may land */
#define PYKVM_INJ_SHORT 11      /* value: sectors a read gets before the host's read returns
                                   short (not at the end of the file): the rest must be read */

#define PYKVM_INJ_DELAY_FIXED 0
#define PYKVM_INJ_DELAY_UNIFORM 1       /* in [delay_ns, delay_max_ns] */
#define PYKVM_INJ_DELAY_EXPONENTIAL 2   /* mean delay_ns */

#define PYKVM_INJ_ORDER_FIFO 0
#define PYKVM_INJ_ORDER_REVERSE 1
#define PYKVM_INJ_ORDER_RANDOM 2
#define PYKVM_INJ_ORDER_GIVEN 3         /* order_list: positions (0: the first held), 4 bits
                                           each from the lowest, order_n of them */
#define PYKVM_INJ_MAX_ORDER_LIST 16

/* check flags */
#define PYKVM_INJ_GUEST 1       /* a guest request: raise its event, try [fault] rules */

struct pykvm_inject_rule {
    uint32_t kind;
    uint32_t event;             /* inject-error, set-state */
    int32_t state;              /* 0: any state */
    int32_t new_state;          /* set-state; fault: the state it moves to when it fires (0: none) */
    uint32_t ops;               /* mask of 1 << PYKVM_INJ_OP_* */
    int64_t offset;             /* -1: anywhere; else the bytes [offset, offset + length) */
    uint64_t length;            /* inject-error: 0 (the request must cover offset) */
    int32_t queue;              /* -1: any queue */
    uint32_t once;              /* inject-error: removed once it fired */
    uint64_t after;             /* fault: skip the first `after` matching requests */
    uint64_t every;             /* fault: then fire on every `every`th (1: each) */
    uint64_t times;             /* fault: fire at most this often (0: no limit) */
    double probability;         /* fault: of firing, once the counts allow it */
    uint64_t seed;
    uint32_t action;
    int32_t value;
    uint32_t dist;
    uint64_t delay_ns;
    uint64_t delay_max_ns;
    uint32_t order;
    uint64_t timeout_ns;
    uint64_t order_list;        /* hold, order given: the release order (PYKVM_INJ_ORDER_GIVEN) */
    uint32_t order_n;
    uint32_t release_after;     /* hold: release once this many more requests completed (0: no) */
    uint32_t waiting;           /* fault: matches nothing until pykvm_inject_arm (a mark or a
                                   time the rule waits for: Python keeps those) */
};

/* What a check found: the rule's index (-1: none) and what to do. */
struct pykvm_inject_hit {
    int32_t rule;
    uint32_t action;
    int32_t value;
    uint32_t order;
    uint64_t delay_ns;
    uint64_t timeout_ns;
    uint64_t seed;              /* for the bits a corruption flips, a random order */
    uint64_t order_list;
    uint32_t order_n;
    uint32_t release_after;
};

struct pykvm_inject;

/* An engine with these rules (copied), state 1; NULL out of memory. */
struct pykvm_inject *pykvm_inject_new(const struct pykvm_inject_rule *rules, uint32_t n);
void pykvm_inject_free(struct pykvm_inject *inj);
/* Add a rule while threads may be asking (the API's inject()); its index, or
 * -1 out of memory. */
int32_t pykvm_inject_add(struct pykvm_inject *inj, const struct pykvm_inject_rule *rule);
/* Remove rule i (it matches nothing from now on; indexes stay as they are). */
void pykvm_inject_remove(struct pykvm_inject *inj, uint32_t i);
/* Rule i stops waiting: from now on it matches requests. */
void pykvm_inject_arm(struct pykvm_inject *inj, uint32_t i);
/* Power-cut rule i fires now, on no request (at a mark or a time): 1, or 0
 * when the power is already off or the rule was removed. */
int pykvm_inject_cut(struct pykvm_inject *inj, uint32_t i);
/* Raise an event (QEMU's blkdebug_debug_event). */
void pykvm_inject_event(struct pykvm_inject *inj, uint32_t event);
/* 1 when a rule fired on the request (``hit`` filled), else 0. */
int pykvm_inject_check(struct pykvm_inject *inj, uint32_t op, uint64_t offset, uint64_t length,
                       int32_t queue, uint32_t flags, struct pykvm_inject_hit *hit);
/* Let every hung request go; the I/O threads see a new release generation. */
void pykvm_inject_release(struct pykvm_inject *inj);
uint64_t pykvm_inject_release_gen(const struct pykvm_inject *inj);
int32_t pykvm_inject_state(struct pykvm_inject *inj);
/* How often rule i matched a request and fired (inject-error: fired only). */
void pykvm_inject_rule_counts(struct pykvm_inject *inj, uint32_t i, uint64_t *matched,
                              uint64_t *fired);
uint64_t pykvm_inject_event_count(struct pykvm_inject *inj, uint32_t event);

/* The bits a corruption flips: `n` bit positions in [0, 8 * nbytes), from seed. */
void pykvm_inject_flip_positions(uint64_t seed, uint32_t n, uint64_t nbytes, uint64_t *out);
/* A seeded permutation of idx[0..n) (Fisher-Yates), for a random release order. */
void pykvm_inject_shuffle(uint64_t seed, uint32_t *idx, uint32_t n);
