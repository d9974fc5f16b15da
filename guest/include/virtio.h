/*
 * virtio.h - a virtio 1.x (modern only, no legacy) driver library for the
 * test guests: transports virtio-MMIO (version 2) and virtio-PCI (modern),
 * split virtqueues, and a virtio-blk request layer built for many requests
 * in flight with polling at CPL 3.
 *
 * Discovery
 *   MMIO  from the command line: `virtio_mmio.device=<size>@<base>:<irq>`
 *         (size decimal or 0x-hex with an optional K/M/G suffix, base 0x-hex
 *         or decimal, irq decimal; the word may repeat, one per device, in
 *         command-line order).  A window must read magic 0x74726976 and
 *         version 2 (version 1 = legacy is refused); device id 0 is skipped.
 *   PCI   bus 0, devices 0..31, functions 0..7, mechanism #1; vendor 0x1af4,
 *         device 0x1040 + virtio id (block: 0x1042).  The vendor capabilities
 *         give common (1), notify (2), ISR (3) and device (4) config; their
 *         BARs are mapped with pci_bar_map() (unassigned or >4 GiB BARs are
 *         moved to 0xe0000000.., see pci.h); memory decoding and bus
 *         mastering are enabled and INTx is disabled.
 *   transport ANY = every MMIO device first (command-line order), then PCI.
 *
 * Hot path (inline below, all at CPL 3): descriptors and the avail ring are
 * written with plain stores (x86 keeps stores in order; a compiler barrier
 * orders them against the avail idx store); after publishing avail->idx a
 * full barrier (mfence) precedes the read of avail_event / used->flags (the
 * one store->load order the spec needs); the queue-notify register is written
 * only when the device asks for it (EVENT_IDX avail_event, else the
 * NO_NOTIFY flag) and at most once per batch.  Completions are found by
 * reading used->idx (no exit).  When polling, the device is told not to
 * interrupt (avail flag NO_INTERRUPT, or with EVENT_IDX a used_event kept
 * half the index space ahead), so the VMM does not even signal an irqfd.
 */
#ifndef VIRTIO_H
#define VIRTIO_H

#include "guest.h"

/* ---- virtio ABI (spec 1.2) ------------------------------------------------ */

#define VIRTIO_ID_BLOCK 2

#define VIRTIO_STATUS_ACKNOWLEDGE   0x01
#define VIRTIO_STATUS_DRIVER        0x02
#define VIRTIO_STATUS_DRIVER_OK     0x04
#define VIRTIO_STATUS_FEATURES_OK   0x08
#define VIRTIO_STATUS_NEEDS_RESET   0x40
#define VIRTIO_STATUS_FAILED        0x80

#define VIRTIO_F_INDIRECT_DESC      28
#define VIRTIO_F_EVENT_IDX          29
#define VIRTIO_F_VERSION_1          32
#define VIRTIO_F_ACCESS_PLATFORM    33
#define VIRTIO_F_RING_PACKED        34

#define VIRTQ_DESC_F_NEXT           1
#define VIRTQ_DESC_F_WRITE          2
#define VIRTQ_DESC_F_INDIRECT       4
#define VIRTQ_AVAIL_F_NO_INTERRUPT  1
#define VIRTQ_USED_F_NO_NOTIFY      1

struct virtq_desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct virtq_avail {
    uint16_t flags;
    uint16_t idx;
    uint16_t ring[];                    /* size entries, then used_event */
};

struct virtq_used_elem {
    uint32_t id;
    uint32_t len;
};

struct virtq_used {
    uint16_t flags;
    uint16_t idx;
    struct virtq_used_elem ring[];      /* size entries, then avail_event */
};

