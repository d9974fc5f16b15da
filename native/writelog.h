/*
 * writelog.h - the live write log of a blklogwrites node, in dm-log-writes'
 * format (pykvm/block/writelog.py describes it and reads it back).
 *
 * One writer per log, shared by every C I/O thread of the disk (one per
 * queue with iothread=queue) and by Python, each call under one lock, so
 * the entries of requests served in C and in Python land in one log in one
 * order. Callers report a request as its completion is published to the
 * guest (before the used element, while the guest's buffers still hold the
 * data), a flush when it is submitted and again when it is published.
 *
 * The order is dm-log-writes': a write is in the log after the entry of
 * every flush submitted before it completed, and before the entry of the
 * first flush submitted after it completed. A write (discard, write-zeroes)
 * that completes while no flush is in flight is appended at once (entry and
 * data copied into a 1 MiB buffer of entries, which a thread of the writer
 * writes out when full, and before every super block and at close; a larger
 * write goes with one pwritev); one that completes while a flush is in flight is
 * copied and held until the entries of every flush in flight then are
 * written (flush entries go in submission order). Past hold_max bytes held,
 * the held ones are appended early, before the flush entry (legal: they
 * completed), with one line on stderr the first time. A FUA write (the
 * disk's writethrough) and a mark are appended at once. The super block is
 * rewritten after every FUA or MARK entry and every super_interval entries.
 */

#define PYKVM_WLOG_FLUSH 1
#define PYKVM_WLOG_FUA 2
#define PYKVM_WLOG_DISCARD 4
#define PYKVM_WLOG_MARK 8
#define PYKVM_WLOG_ZERO_CHUNK 1048576   /* write-zeroes: one write entry per MiB */

struct pykvm_wlog_stats {
    uint64_t entries;           /* in the log */
    uint64_t log_bytes;         /* where the next entry goes */
    uint64_t flushes;           /* flush entries (the last flush-N mark's N) */
    uint64_t held;              /* completions that waited for a flush in flight */
    uint64_t held_bytes;        /* data held now */
    uint64_t held_peak;         /* most data ever held at once */
    uint64_t forced;            /* times hold_max made the held ones go early */
    uint64_t waits;             /* times an entry waited for the thread to free a buffer */
    int32_t error;              /* the first errno writing the log (then it stops); 0 */
};

struct pykvm_wlog;

/* A writer appending to fd from byte pos (log sector `entries` + 1 taken);
 * writes the super block at once. direct_fd: the same file opened O_DIRECT,
 * through which a thread of its own writes the buffers of entries (-1:
 * through fd; so too once the file system refuses it, with one line on
 * stderr). NULL: out of memory or a bad size. */
struct pykvm_wlog *pykvm_wlog_new(int32_t fd, int32_t direct_fd, uint32_t sector_size,
                                  uint64_t entries, uint64_t pos, uint32_t super_interval,
                                  uint64_t hold_max);
/* Everything held goes to the log, then the mark dm-log-writes-end and the
 * super block; frees the writer. Returns the first error (errno) or 0. */
int32_t pykvm_wlog_close(struct pykvm_wlog *w);

/* A write of the disk's bytes [offset, offset + length of iov) completed
 * (fua: it was durable as it completed). 0, or -EINVAL when it is not
 * aligned to the log's sector size (not logged), or -errno of the log. */
int32_t pykvm_wlog_write(struct pykvm_wlog *w, uint64_t offset, const struct iovec *iov,
                         uint32_t niov, int32_t fua);
int32_t pykvm_wlog_write_buf(struct pykvm_wlog *w, uint64_t offset, const uint8_t *buf,
                             uint64_t length, int32_t fua);
/* Write-zeroes, logged as writes of zeroes; a discard. */
int32_t pykvm_wlog_zeroes(struct pykvm_wlog *w, uint64_t offset, uint64_t length, int32_t fua);
int32_t pykvm_wlog_discard(struct pykvm_wlog *w, uint64_t offset, uint64_t length);
/* A flush is submitted: its ticket (1, 2, ...). */
uint64_t pykvm_wlog_flush_start(struct pykvm_wlog *w);
/* Flush `ticket` completed (ok) or failed: once every earlier one has too,
 * its entry and the mark flush-N are written, then what was held behind it. */
void pykvm_wlog_flush_done(struct pykvm_wlog *w, uint64_t ticket, int32_t ok);
/* A mark (named entry) now; the name is cut to what fits in an entry. */
int32_t pykvm_wlog_mark(struct pykvm_wlog *w, const char *name);
void pykvm_wlog_stats(struct pykvm_wlog *w, struct pykvm_wlog_stats *out);
