/*
 * crc32c.c - CRC-32C (Castagnoli) in software, slicing-by-8.
 *
 * crc32c_table[0] is the classic byte-at-a-time table of the reflected
 * polynomial 0x82F63B78; tables 1..7 let crc32c_u64() (guest.h) consume a
 * whole little-endian word per step (~1 cycle per byte instead of ~3).  The
 * result is the standard CRC-32C: init ~0, final ~0, check value
 * crc32c("123456789") = 0xE3069283.  No SSE4.2 crc32 instruction: the CPUID
 * our VMM gives lacks it (and kvm_pvm's emulator would not run it at CPL 0).
 */
#include "guest.h"

uint32_t crc32c_table[8][256];
static int ready;

void crc32c_init(void)
{
    if (ready)
        return;
    for (uint32_t i = 0; i < 256; i++) {
        uint32_t c = i;
        for (int k = 0; k < 8; k++)
            c = (c >> 1) ^ (0x82F63B78u & (0u - (c & 1)));
        crc32c_table[0][i] = c;
    }
    for (uint32_t i = 0; i < 256; i++)
        for (int t = 1; t < 8; t++)
            crc32c_table[t][i] = (crc32c_table[t - 1][i] >> 8) ^
                                 crc32c_table[0][crc32c_table[t - 1][i] & 0xff];
    ready = 1;
}

uint32_t crc32c_update(uint32_t crc, const void *p, size_t n)
{
    const uint8_t *b = p;
    crc32c_init();
    while (n && ((uintptr_t)b & 7)) {
        crc = crc32c_table[0][(crc ^ *b++) & 0xff] ^ (crc >> 8);
        n--;
    }
    for (; n >= 8; n -= 8, b += 8)
        crc = crc32c_u64(crc, *(const uint64_t *)b);
    while (n--)
        crc = crc32c_table[0][(crc ^ *b++) & 0xff] ^ (crc >> 8);
    return crc;
}

uint32_t crc32c(const void *p, size_t n)
{
    return ~crc32c_update(~0u, p, n);
}
