/*
 * hostile - a virtio-blk driver that breaks the rules on purpose, one case at
 * a time, and checks that the device survives and recovers.
 *
 * OPTIONS
 *   transport=mmio|pci   default: the first virtio-blk device, MMIO first
 *   index=N              device number on that transport (default 0)
 *   case=NAME            run only this case (default: all, in the order below)
 *   timeout_ms=N         how long to wait for each outcome (default 2000)
 *   tsc_khz=N            TSC frequency when CPUID 0x40000010 gives none (needed)
 *
 * Each case starts from a freshly initialised device (VERSION_1, plus
 * INDIRECT_DESC and EVENT_IDX when offered), puts ONE bad request (or bad
 * ring state) on queue 0 by writing descriptors and the avail ring directly,
 * notifies, and waits until a used entry appears, the device status shows
 * DEVICE_NEEDS_RESET (0x40; polled every ~1 ms), or timeout_ms passes.  Then
 * it resets the device (status 0, waiting until it reads back 0),
 * re-initialises it, and reads sector 0 with a valid request.  One line per
 * case:
 *
 *   hostile: <case>: status=<s> device_status=0x<xx> needs_reset=<0|1> recovered=<0|1>
 *
 *   status        the request's status byte as the device left it, decimal
 *                 (0 OK, 1 IOERR, 2 UNSUPP); "none" if the request was not
 *                 completed (the device flagged NEEDS_RESET instead) or was
 *                 completed without writing a status byte; "timeout" if nothing
 *                 happened within timeout_ms; "skipped" when the case needs a
 *                 feature the device does not offer (INDIRECT_DESC, RO, FLUSH,
 *                 DISCARD, WRITE_ZEROES)
 *   device_status the status register right after the outcome (before reset)
 *   recovered     1 if the reset, re-initialisation and valid read all worked
 *
 * Exit status 0 if every case recovered, 1 otherwise, 2 for setup failures.
 *
 * CASES (the request is a 4 KiB IN of sector 0 unless said otherwise;
 * "chain" lists descriptors in order, R = device-readable, W = writable)
 *   valid                   a correct request (checks the harness): expect 0
 *   get_id                  a correct GET_ID (20 writable bytes): expect 0
 *   flush                   a correct FLUSH (header, status): expect 0; needs FLUSH
 *   discard                 a correct DISCARD of sectors 8..15: expect 0; needs DISCARD
 *   write_zeroes            a correct WRITE_ZEROES of sectors 8..15: expect 0; needs
 *                           WRITE_ZEROES (on a read-only disk both expect IOERR)
 *   addr_outside_ram        data descriptor at 0x7_0000_0000
 *   addr_len_wrap           data at 0xfffffffffffff000, len 0x2000 (wraps 2^64)
 *   len_huge                data at a RAM buffer, len 0xfffff000
 *   next_out_of_range       header's next = queue size + 7
 *   desc_loop               header R -> 16 bytes R -> header -> ... (a NEXT loop of
 *                           readable descriptors, so that no order rule fires first)
 *   head_out_of_range       avail ring entry = queue size
 *   readable_after_writable header R, data W, 16 bytes R, status W
 *   nested_indirect         indirect table whose 2nd entry is itself INDIRECT
 *   indirect_len_bad        indirect descriptor of length 40 (not a multiple of 16)
 *   indirect_with_next      a descriptor with both INDIRECT and NEXT set
 *   indirect_outside_ram    indirect table at 0x7_0000_0000
 *   avail_ahead             avail->idx = used idx + queue size + 1
 *   header_short            the header descriptor is 8 bytes
 *   no_status               OUT of sector 8: header R, data R, nothing writable
 *   in_data_readonly        IN whose data descriptor is device-readable
 *   zero_len_data           a 0-byte data descriptor
 *   len_unaligned           IN of 1000 bytes (not a multiple of 512)
 *   sector_beyond_capacity  IN at sector = capacity (512 bytes)
 *   sector_overflow         IN at sector 0xfffffffffffffff8, 4 KiB (wraps)
 *   unknown_type            request type 0x7fffabcd: expect UNSUPP (2)
 *   write_readonly          OUT of sector 0 on a disk that offers RO: expect IOERR
 */
#include "guest.h"
#include "virtio.h"

#define FAR_ADDR 0x700000000ull

static struct vblk blk;
static struct virtio_blk_outhdr *hdr;
static volatile uint8_t *st;
static uint8_t *data, *extra;
static struct virtq_desc *itab, *itab2;
static uint64_t timeout_ns = 2000000000ull;

/* ---- building requests ------------------------------------------------------ */

