/*
 * vq.c - the split virtqueue, device side: the C twin of SplitQueue
 * (pykvm/virtio/queue.py; the flow and the checks are in pykvm/virtio/README.md).
 *
 * Every guest value is hostile and checked once, where it is read; each
 * descriptor is copied out of guest memory once, and ring indices shared with
 * a running guest are read and written with single 16-bit accesses. Guest
 * addresses go through the region table passed to each call; nothing here
 * keeps a host pointer between calls.
 */
#include <endian.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>

enum pykvm_vq_check {
    PYKVM_VQ_QUEUE_SIZE = 1,
    PYKVM_VQ_AREA_ALIGNMENT = 2,
    PYKVM_VQ_AREA_OUTSIDE_RAM = 3,
    PYKVM_VQ_AVAIL_IDX = 4,
    PYKVM_VQ_HEAD_INDEX = 5,
    PYKVM_VQ_NEXT_INDEX = 6,
    PYKVM_VQ_CHAIN_TOO_LONG = 7,
    PYKVM_VQ_BUFFER_OVERFLOW = 8,
    PYKVM_VQ_BUFFER_OUTSIDE_RAM = 9,
    PYKVM_VQ_READABLE_AFTER_WRITABLE = 10,
    PYKVM_VQ_CHAIN_TOO_LARGE = 11,
    PYKVM_VQ_INDIRECT_NOT_NEGOTIATED = 12,
    PYKVM_VQ_INDIRECT_NESTED = 13,
    PYKVM_VQ_INDIRECT_WITH_NEXT = 14,
    PYKVM_VQ_INDIRECT_TABLE_SIZE = 15,
    PYKVM_VQ_INDIRECT_TABLE_OUTSIDE_RAM = 16
};

#define PYKVM_VQ_MAX_SIZE 32768
#define PYKVM_VQ_INDIRECT_MIN_ENTRIES 1024

#define VIRTQ_DESC_F_NEXT 1
#define VIRTQ_DESC_F_WRITE 2
#define VIRTQ_DESC_F_INDIRECT 4
#define VIRTQ_AVAIL_F_NO_INTERRUPT 1
#define VIRTQ_USED_F_NO_NOTIFY 1
#define VQ_DESC_SIZE 16
/* One byte less than the 2^32 that 2.7.5.2 allows, so that the used
 * element's le32 len can always say how much was written. */
#define VQ_MAX_CHAIN_BYTES 0xFFFFFFFFull

struct pykvm_vq_mem {
    const struct pykvm_mem_region *regions;
    uint32_t nregions;
};

struct pykvm_vq_error {
    int check;
    char message[256];
};

struct pykvm_vq_seg {
    uint64_t gpa;
    uint64_t hva;
    uint32_t len;
    uint32_t writable;
};

struct pykvm_vq_chain {
    uint16_t head;
    uint32_t nreadable;
    uint32_t nsegs;
    uint64_t readable_len;
    uint64_t writable_len;
    uint32_t cap;
    struct pykvm_vq_seg *segs;
};

struct pykvm_vq {
    uint32_t index;
    uint32_t max_size;
    uint32_t size;
    uint64_t desc_table;
    uint64_t avail_ring;
    uint64_t used_ring;
    uint8_t ready;
    uint8_t event_idx;
    uint8_t indirect;
    uint8_t active;
    uint16_t last_avail_idx;
    uint16_t used_idx;
    int32_t in_flight;
    uint64_t inflight;
    uint64_t inflight_counter;
    /* private: the validated configuration (activate) and notification state */
    uint16_t pending;           /* entries known available past last_avail_idx */
    uint16_t signalled_used;    /* used_idx when needs_notification last ran */
    uint32_t qsize;
    uint32_t mask;
    uint32_t max_indirect;
    uint64_t desc;
    uint64_t avail;
    uint64_t used;
};

/* vhost-user's inflight region of a split queue (vhost-user.rst, "Inflight
 * I/O tracking"): shared with the front-end, which keeps it across our
 * restarts so that requests in flight at a crash can be served again. */
