/*
 * time.c - TSC frequency and nanoseconds.
 *
 * The frequency comes from the hypervisor's CPUID leaf 0x40000010 (EAX = TSC
 * kHz, the "timing information" leaf that pykvm fills) when leaf 0x40000000
 * says it exists; else from `tsc_khz=N` on the command line; else it is
 * unknown (0).  The CPUID part is read at CPL 0 by entry.S (cpuid_tsc_khz):
 * on kvm_pvm CPUID at CPL 3 is not intercepted and returns the host's leaves.
 * RDTSC at CPL 3 runs natively (no exit).
 */
#include "guest.h"

extern uint32_t cpuid_tsc_khz;

static uint64_t khz;
static int khz_known;

uint64_t tsc_khz(void)
{
    if (!khz_known) {
        khz = cpuid_tsc_khz ? cpuid_tsc_khz : cmdline_get_u64("tsc_khz", 0);
        khz_known = 1;
    }
    return khz;
}

uint64_t tsc_to_ns(uint64_t tsc)
{
    uint64_t k = tsc_khz();
    if (!k)
        return 0;
    /* tsc * 1e6 / k without overflowing 64 bits or needing 128-bit division. */
    return tsc / k * 1000000 + tsc % k * 1000000 / k;
}

uint64_t now_ns(void)
{
    return tsc_to_ns(rdtsc());
}