static void set_desc(unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next)
{
    blk.q[0].vq.desc[i] = (struct virtq_desc){ addr, len, flags, next };
}

static void set_hdr(uint32_t type, uint64_t sector)
{
    hdr->type = type;
    hdr->reserved = 0;
    hdr->sector = sector;
    *st = 0xff;
}

/* the usual three-descriptor chain at 0, 1, 2 */
static void chain3(uint64_t daddr, uint32_t dlen, uint16_t dflags)
{
    set_desc(0, (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 1);
    set_desc(1, daddr, dlen, dflags | VIRTQ_DESC_F_NEXT, 2);
    set_desc(2, (uintptr_t)st, 1, VIRTQ_DESC_F_WRITE, 0);
}

static void post(uint16_t head)
{
    struct virtq *vq = &blk.q[0].vq;
    virtq_push(vq, head);
    barrier();
    vq->avail->idx = vq->avail_idx;
    vq->kicked_idx = vq->avail_idx;
    mb();
    virtq_notify(vq);
}

static int has_indirect(void) { return virtio_has(&blk.dev, VIRTIO_F_INDIRECT_DESC); }

/* Each case builds its request and posts it; returns 0, or 1 to skip. */
typedef int (*case_fn)(void);

static int c_valid(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 4096, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_get_id(void)
{
    set_hdr(VIRTIO_BLK_T_GET_ID, 0);
    memset(data, 0, VIRTIO_BLK_ID_BYTES);
    chain3((uintptr_t)data, VIRTIO_BLK_ID_BYTES, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_flush(void)
{
    if (!virtio_has(&blk.dev, VIRTIO_BLK_F_FLUSH))
        return 1;
    set_hdr(VIRTIO_BLK_T_FLUSH, 0);
    set_desc(0, (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 1);
    set_desc(1, (uintptr_t)st, 1, VIRTQ_DESC_F_WRITE, 0);
    post(0);
    return 0;
}

static int seg_request(int feature, uint32_t type, uint32_t flags)
{
    if (!virtio_has(&blk.dev, feature))
        return 1;
    struct virtio_blk_discard_wz *seg = (void *)extra;
    seg->sector = 8;
    seg->num_sectors = 8;
    seg->flags = flags;
    set_hdr(type, 0);
    chain3((uintptr_t)seg, sizeof(*seg), 0);
    post(0);
    return 0;
}

static int c_discard(void) { return seg_request(VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_T_DISCARD, 0); }
static int c_write_zeroes(void) { return seg_request(VIRTIO_BLK_F_WRITE_ZEROES, VIRTIO_BLK_T_WRITE_ZEROES, 0); }

static int c_addr_outside_ram(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3(FAR_ADDR, 4096, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_addr_len_wrap(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3(0xfffffffffffff000ull, 0x2000, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_len_huge(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 0xfffff000u, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_next_out_of_range(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 4096, VIRTQ_DESC_F_WRITE);
    blk.q[0].vq.desc[0].next = (uint16_t)(blk.q[0].vq.size + 7);
    post(0);
    return 0;
}

static int c_desc_loop(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(0, (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 1);
    set_desc(1, (uintptr_t)extra, 16, VIRTQ_DESC_F_NEXT, 0);
    post(0);
    return 0;
}

static int c_head_out_of_range(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 4096, VIRTQ_DESC_F_WRITE);
    post(blk.q[0].vq.size);
    return 0;
}

static int c_readable_after_writable(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(0, (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 1);
    set_desc(1, (uintptr_t)data, 4096, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2);
    set_desc(2, (uintptr_t)extra, 16, VIRTQ_DESC_F_NEXT, 3);
    set_desc(3, (uintptr_t)st, 1, VIRTQ_DESC_F_WRITE, 0);
    post(0);
    return 0;
}

static void itab3(struct virtq_desc *t)
{
    t[0] = (struct virtq_desc){ (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 1 };
    t[1] = (struct virtq_desc){ (uintptr_t)data, 4096, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 2 };
    t[2] = (struct virtq_desc){ (uintptr_t)st, 1, VIRTQ_DESC_F_WRITE, 0 };
}

static int c_nested_indirect(void)
{
    if (!has_indirect())
        return 1;
    set_hdr(VIRTIO_BLK_T_IN, 0);
    itab3(itab2);
    itab[0] = (struct virtq_desc){ (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 1 };
    itab[1] = (struct virtq_desc){ (uintptr_t)itab2, 48, VIRTQ_DESC_F_INDIRECT, 0 };
    set_desc(0, (uintptr_t)itab, 32, VIRTQ_DESC_F_INDIRECT, 0);
    post(0);
    return 0;
}

static int c_indirect_len_bad(void)
{
    if (!has_indirect())
        return 1;
    set_hdr(VIRTIO_BLK_T_IN, 0);
    itab3(itab);
    set_desc(0, (uintptr_t)itab, 40, VIRTQ_DESC_F_INDIRECT, 0);
    post(0);
    return 0;
}

static int c_indirect_with_next(void)
{
    if (!has_indirect())
        return 1;
    set_hdr(VIRTIO_BLK_T_IN, 0);
    itab3(itab);
    set_desc(0, (uintptr_t)itab, 48, VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT, 1);
    set_desc(1, (uintptr_t)extra, 1, VIRTQ_DESC_F_WRITE, 0);
    post(0);
    return 0;
}

static int c_indirect_outside_ram(void)
{
    if (!has_indirect())
        return 1;
    set_hdr(VIRTIO_BLK_T_IN, 0);
    set_desc(0, FAR_ADDR, 48, VIRTQ_DESC_F_INDIRECT, 0);
    post(0);
    return 0;
}

static int c_avail_ahead(void)
{
    struct virtq *vq = &blk.q[0].vq;
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 4096, VIRTQ_DESC_F_WRITE);
    for (unsigned k = 0; k < vq->size; k++)
        vq->avail->ring[k] = 0;
    uint16_t idx = (uint16_t)(vq->used->idx + vq->size + 1);
    barrier();
    vq->avail->idx = idx;
    vq->avail_idx = vq->kicked_idx = idx;
    mb();
    virtq_notify(vq);
    return 0;
}

static int c_header_short(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 4096, VIRTQ_DESC_F_WRITE);
    blk.q[0].vq.desc[0].len = 8;
    post(0);
    return 0;
}

static int c_no_status(void)
{
    set_hdr(VIRTIO_BLK_T_OUT, 8);
    set_desc(0, (uintptr_t)hdr, 16, VIRTQ_DESC_F_NEXT, 1);
    set_desc(1, (uintptr_t)data, 4096, 0, 0);
    post(0);
    return 0;
}

static int c_in_data_readonly(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 4096, 0);
    post(0);
    return 0;
}

static int c_zero_len_data(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 0, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_len_unaligned(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0);
    chain3((uintptr_t)data, 1000, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_sector_beyond_capacity(void)
{
    set_hdr(VIRTIO_BLK_T_IN, blk.capacity);
    chain3((uintptr_t)data, 512, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_sector_overflow(void)
{
    set_hdr(VIRTIO_BLK_T_IN, 0xfffffffffffffff8ull);
    chain3((uintptr_t)data, 4096, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_unknown_type(void)
{
    set_hdr(0x7fffabcd, 0);
    chain3((uintptr_t)data, 512, VIRTQ_DESC_F_WRITE);
    post(0);
    return 0;
}

static int c_write_readonly(void)
{
    if (!blk.ro)
        return 1;
    set_hdr(VIRTIO_BLK_T_OUT, 0);
    chain3((uintptr_t)data, 512, 0);
    post(0);
    return 0;
}

static const struct { const char *name; case_fn fn; } cases[] = {
    { "valid", c_valid },
    { "get_id", c_get_id },
    { "flush", c_flush },
    { "discard", c_discard },
    { "write_zeroes", c_write_zeroes },
    { "addr_outside_ram", c_addr_outside_ram },
    { "addr_len_wrap", c_addr_len_wrap },
    { "len_huge", c_len_huge },
    { "next_out_of_range", c_next_out_of_range },
    { "desc_loop", c_desc_loop },
    { "head_out_of_range", c_head_out_of_range },
    { "readable_after_writable", c_readable_after_writable },
    { "nested_indirect", c_nested_indirect },
    { "indirect_len_bad", c_indirect_len_bad },
    { "indirect_with_next", c_indirect_with_next },
    { "indirect_outside_ram", c_indirect_outside_ram },
    { "avail_ahead", c_avail_ahead },
    { "header_short", c_header_short },
    { "no_status", c_no_status },
    { "in_data_readonly", c_in_data_readonly },
    { "zero_len_data", c_zero_len_data },
    { "len_unaligned", c_len_unaligned },
    { "sector_beyond_capacity", c_sector_beyond_capacity },
    { "sector_overflow", c_sector_overflow },
    { "unknown_type", c_unknown_type },
    { "write_readonly", c_write_readonly },
};
#define NCASES (sizeof(cases) / sizeof(cases[0]))

/* ---- running a case ------------------------------------------------------------ */

static uint64_t ns_to_tsc(uint64_t ns)
{
    return ns / 1000 * tsc_khz() / 1000;
}

static int recover(void)
{
    if (virtio_reset(&blk.dev, timeout_ns) < 0)
        return 0;
    if (vblk_reinit(&blk, NULL) < 0)
        return 0;
    memset(data, 0xa5, 512);
    return vblk_rw_sync(&blk, VIRTIO_BLK_T_IN, 0, data, 512, timeout_ns) == VIRTIO_BLK_S_OK;
}

static int run_case(unsigned k)
{
    struct virtq *vq = &blk.q[0].vq;
    uint16_t used0 = vq->used->idx;
    char status[16];
    uint8_t ds;

    if (cases[k].fn()) {
        ds = virtio_get_status(&blk.dev);
        printf("hostile: %s: status=skipped device_status=0x%02x needs_reset=%d recovered=1\n",
               cases[k].name, ds, !!(ds & VIRTIO_STATUS_NEEDS_RESET));
        return 1;
    }
    uint64_t t0 = rdtsc(), deadline = t0 + ns_to_tsc(timeout_ns), step = ns_to_tsc(1000000);
    uint64_t next_check = t0 + step;
    int outcome = 0;                    /* 1 used, 2 needs reset, 3 timeout */
    for (;;) {
        if (vq->used->idx != used0) {
            outcome = 1;
            break;
        }
        uint64_t t = rdtsc();
        if (t >= next_check) {
            next_check = t + step;
            if (virtio_get_status(&blk.dev) & VIRTIO_STATUS_NEEDS_RESET) {
                outcome = 2;
                break;
            }
        }
        if (t > deadline) {
            outcome = 3;
            break;
        }
        cpu_relax();
    }
    barrier();
    ds = virtio_get_status(&blk.dev);
    if (outcome == 3)
        snprintf(status, sizeof(status), "timeout");
    else if (outcome == 2 || *st == 0xff)
        snprintf(status, sizeof(status), "none");
    else
        snprintf(status, sizeof(status), "%u", *st);
    int rec = recover();
    printf("hostile: %s: status=%s device_status=0x%02x needs_reset=%d recovered=%d\n",
           cases[k].name, status, ds, !!(ds & VIRTIO_STATUS_NEEDS_RESET), rec);
    if (!rec) {
        /* try once more so that the next case starts clean */
        recover();
    }
    return rec;
}

int main(void)
{
    static const char *const transports[] = { "any", "mmio", "pci" };
    int transport = VIRTIO_ANY;
    const char *t = cmdline_get("transport");
    if (t) {
        transport = -1;
        for (int i = 0; i < 3; i++)
            if (!strcmp(t, transports[i]))
                transport = i;
        if (transport < 0) {
            printf("hostile: error: bad value for transport: %s\n", t);
            return 2;
        }
    }
    if (!tsc_khz()) {
        printf("hostile: error: TSC frequency unknown: pass tsc_khz=\n");
        return 2;
    }
    timeout_ns = cmdline_get_u64("timeout_ms", 2000) * 1000000ull;
    const char *only = cmdline_get("case");
    int found = -1;
    if (only) {
        for (unsigned k = 0; k < NCASES; k++)
            if (!strcmp(only, cases[k].name))
                found = (int)k;
        if (found < 0) {
            printf("hostile: error: unknown case: %s\n", only);
            return 2;
        }
    }

    struct vblk_opts vo = VBLK_OPTS_DEFAULT;
    vo.max_bytes = 4096;
    const char *err;
    if (vblk_open(&blk, transport, (int)cmdline_get_u64("index", 0), &vo, &err) < 0) {
        printf("hostile: error: virtio-blk: %s\n", err);
        return 2;
    }
    hdr = guest_zalloc(4096, 4096);
    st = (volatile uint8_t *)hdr + 64;
    data = guest_zalloc(8192, 4096);
    extra = guest_zalloc(4096, 4096);
    itab = guest_zalloc(4096, 4096);
    itab2 = guest_zalloc(4096, 4096);
    if (!hdr || !data || !extra || !itab || !itab2) {
        printf("hostile: error: out of memory\n");
        return 2;
    }
    char desc[512];
    vblk_describe(&blk, desc, sizeof(desc));
    printf("hostile: device: %s\n", desc);

    unsigned ran = 0, ok = 0;
    for (unsigned k = 0; k < NCASES; k++) {
        if (found >= 0 && (int)k != found)
            continue;
        ran++;
        ok += (unsigned)run_case(k);
    }
    printf("hostile: %u cases, %u recovered\n", ran, ok);
    return ok == ran ? 0 : 1;
}
