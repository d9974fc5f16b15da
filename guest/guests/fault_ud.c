/*
 * fault_ud - an exception before any IDT exists: the VMM must report it.
 *
 * guest_early() runs at CPL 0 in long mode with the GDT and TSS loaded but
 * *no IDT* (IDTR is still the reset value, limit 0xffff at base 0, which
 * holds no valid gates), and executes ud2.  #UD cannot be delivered, nor
 * can the #GP/#DF that follow: the CPU triple-faults (shutdown) with RIP at
 * the ud2 in guest_early.
 *
 * Expected: no output at all; pykvm reports a shutdown at guest_early
 * (exit status: the VMM's fault status); QEMU -no-reboot exits with status 0.
 */
#include "guest.h"

void guest_early(void)
{
    __asm__ volatile("ud2");
}

int main(void)
{
    printf("fault_ud: not reached\n");
    return 1;
}
