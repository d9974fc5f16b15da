/*
 * pci.c - configuration mechanism #1 and BAR assignment (see pci.h).
 *
 * Address port 0xcf8: enable bit 31 | bus << 16 | device << 11 |
 * function << 8 | register & 0xfc; data port 0xcfc + (register & 3).
 *
 * BARs: pykvm assigns them itself (no firmware), SeaBIOS does under QEMU -M
 * pc.  Our page tables map only 0..4 GiB, so a BAR that is unassigned or above
 * 4 GiB is moved into [PCI_WINDOW_BASE, PCI_WINDOW_END) = [0xe0000000,
 * 0xfec00000): the lowest naturally aligned spot there that overlaps no
 * memory BAR that a bus-0 function already decodes below 4 GiB.
 */
#include "pci.h"

static void cfg_addr(uint32_t bdf, unsigned off)
{
    outl(0xcf8, 0x80000000u | (bdf << 8) | (off & 0xfc));
}

uint32_t pci_read32(uint32_t bdf, unsigned off) { cfg_addr(bdf, off); return inl(0xcfc); }
uint16_t pci_read16(uint32_t bdf, unsigned off) { cfg_addr(bdf, off); return inw((uint16_t)(0xcfc + (off & 2))); }
uint8_t pci_read8(uint32_t bdf, unsigned off)   { cfg_addr(bdf, off); return inb((uint16_t)(0xcfc + (off & 3))); }
void pci_write32(uint32_t bdf, unsigned off, uint32_t v) { cfg_addr(bdf, off); outl(0xcfc, v); }
void pci_write16(uint32_t bdf, unsigned off, uint16_t v) { cfg_addr(bdf, off); outw((uint16_t)(0xcfc + (off & 2)), v); }
void pci_write8(uint32_t bdf, unsigned off, uint8_t v)   { cfg_addr(bdf, off); outb((uint16_t)(0xcfc + (off & 3)), v); }

static int present(uint32_t bdf)
{
    return pci_read16(bdf, PCI_VENDOR_ID) != 0xffff;
}

/* Calls fn for every present function of bus 0; stops when fn returns non-zero. */
static int for_each_function(int (*fn)(uint32_t bdf, void *arg), void *arg)
{
    for (unsigned dev = 0; dev < 32; dev++) {
        if (!present(PCI_BDF(0, dev, 0)))
            continue;
        unsigned nfn = (pci_read8(PCI_BDF(0, dev, 0), PCI_HEADER_TYPE) & 0x80) ? 8 : 1;
        for (unsigned f = 0; f < nfn; f++) {
            uint32_t bdf = PCI_BDF(0, dev, f);
            if (present(bdf) && fn(bdf, arg))
                return 1;
        }
    }
    return 0;
}

struct find_arg { uint16_t vendor, device; int index; uint32_t bdf; };

static int find_one(uint32_t bdf, void *arg)
{
    struct find_arg *a = arg;
    if (pci_read16(bdf, PCI_VENDOR_ID) == a->vendor && pci_read16(bdf, PCI_DEVICE_ID) == a->device) {
        if (a->index-- == 0) {
            a->bdf = bdf;
            return 1;
        }
    }
    return 0;
}

int pci_find(uint16_t vendor, uint16_t device, int index, uint32_t *bdf)
{
    struct find_arg a = { vendor, device, index, 0 };
    if (!for_each_function(find_one, &a))
        return -1;
    *bdf = a.bdf;
    return 0;
}

unsigned pci_find_cap(uint32_t bdf, uint8_t id, unsigned after)
{
    if (!(pci_read16(bdf, PCI_STATUS) & PCI_STATUS_CAPS))
        return 0;
    unsigned off = after ? pci_read8(bdf, after + 1) : pci_read8(bdf, PCI_CAP_PTR);
    for (int guard = 0; off >= 0x40 && guard < 48; guard++) {
        off &= 0xfc;
        if (pci_read8(bdf, off) == id)
            return off;
        off = pci_read8(bdf, off + 1);
    }
    return 0;
}

/* Header type 0 only: 6 BARs. */
static int bar_info(uint32_t bdf, int bar, uint64_t *addr, int *is64)
{
    uint32_t lo = pci_read32(bdf, PCI_BAR0 + 4 * bar);
    if (lo & 1)
        return -1;                              /* I/O BAR */
    *is64 = ((lo >> 1) & 3) == 2;
    *addr = lo & ~0xfull;
    if (*is64 && bar < 5)
        *addr |= (uint64_t)pci_read32(bdf, PCI_BAR0 + 4 * bar + 4) << 32;
    return 0;
}

