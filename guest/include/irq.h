/*
 * irq.h - hardware interrupts for the test guests: the local APIC, the
 * IOAPIC(s), IDT vectors with C handlers, and IF at CPL 3.
 *
 * Handlers run at CPL 0 (slow on kvm_pvm: every instruction is emulated) with
 * IF = 0, on the kernel stack; the stub saves the caller-saved registers,
 * counts the interrupt, calls the handler and then writes the local APIC EOI
 * (except for IRQ_VECTOR_SPURIOUS).  Polling needs none of this.
 */
#ifndef IRQ_H
#define IRQ_H

#include "guest.h"

#define IRQ_VECTOR_FIRST    32
#define IRQ_VECTOR_LAST     63
#define IRQ_VECTOR_SPURIOUS 63          /* the LAPIC's spurious vector (no EOI) */

#define LAPIC_BASE   0xfee00000u
#define IOAPIC_BASE  0xfec00000u        /* GSIs 0.. */
#define IOAPIC2_BASE 0xfec10000u        /* QEMU microvm's second IOAPIC (GSIs 24..) */

typedef void (*irq_handler_t)(int vector, void *arg);

/* Point IDT vector (IRQ_VECTOR_FIRST..IRQ_VECTOR_LAST) at the library's stub
 * for it, which calls fn(vector, arg).  The IDT is ordinary memory mapped at
 * CPL 3, so this is a plain store.  Returns -1 for a vector out of range. */
int irq_set_handler(int vector, irq_handler_t fn, void *arg);
/* Interrupts taken on each vector (incremented by the stub, at CPL 0). */
extern volatile uint64_t irq_count[IRQ_VECTOR_LAST - IRQ_VECTOR_FIRST + 1];
static inline uint64_t irq_count_of(int vector) { return irq_count[vector - IRQ_VECTOR_FIRST]; }

/* RFLAGS.IF at CPL 3.  `sti` needs CPL <= IOPL, and on kvm_pvm IOPL 3 does
 * not stick at CPL 3, so both go through a one-shot CPL 0 trampoline: the
 * #BP gate (DPL 3) is pointed for a moment at a stub that sets or clears IF
 * in the frame it returns through, and the guest executes int3. */
void irq_enable(void);
void irq_disable(void);

/* Local APIC (xAPIC MMIO at LAPIC_BASE): software-enable it (SVR, spurious
 * vector IRQ_VECTOR_SPURIOUS), TPR 0.  Also masks both 8259 PICs and LVT
 * LINT0 (firmware leaves the PIT's IRQ 0 unmasked at vector 8 behind
 * ExtINT).  Returns its APIC ID. */
uint32_t lapic_init(void);
uint32_t lapic_id(void);
void lapic_eoi(void);

/* Route global system interrupt gsi to vector on the APIC `dest` (physical
 * destination mode, fixed delivery), active high, edge- or level-triggered,
 * masked or not.  GSIs beyond the first IOAPIC's pins go to a second IOAPIC
 * at IOAPIC2_BASE when one answers there (QEMU microvm: GSIs 24..47).
 * Returns -1 when no IOAPIC has that pin. */
int ioapic_route(uint32_t gsi, int vector, uint32_t dest, int level, int masked);
int ioapic_mask(uint32_t gsi, int masked);

#endif
