/*
 * virtio.c - virtio 1.x transports (MMIO version 2, modern PCI), status and
 * feature negotiation, device configuration, split-virtqueue setup.
 * See virtio.h.  Everything here runs at CPL 3; the register accesses are
 * exits (setup only), the rings are plain memory.
 */
#include "virtio.h"
#include "pci.h"

const char *virtio_transport_name(int transport)
{
    return transport == VIRTIO_MMIO ? "mmio" : transport == VIRTIO_PCI ? "pci" : "any";
}

/* ---- MMIO discovery from the command line ---------------------------------- */

/* Parse a number: decimal or 0x-hex, optional K/M/G suffix; advances *s. */
static int parse_num(const char **s, uint64_t *out, int suffix)
{
    const char *p = *s;
    uint64_t v = 0;
    unsigned base = 10;
    int digits = 0;
    if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) {
        base = 16;
        p += 2;
    }
    for (;; p++) {
        unsigned d;
        if (*p >= '0' && *p <= '9') d = (unsigned)(*p - '0');
        else if (base == 16 && *p >= 'a' && *p <= 'f') d = (unsigned)(*p - 'a' + 10);
        else if (base == 16 && *p >= 'A' && *p <= 'F') d = (unsigned)(*p - 'A' + 10);
        else break;
        v = v * base + d;
        digits++;
    }
    if (!digits)
        return -1;
    if (suffix) {
        switch (*p) {
        case 'k': case 'K': v <<= 10; p++; break;
        case 'm': case 'M': v <<= 20; p++; break;
        case 'g': case 'G': v <<= 30; p++; break;
        default: break;
        }
    }
    *s = p;
    *out = v;
    return 0;
}

/* The n-th `virtio_mmio.device=` word: 0 and the fields, or -1. */
static int mmio_cmdline_device(int n, uint64_t *size, uint64_t *base, uint32_t *irq)
{
    static const char key[] = "virtio_mmio.device=";
    const char *c = cmdline();
    while (*c) {
        while (*c == ' ')
            c++;
        const char *w = c;
        while (*c && *c != ' ')
            c++;
        if ((size_t)(c - w) <= sizeof(key) - 1 || strncmp(w, key, sizeof(key) - 1))
            continue;
        if (n-- > 0)
            continue;
        const char *p = w + sizeof(key) - 1;
        uint64_t irqv = 0;
        if (parse_num(&p, size, 1) < 0 || *p++ != '@' || parse_num(&p, base, 0) < 0)
            return -1;
        if (*p == ':') {
            p++;
            if (parse_num(&p, &irqv, 0) < 0)
                return -1;
        }
        *irq = (uint32_t)irqv;
        return 0;
    }
    return -1;
}

static int find_mmio(uint32_t device_id, int index, struct virtio_dev *d, const char **why)
{
    for (int n = 0;; n++) {
        uint64_t size, base;
        uint32_t irq;
        if (mmio_cmdline_device(n, &size, &base, &irq) < 0)
            return -1;
        if (base >= 0x100000000ull || base + 0x100 > 0x100000000ull || base < 0xc0000000ull) {
            if (why)
                *why = "virtio_mmio.device window outside 0xc0000000..4 GiB (not mapped uncached)";
            continue;
        }
        if (mmio_read32(base + VIRTIO_MMIO_MAGIC) != VIRTIO_MMIO_MAGIC_VALUE)
            continue;
        uint32_t ver = mmio_read32(base + VIRTIO_MMIO_VERSION);
        uint32_t id = mmio_read32(base + VIRTIO_MMIO_DEVICE_ID);
        if (id != device_id)
            continue;
        if (ver != 2) {
            if (why)
                *why = ver == 1 ? "virtio-mmio device is legacy (version 1); only version 2 is supported"
                                : "virtio-mmio device has an unknown version";
            continue;
        }
        if (index-- > 0)
            continue;
        memset(d, 0, sizeof(*d));
        d->transport = VIRTIO_MMIO;
        d->device_id = device_id;
        d->mmio = (uintptr_t)base;
        d->mmio_size = size;
        d->gsi = irq;
        return 0;
    }
}

