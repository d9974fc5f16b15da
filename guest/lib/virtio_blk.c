/*
 * virtio_blk.c - the virtio-blk request layer (virtio.h).
 *
 * Request queues 0 .. nqueues-1 (more than one only with VIRTIO_BLK_F_MQ,
 * when opts ask for it), all of one size and one slot geometry; each has its
 * own ring, slots and request headers.  Every request has a slot with a
 * fixed descriptor chain prepared at initialisation:
 *
 *   without INDIRECT_DESC  slot s owns ring descriptors s*chain .. s*chain +
 *                          chain - 1, already linked by `next`; at most
 *                          queue_size / chain requests are in flight.
 *   with INDIRECT_DESC     ring descriptor s points at slot s's own table of
 *                          `chain` descriptors; queue_size requests in flight.
 *
 * chain = 2 + max_segs: the 16-byte header (device-readable), up to max_segs
 * data descriptors (device-writable for IN/GET_ID, readable otherwise; a
 * buffer is split at seg_bytes = SIZE_MAX when the device sets one), and the
 * status byte (device-writable).  Submitting a request writes the header,
 * the data descriptors and the status descriptor, and pushes the head: no
 * allocation, no division.  Completions come back by head index through a
 * head -> slot table.
 */
#include "virtio.h"
#include "pci.h"
#include "irq.h"

#define DEFAULT_QUEUE_SIZE 256u
#define DEFAULT_MAX_BYTES  (1u << 20)
#define DEFAULT_IRQ_VECTOR 48

static void mmio_isr(int vector, void *arg)
{
    (void)vector;
    struct vblk *b = arg;
    /* Acknowledge so that QEMU lowers its (level) line and the next
     * completion makes a new edge (the IOAPIC entry is edge-triggered). */
    virtio_isr_read_ack(&b->dev);
}

static uint64_t wanted_features(const struct vblk_opts *o)
{
    uint64_t w = 1ull << VIRTIO_F_VERSION_1 |
                 1ull << VIRTIO_BLK_F_SIZE_MAX | 1ull << VIRTIO_BLK_F_SEG_MAX |
                 1ull << VIRTIO_BLK_F_GEOMETRY | 1ull << VIRTIO_BLK_F_RO |
                 1ull << VIRTIO_BLK_F_BLK_SIZE | 1ull << VIRTIO_BLK_F_FLUSH |
                 1ull << VIRTIO_BLK_F_TOPOLOGY | 1ull << VIRTIO_BLK_F_CONFIG_WCE |
                 1ull << VIRTIO_BLK_F_DISCARD | 1ull << VIRTIO_BLK_F_WRITE_ZEROES;
    if (o->indirect)
        w |= 1ull << VIRTIO_F_INDIRECT_DESC;
    if (o->event_idx)
        w |= 1ull << VIRTIO_F_EVENT_IDX;
    if (o->queues > 1)
        w |= 1ull << VIRTIO_BLK_F_MQ;
    return w;
}

static void read_config(struct vblk *b)
{
    struct virtio_dev *d = &b->dev;
    b->capacity = virtio_cfg_read64(d, VIRTIO_BLK_CFG_CAPACITY);
    b->size_max = virtio_has(d, VIRTIO_BLK_F_SIZE_MAX) ? virtio_cfg_read32(d, VIRTIO_BLK_CFG_SIZE_MAX) : 0;
    b->seg_max = virtio_has(d, VIRTIO_BLK_F_SEG_MAX) ? virtio_cfg_read32(d, VIRTIO_BLK_CFG_SEG_MAX) : 0;
    b->blk_size = virtio_has(d, VIRTIO_BLK_F_BLK_SIZE) ? virtio_cfg_read32(d, VIRTIO_BLK_CFG_BLK_SIZE) : 512;
    b->writeback = virtio_has(d, VIRTIO_BLK_F_CONFIG_WCE) ? virtio_cfg_read8(d, VIRTIO_BLK_CFG_WRITEBACK)
                                                          : (uint8_t)virtio_has(d, VIRTIO_BLK_F_FLUSH);
    b->ro = virtio_has(d, VIRTIO_BLK_F_RO);
    if (virtio_has(d, VIRTIO_BLK_F_DISCARD)) {
        b->max_discard_sectors = virtio_cfg_read32(d, VIRTIO_BLK_CFG_MAX_DISCARD_SECTORS);
        b->max_discard_seg = virtio_cfg_read32(d, VIRTIO_BLK_CFG_MAX_DISCARD_SEG);
    }
    if (virtio_has(d, VIRTIO_BLK_F_WRITE_ZEROES)) {
        b->max_wz_sectors = virtio_cfg_read32(d, VIRTIO_BLK_CFG_MAX_WZ_SECTORS);
        b->max_wz_seg = virtio_cfg_read32(d, VIRTIO_BLK_CFG_MAX_WZ_SEG);
    }
    b->num_queues = virtio_has(d, VIRTIO_BLK_F_MQ) ? virtio_cfg_read16(d, VIRTIO_BLK_CFG_NUM_QUEUES) : 1;
}