static uint64_t bar_size(uint32_t bdf, int bar, int is64)
{
    unsigned reg = PCI_BAR0 + 4 * bar;
    uint32_t lo = pci_read32(bdf, reg), hi = is64 ? pci_read32(bdf, reg + 4) : 0;
    pci_write32(bdf, reg, 0xffffffffu);
    uint64_t mask = pci_read32(bdf, reg) & ~0xfull;
    if (is64) {
        pci_write32(bdf, reg + 4, 0xffffffffu);
        mask |= (uint64_t)pci_read32(bdf, reg + 4) << 32;
        pci_write32(bdf, reg + 4, hi);
    } else {
        mask |= 0xffffffff00000000ull;
    }
    pci_write32(bdf, reg, lo);
    if (!(mask & 0xffffffffull) && !(mask >> 32))
        return 0;
    return ~mask + 1;
}

/* Memory BARs below 4 GiB that bus-0 functions already decode (collected
 * once, when the first BAR needs an address), plus those we assign. */
#define MAX_RANGES 64
static struct { uint64_t lo, hi; } ranges[MAX_RANGES];
static int nranges = -1;

static int range_scan(uint32_t bdf, void *arg)
{
    (void)arg;
    if ((pci_read8(bdf, PCI_HEADER_TYPE) & 0x7f) != 0)
        return 0;
    for (int b = 0; b < 6; b++) {
        uint64_t a;
        int is64;
        if (bar_info(bdf, b, &a, &is64) < 0)
            continue;
        if (a && a < 0x100000000ull && nranges < MAX_RANGES) {
            uint16_t cmd = pci_read16(bdf, PCI_COMMAND);
            pci_write16(bdf, PCI_COMMAND, cmd & (uint16_t)~PCI_CMD_MEMORY);
            uint64_t sz = bar_size(bdf, b, is64);
            pci_write16(bdf, PCI_COMMAND, cmd);
            if (sz) {
                ranges[nranges].lo = a;
                ranges[nranges].hi = a + sz;
                nranges++;
            }
        }
        if (is64)
            b++;
    }
    return 0;
}

/* Lowest naturally aligned address in the window where sz bytes overlap no
 * known BAR; 0 if none. */
static uint64_t window_alloc(uint64_t sz)
{
    if (nranges < 0) {
        nranges = 0;
        for_each_function(range_scan, NULL);
    }
    uint64_t a = (PCI_WINDOW_BASE + sz - 1) & ~(sz - 1);
    for (int moved = 1; moved;) {
        moved = 0;
        for (int i = 0; i < nranges; i++) {
            if (ranges[i].lo < a + sz && a < ranges[i].hi) {
                a = (ranges[i].hi + sz - 1) & ~(sz - 1);
                moved = 1;
            }
        }
    }
    if (a + sz > PCI_WINDOW_END || nranges >= MAX_RANGES)
        return 0;
    ranges[nranges].lo = a;
    ranges[nranges].hi = a + sz;
    nranges++;
    return a;
}

int pci_bar_map(uint32_t bdf, int bar, uint64_t *addr, uint64_t *size, int *moved)
{
    uint64_t a;
    int is64;
    if (bar < 0 || bar > 5 || bar_info(bdf, bar, &a, &is64) < 0)
        return -1;
    uint16_t cmd = pci_read16(bdf, PCI_COMMAND);
    /* Sizing writes all-ones into the BAR: stop decoding meanwhile. */
    pci_write16(bdf, PCI_COMMAND, cmd & (uint16_t)~PCI_CMD_MEMORY);
    uint64_t sz = bar_size(bdf, bar, is64);
    *moved = 0;
    if (!sz) {
        pci_write16(bdf, PCI_COMMAND, cmd);
        return -1;
    }
    if (a == 0 || a + sz > 0x100000000ull) {
        a = window_alloc(sz);
        if (!a) {
            pci_write16(bdf, PCI_COMMAND, cmd);
            return -1;
        }
        pci_write32(bdf, PCI_BAR0 + 4 * bar, (uint32_t)a);
        if (is64)
            pci_write32(bdf, PCI_BAR0 + 4 * bar + 4, 0);
        *moved = 1;
    }
    pci_write16(bdf, PCI_COMMAND, cmd | PCI_CMD_MEMORY | PCI_CMD_MASTER);
    *addr = a;
    *size = sz;
    return 0;
}
