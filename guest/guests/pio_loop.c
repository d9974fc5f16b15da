/*
 * pio_loop - a benchmark guest: how many port-I/O exits per second the VMM serves.
 *
 * Writes `count=N` (default 100000) bytes to port 0x80 (POST codes; nobody
 * claims it, so each write is one exit the VMM counts and drops), timing the
 * loop with the TSC. Prints one line, then exits 0:
 *
 *   pio_loop: <N> exits in <nanoseconds> ns
 *
 * Needs the TSC frequency (CPUID 0x40000010, or `tsc_khz=` on the command line).
 */
#include "guest.h"

int main(void)
{
    uint64_t n = cmdline_get_u64("count", 100000);

    if (!tsc_khz()) {
        printf("pio_loop: TSC frequency unknown (pass tsc_khz=)\n");
        return 1;
    }
    uint64_t t0 = rdtsc();
    for (uint64_t i = 0; i < n; i++)
        outb(0x80, (uint8_t)i);
    uint64_t t1 = rdtsc();
    printf("pio_loop: %lu exits in %lu ns\n", n, tsc_to_ns(t1 - t0));
    return 0;
}
