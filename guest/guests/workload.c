/*
 * workload - an fio-like I/O generator over virtio-blk; its hot loop runs at
 * CPL 3 and makes no exits except queue notifications the device asks for.
 *
 * OPTIONS (command line, `key=value`, all optional; sizes take k/m/g/t
 * suffixes, powers of 1024; unknown keys without a '.' are an error, keys
 * with a '.' such as virtio_mmio.device= belong to others and are ignored)
 *   transport=mmio|pci     default: the first virtio-blk device found, MMIO first
 *   index=N                which device of that transport (default 0)
 *   rw=read|write|randread|randwrite|randrw          default randread
 *   rwmixread=N            percent reads for randrw (0..100, default 50)
 *   bs=N                   block size in bytes, a multiple of 512 (default 4k)
 *   iodepth=N              requests in flight, over all queues (default 1; each
 *                          queue must hold ceil(iodepth / queues) requests: queue
 *                          size with indirect descriptors, queue size / (2 + data
 *                          descriptors per request) without)
 *   queues=N               request queues, 1..16 (default 1).  N > 1 needs
 *                          VIRTIO_BLK_F_MQ and num_queues >= N (else exit 2); job j
 *                          of the iodepth jobs always uses queue j % N.  N changes
 *                          only which ring a request goes to, never the I/O stream
 *   size=N                 bytes of the disk to use from offset (default: all of
 *                          it after offset); nblocks = size / bs
 *   offset=N               first byte used (a multiple of 512, default 0)
 *   runtime=S              seconds to keep issuing, to the millisecond: 5, 0.25
 *                          (default 5 unless ios= is given)
 *   ios=N                  exact number of I/Os (with runtime= too: whichever ends first)
 *   seed=N                 default 1
 *   verify=crc32c|none     default none (see VERIFY)
 *   verify_unwritten=check|skip   default check (see VERIFY)
 *   irq=0|1                interrupts instead of polling (default 0)
 *   tsc_khz=N              TSC frequency when CPUID 0x40000010 gives none
 *   flush=N                a FLUSH after every N writes (default 0 = never)
 *   flush_report=1         print "workload: flush-done ios=D" as each flush completes: every
 *                          write numbered below D had completed before that flush was
 *                          submitted, so it is durable (the crash model's rule)
 *   indirect=0|1           use indirect descriptors when offered (default 1)
 *   event_idx=0|1          use EVENT_IDX when offered (default 1)
 *   qsize=N                queue size (power of two; default min(device max, 256))
 *   io_timeout=S           give up when nothing completes for S seconds (default 30):
 *                          "workload: io timeout: ..." line, the requests still in
 *                          flight count as io_errors, result line, exit 1
 *   seg_bytes=N            split each data buffer into descriptors of at most N
 *                          bytes (default: the device's SIZE_MAX, else one descriptor)
 *   refill=1|0             1 (default): every write generates its whole block (BLOCK
 *                          CONTENT).  0: each buffer is generated once, at start, and a
 *                          write only stamps its offset and generation (bytes 8..23; the
 *                          CRC no longer matches), as fio reuses its buffers by default:
 *                          for throughput runs that must not be bound by the guest's
 *                          CPU.  Not with verify=crc32c
 *
 * THE I/O STREAM (the host re-computes it: guest/tools/check_disk.py)
 *   next() is splitmix64 with state = seed:
 *     state += 0x9E3779B97F4A7C15; z = state;
 *     z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9; z = (z ^ (z >> 27)) * 0x94D049BB133111EB;
 *     return z ^ (z >> 31);                                  (all mod 2^64)
 *   nblocks = size / bs.  For I/O number i = 0, 1, 2, ...:
 *     randrw:    is_read = next() % 100 < rwmixread;  then block = next() % nblocks
 *     randread / randwrite: block = next() % nblocks
 *     read / write (sequential): block = i % nblocks (no next() calls)
 *     byte offset on the disk = offset + block * bs
 *   I/Os are issued in order of i.  No two requests in flight touch the same
 *   block: when I/O i's block is busy, completions are reaped until it is
 *   free, so the stream (and the disk contents) do not depend on completion
 *   order.  FLUSH requests (flush=N) are extra: they are not numbered.
 *
 * BLOCK CONTENT (every write, whatever verify= says; little-endian)
 *   bytes  0..3   u32 magic 0x42564b50 ("PKVB")
 *   bytes  4..7   u32 crc32c of bytes 8..bs-1 (CRC-32C: reflected poly
 *                 0x82F63B78, init ~0, final ~0; "123456789" -> 0xE3069283)
 *   bytes  8..15  u64 byte offset of the block on the disk
 *   bytes 16..23  u64 generation = i, the number of the I/O that wrote it
 *   bytes 24..31  u64 seed
 *   bytes 32..    (bs - 32) / 8 u64 words: state = seed ^ offset ^ (generation *
 *                 0x9E3779B97F4A7C15), word_j = next() (j = 0, 1, ...)
 *   Cost: every write generates and checksums its block (about 1 ns per
 *   byte: ~4 us for 4 KiB, ~1 ms for 1 MiB) before it is submitted.
 *
 * VERIFY (verify=crc32c; checked when a read completes)
 *   A block written in this run must hold exactly the block of its last
 *   successful write (magic, crc, offset, generation, seed, payload).  A
 *   block not written in this run (verify_unwritten=check) must be all zeros
 *   or a self-consistent block of any earlier run with the same bs and
 *   alignment (magic, offset, crc and the payload its own header implies);
 *   verify_unwritten=skip does not look at those.  A block whose write
 *   failed is not checked.  Errors count in verify_errors; the first bad
 *   block's offset is first_bad.  The per-block generation table (8 bytes
 *   per block) exists only with verify=crc32c and writes in the mix.
 *
 * OUTPUT: human lines start with "workload: "; the last line is
 *   fio-result: rw=<rw> bs=<bytes> iodepth=<n> queues=<n> size=<bytes>
 *   offset=<bytes> seed=<n> transport=<mmio|pci> time_ns=<n> read_ios=<n>
 *   read_bytes=<n> read_lat_min_ns=<n> read_lat_max_ns=<n> read_lat_sum_ns=<n>
 *   read_hist=<idx>:<count>,... write_ios=<n> write_bytes=<n>
 *   write_lat_min_ns=<n> write_lat_max_ns=<n> write_lat_sum_ns=<n>
 *   write_hist=<idx>:<count>,... flushes=<n> io_errors=<n> verify_errors=<n>
 *   first_bad=<offset or -1> last_generation=<n or -1>
 * (one line, single spaces).  *_ios count every completed request of that
 * direction, failed ones included; *_bytes count the successful ones;
 * io_errors counts requests (flushes too) whose status was not OK;
 * last_generation is the number i of the last write issued (-1: none), so
 * the stream up to last_generation + 1 I/Os determines the disk contents.
 * time_ns runs from the first submission to the last completion.
 * Latency: TSC from putting the request in the ring to seeing its
 * completion, in ns.  Histogram: index of v ns = v if v < 16, else with
 * msb = 63 - clz(v): (msb - 3) * 16 + ((v >> (msb - 4)) & 15); only
 * non-empty buckets, ascending; "-" when empty.
 *   On I/O errors: "workload: io error status=<s> op=<read|write|flush>
 *   offset=<o>" (first 10).  Exit 0 when io_errors == verify_errors == 0,
 *   1 otherwise, 2 for setup failures ("workload: error: ..." line).
 */