/* Geometry of the request slots (qmax: the smallest maximum size of the
 * queues in use); allocates every queue's memory on the first call. */
static int layout(struct vblk *b, unsigned qmax, const char **err)
{
    unsigned qsize = b->opts.queue_size;
    if (!qsize)
        qsize = qmax < DEFAULT_QUEUE_SIZE ? qmax : DEFAULT_QUEUE_SIZE;
    if (qsize == 0 || qsize > qmax || qsize > 32768 || (qsize & (qsize - 1))) {
        *err = "queue size is not a power of two within the device's maximum";
        return -1;
    }
    b->seg_bytes = 0x400000;                    /* 4 MiB: any buffer we make is smaller */
    if (b->size_max >= 512 && b->size_max < b->seg_bytes)
        b->seg_bytes = b->size_max & ~511u;
    if (b->opts.seg_bytes >= 512 && b->opts.seg_bytes < b->seg_bytes)
        b->seg_bytes = b->opts.seg_bytes & ~511u;
    uint32_t max_bytes = b->opts.max_bytes ? b->opts.max_bytes : DEFAULT_MAX_BYTES;
    b->max_segs = (max_bytes + b->seg_bytes - 1) / b->seg_bytes;
    if (!b->max_segs)
        b->max_segs = 1;
    if (b->seg_max && b->max_segs > b->seg_max) {
        *err = "requests of max_bytes would need more segments than the device's seg_max";
        return -1;
    }
    b->chain = 2 + b->max_segs;
    b->use_indirect = virtio_has(&b->dev, VIRTIO_F_INDIRECT_DESC);
    if (b->chain > qsize) {
        *err = "a request's descriptor chain is longer than the queue";
        return -1;
    }
    unsigned nslots = b->use_indirect ? qsize : qsize / b->chain;
    if (b->q[0].hdrs) {                         /* reinit: same geometry as before */
        if (nslots != b->nslots || qsize != b->q[0].vq.size) {
            *err = "the device changed its queue geometry across a reset";
            return -1;
        }
        return 0;
    }
    b->nslots = nslots;
    for (unsigned i = 0; i < b->nqueues; i++) {
        struct vblk_queue *q = &b->q[i];
        q->vq.mem = guest_alloc(virtq_mem_size(qsize), 4096);
        q->hdrs = guest_alloc(sizeof(struct vblk_reqhdr) * nslots, 64);
        q->itables = b->use_indirect ? guest_alloc(16ul * b->chain * nslots, 64) : NULL;
        q->tags = guest_alloc(8ul * nslots, 8);
        q->free_slots = guest_alloc(2ul * nslots, 8);
        q->head_slot = guest_alloc(2ul * qsize, 8);
        if (!q->vq.mem || !q->hdrs || (b->use_indirect && !q->itables) || !q->tags ||
            !q->free_slots || !q->head_slot) {
            *err = "out of guest memory for the queues";
            return -1;
        }
        q->vq.size = (uint16_t)qsize;           /* remembered for reinit */
    }
    return 0;
}

/* Fill in the fixed parts of every chain of queue q and free every slot. */
static void prepare_slots(struct vblk *b, struct vblk_queue *q)
{
    unsigned qsize = q->vq.size;
    memset(q->head_slot, 0, 2ul * qsize);
    for (unsigned s = 0; s < b->nslots; s++) {
        struct virtq_desc *d;
        uint16_t head;
        if (b->use_indirect) {
            d = q->itables + (size_t)s * b->chain;
            for (unsigned j = 0; j < b->chain; j++)
                d[j] = (struct virtq_desc){ 0, 0, 0, (uint16_t)(j + 1) };
            head = (uint16_t)s;
            q->vq.desc[head] = (struct virtq_desc){ (uintptr_t)d, 0, VIRTQ_DESC_F_INDIRECT, 0 };
        } else {
            head = (uint16_t)(s * b->chain);
            d = q->vq.desc + head;
            for (unsigned j = 0; j < b->chain; j++)
                d[j] = (struct virtq_desc){ 0, 0, 0, (uint16_t)(head + j + 1) };
        }
        d[0].addr = (uintptr_t)&q->hdrs[s].hdr;
        d[0].len = sizeof(struct virtio_blk_outhdr);
        d[0].flags = VIRTQ_DESC_F_NEXT;
        q->head_slot[head] = (uint16_t)s;
        q->free_slots[s] = (uint16_t)(b->nslots - 1 - s);
    }
    q->nfree = b->nslots;
}