/* ---- PCI discovery ----------------------------------------------------------- */

static int map_cap_bar(struct virtio_dev *d, unsigned cap, uintptr_t *out, uint32_t *len)
{
    uint8_t bar = pci_read8(d->bdf, cap + 4);
    uint32_t off = pci_read32(d->bdf, cap + 8), l = pci_read32(d->bdf, cap + 12);
    uint64_t addr, size;
    int moved;
    if (pci_bar_map(d->bdf, bar, &addr, &size, &moved) < 0)
        return -1;
    d->bars_moved += moved;
    if ((uint64_t)off + l > size)
        return -1;
    *out = (uintptr_t)(addr + off);
    if (len)
        *len = l;
    return 0;
}

static int find_pci(uint32_t device_id, int index, struct virtio_dev *d, const char **why)
{
    uint32_t bdf;
    /* Modern ids 0x1040 + id first; then transitional ones (0x1000 + id - 1
     * for net/block), which also carry the modern capabilities. */
    if (pci_find(0x1af4, (uint16_t)(0x1040 + device_id), index, &bdf) < 0) {
        int n = 0;
        while (pci_find(0x1af4, (uint16_t)(0x1040 + device_id), n, &bdf) == 0)
            n++;
        if (device_id < 1 || device_id > 2 ||
            pci_find(0x1af4, (uint16_t)(0x1000 + device_id - 1), index - n, &bdf) < 0)
            return -1;
    }
    memset(d, 0, sizeof(*d));
    d->transport = VIRTIO_PCI;
    d->device_id = device_id;
    d->bdf = bdf;
    int have = 0;
    for (unsigned cap = pci_find_cap(bdf, PCI_CAP_VENDOR, 0); cap;
         cap = pci_find_cap(bdf, PCI_CAP_VENDOR, cap)) {
        uint8_t type = pci_read8(bdf, cap + 3);
        /* The first capability of each type is the preferred one (spec 4.1.4). */
        if (type < 1 || type > 4 || (have & (1 << type)))
            continue;
        uintptr_t a;
        uint32_t len;
        if (map_cap_bar(d, cap, &a, &len) < 0) {
            if (why)
                *why = "virtio-pci capability in an I/O or unmappable BAR";
            continue;
        }
        switch (type) {
        case VIRTIO_PCI_CAP_COMMON: d->common = a; break;
        case VIRTIO_PCI_CAP_NOTIFY:
            d->notify = a;
            d->notify_mult = pci_read32(bdf, cap + 16);
            break;
        case VIRTIO_PCI_CAP_ISR: d->isr = a; break;
        case VIRTIO_PCI_CAP_DEVICE: d->devcfg = a; d->devcfg_len = len; break;
        }
        have |= 1 << type;
    }
    if ((have & 0x1e) != 0x1e) {
        if (why && !*why)
            *why = "virtio-pci device lacks a common/notify/ISR/device capability (legacy-only?)";
        return -1;
    }
    unsigned msix = pci_find_cap(bdf, PCI_CAP_MSIX, 0);
    if (msix) {
        uint16_t ctl = pci_read16(bdf, msix + 2);
        uint32_t tbl = pci_read32(bdf, msix + 4);
        uint64_t addr, size;
        int moved;
        if (pci_bar_map(bdf, (int)(tbl & 7), &addr, &size, &moved) == 0) {
            d->bars_moved += moved;
            d->msix_cap = msix;
            d->msix_entries = (ctl & 0x7ff) + 1u;
            d->msix_table = (uintptr_t)(addr + (tbl & ~7u));
        }
    }
    uint16_t cmd = pci_read16(bdf, PCI_COMMAND);
    pci_write16(bdf, PCI_COMMAND, cmd | PCI_CMD_MEMORY | PCI_CMD_MASTER | PCI_CMD_INTX_OFF);
    return 0;
}

