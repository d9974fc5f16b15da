/*
 * longmode - checks that the guest really runs in 64-bit long mode at CPL 3.
 *
 * guest_early_idt() (CPL 0) records CR0, CR4, EFER and CS.  main() (CPL 3)
 * checks CR0.PE and PG, CR4.PAE, EFER.LME and LMA, that the kernel CS was
 * 0x08, that its own CS has RPL 3, and that 64-bit arithmetic does not wrap
 * at 32 bits.
 *
 * Expected output, then exit 0 (QEMU status 1):
 *
 *   longmode: cr0=0x80000011 cr4=0x20 efer=0x500 cs0=0x8 cs3=0x33
 *   longmode: ok
 *
 * (cs3 is what `mov %cs` reads at CPL 3: 0x23 on hardware virtualisation,
 * but kvm_pvm runs CPL 3 natively in host user mode, so it reads the host's
 * user CS, 0x33.  Only its RPL is checked.)  On a failed check it prints
 * `longmode: FAIL <check>` for each and exits 1 (QEMU status 3).
 */
#include "guest.h"

#define CR0_PE   (1ul << 0)
#define CR0_PG   (1ul << 31)
#define CR4_PAE  (1ul << 5)
#define EFER_LME (1ul << 8)
#define EFER_LMA (1ul << 10)

static uint64_t cr0, cr4, efer;
static uint16_t cs0;

void guest_early_idt(void)
{
    uint32_t lo, hi;
    __asm__ volatile("mov %%cr0, %0" : "=r"(cr0));
    __asm__ volatile("mov %%cr4, %0" : "=r"(cr4));
    __asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(0xc0000080));
    __asm__ volatile("mov %%cs, %0" : "=r"(cs0));
    efer = ((uint64_t)hi << 32) | lo;
}

static int failed;

static void check(int ok, const char *what)
{
    if (!ok) {
        printf("longmode: FAIL %s\n", what);
        failed = 1;
    }
}

int main(void)
{
    uint16_t cs3;
    __asm__ volatile("mov %%cs, %0" : "=r"(cs3));

    /* volatile: computed at run time, in 64-bit registers. */
    volatile uint64_t a = 0xffffffffu, b = 0x100000001ull;
    uint64_t sum = a + b;                       /* 0x200000000 */
    uint64_t prod = a * b;                      /* 0xffffffffffffffff */
    uint64_t shr = (a << 32 | a) >> 36;         /* 0xfffffff */

    printf("longmode: cr0=0x%lx cr4=0x%lx efer=0x%lx cs0=0x%x cs3=0x%x\n",
           cr0, cr4, efer, cs0, cs3);
    check(cr0 & CR0_PE, "CR0.PE");
    check(cr0 & CR0_PG, "CR0.PG");
    check(cr4 & CR4_PAE, "CR4.PAE");
    check(efer & EFER_LME, "EFER.LME");
    check(efer & EFER_LMA, "EFER.LMA");
    check(cs0 == GDT_KERNEL_CS, "CS at CPL 0 is the kernel code64 selector");
    check((cs3 & 3) == 3, "CS.RPL at CPL 3");
    check(sum == 0x200000000ull, "64-bit add");
    check(prod == 0xffffffffffffffffull, "64-bit multiply");
    check(shr == 0xfffffffull, "64-bit shift");
    check(sizeof(void *) == 8, "pointer size");
    if (failed)
        return 1;
    printf("longmode: ok\n");
    return 0;
}