#include "guest.h"
#include "virtio.h"

#define MAGIC 0x42564b50u
#define HIST_BUCKETS 976                /* index of 2^64-1 is 975 */
#define GEN_NONE 0                      /* gen table: not written in this run */
#define GEN_UNKNOWN UINT64_MAX          /* gen table: last write failed */
#define MAX_REPORTS 10

enum rw { RW_READ, RW_WRITE, RW_RANDREAD, RW_RANDWRITE, RW_RANDRW };
static const char *const rw_names[] = { "read", "write", "randread", "randwrite", "randrw" };

struct dirstats {
    uint64_t ios, bytes, lat_min, lat_max, lat_sum;
    uint64_t hist[HIST_BUCKETS];
};

struct job {
    uint64_t block, gen, t0;
    uint8_t is_read, is_flush;
    uint8_t busy;                       /* submitted, not yet completed */
    uint8_t queue;                      /* job number % queues, fixed */
};

static struct vblk blk;
static struct dirstats st_read, st_write;

/* options */
static int rw = RW_RANDREAD, rwmixread = 50, verify, verify_unwritten = 1, refill = 1;
static uint64_t bs = 4096, iodepth = 1, queues = 1, size, offset, runtime_ms, ios_limit, seed = 1;
static uint64_t flush_every;
static int flush_report;                /* print each completed flush's durable point */
static uint64_t io_timeout_s = 30;