struct vq_inflight_desc {
    uint8_t inflight;           /* popped and not yet returned (head only) */
    uint8_t padding[5];
    uint16_t next;              /* the last used batch, as a list */
    uint64_t counter;           /* fetch order */
};

struct vq_inflight {
    uint64_t features;
    uint16_t version;
    uint16_t desc_num;
    uint16_t last_batch_head;
    uint16_t used_idx;          /* used->idx as of the last finished add_used */
    struct vq_inflight_desc desc[];
};

/* A descriptor as the guest lays it out (little-endian). */
struct vq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

static const char *const vq_check_names[] = {
    [PYKVM_VQ_QUEUE_SIZE] = "queue-size",
    [PYKVM_VQ_AREA_ALIGNMENT] = "area-alignment",
    [PYKVM_VQ_AREA_OUTSIDE_RAM] = "area-outside-ram",
    [PYKVM_VQ_AVAIL_IDX] = "avail-idx",
    [PYKVM_VQ_HEAD_INDEX] = "head-index",
    [PYKVM_VQ_NEXT_INDEX] = "next-index",
    [PYKVM_VQ_CHAIN_TOO_LONG] = "chain-too-long",
    [PYKVM_VQ_BUFFER_OVERFLOW] = "buffer-overflow",
    [PYKVM_VQ_BUFFER_OUTSIDE_RAM] = "buffer-outside-ram",
    [PYKVM_VQ_READABLE_AFTER_WRITABLE] = "readable-after-writable",
    [PYKVM_VQ_CHAIN_TOO_LARGE] = "chain-too-large",
    [PYKVM_VQ_INDIRECT_NOT_NEGOTIATED] = "indirect-not-negotiated",
    [PYKVM_VQ_INDIRECT_NESTED] = "indirect-nested",
    [PYKVM_VQ_INDIRECT_WITH_NEXT] = "indirect-with-next",
    [PYKVM_VQ_INDIRECT_TABLE_SIZE] = "indirect-table-size",
    [PYKVM_VQ_INDIRECT_TABLE_OUTSIDE_RAM] = "indirect-table-outside-ram",
};

static const char *pykvm_vq_check_name(int check)
{
    if (check <= 0 || check >= (int)(sizeof(vq_check_names) / sizeof(vq_check_names[0])))
        return "";
    return vq_check_names[check];
}

static int vq_fail(struct pykvm_vq_error *err, uint32_t queue, int check, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Fill *err as QueueError(queue, check, detail) would print; return -1. */
static int vq_fail(struct pykvm_vq_error *err, uint32_t queue, int check, const char *fmt, ...)
{
    va_list ap;
    int n;

    if (!err)
        return -1;
    err->check = check;
    n = snprintf(err->message, sizeof(err->message), "virtqueue %" PRIu32 ": %s: ", queue,
                 pykvm_vq_check_name(check));
    if (n < 0 || (size_t)n >= sizeof(err->message))
        return -1;
    va_start(ap, fmt);
    vsnprintf(err->message + n, sizeof(err->message) - n, fmt, ap);
    va_end(ap);
    return -1;
}

/* a + b in hex as Python prints it ({:#x}), past 2^64 included. */
static const char *vq_hex_sum(char buf[40], uint64_t a, uint64_t b)
{
    uint64_t lo = a + b;

    if (lo < a)
        snprintf(buf, 40, "0x1%016" PRIx64, lo);
    else
        snprintf(buf, 40, "0x%" PRIx64, lo);
    return buf;
}

/*
 * Host address of [gpa, gpa+len), or 0 unless the range lies wholly inside
 * one region. A zero-length range is valid anywhere inside a region and at
 * its end: the rule of GuestMemory.contains, which pykvm_gpa_to_hva (no
 * empty range at a region's end) does not follow.
 */
static uint64_t vq_hva(const struct pykvm_vq_mem *mem, uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < mem->nregions; i++) {
        const struct pykvm_mem_region *r = &mem->regions[i];
        uint64_t off;

        if (gpa < r->gpa)
            continue;
        off = gpa - r->gpa;
        if (off > r->size || (off == r->size && len))
            continue;
        /* written so that no sum can overflow: off <= r->size */
        if (len > r->size - off)
            return 0;
        return r->hva + off;
    }
    return 0;
}

