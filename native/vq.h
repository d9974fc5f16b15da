/*
 * vq.h - the split virtqueue, device side, in C: the twin of SplitQueue
 * (pykvm/virtio/queue.py). Same steps, same checks, same check names, same
 * one-line messages; pykvm/virtio/README.md lists the checks.
 *
 * Guest memory is an argument of every operation (a region table), never
 * kept in the queue; guest addresses are translated through that table only.
 * The functions return -1 on a failed check and fill a pykvm_vq_error whose
 * message is the str() of the QueueError Python would raise.
 */

/* The checks, as error codes (pykvm_vq_check_name gives the Python name). */
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

/* Guest memory as a queue operation sees it. */
struct pykvm_vq_mem {
    const struct pykvm_mem_region *regions;
    uint32_t nregions;
};

struct pykvm_vq_error {
    int check;              /* enum pykvm_vq_check, 0 when none */
    char message[256];      /* "virtqueue Q: check: detail", one line */
};

/* One buffer of a chain, checked: [gpa, gpa+len) lies wholly inside one
 * region, hva is where it is mapped. */
struct pykvm_vq_seg {
    uint64_t gpa;
    uint64_t hva;
    uint32_t len;
    uint32_t writable;
};

/* A popped chain: segs[0, nreadable) device-readable, then device-writable
 * up to nsegs. The caller provides segs with room for
 * pykvm_vq_chain_capacity(vq) entries. */
struct pykvm_vq_chain {
    uint16_t head;
    uint32_t nreadable;
    uint32_t nsegs;
    uint64_t readable_len;
    uint64_t writable_len;
    uint32_t cap;
    struct pykvm_vq_seg *segs;
};

/* The queue: the transport fills the configuration fields (as it sets
 * SplitQueue's attributes), then pykvm_vq_activate validates them once. */
struct pykvm_vq {
    uint32_t index;
    uint32_t max_size;
    /* configuration, as the driver wrote it */
    uint32_t size;
    uint64_t desc_table;
    uint64_t avail_ring;
    uint64_t used_ring;
    uint8_t ready;
    uint8_t event_idx;
    uint8_t indirect;
    /* state */
    uint8_t active;
    uint16_t last_avail_idx;    /* next avail ring entry to pop (16-bit) */
    uint16_t used_idx;          /* the device's shadow of used->idx (16-bit) */
    int32_t in_flight;          /* popped, not yet add_used (informational) */
    /* vhost-user inflight tracking: the host address of this queue's
     * QueueRegionSplit (0: none), checked by the caller to hold at least
     * size descriptor states, and the next fetch counter to record */
    uint64_t inflight;
    uint64_t inflight_counter;
    ...;
};

/* max_size a power of 2 in [1, 32768]; 0, or -1 when it is not. */
int pykvm_vq_init(struct pykvm_vq *vq, uint32_t index, uint32_t max_size);
void pykvm_vq_reset(struct pykvm_vq *vq);
int pykvm_vq_activate(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem,
                      uint16_t last_avail_idx, uint16_t used_idx, struct pykvm_vq_error *err);
uint32_t pykvm_vq_chain_capacity(const struct pykvm_vq *vq);

/* 1: a chain was popped into *chain; 0: the ring is empty; -1: *err. */
int pykvm_vq_pop(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem,
                 struct pykvm_vq_chain *chain, struct pykvm_vq_error *err);
/* 0: the chain at head (recorded as in flight by an earlier back-end
 * process) is in *chain, last_avail_idx untouched; -1: *err. */
int pykvm_vq_resubmit(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem, uint16_t head,
                      struct pykvm_vq_chain *chain, struct pykvm_vq_error *err);
/* 1 / 0 / -1, as SplitQueue.has_pending (same avail-idx check). */
int pykvm_vq_has_pending(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem,
                         struct pykvm_vq_error *err);
void pykvm_vq_add_used(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem, uint16_t head,
                       uint32_t len);
/* 1 when a used buffer notification is due, else 0. */
int pykvm_vq_needs_notification(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem);
/* 1: chains arrived meanwhile, pop again; 0; -1: *err (the re-check failed). */
int pykvm_vq_set_notification(struct pykvm_vq *vq, const struct pykvm_vq_mem *mem, int enable,
                              struct pykvm_vq_error *err);

int pykvm_vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old);
const char *pykvm_vq_check_name(int check);