static GUEST_NORETURN void die(const char *msg, const char *arg)
{
    if (arg)
        printf("workload: error: %s: %s\n", msg, arg);
    else
        printf("workload: error: %s\n", msg);
    guest_exit(2);
}

/* ---- options ------------------------------------------------------------------ */

static const char *const known[] = {
    "transport", "index", "rw", "rwmixread", "bs", "iodepth", "size", "offset", "runtime",
    "ios", "seed", "verify", "verify_unwritten", "irq", "tsc_khz", "flush", "flush_report",
    "indirect",
    "event_idx", "qsize", "seg_bytes", "io_timeout", "refill", "queues", NULL,
};

static void check_unknown(void)
{
    const char *c = cmdline();
    while (*c) {
        while (*c == ' ')
            c++;
        const char *w = c;
        while (*c && *c != ' ' && *c != '=')
            c++;
        size_t n = (size_t)(c - w);
        while (*c && *c != ' ')
            c++;
        if (!n)
            continue;
        int dot = 0, ok = 0;
        for (size_t k = 0; k < n; k++)
            dot |= w[k] == '.';
        for (int k = 0; known[k]; k++)
            ok |= strlen(known[k]) == n && !strncmp(known[k], w, n);
        if (!ok && !dot) {
            char name[64];
            size_t m = n < sizeof(name) - 1 ? n : sizeof(name) - 1;
            memcpy(name, w, m);
            name[m] = 0;
            die("unknown option", name);
        }
    }
}

static uint64_t opt_u64(const char *key, uint64_t dflt, uint64_t min, uint64_t max)
{
    const char *s = cmdline_get(key);
    uint64_t v;
    if (!s)
        return dflt;
    if (parse_u64(s, &v) < 0 || v < min || v > max) {
        char msg[80];
        snprintf(msg, sizeof(msg), "bad value for %s (want %lu..%lu)", key,
                 (unsigned long)min, (unsigned long)max);
        die(msg, s);
    }
    return v;
}

/* Seconds with up to three decimals ("2", "0.25"), in milliseconds. */
static uint64_t opt_ms(const char *key, uint64_t dflt_ms, uint64_t min_ms, uint64_t max_ms)
{
    const char *s = cmdline_get(key);
    uint64_t ms = 0;
    int digits = 0, frac = -1;
    if (!s)
        return dflt_ms;
    for (const char *p = s; *p; p++) {
        if (*p == '.' && frac < 0) {
            frac = 0;
        } else if (*p >= '0' && *p <= '9' && frac < 3 && ms <= max_ms) {
            ms = ms * 10 + (uint64_t)(*p - '0');
            digits++;
            if (frac >= 0)
                frac++;
        } else {
            ms = 0, digits = 0;  /* not a number, or more than three decimals */
            break;
        }
    }
    for (int f = frac < 0 ? 0 : frac; f < 3 && digits; f++)
        ms *= 10;
    if (!digits || ms < min_ms || ms > max_ms) {
        char msg[80];
        snprintf(msg, sizeof(msg), "bad value for %s (want seconds, 0.001..%lu)", key,
                 (unsigned long)(max_ms / 1000));
        die(msg, s);
    }
    return ms;
}

static int opt_choice(const char *key, const char *const *names, int n, int dflt)
{
    const char *s = cmdline_get(key);
    if (!s)
        return dflt;
    for (int i = 0; i < n; i++)
        if (!strcmp(s, names[i]))
            return i;
    char msg[64];
    snprintf(msg, sizeof(msg), "bad value for %s", key);
    die(msg, s);
}

/* ---- block content ---------------------------------------------------------------- */