static int setup_irq(struct vblk *b, const char **err)
{
    struct virtio_dev *d = &b->dev;
    uint32_t apic = lapic_init();
    b->irq_vector = b->opts.irq_vector ? b->opts.irq_vector : DEFAULT_IRQ_VECTOR;
    if (b->irq_vector < IRQ_VECTOR_FIRST || b->irq_vector + 1 >= IRQ_VECTOR_SPURIOUS) {
        *err = "irq vector out of range";
        return -1;
    }
    b->irq_counter = &irq_count[b->irq_vector - IRQ_VECTOR_FIRST];
    if (d->transport == VIRTIO_MMIO) {
        b->cfg_vector = 0;
        irq_set_handler(b->irq_vector, mmio_isr, b);
        if (ioapic_route(d->gsi, b->irq_vector, apic, 0, 0) < 0) {
            *err = "no IOAPIC pin for the device's interrupt line";
            return -1;
        }
    } else {
        if (!d->msix_cap || d->msix_entries < 2) {
            *err = "the PCI device has no MSI-X table with 2 entries";
            return -1;
        }
        b->cfg_vector = b->irq_vector + 1;
        irq_set_handler(b->irq_vector, NULL, NULL);
        irq_set_handler(b->cfg_vector, NULL, NULL);
        /* entry 0: configuration changes, entry 1: every request queue */
        for (int e = 0; e < 2; e++) {
            uintptr_t t = d->msix_table + 16u * (unsigned)e;
            mmio_write32(t + 0, 0xfee00000u | (apic << 12));
            mmio_write32(t + 4, 0);
            mmio_write32(t + 8, (uint32_t)(e == 0 ? b->cfg_vector : b->irq_vector));
            mmio_write32(t + 12, 0);            /* unmasked */
        }
        uint16_t ctl = pci_read16(d->bdf, d->msix_cap + 2);
        pci_write16(d->bdf, d->msix_cap + 2, (uint16_t)((ctl | 0x8000) & ~0x4000));
    }
    b->irq_seen = *b->irq_counter;
    return 0;
}

static int init_device(struct vblk *b, const char **err)
{
    struct virtio_dev *d = &b->dev;
    int r = virtio_negotiate(d, b->wanted);
    if (r == -1) { *err = "device reset timed out"; return -1; }
    if (r == -2) { *err = "device does not offer VIRTIO_F_VERSION_1 (legacy only)"; return -1; }
    if (r == -3) { *err = "device refused FEATURES_OK"; return -1; }
    read_config(b);
    if (b->nqueues > 1) {
        if (!virtio_has(d, VIRTIO_BLK_F_MQ)) {
            *err = "the device does not offer VIRTIO_BLK_F_MQ";
            goto fail;
        }
        if (b->num_queues < b->nqueues) {
            *err = "the device has fewer queues than asked for";
            goto fail;
        }
    }
    unsigned qmax = 0;
    for (unsigned i = 0; i < b->nqueues; i++) {
        unsigned m = virtq_max_size(d, i);
        if (!m) {
            *err = i ? "a request queue past queue 0 is not available" : "queue 0 is not available";
            goto fail;
        }
        if (!qmax || m < qmax)
            qmax = m;
    }
    if (layout(b, qmax, err) < 0)
        goto fail;
    uint16_t qvec = VIRTIO_MSI_NO_VECTOR;
    if (d->transport == VIRTIO_PCI) {
        uint16_t cvec = VIRTIO_MSI_NO_VECTOR;
        if (b->opts.irq) {
            cvec = 0;
            qvec = 1;                           /* shared by every queue */
        }
        mmio_write16(d->common + VIRTIO_PCI_CONFIG_MSIX, cvec);
        if (mmio_read16(d->common + VIRTIO_PCI_CONFIG_MSIX) != cvec) {
            *err = "device refused the MSI-X config vector";
            goto fail;
        }
    }
    for (unsigned i = 0; i < b->nqueues; i++) {
        struct vblk_queue *q = &b->q[i];
        void *mem = q->vq.mem;
        unsigned qsize = q->vq.size;
        if (virtq_setup(d, &q->vq, i, qsize, mem, qvec, b->opts.irq) < 0) {
            *err = "queue setup refused (size or MSI-X vector)";
            goto fail;
        }
        prepare_slots(b, q);
    }
    b->reap_next = 0;
    virtio_driver_ok(d);
    if (virtio_get_status(d) & (VIRTIO_STATUS_NEEDS_RESET | VIRTIO_STATUS_FAILED)) {
        *err = "device status shows NEEDS_RESET/FAILED after DRIVER_OK";
        return -1;
    }
    return 0;
fail:
    /* add FAILED: a driver must not clear status bits (spec 2.1.2) */
    virtio_set_status(d, (uint8_t)(virtio_get_status(d) | VIRTIO_STATUS_FAILED));
    return -1;
}