/* Checks of a range that may be empty, where no host address is needed. */
static int vq_contains(const struct pykvm_vq_mem *mem, uint64_t gpa, uint64_t len)
{
    return vq_hva(mem, gpa, len) != 0;
}

static inline uint16_t vq_load_u16(uint64_t hva)
{
    return le16toh(__atomic_load_n((const uint16_t *)(uintptr_t)hva, __ATOMIC_RELAXED));
}

static inline void vq_store_u16(uint64_t hva, uint16_t value)
{
    __atomic_store_n((uint16_t *)(uintptr_t)hva, htole16(value), __ATOMIC_RELAXED);
}

/* Copy one descriptor out of guest memory, once: the compiler may not read
 * the guest's copy again (the asm claims to change the local copy). */
static inline void vq_load_desc(uint64_t hva, struct vq_desc *d)
{
    memcpy(d, (const void *)(uintptr_t)hva, sizeof(*d));
    __asm__ volatile("" : "+m"(*d));
    d->addr = le64toh(d->addr);
    d->len = le32toh(d->len);
    d->flags = le16toh(d->flags);
    d->next = le16toh(d->next);
}

static void vq_start(struct pykvm_vq *vq, uint16_t last_avail_idx, uint16_t used_idx)
{
    vq->last_avail_idx = last_avail_idx;
    vq->used_idx = used_idx;
    vq->in_flight = 0;
    vq->pending = 0;
    vq->signalled_used = used_idx;
}

static void pykvm_vq_reset(struct pykvm_vq *vq)
{
    vq->size = vq->max_size;
    vq->desc_table = vq->avail_ring = vq->used_ring = 0;
    vq->ready = vq->event_idx = vq->indirect = 0;
    vq->active = 0;
    vq->inflight = vq->inflight_counter = 0;
    vq_start(vq, 0, 0);
}

static int pykvm_vq_init(struct pykvm_vq *vq, uint32_t index, uint32_t max_size)
{
    if (!max_size || max_size > PYKVM_VQ_MAX_SIZE || (max_size & (max_size - 1)))
        return -1;
    memset(vq, 0, sizeof(*vq));
    vq->index = index;
    vq->max_size = max_size;
    pykvm_vq_reset(vq);
    return 0;
}

static uint32_t pykvm_vq_chain_capacity(const struct pykvm_vq *vq)
{
    uint32_t size = vq->active ? vq->qsize : vq->max_size;
    /* at most size direct descriptors, one of them pointing to a table */
    return size + (size > PYKVM_VQ_INDIRECT_MIN_ENTRIES ? size : PYKVM_VQ_INDIRECT_MIN_ENTRIES);
}

static int pykvm_vq_activate(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem,
                             uint16_t last_avail_idx, uint16_t used_idx,
                             struct pykvm_vq_error *err)
{
    uint32_t size = vq->size;
    const struct {
        const char *name;
        uint64_t gpa, align, length;
    } areas[3] = {
        {"desc_table", vq->desc_table, 16, (uint64_t)VQ_DESC_SIZE * size},
        {"avail_ring", vq->avail_ring, 2, 6 + 2 * (uint64_t)size},
        {"used_ring", vq->used_ring, 4, 6 + 8 * (uint64_t)size},
    };