int virtio_find(int transport, uint32_t device_id, int index, struct virtio_dev *d,
                const char **why)
{
    if (why)
        *why = NULL;
    if (transport == VIRTIO_MMIO)
        return find_mmio(device_id, index, d, why);
    if (transport == VIRTIO_PCI)
        return find_pci(device_id, index, d, why);
    /* ANY: MMIO devices first, then PCI. */
    int n_mmio = 0;
    struct virtio_dev tmp;
    while (find_mmio(device_id, n_mmio, &tmp, why) == 0)
        n_mmio++;
    if (index < n_mmio)
        return find_mmio(device_id, index, d, why);
    return find_pci(device_id, index - n_mmio, d, why);
}

/* ---- registers ---------------------------------------------------------------- */

uint8_t virtio_get_status(struct virtio_dev *d)
{
    if (d->transport == VIRTIO_MMIO)
        return (uint8_t)mmio_read32(d->mmio + VIRTIO_MMIO_STATUS);
    return mmio_read8(d->common + VIRTIO_PCI_STATUS);
}

void virtio_set_status(struct virtio_dev *d, uint8_t s)
{
    if (d->transport == VIRTIO_MMIO)
        mmio_write32(d->mmio + VIRTIO_MMIO_STATUS, s);
    else
        mmio_write8(d->common + VIRTIO_PCI_STATUS, s);
}

int virtio_reset(struct virtio_dev *d, uint64_t timeout_ns)
{
    uint64_t khz = tsc_khz();
    if (!timeout_ns)
        timeout_ns = 1000000000ull;
    uint64_t limit = khz ? rdtsc() + timeout_ns / 1000000 * khz + 1 : 0;
    uint64_t polls = 0;
    virtio_set_status(d, 0);
    while (virtio_get_status(d) != 0) {
        if (khz ? rdtsc() > limit : ++polls > 100000000ull)
            return -1;
        cpu_relax();
    }
    return 0;
}

static uint32_t dev_features_word(struct virtio_dev *d, uint32_t sel)
{
    if (d->transport == VIRTIO_MMIO) {
        mmio_write32(d->mmio + VIRTIO_MMIO_DEV_FEATURES_SEL, sel);
        return mmio_read32(d->mmio + VIRTIO_MMIO_DEV_FEATURES);
    }
    mmio_write32(d->common + VIRTIO_PCI_DEV_FEATURE_SEL, sel);
    return mmio_read32(d->common + VIRTIO_PCI_DEV_FEATURE);
}

static void drv_features_word(struct virtio_dev *d, uint32_t sel, uint32_t v)
{
    if (d->transport == VIRTIO_MMIO) {
        mmio_write32(d->mmio + VIRTIO_MMIO_DRV_FEATURES_SEL, sel);
        mmio_write32(d->mmio + VIRTIO_MMIO_DRV_FEATURES, v);
    } else {
        mmio_write32(d->common + VIRTIO_PCI_DRV_FEATURE_SEL, sel);
        mmio_write32(d->common + VIRTIO_PCI_DRV_FEATURE, v);
    }
}

int virtio_negotiate(struct virtio_dev *d, uint64_t wanted)
{
    if (virtio_reset(d, 0) < 0)
        return -1;
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE);
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER);
    d->device_features = dev_features_word(d, 0) | (uint64_t)dev_features_word(d, 1) << 32;
    if (!((d->device_features >> VIRTIO_F_VERSION_1) & 1)) {
        virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                             VIRTIO_STATUS_FAILED);     /* a driver never clears bits */
        return -2;
    }
    d->features = d->device_features & (wanted | 1ull << VIRTIO_F_VERSION_1);
    drv_features_word(d, 0, (uint32_t)d->features);
    drv_features_word(d, 1, (uint32_t)(d->features >> 32));
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER | VIRTIO_STATUS_FEATURES_OK);
    if (!(virtio_get_status(d) & VIRTIO_STATUS_FEATURES_OK)) {
        virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                             VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_FAILED);
        return -3;
    }
    return 0;
}