/* virtio-MMIO registers (spec 4.2.2) */
#define VIRTIO_MMIO_MAGIC           0x000   /* 0x74726976 "virt" */
#define VIRTIO_MMIO_VERSION         0x004
#define VIRTIO_MMIO_DEVICE_ID       0x008
#define VIRTIO_MMIO_VENDOR_ID       0x00c
#define VIRTIO_MMIO_DEV_FEATURES    0x010
#define VIRTIO_MMIO_DEV_FEATURES_SEL 0x014
#define VIRTIO_MMIO_DRV_FEATURES    0x020
#define VIRTIO_MMIO_DRV_FEATURES_SEL 0x024
#define VIRTIO_MMIO_QUEUE_SEL       0x030
#define VIRTIO_MMIO_QUEUE_NUM_MAX   0x034
#define VIRTIO_MMIO_QUEUE_NUM       0x038
#define VIRTIO_MMIO_QUEUE_READY     0x044
#define VIRTIO_MMIO_QUEUE_NOTIFY    0x050
#define VIRTIO_MMIO_INT_STATUS      0x060
#define VIRTIO_MMIO_INT_ACK         0x064
#define VIRTIO_MMIO_STATUS          0x070
#define VIRTIO_MMIO_QUEUE_DESC_LO   0x080
#define VIRTIO_MMIO_QUEUE_DESC_HI   0x084
#define VIRTIO_MMIO_QUEUE_DRIVER_LO 0x090
#define VIRTIO_MMIO_QUEUE_DRIVER_HI 0x094
#define VIRTIO_MMIO_QUEUE_DEVICE_LO 0x0a0
#define VIRTIO_MMIO_QUEUE_DEVICE_HI 0x0a4
#define VIRTIO_MMIO_CONFIG_GEN      0x0fc
#define VIRTIO_MMIO_CONFIG          0x100
#define VIRTIO_MMIO_MAGIC_VALUE     0x74726976u

/* virtio-PCI common configuration (struct virtio_pci_common_cfg) */
#define VIRTIO_PCI_DEV_FEATURE_SEL  0x00
#define VIRTIO_PCI_DEV_FEATURE      0x04
#define VIRTIO_PCI_DRV_FEATURE_SEL  0x08
#define VIRTIO_PCI_DRV_FEATURE      0x0c
#define VIRTIO_PCI_CONFIG_MSIX      0x10
#define VIRTIO_PCI_NUM_QUEUES       0x12
#define VIRTIO_PCI_STATUS           0x14
#define VIRTIO_PCI_CONFIG_GEN       0x15
#define VIRTIO_PCI_QUEUE_SEL        0x16
#define VIRTIO_PCI_QUEUE_SIZE       0x18
#define VIRTIO_PCI_QUEUE_MSIX       0x1a
#define VIRTIO_PCI_QUEUE_ENABLE     0x1c
#define VIRTIO_PCI_QUEUE_NOTIFY_OFF 0x1e
#define VIRTIO_PCI_QUEUE_DESC       0x20
#define VIRTIO_PCI_QUEUE_DRIVER     0x28
#define VIRTIO_PCI_QUEUE_DEVICE     0x30
#define VIRTIO_PCI_CAP_COMMON       1
#define VIRTIO_PCI_CAP_NOTIFY       2
#define VIRTIO_PCI_CAP_ISR          3
#define VIRTIO_PCI_CAP_DEVICE       4
#define VIRTIO_MSI_NO_VECTOR        0xffff

/* ---- devices and transports ------------------------------------------------ */

enum virtio_transport {
    VIRTIO_ANY = 0,
    VIRTIO_MMIO = 1,
    VIRTIO_PCI = 2,
};

const char *virtio_transport_name(int transport);   /* "mmio", "pci", "any" */

struct virtio_dev {
    int transport;                      /* VIRTIO_MMIO or VIRTIO_PCI */
    uint32_t device_id;
    /* MMIO */
    uintptr_t mmio;                     /* register window */
    uint64_t mmio_size;
    uint32_t gsi;                       /* interrupt line from the command line */
    /* PCI */
    uint32_t bdf;
    uintptr_t common, isr, devcfg, notify;
    uint32_t notify_mult, devcfg_len;
    unsigned msix_cap;                  /* config offset of the MSI-X capability, 0 = none */
    unsigned msix_entries;
    uintptr_t msix_table;
    int bars_moved;                     /* how many BARs the guest had to assign */
    /* negotiated state */
    uint64_t device_features;           /* as offered */
    uint64_t features;                  /* as accepted (FEATURES_OK) */
};

/* Find the index-th device with this virtio device id on a transport and
 * fill *d (no register is written).  0, or -1 when there is none.  On -1,
 * *why (if not NULL) says what was seen (e.g. a legacy window). */