    if (!size || size > vq->max_size || (size & (size - 1)))
        return vq_fail(err, vq->index, PYKVM_VQ_QUEUE_SIZE,
                       "size %" PRIu32 " is not a power of 2 in [1, %" PRIu32 "]", size,
                       vq->max_size);
    for (int i = 0; i < 3; i++) {
        char end[40];

        if (areas[i].gpa % areas[i].align)
            return vq_fail(err, vq->index, PYKVM_VQ_AREA_ALIGNMENT,
                           "%s 0x%" PRIx64 " is not %" PRIu64 "-byte aligned", areas[i].name,
                           areas[i].gpa, areas[i].align);
        if (!vq_contains(mem, areas[i].gpa, areas[i].length))
            return vq_fail(err, vq->index, PYKVM_VQ_AREA_OUTSIDE_RAM,
                           "%s [0x%" PRIx64 ", %s) is not inside guest RAM", areas[i].name,
                           areas[i].gpa, vq_hex_sum(end, areas[i].gpa, areas[i].length));
    }
    vq->qsize = size;
    vq->mask = size - 1;
    vq->desc = vq->desc_table;
    vq->avail = vq->avail_ring;
    vq->used = vq->used_ring;
    vq->max_indirect = size > PYKVM_VQ_INDIRECT_MIN_ENTRIES ? size : PYKVM_VQ_INDIRECT_MIN_ENTRIES;
    vq_start(vq, last_avail_idx, used_idx);
    vq->active = 1;
    return 0;
}

/* -- driver -> device ------------------------------------------------------- */

/* Read avail->idx (one 16-bit load: the driver may be storing it right now);
 * return how many entries it is ahead of last_avail_idx, or -1. Checks: at
 * most size ahead (16-bit). */
static int vq_avail_ahead(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem,
                          struct pykvm_vq_error *err)
{
    uint64_t avail = vq_hva(mem, vq->avail, 4);
    uint16_t idx, ahead;

    if (!avail)
        return vq_fail(err, vq->index, PYKVM_VQ_AREA_OUTSIDE_RAM, "avail_ring moved out of RAM");
    idx = vq_load_u16(avail + 2);
    ahead = (uint16_t)(idx - vq->last_avail_idx);
    if (ahead > vq->qsize)
        return vq_fail(err, vq->index, PYKVM_VQ_AVAIL_IDX,
                       "avail->idx %u is %u ahead of last_avail_idx %u, more than the queue "
                       "size %" PRIu32, idx, ahead, vq->last_avail_idx, vq->qsize);
    return ahead;
}

static int vq_desc_fail(struct pykvm_vq *vq, struct pykvm_vq_error *err, uint16_t head,
                        uint32_t i, int in_table, uint64_t table_gpa, int check,
                        const char *detail)
{
    if (in_table)
        return vq_fail(err, vq->index, check,
                       "chain %u, indirect descriptor %" PRIu32 " of table 0x%" PRIx64 ": %s",
                       head, i, table_gpa, detail);
    return vq_fail(err, vq->index, check, "chain %u, descriptor %" PRIu32 ": %s", head, i, detail);
}

/* Read the chain starting at descriptor head (already < size), with the
 * checks of SplitQueue._walk and _check_indirect, in the same order. */
static int vq_walk(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem, uint16_t head,
                   struct pykvm_vq_chain *chain, struct pykvm_vq_error *err)
{
    uint64_t table = vq_hva(mem, vq->desc, (uint64_t)VQ_DESC_SIZE * vq->qsize);
    uint32_t entries = vq->qsize;
    int in_table = 0;          /* walking an indirect table */
    uint64_t table_gpa = 0;    /* its gpa */
    uint64_t total = 0;
    uint32_t count = 0, nwritable = 0;
    uint32_t i = head;
    char detail[200], end[40];

