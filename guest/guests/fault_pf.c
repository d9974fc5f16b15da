/*
 * fault_pf - a page fault at CPL 3, reported by the guest and then by the VMM.
 *
 * main() reads from 0x1dead0000, above the 4 GiB identity map (its PDPT
 * entry is not present).  The guest's #PF handler prints one line and hands
 * the fault to the VMM: it loads a zero-limit IDT and returns to the load,
 * which faults again and now triple-faults with RIP at the load in main.
 *
 * Expected output (rip: the load in main, 0x102072 in this build), then a
 * shutdown (QEMU -no-reboot exits with status 0):
 *
 *   fault_pf: reading 0x1dead0000
 *   guest: exception #PF (vector 14) error=0x4 rip=0x102072 cr2=0x1dead0000 cpl=3
 */
#include "guest.h"

#define UNMAPPED 0x1dead0000ul

int main(void)
{
    printf("fault_pf: reading 0x%lx\n", UNMAPPED);
    uint64_t v = *(volatile uint64_t *)UNMAPPED;
    printf("fault_pf: not reached (read 0x%lx)\n", v);
    return 1;
}
