/*
 * memory.c - bounds-checked gpa -> hva translation over the region table.
 */
#include <stddef.h>
#include <stdint.h>

struct pykvm_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t hva;
};

static void *pykvm_gpa_to_hva(const struct pykvm_mem_region *regions, uint32_t nregions,
                              uint64_t gpa, uint64_t len)
{
    for (uint32_t i = 0; i < nregions; i++) {
        const struct pykvm_mem_region *r = &regions[i];

        if (gpa < r->gpa || gpa - r->gpa >= r->size)
            continue;
        /* written so that no sum can overflow: gpa - r->gpa < r->size */
        if (len > r->size - (gpa - r->gpa))
            return NULL;
        return (void *)(uintptr_t)(r->hva + (gpa - r->gpa));
    }
    return NULL;
}

static void pykvm_smp_mb(void)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
}
