/*
 * inject.c - the blkdebug node's rule engine (inject.h says what it decides;
 * pykvm/block/filters/blkdebug.py parses the rules file into its table).
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "inject.h"

struct inj_rule {
    struct pykvm_inject_rule r;
    uint64_t matched, fired, rng;
    int removed;                /* inject-error with once=on, after it fired; or removed */
    int waiting;                /* r.waiting until pykvm_inject_arm */
};

struct pykvm_inject {
    pthread_mutex_t lock;
    struct inj_rule *rules;
    uint32_t nrules;
    int32_t state;
    uint32_t *active;           /* inject-error rules, newest first (QEMU's active_rules) */
    uint32_t nactive;
    uint64_t release_gen;
    uint64_t events[PYKVM_INJ_EVENTS];
    int32_t cut;                /* a power-cut rule fired: its index + 1 (0: none) */
};

/* splitmix64: the generator of guest/guests/workload.c, one state per rule */
static uint64_t inj_next(uint64_t *s)
{
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);

    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) with 53 bits */
static double inj_unit(uint64_t *s)
{
    return (double)(inj_next(s) >> 11) * (1.0 / 9007199254740992.0);
}

struct pykvm_inject *pykvm_inject_new(const struct pykvm_inject_rule *rules, uint32_t n)
{
    struct pykvm_inject *inj = calloc(1, sizeof(*inj));

    if (!inj)
        return NULL;
    inj->rules = calloc(n ? n : 1, sizeof(*inj->rules));
    inj->active = calloc(n ? n : 1, sizeof(*inj->active));
    if (!inj->rules || !inj->active) {
        free(inj->rules);
        free(inj->active);
        free(inj);
        return NULL;
    }
    for (uint32_t i = 0; i < n; i++) {
        inj->rules[i].r = rules[i];
        inj->rules[i].rng = rules[i].seed;
        inj->rules[i].waiting = (int)rules[i].waiting;
    }
    inj->nrules = n;
    inj->state = 1;
    pthread_mutex_init(&inj->lock, NULL);
    return inj;
}

int32_t pykvm_inject_add(struct pykvm_inject *inj, const struct pykvm_inject_rule *rule)
{
    struct inj_rule *rules;
    uint32_t *active;
    int32_t i = -1;

    pthread_mutex_lock(&inj->lock);     /* every use of the tables holds it */
    rules = realloc(inj->rules, sizeof(*rules) * (inj->nrules + 1));
    if (rules)
        inj->rules = rules;
    active = realloc(inj->active, sizeof(*active) * (inj->nrules + 1));
    if (active)
        inj->active = active;
    if (rules && active) {
        i = (int32_t)inj->nrules++;
        memset(&inj->rules[i], 0, sizeof(inj->rules[i]));
        inj->rules[i].r = *rule;
        inj->rules[i].rng = rule->seed;
        inj->rules[i].waiting = (int)rule->waiting;
    }
    pthread_mutex_unlock(&inj->lock);
    return i;
}

void pykvm_inject_remove(struct pykvm_inject *inj, uint32_t i)
{
    pthread_mutex_lock(&inj->lock);
    if (i < inj->nrules) {
        inj->rules[i].removed = 1;
        for (uint32_t k = 0; k < inj->nactive; k++) {
            if (inj->active[k] == i) {
                memmove(inj->active + k, inj->active + k + 1,
                        sizeof(*inj->active) * (inj->nactive - k - 1));
                inj->nactive--;
                break;
            }
        }
    }
    pthread_mutex_unlock(&inj->lock);
}

void pykvm_inject_arm(struct pykvm_inject *inj, uint32_t i)
{
    pthread_mutex_lock(&inj->lock);
    if (i < inj->nrules)
        inj->rules[i].waiting = 0;
    pthread_mutex_unlock(&inj->lock);
}

int pykvm_inject_cut(struct pykvm_inject *inj, uint32_t i)
{
    int fired = 0;

    pthread_mutex_lock(&inj->lock);
    if (i < inj->nrules && !inj->cut && !inj->rules[i].removed &&
        inj->rules[i].r.action == PYKVM_INJ_POWER_CUT) {
        inj->rules[i].waiting = 0;
        inj->rules[i].fired++;
        inj->cut = (int32_t)i + 1;
        fired = 1;
    }
    pthread_mutex_unlock(&inj->lock);
    return fired;
}

