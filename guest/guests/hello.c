/*
 * hello - the smallest useful guest: prints what the VMM handed it.
 *
 * Output (byte-exact, "\n" line ends), then exit status 0
 * (pykvm: 0; QEMU isa-debug-exit: 1):
 *
 *   hello from the guest
 *   cmdline: <the command line, verbatim; empty if none>
 *   tsc_khz: <decimal; 0 if unknown>
 *   e820: <N> entries
 *   e820: 0x<addr, 16 hex digits> 0x<size, 16 hex digits> <type, decimal>
 *   ... (one line per memory-map entry, in the VMM's order)
 */
#include "guest.h"

int main(void)
{
    printf("hello from the guest\n");
    printf("cmdline: %s\n", cmdline());
    printf("tsc_khz: %lu\n", tsc_khz());
    int n = e820_count();
    printf("e820: %d entries\n", n);
    for (int i = 0; i < n; i++) {
        const struct e820 *e = e820_entry(i);
        printf("e820: 0x%016lx 0x%016lx %u\n", e->addr, e->size, e->type);
    }
    return 0;
}