void virtio_driver_ok(struct virtio_dev *d)
{
    virtio_set_status(d, VIRTIO_STATUS_ACKNOWLEDGE | VIRTIO_STATUS_DRIVER |
                         VIRTIO_STATUS_FEATURES_OK | VIRTIO_STATUS_DRIVER_OK);
}

static uintptr_t cfg_addr(struct virtio_dev *d, unsigned off)
{
    return d->transport == VIRTIO_MMIO ? d->mmio + VIRTIO_MMIO_CONFIG + off : d->devcfg + off;
}

static uint32_t cfg_generation(struct virtio_dev *d)
{
    if (d->transport == VIRTIO_MMIO)
        return mmio_read32(d->mmio + VIRTIO_MMIO_CONFIG_GEN);
    return mmio_read8(d->common + VIRTIO_PCI_CONFIG_GEN);
}

uint8_t virtio_cfg_read8(struct virtio_dev *d, unsigned off)   { return mmio_read8(cfg_addr(d, off)); }
uint16_t virtio_cfg_read16(struct virtio_dev *d, unsigned off) { return mmio_read16(cfg_addr(d, off)); }
uint32_t virtio_cfg_read32(struct virtio_dev *d, unsigned off) { return mmio_read32(cfg_addr(d, off)); }
void virtio_cfg_write8(struct virtio_dev *d, unsigned off, uint8_t v) { mmio_write8(cfg_addr(d, off), v); }

uint64_t virtio_cfg_read64(struct virtio_dev *d, unsigned off)
{
    uint32_t g0, g1, lo, hi;
    int guard = 0;
    do {
        g0 = cfg_generation(d);
        lo = mmio_read32(cfg_addr(d, off));
        hi = mmio_read32(cfg_addr(d, off + 4));
        g1 = cfg_generation(d);
    } while (g0 != g1 && ++guard < 1000);
    return (uint64_t)hi << 32 | lo;
}

uint32_t virtio_isr_read_ack(struct virtio_dev *d)
{
    if (d->transport == VIRTIO_MMIO) {
        uint32_t s = mmio_read32(d->mmio + VIRTIO_MMIO_INT_STATUS);
        if (s)
            mmio_write32(d->mmio + VIRTIO_MMIO_INT_ACK, s);
        return s;
    }
    return mmio_read8(d->isr);
}

/* ---- virtqueues ------------------------------------------------------------------ */

#define PAGE 4096u
#define ALIGN_UP(x, a) (((x) + (a) - 1) & ~(size_t)((a) - 1))

size_t virtq_mem_size(unsigned size)
{
    return ALIGN_UP(16u * size, PAGE) + ALIGN_UP(6u + 2u * size, PAGE) + ALIGN_UP(6u + 8u * size, PAGE);
}

unsigned virtq_max_size(struct virtio_dev *d, unsigned index)
{
    if (d->transport == VIRTIO_MMIO) {
        mmio_write32(d->mmio + VIRTIO_MMIO_QUEUE_SEL, index);
        return mmio_read32(d->mmio + VIRTIO_MMIO_QUEUE_NUM_MAX);
    }
    if (index >= mmio_read16(d->common + VIRTIO_PCI_NUM_QUEUES))
        return 0;
    mmio_write16(d->common + VIRTIO_PCI_QUEUE_SEL, (uint16_t)index);
    return mmio_read16(d->common + VIRTIO_PCI_QUEUE_SIZE);
}