void pykvm_inject_free(struct pykvm_inject *inj)
{
    if (!inj)
        return;
    pthread_mutex_destroy(&inj->lock);
    free(inj->rules);
    free(inj->active);
    free(inj);
}

/* With the lock held: QEMU's event processing. */
static void inj_event(struct pykvm_inject *inj, uint32_t event)
{
    int32_t new_state = inj->state;
    int injected = 0;

    if (event < PYKVM_INJ_EVENTS)
        inj->events[event]++;
    for (uint32_t i = 0; i < inj->nrules; i++) {
        struct inj_rule *x = &inj->rules[i];

        if (x->removed || x->r.event != event || (x->r.state && x->r.state != inj->state))
            continue;
        if (x->r.kind == PYKVM_INJ_RULE_SET_STATE) {
            new_state = x->r.new_state;
        } else if (x->r.kind == PYKVM_INJ_RULE_INJECT_ERROR) {
            int present = 0;

            if (!injected) {
                inj->nactive = 0;   /* the event's rules replace the active ones */
                injected = 1;
            }
            for (uint32_t k = 0; k < inj->nactive; k++)
                present |= inj->active[k] == i;
            if (!present) {
                memmove(inj->active + 1, inj->active, sizeof(*inj->active) * inj->nactive);
                inj->active[0] = i;
                inj->nactive++;
            }
        }
    }
    inj->state = new_state;
}

void pykvm_inject_event(struct pykvm_inject *inj, uint32_t event)
{
    pthread_mutex_lock(&inj->lock);
    inj_event(inj, event);
    pthread_mutex_unlock(&inj->lock);
}

static uint64_t inj_delay(struct inj_rule *x)
{
    const struct pykvm_inject_rule *r = &x->r;

    switch (r->dist) {
    case PYKVM_INJ_DELAY_UNIFORM:
        return r->delay_ns + (uint64_t)(inj_unit(&x->rng) * (double)(r->delay_max_ns - r->delay_ns));
    case PYKVM_INJ_DELAY_EXPONENTIAL: {
        double d = -log(1.0 - inj_unit(&x->rng)) * (double)r->delay_ns;

        return d > 3.6e12 ? 3600000000000ull : (uint64_t)d;  /* at most an hour */
    }
    default:
        return r->delay_ns;
    }
}

static void inj_fill(struct inj_rule *x, uint32_t i, struct pykvm_inject_hit *hit)
{
    hit->rule = (int32_t)i;
    hit->action = x->r.action;
    hit->value = x->r.value;
    hit->order = x->r.order;
    hit->timeout_ns = x->r.timeout_ns;
    hit->delay_ns = x->r.action == PYKVM_INJ_DELAY ? inj_delay(x) : 0;
    hit->seed = inj_next(&x->rng);
    hit->order_list = x->r.order_list;
    hit->order_n = x->r.order_n;
    hit->release_after = x->r.release_after;
}