static void fill_block(uint64_t *w, uint64_t nwords, uint64_t off, uint64_t gen)
{
    uint64_t state = seed ^ off ^ (gen * SPLITMIX64_GAMMA);
    w[1] = off;
    w[2] = gen;
    w[3] = seed;
    uint32_t crc = ~0u;
    crc = crc32c_u64(crc, off);
    crc = crc32c_u64(crc, gen);
    crc = crc32c_u64(crc, seed);
    for (uint64_t k = 4; k < nwords; k++) {
        uint64_t v = splitmix64(&state);
        w[k] = v;
        crc = crc32c_u64(crc, v);
    }
    w[0] = (uint64_t)MAGIC | (uint64_t)(~crc) << 32;
}

/* NULL if the block is what (gen, sd) at offset off wrote; else the reason. */
static const char *check_block(const uint64_t *w, uint64_t nwords, uint64_t off, uint64_t gen,
                               uint64_t sd)
{
    if ((uint32_t)w[0] != MAGIC)
        return "bad magic";
    if (w[1] != off)
        return "wrong offset";
    if (w[2] != gen)
        return "wrong generation";
    if (w[3] != sd)
        return "wrong seed";
    uint64_t state = sd ^ off ^ (gen * SPLITMIX64_GAMMA);
    uint32_t crc = ~0u;
    crc = crc32c_u64(crc, w[1]);
    crc = crc32c_u64(crc, w[2]);
    crc = crc32c_u64(crc, w[3]);
    int payload_ok = 1;
    for (uint64_t k = 4; k < nwords; k++) {
        uint64_t v = w[k];
        payload_ok &= v == splitmix64(&state);
        crc = crc32c_u64(crc, v);
    }
    if ((uint32_t)(w[0] >> 32) != ~crc)
        return "bad crc32c";
    if (!payload_ok)
        return "payload differs";
    return NULL;
}

static uint64_t verify_errors, first_bad = UINT64_MAX, checked, unchecked;
static uint64_t *gentab;

static void verify_read(const uint64_t *w, uint64_t nwords, uint64_t block, uint64_t off)
{
    uint64_t g = gentab ? gentab[block] : GEN_NONE;
    const char *why;
    if (g == GEN_UNKNOWN) {
        unchecked++;
        return;
    }
    if (g != GEN_NONE) {
        why = check_block(w, nwords, off, g - 1, seed);
    } else if (!verify_unwritten) {
        unchecked++;
        return;
    } else if ((uint32_t)w[0] == MAGIC) {
        why = check_block(w, nwords, off, w[2], w[3]);
    } else {
        why = NULL;
        for (uint64_t k = 0; k < nwords; k++)
            if (w[k]) {
                why = "neither zero nor a workload block";
                break;
            }
    }
    checked++;
    if (!why)
        return;
    if (verify_errors < MAX_REPORTS) {
        if (g != GEN_NONE)
            printf("workload: verify error offset=%lu block=%lu: %s (expected generation %lu, "
                   "found %lu)\n", (unsigned long)off, (unsigned long)block, why,
                   (unsigned long)(g - 1), (unsigned long)w[2]);
        else
            printf("workload: verify error offset=%lu block=%lu: %s (not written in this run)\n",
                   (unsigned long)off, (unsigned long)block, why);
    }
    if (!verify_errors)
        first_bad = off;
    verify_errors++;
}

/* ---- in-flight blocks: open addressing, backward-shift deletion ------------------ */

static uint64_t *busy;                  /* block + 1, 0 = empty */
static unsigned busy_bits;
static uint64_t busy_mask;

static inline uint64_t busy_home(uint64_t block)
{
    return (block * SPLITMIX64_GAMMA) >> (64 - busy_bits);
}

static inline int busy_has(uint64_t block)
{
    for (uint64_t i = busy_home(block); busy[i]; i = (i + 1) & busy_mask)
        if (busy[i] == block + 1)
            return 1;
    return 0;
}

static inline void busy_add(uint64_t block)
{
    uint64_t i = busy_home(block);
    while (busy[i])
        i = (i + 1) & busy_mask;
    busy[i] = block + 1;
}

