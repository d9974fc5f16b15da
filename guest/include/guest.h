/*
 * guest.h - the freestanding library for pykvm's test guests.
 *
 * A guest is an ELF64 image linked at 1 MiB that boots by the Xen PVH protocol
 * (lib/entry.S).  The boot code sets up long mode at CPL 0 with as few
 * instructions as possible, then calls the guest's `int main(void)` at CPL 3,
 * where the guest does its real work (see README.md for why).  Everything
 * below is callable from CPL 3: all RAM and the device windows are mapped
 * user-accessible and the TSS I/O bitmap allows every port.
 *
 * No libc: only what is declared here.  No floating point or SIMD (the
 * library and the guests are compiled with -mgeneral-regs-only).
 */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#define GUEST_NORETURN __attribute__((noreturn))
#define GUEST_PRINTF(f, a) __attribute__((format(printf, f, a)))

/* ---- entry points a guest provides ------------------------------------ */

int main(void);                 /* runs at CPL 3; its return value goes to guest_exit() */

/*
 * Optional hooks, both run at CPL 0 (slow: every instruction is emulated on
 * kvm_pvm, keep them short).  Weak empty defaults live in lib/entry.S.
 *   guest_early()      long mode, GDT and TSS loaded, *no IDT yet*: any
 *                      exception here triple-faults.
 *   guest_early_idt()  right after the IDT is loaded: exceptions are
 *                      reported by the library's handler (see README.md).
 * Do not use int3 / int N here: kvm_pvm's emulator cannot deliver software
 * interrupts at CPL 0 and stops the VM (KVM_EXIT_INTERNAL_ERROR).
 */
void guest_early(void);
void guest_early_idt(void);

/* The image occupies [__image_start, __image_end), 4 KiB aligned, starting
 * at 1 MiB; RAM above __image_end (see the e820 map) is free for the guest. */
extern char __image_start[], __image_end[];

/* ---- exit --------------------------------------------------------------- */

/* Write v to the isa-debug-exit port 0x501 (pykvm exits with v, QEMU with
 * (v<<1)|1), then spin in case the VMM keeps running us. */
GUEST_NORETURN void guest_exit(int v);

/* ---- port I/O ------------------------------------------------------------ */