int virtio_find(int transport, uint32_t device_id, int index, struct virtio_dev *d,
                const char **why);

uint8_t virtio_get_status(struct virtio_dev *d);
void virtio_set_status(struct virtio_dev *d, uint8_t status);
/* Write 0 to the status and wait (TSC, timeout_ns; 0 = 1 s; without a known
 * TSC frequency, 10^8 polls) until it reads back 0.  0 or -1 on timeout. */
int virtio_reset(struct virtio_dev *d, uint64_t timeout_ns);

/* Steps 1-6 of the initialisation (spec 3.1.1): reset, ACKNOWLEDGE, DRIVER,
 * read the device features, write (offered & wanted), FEATURES_OK, re-read
 * status.  VERSION_1 must be offered (else -2: legacy-only device); it is
 * always accepted.  Returns 0, -1 (reset timeout), -2 (no VERSION_1), -3
 * (FEATURES_OK did not stick).  On failure the status is set to FAILED. */
int virtio_negotiate(struct virtio_dev *d, uint64_t wanted);
static inline int virtio_has(const struct virtio_dev *d, int bit) { return (d->features >> bit) & 1; }

void virtio_driver_ok(struct virtio_dev *d);

/* Device-specific configuration: aligned reads of the field's width; the
 * 64-bit read is two 32-bit reads inside a config-generation loop. */
uint8_t virtio_cfg_read8(struct virtio_dev *d, unsigned off);
uint16_t virtio_cfg_read16(struct virtio_dev *d, unsigned off);
uint32_t virtio_cfg_read32(struct virtio_dev *d, unsigned off);
uint64_t virtio_cfg_read64(struct virtio_dev *d, unsigned off);
void virtio_cfg_write8(struct virtio_dev *d, unsigned off, uint8_t v);

/* Interrupt status (MMIO: InterruptStatus, then InterruptACK of those bits;
 * PCI: a read of the ISR byte, which clears it). */
uint32_t virtio_isr_read_ack(struct virtio_dev *d);

/* ---- split virtqueues ---------------------------------------------------------- */

struct virtq {
    struct virtio_dev *dev;
    uint16_t index, size, mask;
    struct virtq_desc *desc;
    volatile struct virtq_avail *avail;
    volatile struct virtq_used *used;
    volatile uint16_t *used_event;      /* &avail->ring[size] */
    volatile uint16_t *avail_event;     /* (u16 *)&used->ring[size] */
    uint16_t avail_idx;                 /* next avail slot (shadow of avail->idx) */
    uint16_t kicked_idx;                /* avail->idx at the last notification decision */
    uint16_t last_used;                 /* next used entry to consume */
    int event_idx;                      /* VIRTIO_F_EVENT_IDX negotiated */
    int irq;                            /* interrupts wanted (else suppressed) */
    uintptr_t notify_addr;              /* queue-notify register */
    int notify_pci;                     /* 16-bit write (PCI) or 32-bit (MMIO) */
    uint64_t notifies;                  /* notify-register writes so far */
    void *mem;                          /* ring memory (3 regions, one allocation) */
    size_t mem_size;
};

/* Bytes of ring memory for a queue of `size` entries (page-aligned regions:
 * descriptors, avail ring + used_event, used ring + avail_event). */
size_t virtq_mem_size(unsigned size);

/* Read the queue's maximum size (0 = queue not available). */
unsigned virtq_max_size(struct virtio_dev *d, unsigned index);

/* Set queue `index` up with `size` entries (a power of two <= max) on ring
 * memory `mem` (page aligned, virtq_mem_size(size) bytes; cleared here),
 * MSI-X vector `msix_vector` (PCI, VIRTIO_MSI_NO_VECTOR for none) and enable
 * it.  Call between FEATURES_OK and DRIVER_OK.  0, or -1 (size not
 * accepted, MSI-X vector refused). */
int virtq_setup(struct virtio_dev *d, struct virtq *vq, unsigned index, unsigned size,
                void *mem, uint16_t msix_vector, int irq);

