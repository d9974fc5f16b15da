/*
 * alloc.c - a bump allocator over free guest RAM.
 *
 * Free RAM is every e820 RAM entry (type 1) clipped to [__image_end,
 * 0xc0000000): above the image, and inside the part of the identity map that
 * entry.S maps cacheable (0xc0000000 and up is PCD|PWT).  The VMM's boot
 * information (hvm_start_info, the memory map it points to and the command
 * line) may lie in that RAM (pykvm puts it right after the image), so those
 * ranges are skipped.  Allocation walks upward from the last allocation; the
 * e820 entries may come in any order (QEMU's are not sorted).
 */
#include "guest.h"

#define ALLOC_LIMIT 0xc0000000ull

static uint64_t next_free;              /* lowest address not yet handed out */

struct range { uint64_t lo, hi; };

static int reserved(struct range *r)
{
    const struct hvm_start_info *si = start_info();
    int n = 0;
    if (!si)
        return 0;
    r[n++] = (struct range){ (uintptr_t)si, (uintptr_t)si + sizeof(*si) };
    if (si->memmap_paddr && si->memmap_entries)
        r[n++] = (struct range){ si->memmap_paddr,
                                 si->memmap_paddr + si->memmap_entries * sizeof(struct e820) };
    if (si->cmdline_paddr)
        r[n++] = (struct range){ si->cmdline_paddr, si->cmdline_paddr + strlen(cmdline()) + 1 };
    return n;
}

/* The RAM entry containing a, or else the lowest one starting above a; its
 * clipped bounds in *lo and *hi.  0 if there is none. */
static int ram_at_or_above(uint64_t a, uint64_t *lo, uint64_t *hi)
{
    int found = 0;
    for (int i = 0; i < e820_count(); i++) {
        const struct e820 *e = e820_entry(i);
        uint64_t s = e->addr, t = e->addr + e->size;
        if (e->type != E820_RAM || !e->size)
            continue;
        if (s < (uintptr_t)__image_end)
            s = (uintptr_t)__image_end;
        if (t > ALLOC_LIMIT)
            t = ALLOC_LIMIT;
        if (s >= t || t <= a)
            continue;
        if (s <= a) {
            *lo = a;
            *hi = t;
            return 1;
        }
        if (!found || s < *lo) {
            *lo = s;
            *hi = t;
            found = 1;
        }
    }
    return found;
}

void *guest_alloc(size_t size, size_t align)
{
    struct range res[3];
    int nres = reserved(res);
    uint64_t a = next_free ? next_free : (uintptr_t)__image_end;

    if (!align)
        align = 16;
    for (;;) {
        uint64_t lo, hi;
        if (!ram_at_or_above(a, &lo, &hi))
            return NULL;
        a = (lo + align - 1) & ~(uint64_t)(align - 1);
        if (a + size > hi || a + size < a) {
            a = hi;
            continue;
        }
        int clash = 0;
        for (int i = 0; i < nres; i++) {
            if (res[i].lo < a + size && a < res[i].hi) {
                a = res[i].hi;
                clash = 1;
                break;
            }
        }
        if (clash)
            continue;
        next_free = a + size;
        return (void *)(uintptr_t)a;
    }
}

void *guest_zalloc(size_t size, size_t align)
{
    void *p = guest_alloc(size, align);
    if (p)
        memset(p, 0, size);
    return p;
}

uint64_t guest_alloc_avail(void)
{
    uint64_t a = next_free ? next_free : (uintptr_t)__image_end, lo, hi, total = 0;
    while (ram_at_or_above(a, &lo, &hi)) {
        total += hi - lo;
        a = hi;
    }
    return total;
}
