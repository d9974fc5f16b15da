/*
 * trap.c - the exception report, run at CPL 0 from trap_entry (entry.S).
 *
 * One line per event, always this format (tests parse it):
 *
 *   guest: exception #PF (vector 14) error=0x4 rip=0x1012ab cr2=0xdead0000 cpl=3
 *
 * name: the mnemonic for vectors 0..31 (#15, #22.. for reserved ones), "IRQ"
 * for 32..255; error: the CPU's error code, 0 for vectors without one; rip:
 * the faulting instruction (for #BP, the int3, i.e. the pushed RIP - 1);
 * cr2: CR2 when the event was taken (meaningful for #PF); cpl: CS & 3 of the
 * interrupted context.  All numbers are lower-case hex without padding,
 * except vector and cpl (decimal).
 *
 * Then the event is handed to the VMM (see trap_entry): for faults the handler
 * loads a zero-limit IDT and returns, so the instruction faults again and the
 * CPU triple-faults *at that instruction*; for the rest it triple-faults in
 * trap_stop.  Nothing here may fault: a nested event goes straight to
 * trap_stop.
 */
#include "guest.h"

struct trap_frame {
    uint64_t r15, r14, r13, r12, r11, r10, r9, r8;
    uint64_t rbp, rdi, rsi, rdx, rcx, rbx, rax;
    uint64_t vector, error;
    uint64_t rip, cs, rflags, rsp, ss;  /* pushed by the CPU */
};

_Static_assert(sizeof(struct trap_frame) == 22 * 8, "trap_frame must match trap_entry");

static const char *const names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM",
    "#DF", "#CoP", "#TS", "#NP", "#SS", "#GP", "#PF", "#15",
    "#MF", "#AC", "#MC", "#XM", "#VE", "#CP", "#22", "#23",
    "#24", "#25", "#26", "#27", "#HV", "#VC", "#SX", "#31",
};

/* Vectors that re-occur when the instruction is executed again (faults). */
static int refaults(uint64_t v)
{
    switch (v) {
    case 0: case 5: case 6: case 7: case 10: case 11: case 12: case 13:
    case 14: case 16: case 17: case 19: case 20: case 21:
        return 1;
    default:
        return 0;
    }
}

static int in_trap;

/* Returns 0: iretq to re-execute the instruction, 1: triple-fault here. */
int trap_report(struct trap_frame *f, uint64_t cr2)
{
    if (in_trap)
        return 1;               /* the report itself faulted */
    in_trap = 1;
    /* Back to the int3 so that it re-executes.  (On kvm_pvm the shutdown
     * that follows reports RIP after the int3; hardware/TCG report the int3.
     * int N with N != 3 at CPL 3 arrives as #UD there, not #GP.) */
    if (f->vector == 3)
        f->rip -= 1;
    printf("guest: exception %s (vector %lu) error=0x%lx rip=0x%lx cr2=0x%lx cpl=%lu\n",
           f->vector < 32 ? names[f->vector] : "IRQ", (unsigned long)f->vector,
           (unsigned long)f->error, (unsigned long)f->rip, (unsigned long)cr2,
           (unsigned long)(f->cs & 3));
    return !(refaults(f->vector) || f->vector == 3);
}