/* the event-index test of the spec (2.7.10) */
static inline int vring_need_event(uint16_t event, uint16_t new_idx, uint16_t old_idx)
{
    return (uint16_t)(new_idx - event - 1) < (uint16_t)(new_idx - old_idx);
}

/* Put a chain head in the avail ring (not yet visible to the device). */
static inline void virtq_push(struct virtq *vq, uint16_t head)
{
    vq->avail->ring[vq->avail_idx & vq->mask] = head;
    vq->avail_idx++;
}

static inline void virtq_notify(struct virtq *vq)
{
    if (vq->notify_pci)
        mmio_write16(vq->notify_addr, vq->index);
    else
        mmio_write32(vq->notify_addr, vq->index);
    vq->notifies++;
}

/* Publish what was pushed (avail->idx) and notify the device if it wants to
 * be notified.  Returns 1 if it notified. */
static inline int virtq_kick(struct virtq *vq)
{
    uint16_t old = vq->kicked_idx, new_idx = vq->avail_idx;
    if (old == new_idx)
        return 0;
    barrier();                          /* descriptors and ring entries before idx */
    vq->avail->idx = new_idx;
    vq->kicked_idx = new_idx;
    mb();                               /* idx store before the event/flags load */
    int need = vq->event_idx ? vring_need_event(*vq->avail_event, new_idx, old)
                             : !(vq->used->flags & VIRTQ_USED_F_NO_NOTIFY);
    if (need)
        virtq_notify(vq);
    return need;
}

/* Used entries the device has published that we have not consumed. */
static inline uint16_t virtq_used_pending(struct virtq *vq)
{
    uint16_t n = (uint16_t)(vq->used->idx - vq->last_used);
    barrier();                          /* read entries only after idx (x86 keeps load order) */
    return n;
}

/* Consume one used entry; call only when virtq_used_pending() > 0. */
static inline struct virtq_used_elem virtq_pop_used(struct virtq *vq)
{
    volatile struct virtq_used_elem *e = &vq->used->ring[vq->last_used & vq->mask];
    struct virtq_used_elem r = { e->id, e->len };
    vq->last_used++;
    return r;
}

/* After consuming: with interrupts wanted, ask for one at the next used entry
 * and return how many entries are already pending (re-check after the full
 * barrier, spec 2.7.10); when polling, push used_event (EVENT_IDX) half the
 * index space ahead so that the device never needs to interrupt. */
static inline uint16_t virtq_rearm(struct virtq *vq)
{
    if (!vq->irq) {
        if (vq->event_idx)
            *vq->used_event = (uint16_t)(vq->last_used + 0x7fff);
        return 0;
    }
    if (vq->event_idx)
        *vq->used_event = vq->last_used;
    mb();
    return virtq_used_pending(vq);
}

/* ---- virtio-blk ---------------------------------------------------------------- */

#define VIRTIO_BLK_F_SIZE_MAX       1
#define VIRTIO_BLK_F_SEG_MAX        2
#define VIRTIO_BLK_F_GEOMETRY       4
#define VIRTIO_BLK_F_RO             5
#define VIRTIO_BLK_F_BLK_SIZE       6
#define VIRTIO_BLK_F_FLUSH          9
#define VIRTIO_BLK_F_TOPOLOGY       10
#define VIRTIO_BLK_F_CONFIG_WCE     11
#define VIRTIO_BLK_F_MQ             12
#define VIRTIO_BLK_F_DISCARD        13
#define VIRTIO_BLK_F_WRITE_ZEROES   14

/* config offsets (struct virtio_blk_config) */
#define VIRTIO_BLK_CFG_CAPACITY     0
#define VIRTIO_BLK_CFG_SIZE_MAX     8
#define VIRTIO_BLK_CFG_SEG_MAX      12
#define VIRTIO_BLK_CFG_BLK_SIZE     20
#define VIRTIO_BLK_CFG_PHYS_EXP     24
#define VIRTIO_BLK_CFG_MIN_IO       26
#define VIRTIO_BLK_CFG_OPT_IO       28
#define VIRTIO_BLK_CFG_WRITEBACK    32
#define VIRTIO_BLK_CFG_NUM_QUEUES   34
#define VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS 36
#define VIRTIO_BLK_CFG_MAX_DISCARD_SEG     40
#define VIRTIO_BLK_CFG_DISCARD_ALIGN       44
#define VIRTIO_BLK_CFG_MAX_WZ_SECTORS      48
#define VIRTIO_BLK_CFG_MAX_WZ_SEG          52