static inline void busy_del(uint64_t block)
{
    uint64_t i = busy_home(block);
    while (busy[i] != block + 1)
        i = (i + 1) & busy_mask;
    for (uint64_t j = i;;) {
        j = (j + 1) & busy_mask;
        if (!busy[j])
            break;
        uint64_t k = busy_home(busy[j] - 1);
        /* move j's entry into the hole at i unless its home lies in (i, j] */
        if (i <= j ? (k <= i || k > j) : (k <= i && k > j)) {
            busy[i] = busy[j];
            i = j;
        }
    }
    busy[i] = 0;
}

/* ---- statistics -------------------------------------------------------------------- */

static uint64_t ns_mult;                /* ns = tsc * ns_mult >> 32 */

static inline uint64_t tsc_ns(uint64_t t)
{
    return (uint64_t)(((unsigned __int128)t * ns_mult) >> 32);
}

static inline unsigned hist_index(uint64_t v)
{
    if (v < 16)
        return (unsigned)v;
    unsigned msb = 63u - (unsigned)__builtin_clzll(v);
    return (msb - 3) * 16 + (unsigned)((v >> (msb - 4)) & 15);
}

static inline void account(struct dirstats *s, uint64_t lat_ns)
{
    s->ios++;
    if (lat_ns < s->lat_min || s->ios == 1)
        s->lat_min = lat_ns;
    if (lat_ns > s->lat_max)
        s->lat_max = lat_ns;
    s->lat_sum += lat_ns;
    s->hist[hist_index(lat_ns)]++;
}

/* The result line is long: build it in a buffer, print it in one go. */
static char line[32768];
static size_t line_len;

static void out(const char *fmt, ...) GUEST_PRINTF(1, 2);
static void out(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    if (line_len < sizeof(line))
        line_len += (size_t)vsnprintf(line + line_len, sizeof(line) - line_len, fmt, ap);
    va_end(ap);
}

static void out_dir(const char *name, const struct dirstats *s)
{
    out(" %s_ios=%lu %s_bytes=%lu %s_lat_min_ns=%lu %s_lat_max_ns=%lu %s_lat_sum_ns=%lu %s_hist=",
        name, (unsigned long)s->ios, name, (unsigned long)s->bytes, name,
        (unsigned long)s->lat_min, name, (unsigned long)s->lat_max, name,
        (unsigned long)s->lat_sum, name);
    int any = 0;
    for (unsigned i = 0; i < HIST_BUCKETS; i++) {
        if (!s->hist[i])
            continue;
        out("%s%u:%lu", any ? "," : "", i, (unsigned long)s->hist[i]);
        any = 1;
    }
    if (!any)
        out("-");
}

/* ---- main ------------------------------------------------------------------------------ */

