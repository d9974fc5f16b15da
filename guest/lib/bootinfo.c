/*
 * bootinfo.c - the PVH start info, the e820 memory map and the command line.
 *
 * entry.S stores EBX (the physical address of struct hvm_start_info) in
 * pvh_start_info_paddr; memory is identity-mapped and user-accessible, so
 * everything is read in place, at CPL 3, from the VMM-provided area.
 */
#include "guest.h"

extern uint64_t pvh_start_info_paddr;

const struct hvm_start_info *start_info(void)
{
    const struct hvm_start_info *si = (const void *)(uintptr_t)pvh_start_info_paddr;
    if (!si || si->magic != HVM_START_MAGIC)
        return NULL;
    return si;
}

int e820_count(void)
{
    const struct hvm_start_info *si = start_info();
    if (!si || si->version < 1 || !si->memmap_paddr)
        return 0;
    return (int)si->memmap_entries;
}

const struct e820 *e820_entry(int i)
{
    if (i < 0 || i >= e820_count())
        return NULL;
    return (const struct e820 *)(uintptr_t)start_info()->memmap_paddr + i;
}

const char *cmdline(void)
{
    const struct hvm_start_info *si = start_info();
    if (!si || !si->cmdline_paddr)
        return "";
    return (const char *)(uintptr_t)si->cmdline_paddr;
}

/* The command line split into NUL-terminated words, made on first use, so
 * that every value cmdline_get() returns stays valid. */
static char words[4096];
static size_t words_len;

static void split_words(void)
{
    const char *c = cmdline();
    size_t n = strlen(c);
    if (n > sizeof(words) - 1)
        n = sizeof(words) - 1;
    for (size_t i = 0; i < n; i++)
        words[i] = c[i] == ' ' ? 0 : c[i];
    words[n] = 0;
    words_len = n + 1;
}

const char *cmdline_get(const char *key)
{
    const char *found = NULL;
    size_t klen = strlen(key);

    if (!words_len)
        split_words();
    for (size_t i = 0; i < words_len; i += strlen(words + i) + 1) {
        const char *w = words + i;
        if (!strncmp(w, key, klen) && (w[klen] == 0 || w[klen] == '='))
            found = w[klen] ? w + klen + 1 : w + klen;
    }
    return found;
}

int parse_u64(const char *s, uint64_t *out)
{
    uint64_t v = 0;
    unsigned base = 10;

    if (!s || !*s)
        return -1;
    if (s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
        if (!*s)
            return -1;
    } else if (s[0] == '0' && s[1]) {
        base = 8;
        s++;
    }
    for (; *s; s++) {
        unsigned d;
        if (*s >= '0' && *s <= '9') d = (unsigned)(*s - '0');
        else if (*s >= 'a' && *s <= 'f') d = (unsigned)(*s - 'a' + 10);
        else if (*s >= 'A' && *s <= 'F') d = (unsigned)(*s - 'A' + 10);
        else break;
        if (d >= base)
            break;
        if (v > (UINT64_MAX - d) / base)
            return -1;
        v = v * base + d;
    }
    unsigned shift = 0;
    switch (*s) {
    case 0: break;
    case 'k': case 'K': shift = 10; s++; break;
    case 'm': case 'M': shift = 20; s++; break;
    case 'g': case 'G': shift = 30; s++; break;
    case 't': case 'T': shift = 40; s++; break;
    default: return -1;
    }
    if (*s || (shift && v > (UINT64_MAX >> shift)))
        return -1;
    *out = v << shift;
    return 0;
}

uint64_t cmdline_get_u64(const char *key, uint64_t dflt)
{
    uint64_t v;
    if (parse_u64(cmdline_get(key), &v) < 0)
        return dflt;
    return v;
}