#define VIRTIO_BLK_T_IN             0
#define VIRTIO_BLK_T_OUT            1
#define VIRTIO_BLK_T_FLUSH          4
#define VIRTIO_BLK_T_GET_ID         8
#define VIRTIO_BLK_T_DISCARD        11
#define VIRTIO_BLK_T_WRITE_ZEROES   13

#define VIRTIO_BLK_S_OK             0
#define VIRTIO_BLK_S_IOERR          1
#define VIRTIO_BLK_S_UNSUPP         2

#define VIRTIO_BLK_ID_BYTES         20

struct virtio_blk_outhdr {
    uint32_t type;
    uint32_t reserved;
    uint64_t sector;
};

/* discard / write-zeroes payload */
struct virtio_blk_discard_wz {
    uint64_t sector;
    uint32_t num_sectors;
    uint32_t flags;                     /* bit 0: unmap (write zeroes) */
};

/* Per-request header area: the device reads hdr and writes status. */
struct vblk_reqhdr {
    struct virtio_blk_outhdr hdr;
    volatile uint8_t status;
    uint8_t pad[15];
};

struct vblk_opts {
    unsigned queue_size;                /* 0: min(QueueNumMax, 256) */
    uint32_t max_bytes;                 /* largest data buffer of one request; 0: 1 MiB */
    int indirect;                       /* 1: use INDIRECT_DESC when offered (default) */
    int event_idx;                      /* 1: use EVENT_IDX when offered (default) */
    int irq;                            /* 1: interrupts (IOAPIC line / MSI-X) instead of polling */
    int irq_vector;                     /* first IDT vector to use (0: 48); MSI-X uses two */
    uint32_t seg_bytes;                 /* split data buffers into descriptors of at most
                                           this many bytes (0: SIZE_MAX if offered, else 4 MiB) */
    unsigned queues;                    /* request queues: 0 or 1 = queue 0 only, MQ never
                                           asked for; 2..VBLK_MAX_QUEUES = MQ required and
                                           num_queues >= queues, else vblk_open fails */
};

/* vblk_opts with the defaults */
#define VBLK_OPTS_DEFAULT { 0, 0, 1, 1, 0, 0, 0, 1 }

#define VBLK_MAX_QUEUES 16

struct vblk_done {
    uint64_t tag;
    uint32_t len;                       /* bytes the device says it wrote */
    uint8_t status;
};

/* One request queue: its ring and its nslots request slots. */
struct vblk_queue {
    struct virtq vq;
    struct vblk_reqhdr *hdrs;           /* [nslots] */
    struct virtq_desc *itables;         /* [nslots][chain] when indirect */
    uint64_t *tags;                     /* [nslots] */
    uint16_t *free_slots;               /* stack */
    unsigned nfree;
    uint16_t *head_slot;                /* ring descriptor index -> slot */
};

struct vblk {
    struct virtio_dev dev;
    struct vblk_queue q[VBLK_MAX_QUEUES];
    unsigned nqueues;                   /* request queues in use: q[0 .. nqueues-1] */
    unsigned reap_next;                 /* queue vblk_reap starts with (round robin) */
    struct vblk_opts opts;
    uint64_t wanted;                    /* features we ask for */
    /* configuration (read at open) */
    uint64_t capacity;                  /* in 512-byte sectors */
    uint32_t size_max, seg_max, blk_size;
    uint32_t max_discard_sectors, max_discard_seg, max_wz_sectors, max_wz_seg;
    uint16_t num_queues;                /* the device's (MQ), else 1 */
    uint8_t writeback;                  /* CONFIG_WCE: 1 writeback, 0 writethrough */
    int ro;
    /* request slots: the same geometry on every queue */
    unsigned nslots;                    /* requests that can be in flight PER QUEUE */
    unsigned chain;                     /* descriptors per request (2 + max segments) */
    unsigned max_segs;
    uint32_t seg_bytes;                 /* largest data descriptor */
    int use_indirect;
    /* interrupts */
    int irq_vector;                     /* queue vector (MMIO line / MSI-X entry 1, shared
                                           by every queue) */
    int cfg_vector;                     /* MSI-X entry 0 (config changes) */
    volatile uint64_t *irq_counter;     /* &irq_count[queue vector] */
    uint64_t irq_seen;
    uint64_t irq_lost;                  /* waits that found completions without an interrupt */
};