static inline void outb(uint16_t port, uint8_t v)  { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outw(uint16_t port, uint16_t v) { __asm__ volatile("outw %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline void outl(uint16_t port, uint32_t v) { __asm__ volatile("outl %0, %1" : : "a"(v), "Nd"(port) : "memory"); }
static inline uint8_t inb(uint16_t port)  { uint8_t v;  __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint16_t inw(uint16_t port) { uint16_t v; __asm__ volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline uint32_t inl(uint16_t port) { uint32_t v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }

/* ---- MMIO ------------------------------------------------------------------
 * One access of exactly the given width through a volatile pointer; the
 * "memory" clobbers keep the compiler from moving other memory accesses
 * across it (x86 keeps the order of the accesses themselves; UC mappings,
 * PCD|PWT, are set up for 0xc0000000..4 GiB). */
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }

static inline uint8_t mmio_read8(uintptr_t a)   { barrier(); uint8_t v  = *(volatile uint8_t *)a;  barrier(); return v; }
static inline uint16_t mmio_read16(uintptr_t a) { barrier(); uint16_t v = *(volatile uint16_t *)a; barrier(); return v; }
static inline uint32_t mmio_read32(uintptr_t a) { barrier(); uint32_t v = *(volatile uint32_t *)a; barrier(); return v; }
static inline uint64_t mmio_read64(uintptr_t a) { barrier(); uint64_t v = *(volatile uint64_t *)a; barrier(); return v; }
static inline void mmio_write8(uintptr_t a, uint8_t v)   { barrier(); *(volatile uint8_t *)a = v;  barrier(); }
static inline void mmio_write16(uintptr_t a, uint16_t v) { barrier(); *(volatile uint16_t *)a = v; barrier(); }
static inline void mmio_write32(uintptr_t a, uint32_t v) { barrier(); *(volatile uint32_t *)a = v; barrier(); }
static inline void mmio_write64(uintptr_t a, uint64_t v) { barrier(); *(volatile uint64_t *)a = v; barrier(); }

/* ---- serial console (16550 at 0x3f8, polled) ---------------------------------
 * Output is byte-exact: "\n" is sent as a single 0x0a, never "\r\n".
 * The UART is initialised (8N1, 115200, FIFOs on) on first use. */
void serial_putc(char c);
void serial_write(const char *s, size_t n);

int putchar(int c);
int puts(const char *s);        /* s and a "\n", like libc */
GUEST_PRINTF(1, 2) int printf(const char *fmt, ...);
int vprintf(const char *fmt, va_list ap);
/* Formats: %d %i %u %x %X %o %c %s %p %%, flags '-' '0' ' ' '+' '#', width and
 * precision (also '*'), length modifiers hh h l ll z t j.  %p prints 0x%lx.
 * snprintf returns the length the full output would have (C99). */
GUEST_PRINTF(3, 4) int snprintf(char *buf, size_t n, const char *fmt, ...);
int vsnprintf(char *buf, size_t n, const char *fmt, va_list ap);

/* ---- strings and memory -------------------------------------------------- */

void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);
size_t strlen(const char *s);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
char *strchr(const char *s, int c);

/* ---- boot information (Xen PVH hvm_start_info, layout of Xen's
 *      public/arch-x86/hvm/start_info.h) ----------------------------------- */

#define HVM_START_MAGIC 0x336ec578u

struct hvm_start_info {
    uint32_t magic;             /* HVM_START_MAGIC */
    uint32_t version;           /* >= 1: memmap_* are valid */
    uint32_t flags;
    uint32_t nr_modules;
    uint64_t modlist_paddr;
    uint64_t cmdline_paddr;     /* NUL-terminated, 0 = none */
    uint64_t rsdp_paddr;
    uint64_t memmap_paddr;      /* array of struct e820 */
    uint32_t memmap_entries;
    uint32_t reserved;
};

struct e820 {                   /* struct hvm_memmap_table_entry */
    uint64_t addr;
    uint64_t size;
    uint32_t type;              /* 1 RAM, 2 reserved, 3 ACPI, 4 NVS, 5 unusable */
    uint32_t reserved;
};

#define E820_RAM 1

/* The start info the VMM passed in EBX (NULL if the magic was wrong). */
const struct hvm_start_info *start_info(void);

int e820_count(void);                   /* 0 if there is no memory map */
const struct e820 *e820_entry(int i);   /* NULL if out of range */

/* ---- command line --------------------------------------------------------
 * Words are separated by spaces; a word is `key=value` or just `key`.
 * No quoting.  The line is the VMM's copy (not copied, read in place). */
const char *cmdline(void);              /* verbatim, "" if none */
/* Value of the last `key=value` word as a NUL-terminated string that stays
 * valid ("" for a bare `key`, NULL if absent).  The value is everything after
 * the first '=' (`a=b=c` gives "b=c").  Only the first 4095 bytes of the
 * command line are searched. */
const char *cmdline_get(const char *key);
/* Decimal, 0x-hex or 0-octal, with an optional k/m/g/t suffix (either case,
 * powers of 1024).  dflt when absent, empty or malformed. */
uint64_t cmdline_get_u64(const char *key, uint64_t dflt);
/* Parse a number as above from s; returns 0 and sets *out on success, -1 else. */
int parse_u64(const char *s, uint64_t *out);

/* ---- time ------------------------------------------------------------------ */

static inline uint64_t rdtsc(void)
{
    uint32_t lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((uint64_t)hi << 32) | lo;
}

/* TSC frequency in kHz: CPUID 0x40000010 EAX (when the hypervisor's max
 * leaf, CPUID 0x40000000 EAX, reaches it and it is non-zero), else the
 * `tsc_khz=N` command-line argument, else 0 (unknown).  Computed once. */
uint64_t tsc_khz(void);
/* rdtsc() converted to nanoseconds; 0 when tsc_khz() is 0. */
uint64_t now_ns(void);
uint64_t tsc_to_ns(uint64_t tsc);

/* ---- memory allocation (lib/alloc.c) -----------------------------------------
 * A bump allocator over the e820 RAM above the image (__image_end), below
 * 0xc0000000 (the cached part of the identity map), skipping the VMM's boot
 * information (hvm_start_info, its memory map and the command line).  Nothing
 * is ever freed.  align must be a power of two (0 means 16).  Returns NULL
 * when no RAM entry has room.  The memory is *not* cleared (fresh guest RAM
 * reads as zero under QEMU and pykvm); guest_zalloc() clears it. */
void *guest_alloc(size_t size, size_t align);
void *guest_zalloc(size_t size, size_t align);
/* Bytes still free in the RAM entry the allocator is currently in, plus every
 * later RAM entry below 0xc0000000 (an estimate for error messages). */
uint64_t guest_alloc_avail(void);

/* ---- pseudo-random numbers and checksums --------------------------------------
 * splitmix64 (Steele, Lea, Flood 2014), exactly:
 *   state += 0x9E3779B97F4A7C15; z = state;
 *   z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
 *   return z ^ (z >> 31); */
#define SPLITMIX64_GAMMA 0x9E3779B97F4A7C15ull
static inline uint64_t splitmix64(uint64_t *state)
{
    uint64_t z = (*state += SPLITMIX64_GAMMA);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* CRC-32C (Castagnoli; reflected polynomial 0x82F63B78, init ~0, final ~0;
 * crc32c("123456789") == 0xE3069283), in software (lib/crc32c.c): the CPUID
 * the VMM gives has no SSE4.2.  Tables (slicing-by-8, 8 KiB) are built on
 * first use.  crc32c_update() continues a raw (not inverted) register:
 * crc32c(p, n) == ~crc32c_update(~0u, p, n); crc32c_u64() feeds the 8
 * little-endian bytes of one word. */
uint32_t crc32c(const void *p, size_t n);
uint32_t crc32c_update(uint32_t crc, const void *p, size_t n);
extern uint32_t crc32c_table[8][256];
void crc32c_init(void);
static inline uint32_t crc32c_u64(uint32_t crc, uint64_t w)
{
    uint32_t x = crc ^ (uint32_t)w, h = (uint32_t)(w >> 32);
    return crc32c_table[7][x & 0xff] ^ crc32c_table[6][(x >> 8) & 0xff] ^
           crc32c_table[5][(x >> 16) & 0xff] ^ crc32c_table[4][x >> 24] ^
           crc32c_table[3][h & 0xff] ^ crc32c_table[2][(h >> 8) & 0xff] ^
           crc32c_table[1][(h >> 16) & 0xff] ^ crc32c_table[0][h >> 24];
}

/* A full barrier (store->load ordering); mfence works at CPL 3. */
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

/* ---- CPU ------------------------------------------------------------------
 * CAUTION: on kvm_pvm, CPUID executed at CPL 3 is not intercepted: it returns
 * the host CPU's leaves, not the guest CPUID the VMM set.  Call cpuid() from
 * guest_early()/guest_early_idt() (CPL 0) for the VMM's values. */

static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Segment selectors set up by lib/entry.S. */
#define GDT_KERNEL_CS 0x08
#define GDT_KERNEL_DS 0x10
#define GDT_USER_DS   0x1b      /* 0x18 | RPL 3 */
#define GDT_USER_CS   0x23      /* 0x20 | RPL 3 */
#define GDT_TSS       0x28

#endif
