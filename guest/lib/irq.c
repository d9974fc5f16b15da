/*
 * irq.c - IDT vectors with C handlers, the local APIC, the IOAPIC(s) (irq.h).
 */
#include "irq.h"

#define NVEC (IRQ_VECTOR_LAST - IRQ_VECTOR_FIRST + 1)

extern char irq_stubs[], irq_if_on_stub[], irq_if_off_stub[];
extern uint64_t idt[];                  /* lib/entry.S: 256 x 16-byte gates */

volatile uint64_t irq_count[NVEC];
static struct { irq_handler_t fn; void *arg; } handlers[NVEC];

#define LAPIC_ID    0x020
#define LAPIC_TPR   0x080
#define LAPIC_EOI   0x0b0
#define LAPIC_SVR   0x0f0
#define LAPIC_LVT_LINT0 0x350

static void gate_set(int v, void *fn, int dpl)
{
    uint64_t a = (uintptr_t)fn;
    idt[2 * v + 1] = a >> 32;
    idt[2 * v] = (a & 0xffff) | ((uint64_t)GDT_KERNEL_CS << 16) |
                 ((uint64_t)(0x8e | (dpl << 5)) << 40) | (((a >> 16) & 0xffff) << 48);
    barrier();
}

/* Called from irq_common at CPL 0. */
void irq_dispatch(uint64_t v);
void irq_dispatch(uint64_t v)
{
    unsigned i = (unsigned)v - IRQ_VECTOR_FIRST;
    if (i >= NVEC)
        return;
    irq_count[i]++;
    if (handlers[i].fn)
        handlers[i].fn((int)v, handlers[i].arg);
    if (v != IRQ_VECTOR_SPURIOUS)
        lapic_eoi();
}

int irq_set_handler(int vector, irq_handler_t fn, void *arg)
{
    if (vector < IRQ_VECTOR_FIRST || vector > IRQ_VECTOR_LAST)
        return -1;
    handlers[vector - IRQ_VECTOR_FIRST].fn = fn;
    handlers[vector - IRQ_VECTOR_FIRST].arg = arg;
    gate_set(vector, irq_stubs + 16 * (vector - IRQ_VECTOR_FIRST), 0);
    return 0;
}

static void if_trampoline(void *stub)
{
    uint64_t lo = idt[6], hi = idt[7];  /* vector 3 */
    gate_set(3, stub, 3);
    __asm__ volatile("int3" ::: "memory");
    idt[7] = hi;
    idt[6] = lo;
    barrier();
}

void irq_enable(void)  { if_trampoline(irq_if_on_stub); }
void irq_disable(void) { if_trampoline(irq_if_off_stub); }

uint32_t lapic_id(void)
{
    return mmio_read32(LAPIC_BASE + LAPIC_ID) >> 24;
}

void lapic_eoi(void)
{
    mmio_write32(LAPIC_BASE + LAPIC_EOI, 0);
}

uint32_t lapic_init(void)
{
    /* Firmware (SeaBIOS under QEMU -M pc) leaves the 8259 PICs initialised
     * with IRQ 0 (the PIT) unmasked at vector 8, and LINT0 in ExtINT mode:
     * with IF = 1 that timer would arrive as "vector 8".  Mask both PICs and
     * LINT0; only the IOAPIC and MSIs deliver to us. */
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
    mmio_write32(LAPIC_BASE + LAPIC_LVT_LINT0, mmio_read32(LAPIC_BASE + LAPIC_LVT_LINT0) | (1u << 16));
    mmio_write32(LAPIC_BASE + LAPIC_TPR, 0);
    mmio_write32(LAPIC_BASE + LAPIC_SVR, 0x100 | IRQ_VECTOR_SPURIOUS);
    irq_set_handler(IRQ_VECTOR_SPURIOUS, NULL, NULL);
    return lapic_id();
}

static uint32_t ioapic_read(uintptr_t base, uint32_t reg)
{
    mmio_write32(base, reg);
    return mmio_read32(base + 0x10);
}

static void ioapic_write(uintptr_t base, uint32_t reg, uint32_t v)
{
    mmio_write32(base, reg);
    mmio_write32(base + 0x10, v);
}

/* Which IOAPIC and pin serve gsi; -1 if none. */
static int ioapic_pin(uint32_t gsi, uintptr_t *base, uint32_t *pin)
{
    uint32_t ver = ioapic_read(IOAPIC_BASE, 1);
    if (ver == 0xffffffffu)
        return -1;
    uint32_t n = ((ver >> 16) & 0xff) + 1;
    if (gsi < n) {
        *base = IOAPIC_BASE;
        *pin = gsi;
        return 0;
    }
    uint32_t ver2 = ioapic_read(IOAPIC2_BASE, 1);
    if (ver2 == 0xffffffffu || ver2 == 0)
        return -1;
    uint32_t n2 = ((ver2 >> 16) & 0xff) + 1;
    if (gsi - n >= n2)
        return -1;
    *base = IOAPIC2_BASE;
    *pin = gsi - n;
    return 0;
}

int ioapic_route(uint32_t gsi, int vector, uint32_t dest, int level, int masked)
{
    uintptr_t base;
    uint32_t pin;
    if (ioapic_pin(gsi, &base, &pin) < 0)
        return -1;
    uint32_t lo = (uint32_t)vector | (level ? 1u << 15 : 0) | (masked ? 1u << 16 : 0);
    ioapic_write(base, 0x10 + 2 * pin, 1u << 16);       /* mask while changing */
    ioapic_write(base, 0x11 + 2 * pin, dest << 24);
    ioapic_write(base, 0x10 + 2 * pin, lo);
    return 0;
}

int ioapic_mask(uint32_t gsi, int masked)
{
    uintptr_t base;
    uint32_t pin;
    if (ioapic_pin(gsi, &base, &pin) < 0)
        return -1;
    uint32_t lo = ioapic_read(base, 0x10 + 2 * pin);
    ioapic_write(base, 0x10 + 2 * pin, masked ? lo | (1u << 16) : lo & ~(1u << 16));
    return 0;
}
