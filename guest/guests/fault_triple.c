/*
 * fault_triple - a triple fault with the IDT loaded.
 *
 * guest_early_idt() (CPL 0, IDT loaded, no IST) points RSP at an unmapped
 * address and pushes.  The push raises #PF; delivering it needs to push the
 * exception frame on that same stack (no privilege change, so no stack
 * switch), which faults, so the CPU raises #DF; delivering #DF fails the
 * same way: triple fault (shutdown) with RIP at the push.
 *
 * Expected: no output; QEMU -no-reboot exits with status 0; pykvm reports a
 * shutdown at guest_early_idt.
 */
#include "guest.h"

void guest_early_idt(void)
{
    __asm__ volatile("movq $0x1dead0000, %%rsp\n\t"
                     "pushq %%rax" ::: "memory");
}

int main(void)
{
    printf("fault_triple: not reached\n");
    return 1;
}