    chain->head = head;
    chain->nreadable = chain->nsegs = 0;
    chain->readable_len = chain->writable_len = 0;
    if (!table)
        return vq_fail(err, vq->index, PYKVM_VQ_AREA_OUTSIDE_RAM, "desc_table moved out of RAM");
    for (;;) {
        struct vq_desc d;
        uint64_t hva;

        vq_load_desc(table + (uint64_t)VQ_DESC_SIZE * i, &d);
        count++;
        if (d.flags & VIRTQ_DESC_F_INDIRECT) {
            uint32_t n;

            if (in_table)
                return vq_desc_fail(vq, err, head, i, 1, table_gpa, PYKVM_VQ_INDIRECT_NESTED,
                                    "INDIRECT set inside an indirect table");
            if (!vq->indirect)
                return vq_desc_fail(vq, err, head, i, 0, 0, PYKVM_VQ_INDIRECT_NOT_NEGOTIATED,
                                    "INDIRECT set but VIRTIO_F_INDIRECT_DESC was not negotiated");
            if (d.flags & VIRTQ_DESC_F_NEXT) {
                snprintf(detail, sizeof(detail), "flags 0x%x set both INDIRECT and NEXT",
                         d.flags);
                return vq_desc_fail(vq, err, head, i, 0, 0, PYKVM_VQ_INDIRECT_WITH_NEXT, detail);
            }
            n = d.len / VQ_DESC_SIZE;
            if (!d.len || d.len % VQ_DESC_SIZE || n > vq->max_indirect) {
                snprintf(detail, sizeof(detail),
                         "table length %" PRIu32 " is not a non-zero multiple of %d of at most "
                         "%" PRIu32 " entries", d.len, VQ_DESC_SIZE, vq->max_indirect);
                return vq_desc_fail(vq, err, head, i, 0, 0, PYKVM_VQ_INDIRECT_TABLE_SIZE, detail);
            }
            hva = vq_hva(mem, d.addr, d.len);
            if (!hva) {
                snprintf(detail, sizeof(detail),
                         "table [0x%" PRIx64 ", %s) is not inside guest RAM", d.addr,
                         vq_hex_sum(end, d.addr, d.len));
                return vq_desc_fail(vq, err, head, i, 0, 0, PYKVM_VQ_INDIRECT_TABLE_OUTSIDE_RAM,
                                    detail);
            }
            table = hva;
            entries = n;
            in_table = 1;
            table_gpa = d.addr;
            count = 0;
            i = 0;
            continue;
        }
        if (d.len > UINT64_MAX - d.addr) {
            snprintf(detail, sizeof(detail), "addr 0x%" PRIx64 " + len 0x%" PRIx32
                     " passes 2^64", d.addr, d.len);
            return vq_desc_fail(vq, err, head, i, in_table, table_gpa, PYKVM_VQ_BUFFER_OVERFLOW,
                                detail);
        }
        hva = vq_hva(mem, d.addr, d.len);
        if (!hva) {
            snprintf(detail, sizeof(detail),
                     "buffer [0x%" PRIx64 ", 0x%" PRIx64 ") is not inside guest RAM", d.addr,
                     d.addr + d.len);
            return vq_desc_fail(vq, err, head, i, in_table, table_gpa,
                                PYKVM_VQ_BUFFER_OUTSIDE_RAM, detail);
        }
        if (d.flags & VIRTQ_DESC_F_WRITE) {
            nwritable++;
            chain->writable_len += d.len;
        } else if (nwritable) {
            snprintf(detail, sizeof(detail),
                     "device-readable buffer 0x%" PRIx64 " follows %" PRIu32
                     " device-writable one(s)", d.addr, nwritable);
            return vq_desc_fail(vq, err, head, i, in_table, table_gpa,
                                PYKVM_VQ_READABLE_AFTER_WRITABLE, detail);
        } else {
            chain->nreadable++;
            chain->readable_len += d.len;
        }
        /* cap covers the longest chain the checks let through; never more */
        if (chain->nsegs < chain->cap) {
            struct pykvm_vq_seg *s = &chain->segs[chain->nsegs];

            s->gpa = d.addr;
            s->hva = hva;
            s->len = d.len;
            s->writable = !!(d.flags & VIRTQ_DESC_F_WRITE);
        }
        chain->nsegs++;
        total += d.len;
        if (total > VQ_MAX_CHAIN_BYTES) {
            snprintf(detail, sizeof(detail), "chain carries %" PRIu64 " bytes, more than %llu",
                     total, VQ_MAX_CHAIN_BYTES);
            return vq_desc_fail(vq, err, head, i, in_table, table_gpa, PYKVM_VQ_CHAIN_TOO_LARGE,
                                detail);
        }
        if (!(d.flags & VIRTQ_DESC_F_NEXT))
            break;
        if (count >= entries) {
            snprintf(detail, sizeof(detail), "chain has more than %" PRIu32
                     " descriptors (a loop?)", entries);
            return vq_desc_fail(vq, err, head, i, in_table, table_gpa, PYKVM_VQ_CHAIN_TOO_LONG,
                                detail);
        }
        if (d.next >= entries) {
            snprintf(detail, sizeof(detail), "next %u is not below the table's %" PRIu32
                     " entries", d.next, entries);
            return vq_desc_fail(vq, err, head, i, in_table, table_gpa, PYKVM_VQ_NEXT_INDEX,
                                detail);
        }
        i = d.next;
    }
    if (chain->nsegs > chain->cap)  /* a caller's bug, not the guest's */
        return vq_fail(err, vq->index, PYKVM_VQ_CHAIN_TOO_LONG,
                       "chain %u: %" PRIu32 " buffers, more than the %" PRIu32 " provided for",
                       head, chain->nsegs, chain->cap);
    return 0;
}