int pykvm_inject_check(struct pykvm_inject *inj, uint32_t op, uint64_t offset, uint64_t length,
                       int32_t queue, uint32_t flags, struct pykvm_inject_hit *hit)
{
    int found = 0;

    hit->rule = -1;
    hit->action = PYKVM_INJ_NONE;
    pthread_mutex_lock(&inj->lock);
    if (inj->cut) {                     /* the power is off: nothing lands any more */
        inj_fill(&inj->rules[inj->cut - 1], (uint32_t)(inj->cut - 1), hit);
        pthread_mutex_unlock(&inj->lock);
        return 1;
    }
    if (flags & PYKVM_INJ_GUEST) {
        if (op == PYKVM_INJ_OP_READ)
            inj_event(inj, PYKVM_INJ_EV_READ_AIO);
        else if (op == PYKVM_INJ_OP_WRITE)
            inj_event(inj, PYKVM_INJ_EV_WRITE_AIO);
        else if (op == PYKVM_INJ_OP_FLUSH) {
            inj_event(inj, PYKVM_INJ_EV_FLUSH_TO_OS);
            inj_event(inj, PYKVM_INJ_EV_FLUSH_TO_DISK);
        }
    }
    /* QEMU's rule_check: the newest active rule the request matches */
    for (uint32_t k = 0; k < inj->nactive; k++) {
        uint32_t i = inj->active[k];
        struct inj_rule *x = &inj->rules[i];
        int64_t at = x->r.offset;

        if (!(x->r.ops & (1u << op)))
            continue;
        if (at != -1 && !(length && (uint64_t)at >= offset && (uint64_t)at < offset + length))
            continue;
        x->matched++;
        if (!x->r.value)
            break;  /* errno=0: the request goes through */
        x->fired++;
        inj_fill(x, i, hit);
        if (x->r.once) {
            x->removed = 1;
            memmove(inj->active + k, inj->active + k + 1,
                    sizeof(*inj->active) * (inj->nactive - k - 1));
            inj->nactive--;
        }
        found = 1;
        break;
    }
    for (uint32_t i = 0; !found && (flags & PYKVM_INJ_GUEST) && i < inj->nrules; i++) {
        struct inj_rule *x = &inj->rules[i];
        const struct pykvm_inject_rule *r = &x->r;
        uint64_t n;

        if (x->removed || x->waiting || r->kind != PYKVM_INJ_RULE_FAULT ||
            !(r->ops & (1u << op)) ||
            (r->state && r->state != inj->state) || (r->queue >= 0 && r->queue != queue))
            continue;
        if (r->offset >= 0) {
            uint64_t lo = (uint64_t)r->offset, hi = lo + r->length;

            /* overlap; a request without a range (flush) never matches a range */
            if (!length || offset >= hi || offset + length <= lo)
                continue;
        }
        n = ++x->matched;
        if (n <= r->after || (n - r->after) % (r->every ? r->every : 1))
            continue;
        if (r->times && x->fired >= r->times)
            continue;
        if (r->probability < 1.0 && inj_unit(&x->rng) >= r->probability)
            continue;
        x->fired++;
        inj_fill(x, i, hit);
        if (r->new_state)
            inj->state = r->new_state;
        if (r->action == PYKVM_INJ_POWER_CUT)
            inj->cut = (int32_t)i + 1;
        found = r->action != PYKVM_INJ_NONE;  /* pass: the request goes on */
    }
    pthread_mutex_unlock(&inj->lock);
    return found;
}

void pykvm_inject_release(struct pykvm_inject *inj)
{
    __atomic_add_fetch(&inj->release_gen, 1, __ATOMIC_ACQ_REL);
}

uint64_t pykvm_inject_release_gen(const struct pykvm_inject *inj)
{
    return __atomic_load_n(&inj->release_gen, __ATOMIC_ACQUIRE);
}

int32_t pykvm_inject_state(struct pykvm_inject *inj)
{
    int32_t s;

    pthread_mutex_lock(&inj->lock);
    s = inj->state;
    pthread_mutex_unlock(&inj->lock);
    return s;
}

void pykvm_inject_rule_counts(struct pykvm_inject *inj, uint32_t i, uint64_t *matched,
                              uint64_t *fired)
{
    pthread_mutex_lock(&inj->lock);
    *matched = i < inj->nrules ? inj->rules[i].matched : 0;
    *fired = i < inj->nrules ? inj->rules[i].fired : 0;
    pthread_mutex_unlock(&inj->lock);
}

uint64_t pykvm_inject_event_count(struct pykvm_inject *inj, uint32_t event)
{
    uint64_t n;

    pthread_mutex_lock(&inj->lock);
    n = event < PYKVM_INJ_EVENTS ? inj->events[event] : 0;
    pthread_mutex_unlock(&inj->lock);
    return n;
}

void pykvm_inject_flip_positions(uint64_t seed, uint32_t n, uint64_t nbytes, uint64_t *out)
{
    uint64_t s = seed, bits = nbytes * 8;

    for (uint32_t i = 0; i < n; i++)
        out[i] = bits ? inj_next(&s) % bits : 0;
}

void pykvm_inject_shuffle(uint64_t seed, uint32_t *idx, uint32_t n)
{
    uint64_t s = seed;

    for (uint32_t i = n; i > 1; i--) {
        uint32_t j = (uint32_t)(inj_next(&s) % i);
        uint32_t t = idx[i - 1];

        idx[i - 1] = idx[j];
        idx[j] = t;
    }
}