int virtq_setup(struct virtio_dev *d, struct virtq *vq, unsigned index, unsigned size,
                void *mem, uint16_t msix_vector, int irq)
{
    size_t dsz = ALIGN_UP(16u * size, PAGE), asz = ALIGN_UP(6u + 2u * size, PAGE);
    memset(vq, 0, sizeof(*vq));
    memset(mem, 0, virtq_mem_size(size));
    vq->dev = d;
    vq->index = (uint16_t)index;
    vq->size = (uint16_t)size;
    vq->mask = (uint16_t)(size - 1);
    vq->mem = mem;
    vq->mem_size = virtq_mem_size(size);
    vq->desc = mem;
    vq->avail = (void *)((char *)mem + dsz);
    vq->used = (void *)((char *)mem + dsz + asz);
    vq->used_event = &vq->avail->ring[size];
    vq->avail_event = (volatile uint16_t *)&vq->used->ring[size];
    vq->event_idx = virtio_has(d, VIRTIO_F_EVENT_IDX);
    vq->irq = irq;
    if (!irq) {
        if (vq->event_idx)
            *vq->used_event = 0x7fff;
        else
            vq->avail->flags = VIRTQ_AVAIL_F_NO_INTERRUPT;
    }
    uint64_t da = (uintptr_t)vq->desc, aa = (uintptr_t)vq->avail, ua = (uintptr_t)vq->used;
    if (d->transport == VIRTIO_MMIO) {
        uintptr_t m = d->mmio;
        mmio_write32(m + VIRTIO_MMIO_QUEUE_SEL, index);
        if (mmio_read32(m + VIRTIO_MMIO_QUEUE_READY))
            return -1;
        mmio_write32(m + VIRTIO_MMIO_QUEUE_NUM, size);
        mmio_write32(m + VIRTIO_MMIO_QUEUE_DESC_LO, (uint32_t)da);
        mmio_write32(m + VIRTIO_MMIO_QUEUE_DESC_HI, (uint32_t)(da >> 32));
        mmio_write32(m + VIRTIO_MMIO_QUEUE_DRIVER_LO, (uint32_t)aa);
        mmio_write32(m + VIRTIO_MMIO_QUEUE_DRIVER_HI, (uint32_t)(aa >> 32));
        mmio_write32(m + VIRTIO_MMIO_QUEUE_DEVICE_LO, (uint32_t)ua);
        mmio_write32(m + VIRTIO_MMIO_QUEUE_DEVICE_HI, (uint32_t)(ua >> 32));
        mmio_write32(m + VIRTIO_MMIO_QUEUE_READY, 1);
        vq->notify_addr = m + VIRTIO_MMIO_QUEUE_NOTIFY;
        vq->notify_pci = 0;
        return 0;
    }
    uintptr_t c = d->common;
    mmio_write16(c + VIRTIO_PCI_QUEUE_SEL, (uint16_t)index);
    mmio_write16(c + VIRTIO_PCI_QUEUE_SIZE, (uint16_t)size);
    if (mmio_read16(c + VIRTIO_PCI_QUEUE_SIZE) != size)
        return -1;
    mmio_write16(c + VIRTIO_PCI_QUEUE_MSIX, msix_vector);
    if (mmio_read16(c + VIRTIO_PCI_QUEUE_MSIX) != msix_vector)
        return -1;
    mmio_write32(c + VIRTIO_PCI_QUEUE_DESC, (uint32_t)da);
    mmio_write32(c + VIRTIO_PCI_QUEUE_DESC + 4, (uint32_t)(da >> 32));
    mmio_write32(c + VIRTIO_PCI_QUEUE_DRIVER, (uint32_t)aa);
    mmio_write32(c + VIRTIO_PCI_QUEUE_DRIVER + 4, (uint32_t)(aa >> 32));
    mmio_write32(c + VIRTIO_PCI_QUEUE_DEVICE, (uint32_t)ua);
    mmio_write32(c + VIRTIO_PCI_QUEUE_DEVICE + 4, (uint32_t)(ua >> 32));
    uint16_t noff = mmio_read16(c + VIRTIO_PCI_QUEUE_NOTIFY_OFF);
    mmio_write16(c + VIRTIO_PCI_QUEUE_ENABLE, 1);
    vq->notify_addr = d->notify + (uintptr_t)noff * d->notify_mult;
    vq->notify_pci = 1;
    return 0;
}