static int pykvm_vq_pop(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem,
                        struct pykvm_vq_chain *chain, struct pykvm_vq_error *err)
{
    uint64_t avail;
    uint16_t last, head;

    if (!vq->active)
        return 0;
    if (!vq->pending) {
        int ahead = vq_avail_ahead(vq, mem, err);

        if (ahead < 0)
            return -1;
        vq->pending = (uint16_t)ahead;
        if (!vq->pending)
            return 0;
        /* Read barrier: the ring entry and the descriptors are loaded after
         * avail->idx. Pairs with the driver's write barrier between filling
         * the ring and storing avail->idx (2.7.13.3.1). x86 keeps load-load
         * order, so no instruction is needed. */
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
    }
    avail = vq_hva(mem, vq->avail, 4 + 2 * (uint64_t)vq->qsize);
    if (!avail)
        return vq_fail(err, vq->index, PYKVM_VQ_AREA_OUTSIDE_RAM, "avail_ring moved out of RAM");
    last = vq->last_avail_idx;
    head = vq_load_u16(avail + 4 + 2 * (uint64_t)(last & vq->mask));
    if (head >= vq->qsize)
        return vq_fail(err, vq->index, PYKVM_VQ_HEAD_INDEX,
                       "avail ring entry %" PRIu32 " holds head %u, not below the queue size "
                       "%" PRIu32, (uint32_t)(last & vq->mask), head, vq->qsize);
    if (vq_walk(vq, mem, head, chain, err) < 0)
        return -1;
    if (vq->inflight) {
        struct vq_inflight *r = (struct vq_inflight *)(uintptr_t)vq->inflight;

        r->desc[head].counter = vq->inflight_counter++;
        /* Write barrier: the counter is stored before the flag that makes the
         * entry count; pairs with the reader at reconnect (a new process). */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        r->desc[head].inflight = 1;
    }
    vq->pending--;
    vq->last_avail_idx = (uint16_t)(last + 1);
    vq->in_flight++;
    return 1;
}

static int pykvm_vq_resubmit(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem, uint16_t head,
                             struct pykvm_vq_chain *chain, struct pykvm_vq_error *err)
{
    if (!vq->active)
        return vq_fail(err, vq->index, PYKVM_VQ_QUEUE_SIZE, "resubmit on an inactive queue");
    if (head >= vq->qsize)
        return vq_fail(err, vq->index, PYKVM_VQ_HEAD_INDEX,
                       "inflight entry holds head %u, not below the queue size %" PRIu32,
                       head, vq->qsize);
    if (vq_walk(vq, mem, head, chain, err) < 0)
        return -1;
    vq->in_flight++;
    return 0;
}

static int pykvm_vq_has_pending(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem,
                                struct pykvm_vq_error *err)
{
    if (!vq->active)
        return 0;
    if (!vq->pending) {
        int ahead = vq_avail_ahead(vq, mem, err);

        if (ahead < 0)
            return -1;
        vq->pending = (uint16_t)ahead;
    }
    return vq->pending > 0;
}