int vblk_open(struct vblk *b, int transport, int index, const struct vblk_opts *opts,
              const char **err)
{
    static const struct vblk_opts dflt = VBLK_OPTS_DEFAULT;
    const char *e_local, *why = NULL;
    if (!err)
        err = &e_local;
    memset(b, 0, sizeof(*b));
    b->opts = opts ? *opts : dflt;
    if (b->opts.queues > VBLK_MAX_QUEUES) {
        *err = "more queues asked for than VBLK_MAX_QUEUES";
        return -1;
    }
    b->nqueues = b->opts.queues > 1 ? b->opts.queues : 1;
    b->wanted = wanted_features(&b->opts);
    if (virtio_find(transport, VIRTIO_ID_BLOCK, index, &b->dev, &why) < 0) {
        *err = why ? why : "no virtio-blk device found";
        return -1;
    }
    if (b->opts.irq && b->dev.transport == VIRTIO_PCI && setup_irq(b, err) < 0)
        return -1;
    if (init_device(b, err) < 0)
        return -1;
    if (b->opts.irq) {
        if (b->dev.transport == VIRTIO_MMIO && setup_irq(b, err) < 0)
            return -1;
        irq_enable();
    }
    return 0;
}

int vblk_reinit(struct vblk *b, const char **err)
{
    const char *e_local;
    if (!err)
        err = &e_local;
    if (init_device(b, err) < 0)
        return -1;
    if (b->opts.irq)
        b->irq_seen = *b->irq_counter;
    return 0;
}

int vblk_submit(struct vblk *b, unsigned qi, uint32_t type, uint64_t sector, void *buf,
                uint32_t len, uint64_t tag)
{
    if (qi >= b->nqueues)
        return -3;
    struct vblk_queue *q = &b->q[qi];
    if (!q->nfree)
        return -1;
    unsigned nseg = len == 0 ? 0 : len <= b->seg_bytes ? 1 : (len + b->seg_bytes - 1) / b->seg_bytes;
    if (nseg > b->max_segs)
        return -2;
    unsigned s = q->free_slots[--q->nfree];
    struct vblk_reqhdr *h = &q->hdrs[s];
    h->hdr.type = type;
    h->hdr.reserved = 0;
    h->hdr.sector = sector;
    h->status = 0xff;
    struct virtq_desc *d;
    uint16_t head;
    if (b->use_indirect) {
        d = q->itables + (size_t)s * b->chain;
        head = (uint16_t)s;
    } else {
        head = (uint16_t)(s * b->chain);
        d = q->vq.desc + head;
    }
    uint16_t wflag = (type == VIRTIO_BLK_T_IN || type == VIRTIO_BLK_T_GET_ID) ? VIRTQ_DESC_F_WRITE : 0;
    unsigned j = 1;
    uintptr_t a = (uintptr_t)buf;
    while (len) {
        uint32_t l = len < b->seg_bytes ? len : b->seg_bytes;
        d[j].addr = a;
        d[j].len = l;
        d[j].flags = VIRTQ_DESC_F_NEXT | wflag;
        a += l;
        len -= l;
        j++;
    }
    d[j].addr = (uintptr_t)&h->status;
    d[j].len = 1;
    d[j].flags = VIRTQ_DESC_F_WRITE;
    if (b->use_indirect)
        q->vq.desc[head].len = 16u * (j + 1);
    q->tags[s] = tag;
    virtq_push(&q->vq, head);
    return 0;
}

/* Up to max completions of one queue. */
static unsigned reap_queue(struct vblk_queue *q, struct vblk_done *out, unsigned max)
{
    struct virtq *vq = &q->vq;
    unsigned n = 0;
    uint16_t pending = virtq_used_pending(vq);
    if (!pending)
        return 0;
    while (pending-- && n < max) {
        struct virtq_used_elem e = virtq_pop_used(vq);
        if (e.id >= vq->size)
            continue;                           /* a broken device; ignore */
        unsigned s = q->head_slot[e.id];
        out[n].tag = q->tags[s];
        out[n].len = e.len;
        out[n].status = q->hdrs[s].status;
        q->free_slots[q->nfree++] = (uint16_t)s;
        n++;
    }
    virtq_rearm(vq);
    return n;
}