/* Find the index-th virtio-blk device on `transport` (VIRTIO_ANY, VIRTIO_MMIO,
 * VIRTIO_PCI), negotiate, read the configuration, set the request queues up
 * (0 .. nqueues-1, all of the same size) and set DRIVER_OK.  Features
 * requested when offered: VERSION_1 (required), EVENT_IDX and INDIRECT_DESC
 * (unless opts say no), SIZE_MAX, SEG_MAX, GEOMETRY, RO, BLK_SIZE, FLUSH,
 * TOPOLOGY, CONFIG_WCE, DISCARD, WRITE_ZEROES, and MQ only when opts ask
 * for more than one queue.  (GET_ID has no feature bit: the request type
 * always exists.)  Never packed rings or ACCESS_PLATFORM.
 * Returns 0, or -1 with *err (if not NULL) set to a static message. */
int vblk_open(struct vblk *b, int transport, int index, const struct vblk_opts *opts,
              const char **err);

/* Reset the device and redo the whole initialisation with the same features,
 * queues and queue memory (all requests are forgotten).  0, or -1 with *err. */
int vblk_reinit(struct vblk *b, const char **err);

/* Queue one request on request queue q (< nqueues; visible to the device at
 * the next vblk_kick):
 *   IN / GET_ID                 buf is written by the device (len bytes)
 *   OUT / DISCARD / WRITE_ZEROES buf is read by the device
 *   FLUSH                       buf NULL, len 0
 * sector in 512-byte units; tag is returned with the completion.
 * Returns 0, -1 when every slot of queue q is in flight, -2 when len needs
 * more segments than the request layout has (see max_bytes), -3 when there
 * is no queue q. */
int vblk_submit(struct vblk *b, unsigned q, uint32_t type, uint64_t sector, void *buf,
                uint32_t len, uint64_t tag);

/* Publish what was submitted on every queue; notify those that ask for it.
 * Returns how many queues were notified. */
static inline int vblk_kick(struct vblk *b)
{
    int n = 0;
    for (unsigned i = 0; i < b->nqueues; i++)
        n += virtq_kick(&b->q[i].vq);
    return n;
}

/* Requests in flight, all queues. */
static inline unsigned vblk_inflight(const struct vblk *b)
{
    unsigned n = 0;
    for (unsigned i = 0; i < b->nqueues; i++)
        n += b->nslots - b->q[i].nfree;
    return n;
}

/* Notify-register writes so far, all queues. */
static inline uint64_t vblk_notifies(const struct vblk *b)
{
    uint64_t n = 0;
    for (unsigned i = 0; i < b->nqueues; i++)
        n += b->q[i].vq.notifies;
    return n;
}

/* Collect up to max completions from all queues (non-blocking; each call
 * starts one queue further, so that a busy queue does not starve the
 * others when max is reached).  Returns how many. */
unsigned vblk_reap(struct vblk *b, struct vblk_done *out, unsigned max);

/* Wait until there is something to reap on any queue: polling spins on the
 * queues' used->idx; with interrupts (one MMIO line, or MSI-X entry 1 for
 * every queue) it spins on the interrupt counter (fallback: after ~1 s
 * without an interrupt, look at the rings anyway and count irq_lost).
 * Returns 1 when completions are pending, 0 at the TSC deadline (0 = none). */
int vblk_wait(struct vblk *b, uint64_t deadline_tsc);

/* Synchronous helper on queue 0: submit, kick, wait (timeout_ns, 0 = 5 s).
 * Returns the status byte, or -1 on timeout / no slot.  Completions of other
 * requests that it reaps meanwhile are dropped. */
int vblk_rw_sync(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len,
                 uint64_t timeout_ns);

/* A one-line description of the device and the negotiated features. */
void vblk_describe(struct vblk *b, char *buf, size_t n);

#endif