int main(void)
{
    static const char *const transports[] = { "any", "mmio", "pci" };
    static const char *const verifies[] = { "none", "crc32c" };
    static const char *const unwritten[] = { "skip", "check" };

    check_unknown();
    int transport = opt_choice("transport", transports, 3, VIRTIO_ANY);
    uint64_t index = opt_u64("index", 0, 0, 1000);
    rw = opt_choice("rw", rw_names, 5, RW_RANDREAD);
    rwmixread = (int)opt_u64("rwmixread", 50, 0, 100);
    bs = opt_u64("bs", 4096, 512, 64ull << 20);
    if (bs % 512)
        die("bs must be a multiple of 512", cmdline_get("bs"));
    iodepth = opt_u64("iodepth", 1, 1, 32768);
    queues = opt_u64("queues", 1, 1, VBLK_MAX_QUEUES);
    offset = opt_u64("offset", 0, 0, UINT64_MAX);
    if (offset % 512)
        die("offset must be a multiple of 512", cmdline_get("offset"));
    ios_limit = opt_u64("ios", 0, 1, UINT64_MAX);
    runtime_ms = opt_ms("runtime", ios_limit ? 0 : 5000, 1, 1000000000);
    seed = opt_u64("seed", 1, 0, UINT64_MAX);
    verify = opt_choice("verify", verifies, 2, 0);
    verify_unwritten = opt_choice("verify_unwritten", unwritten, 2, 1);
    refill = (int)opt_u64("refill", 1, 0, 1);
    if (!refill && verify)
        die("refill=0 writes blocks whose CRC does not match: not with verify=crc32c",
            cmdline_get("refill"));
    flush_every = opt_u64("flush", 0, 0, UINT64_MAX);
    flush_report = (int)opt_u64("flush_report", 0, 0, 1);
    io_timeout_s = opt_u64("io_timeout", 30, 1, 1000000);
    struct vblk_opts vo = VBLK_OPTS_DEFAULT;
    vo.irq = (int)opt_u64("irq", 0, 0, 1);
    vo.indirect = (int)opt_u64("indirect", 1, 0, 1);
    vo.event_idx = (int)opt_u64("event_idx", 1, 0, 1);
    vo.queue_size = (unsigned)opt_u64("qsize", 0, 1, 32768);
    vo.max_bytes = (uint32_t)bs;
    vo.seg_bytes = (uint32_t)opt_u64("seg_bytes", 0, 512, 0x400000);
    vo.queues = (unsigned)queues;

    uint64_t khz = tsc_khz();
    if (!khz)
        die("TSC frequency unknown (CPUID 0x40000010 is empty): pass tsc_khz=", NULL);
    ns_mult = (1000000ull << 32) / khz;
    if (crc32c("123456789", 9) != 0xE3069283u)
        die("crc32c self-test failed", NULL);

    const char *err;
    if (vblk_open(&blk, transport, (int)index, &vo, &err) < 0)
        die("virtio-blk", err);
    char desc[512];
    vblk_describe(&blk, desc, sizeof(desc));
    printf("workload: %s\n", desc);

    int has_writes = rw == RW_WRITE || rw == RW_RANDWRITE || (rw == RW_RANDRW && rwmixread < 100);
    if (has_writes && blk.ro)
        die("the disk is read-only (VIRTIO_BLK_F_RO) and rw has writes", rw_names[rw]);
    if (bs % blk.blk_size)
        die("bs is not a multiple of the device's blk_size", cmdline_get("bs"));
    uint64_t cap = blk.capacity * 512;
    if (offset >= cap)
        die("offset is beyond the disk's capacity", cmdline_get("offset"));
    size = opt_u64("size", cap - offset, 1, UINT64_MAX);
    if (size > cap - offset)
        die("offset + size is beyond the disk's capacity", cmdline_get("size"));
    uint64_t nblocks = size / bs;
    if (!nblocks)
        die("size is smaller than bs", NULL);
    uint64_t per_queue = (iodepth + queues - 1) / queues;
    if (per_queue > blk.nslots) {
        char msg[200], each[80] = "";
        if (!blk.use_indirect)
            snprintf(each, sizeof(each), ", %u descriptors each; indirect descriptors would "
                     "lift this", blk.chain);
        if (queues == 1)
            snprintf(msg, sizeof(msg), "iodepth %lu exceeds the %u requests the queue holds "
                     "(queue %u%s)", (unsigned long)iodepth, blk.nslots, blk.q[0].vq.size, each);
        else
            snprintf(msg, sizeof(msg), "iodepth %lu over %lu queues needs %lu requests per "
                     "queue, more than the %u one holds (queue %u%s)", (unsigned long)iodepth,
                     (unsigned long)queues, (unsigned long)per_queue, blk.nslots,
                     blk.q[0].vq.size, each);
        die(msg, NULL);
    }
    if (flush_every && !virtio_has(&blk.dev, VIRTIO_BLK_F_FLUSH)) {
        printf("workload: the device does not offer VIRTIO_BLK_F_FLUSH: flush=%lu ignored\n",
               (unsigned long)flush_every);
        flush_every = 0;
    }

    /* memory: buffers, jobs, in-flight table, generation table */
    uint64_t nwords = bs / 8;
    uint8_t *bufs = guest_alloc(iodepth * bs, 4096);
    struct job *jobs = guest_zalloc(sizeof(struct job) * iodepth, 64);
    uint16_t *free_jobs = guest_alloc(2 * iodepth, 8);
    busy_bits = 6;
    while ((1ull << busy_bits) < 4 * iodepth)
        busy_bits++;
    busy_mask = (1ull << busy_bits) - 1;
    busy = guest_zalloc(8ull << busy_bits, 64);
    if (!bufs || !jobs || !free_jobs || !busy)
        die("not enough guest RAM for iodepth * bs", NULL);
    if (verify && has_writes) {
        if (nblocks > (guest_alloc_avail() >> 3) || !(gentab = guest_zalloc(nblocks * 8, 4096)))
            die("not enough guest RAM for the verify table (8 bytes per block): use a smaller size=", NULL);
    }
    unsigned nfree_jobs = (unsigned)iodepth;
    for (unsigned j = 0; j < iodepth; j++) {
        free_jobs[j] = (uint16_t)(iodepth - 1 - j);
        jobs[j].queue = (uint8_t)(j % queues);
    }
    if (!refill && has_writes)
        for (unsigned j = 0; j < iodepth; j++)
            fill_block((uint64_t *)(bufs + (uint64_t)j * bs), nwords, 0, j);

    /* the stream */
    uint64_t state = seed, i = 0, seq_block = 0, last_gen = UINT64_MAX;
    int have_next = 0, next_read = 0, stop = 0;
    uint64_t next_block = 0, writes_since_flush = 0, flush_owed = 0, flushes = 0, io_errors = 0;
    int is_rand = rw >= RW_RANDREAD;

    uint64_t t_start = rdtsc();
    uint64_t deadline = runtime_ms ? t_start + runtime_ms * khz : 0;
    uint64_t io_timeout_tsc = io_timeout_s * khz * 1000;
    uint64_t t_end = t_start;
    struct vblk_done done[256];

    for (;;) {
        /* submit while there are free jobs and the next block is not busy */
        while (nfree_jobs) {
            if (flush_owed) {
                unsigned jn = free_jobs[--nfree_jobs];
                /* the durable point this flush gives: every write numbered
                 * below the lowest one still in flight has completed */
                uint64_t durable = i;
                for (uint64_t j = 0; j < iodepth; j++)
                    if (jobs[j].busy && !jobs[j].is_flush && !jobs[j].is_read &&
                        jobs[j].gen < durable)
                        durable = jobs[j].gen;
                jobs[jn].is_flush = 1;
                jobs[jn].busy = 1;
                jobs[jn].gen = durable;
                jobs[jn].t0 = rdtsc();
                vblk_submit(&blk, jobs[jn].queue, VIRTIO_BLK_T_FLUSH, 0, NULL, 0, jn);
                flush_owed--;
                continue;
            }
            if (stop)
                break;
            if (!have_next) {
                if (ios_limit && i == ios_limit) {
                    stop = 1;
                    break;
                }
                if (rw == RW_RANDRW)
                    next_read = splitmix64(&state) % 100 < (uint64_t)rwmixread;
                else
                    next_read = rw == RW_READ || rw == RW_RANDREAD;
                if (is_rand) {
                    next_block = splitmix64(&state) % nblocks;
                } else {
                    next_block = seq_block;
                    if (++seq_block == nblocks)
                        seq_block = 0;
                }
                have_next = 1;
            }
            if (busy_has(next_block))
                break;
            unsigned jn = free_jobs[--nfree_jobs];
            struct job *jb = &jobs[jn];
            uint8_t *buf = bufs + (uint64_t)jn * bs;
            uint64_t off = offset + next_block * bs;
            jb->block = next_block;
            jb->gen = i;
            jb->is_read = (uint8_t)next_read;
            jb->is_flush = 0;
            jb->busy = 1;
            if (!next_read) {
                if (refill) {
                    fill_block((uint64_t *)buf, nwords, off, i);
                } else {
                    ((uint64_t *)buf)[1] = off;
                    ((uint64_t *)buf)[2] = i;
                }
                last_gen = i;
                if (flush_every && ++writes_since_flush == flush_every) {
                    writes_since_flush = 0;
                    flush_owed++;
                }
            }
            busy_add(next_block);
            jb->t0 = rdtsc();
            vblk_submit(&blk, jb->queue, next_read ? VIRTIO_BLK_T_IN : VIRTIO_BLK_T_OUT,
                        off >> 9, buf, (uint32_t)bs, jn);
            have_next = 0;
            i++;
            if (deadline && jb->t0 >= deadline)
                stop = 1;
        }
        vblk_kick(&blk);
        if (vblk_inflight(&blk) == 0) {
            if (stop && !flush_owed)
                break;
            continue;
        }
        unsigned n = vblk_reap(&blk, done, 256);
        if (!n) {
            if (!vblk_wait(&blk, rdtsc() + io_timeout_tsc)) {
                uint8_t ds = virtio_get_status(&blk.dev);
                printf("workload: io timeout: %u requests in flight, none completed for %lu s; "
                       "device status 0x%02x\n", vblk_inflight(&blk), (unsigned long)io_timeout_s, ds);
                io_errors += vblk_inflight(&blk);
                break;
            }
            n = vblk_reap(&blk, done, 256);
        }
        uint64_t t = rdtsc();
        t_end = t;
        for (unsigned k = 0; k < n; k++) {
            unsigned jn = (unsigned)done[k].tag;
            struct job *jb = &jobs[jn];
            uint64_t lat = tsc_ns(t - jb->t0);
            uint8_t s = done[k].status;
            free_jobs[nfree_jobs++] = (uint16_t)jn;
            jb->busy = 0;
            if (jb->is_flush) {
                flushes++;
                if (s != VIRTIO_BLK_S_OK) {
                    if (io_errors < MAX_REPORTS)
                        printf("workload: io error status=%u op=flush offset=0\n", s);
                    io_errors++;
                } else if (flush_report) {
                    printf("workload: flush-done ios=%lu\n", (unsigned long)jb->gen);
                }
                continue;
            }
            busy_del(jb->block);
            uint64_t off = offset + jb->block * bs;
            struct dirstats *ds = jb->is_read ? &st_read : &st_write;
            account(ds, lat);
            if (s != VIRTIO_BLK_S_OK) {
                if (io_errors < MAX_REPORTS)
                    printf("workload: io error status=%u op=%s offset=%lu\n", s,
                           jb->is_read ? "read" : "write", (unsigned long)off);
                io_errors++;
                if (!jb->is_read && gentab)
                    gentab[jb->block] = GEN_UNKNOWN;
                continue;
            }
            ds->bytes += bs;
            if (jb->is_read) {
                if (verify)
                    verify_read((const uint64_t *)(bufs + (uint64_t)jn * bs), nwords, jb->block, off);
            } else if (gentab) {
                gentab[jb->block] = jb->gen + 1;
            }
        }
    }

    uint64_t time_ns = tsc_to_ns(t_end - t_start);
    uint64_t total = st_read.ios + st_write.ios;
    uint64_t bytes = st_read.bytes + st_write.bytes;
    uint64_t iops = time_ns ? (uint64_t)((unsigned __int128)total * 1000000000u / time_ns) : 0;
    uint64_t kbps = time_ns ? (uint64_t)((unsigned __int128)bytes * 1000000u / time_ns) : 0;
    printf("workload: %lu I/Os in %lu us: %lu IOPS, %lu KB/s, %lu notifies\n",
           (unsigned long)total, (unsigned long)(time_ns / 1000), (unsigned long)iops,
           (unsigned long)kbps, (unsigned long)vblk_notifies(&blk));
    if (vo.irq)
        printf("workload: interrupts taken %lu, waits that found completions without one %lu\n",
               (unsigned long)*blk.irq_counter, (unsigned long)blk.irq_lost);
    if (verify)
        printf("workload: verify: %lu blocks checked, %lu not checked, %lu errors\n",
               (unsigned long)checked, (unsigned long)unchecked, (unsigned long)verify_errors);

    out("fio-result: rw=%s bs=%lu iodepth=%lu queues=%lu size=%lu offset=%lu seed=%lu "
        "transport=%s time_ns=%lu", rw_names[rw], (unsigned long)bs, (unsigned long)iodepth,
        (unsigned long)queues, (unsigned long)size, (unsigned long)offset, (unsigned long)seed,
        virtio_transport_name(blk.dev.transport), (unsigned long)time_ns);
    out_dir("read", &st_read);
    out_dir("write", &st_write);
    out(" flushes=%lu io_errors=%lu verify_errors=%lu first_bad=%ld last_generation=%ld\n",
        (unsigned long)flushes, (unsigned long)io_errors, (unsigned long)verify_errors,
        first_bad == UINT64_MAX ? -1L : (long)first_bad,
        last_gen == UINT64_MAX ? -1L : (long)last_gen);
    serial_write(line, line_len);
    return io_errors || verify_errors ? 1 : 0;
}