unsigned vblk_reap(struct vblk *b, struct vblk_done *out, unsigned max)
{
    unsigned n = 0, i = b->reap_next;
    if (++b->reap_next == b->nqueues)
        b->reap_next = 0;
    for (unsigned k = 0; k < b->nqueues && n < max; k++) {
        n += reap_queue(&b->q[i], out + n, max - n);
        if (++i == b->nqueues)
            i = 0;
    }
    return n;
}

/* Some queue has used entries we have not consumed. */
static int any_pending(struct vblk *b)
{
    for (unsigned i = 0; i < b->nqueues; i++)
        if (virtq_used_pending(&b->q[i].vq))
            return 1;
    return 0;
}

int vblk_wait(struct vblk *b, uint64_t deadline_tsc)
{
    if (!b->opts.irq) {
        while (!any_pending(b)) {
            if (deadline_tsc && rdtsc() > deadline_tsc)
                return 0;
            cpu_relax();
        }
        return 1;
    }
    if (any_pending(b))
        return 1;
    uint64_t khz = tsc_khz();
    uint64_t start = rdtsc(), fallback = khz ? khz * 1000 : (1ull << 31);
    while (*b->irq_counter == b->irq_seen) {
        uint64_t t = rdtsc();
        if (deadline_tsc && t > deadline_tsc)
            return 0;
        if (t - start > fallback) {
            if (any_pending(b)) {
                b->irq_lost++;
                return 1;
            }
            start = t;
        }
        cpu_relax();
    }
    b->irq_seen = *b->irq_counter;
    return 1;
}

int vblk_rw_sync(struct vblk *b, uint32_t type, uint64_t sector, void *buf, uint32_t len,
                 uint64_t timeout_ns)
{
    static const uint64_t tag = 0x5ec0de5ec0deull;
    if (!timeout_ns)
        timeout_ns = 5000000000ull;
    uint64_t khz = tsc_khz();
    uint64_t deadline = khz ? rdtsc() + timeout_ns / 1000000 * khz : 0;
    if (vblk_submit(b, 0, type, sector, buf, len, tag) < 0)
        return -1;
    vblk_kick(b);
    for (;;) {
        struct vblk_done done[16];
        unsigned n = vblk_reap(b, done, 16);
        for (unsigned i = 0; i < n; i++)
            if (done[i].tag == tag)
                return done[i].status;
        if (!vblk_wait(b, deadline))
            return -1;
    }
}

void vblk_describe(struct vblk *b, char *buf, size_t n)
{
    struct virtio_dev *d = &b->dev;
    char where[64], queues[32];
    if (virtio_has(d, VIRTIO_BLK_F_MQ))
        snprintf(queues, sizeof(queues), "%u of %u", b->nqueues, b->num_queues);
    else
        snprintf(queues, sizeof(queues), "1 (no MQ)");
    if (d->transport == VIRTIO_MMIO)
        snprintf(where, sizeof(where), "mmio@0x%lx irq %u", (unsigned long)d->mmio, d->gsi);
    else
        snprintf(where, sizeof(where), "pci %02x:%02x.%x%s", d->bdf >> 8, (d->bdf >> 3) & 31,
                 d->bdf & 7, d->bars_moved ? " (BARs assigned by the guest)" : "");
    snprintf(buf, n,
             "virtio-blk %s: capacity %lu sectors, features offered 0x%lx accepted 0x%lx, "
             "queues %s, queue %u, slots %u per queue, chain %u, indirect %d, event_idx %d, "
             "seg_max %u, size_max %u, blk_size %u, ro %d, flush %d, wce %d, discard %d, "
             "write_zeroes %d, irq %d",
             where, (unsigned long)b->capacity, (unsigned long)d->device_features,
             (unsigned long)d->features, queues, b->q[0].vq.size, b->nslots, b->chain,
             b->use_indirect, b->q[0].vq.event_idx, b->seg_max, b->size_max, b->blk_size, b->ro,
             virtio_has(d, VIRTIO_BLK_F_FLUSH), b->writeback,
             virtio_has(d, VIRTIO_BLK_F_DISCARD), virtio_has(d, VIRTIO_BLK_F_WRITE_ZEROES),
             b->opts.irq);
}
