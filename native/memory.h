/*
 * memory.h - the guest-memory table shared by Python and the C fast path.
 *
 * GuestMemory (pykvm/memory.py) fills an array of these, one per region,
 * sorted by gpa and non-overlapping. C code translates a guest-physical range
 * with pykvm_gpa_to_hva(), which refuses any range not wholly inside one region.
 */
struct pykvm_mem_region {
    uint64_t gpa;
    uint64_t size;
    uint64_t hva;
};

/* Host pointer for [gpa, gpa+len) or NULL when the range is not wholly inside
 * one region (len 0 is valid anywhere inside a region). */
void *pykvm_gpa_to_hva(const struct pykvm_mem_region *regions, uint32_t nregions,
                       uint64_t gpa, uint64_t len);

/* Full memory barrier (orders earlier stores before later loads), for the
 * virtqueue steps that need one; Python calls it through cffi. */
void pykvm_smp_mb(void);