/* -- device -> driver ------------------------------------------------------- */

static void pykvm_vq_add_used(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem, uint16_t head,
                              uint32_t len)
{
    uint64_t used = vq_hva(mem, vq->used, 4 + 8 * (uint64_t)vq->qsize);
    uint16_t idx = vq->used_idx;
    uint32_t *elem;

    if (!used)
        return;  /* validated at activate: only a changed region table gets here */
    if (vq->inflight) {  /* head is in the last batch, until used_idx says done */
        struct vq_inflight *r = (struct vq_inflight *)(uintptr_t)vq->inflight;

        r->desc[head].next = r->last_batch_head;
        r->last_batch_head = head;
    }
    elem = (uint32_t *)(uintptr_t)(used + 4 + 8 * (uint64_t)(idx & vq->mask));
    elem[0] = htole32(head);
    elem[1] = htole32(len);
    /* Write barrier: the used element is stored before used->idx. Pairs with
     * the driver's read barrier between loading used->idx and the element
     * (2.7.8.2: "The device MUST set len prior to updating the used idx").
     * x86 keeps store-store order, so no instruction is needed. */
    __atomic_thread_fence(__ATOMIC_RELEASE);
    idx = (uint16_t)(idx + 1);
    vq_store_u16(used + 2, idx);  /* one store: the driver polls it */
    vq->used_idx = idx;
    vq->in_flight--;
    if (vq->inflight) {
        struct vq_inflight *r = (struct vq_inflight *)(uintptr_t)vq->inflight;

        r->desc[head].inflight = 0;
        /* Write barrier: the flag is cleared before used_idx records the
         * batch as finished; a reader that finds used_idx behind used->idx
         * clears the last batch's flags itself. */
        __atomic_thread_fence(__ATOMIC_RELEASE);
        r->used_idx = idx;
    }
}

static int pykvm_vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old);
}

static int pykvm_vq_needs_notification(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem)
{
    uint16_t new_idx = vq->used_idx, old = vq->signalled_used;
    uint64_t avail;

    if (new_idx == old)
        return 0;
    vq->signalled_used = new_idx;
    /* Full barrier: used->idx (stored by add_used) before used_event or
     * avail->flags is loaded. Pairs with the driver's barrier between storing
     * used_event (or flags) and re-reading used->idx (2.7.14, the note). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    avail = vq_hva(mem, vq->avail, 6 + 2 * (uint64_t)vq->qsize);
    if (!avail)
        return 1;  /* validated at activate; when in doubt, interrupt */
    if (vq->event_idx) {
        uint16_t used_event = vq_load_u16(avail + 4 + 2 * (uint64_t)vq->qsize);

        return pykvm_vring_need_event(used_event, new_idx, old);
    }
    return !(vq_load_u16(avail) & VIRTQ_AVAIL_F_NO_INTERRUPT);
}

static int pykvm_vq_set_notification(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem,
                                     int enable, struct pykvm_vq_error *err)
{
    uint64_t used;

    if (!vq->active)
        return 0;
    used = vq_hva(mem, vq->used, 6 + 8 * (uint64_t)vq->qsize);
    if (!used)
        return vq_fail(err, vq->index, PYKVM_VQ_AREA_OUTSIDE_RAM, "used_ring moved out of RAM");
    if (vq->event_idx) {
        if (!enable)
            return 0;
        vq_store_u16(used + 4 + 8 * (uint64_t)vq->qsize, vq->last_avail_idx);
    } else {
        vq_store_u16(used, enable ? 0 : VIRTQ_USED_F_NO_NOTIFY);
        if (!enable)
            return 0;
    }
    /* Full barrier: avail_event (or used->flags) is stored before avail->idx
     * is re-loaded. Pairs with the driver's barrier between storing
     * avail->idx and reading used->flags / avail_event (2.7.13.4.1). */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return pykvm_vq_has_pending(vq, mem, err);
}
