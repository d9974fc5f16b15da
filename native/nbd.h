/*
 * nbd.h - an NBD connection in C over libnbd's asynchronous API, shared by
 * both paths of a disk (one connection: a FLUSH covers every write).
 *
 * A pump thread polls the connection's socket and drives libnbd's state
 * machine (nbd_aio_notify_read/write); requests complete through libnbd's
 * completion callbacks, without the GIL. A lost connection is reconnected
 * in the background; requests wait for it up to reconnect_delay_ms (QEMU's
 * reconnect-delay), then fail with EIO, as do later ones until it is back.
 *
 * Requests are AIO requests (aio.h): READ, WRITE, FLUSH, and FALLOCATE with
 * FALLOC_FL_PUNCH_HOLE (write zeroes, the server may punch) or
 * FALLOC_FL_ZERO_RANGE (write zeroes, NO_HOLE). A connection is routed from
 * a "key" descriptor: a C engine sends every request on that fd here.
 */

struct pykvm_nbd;

struct pykvm_nbd_info {
    uint64_t size;
    int32_t read_only;
    int32_t can_flush;
    int32_t can_fua;
    int32_t can_trim;
    int32_t can_zero;
    int32_t can_fast_zero;
    int32_t can_multi_conn;
    int32_t can_block_status;   /* base:allocation negotiated */
    uint32_t block_min;
    uint32_t block_pref;
    uint32_t block_max;         /* largest payload a request carries (split above it) */
    int32_t connected;
    uint64_t reconnects;        /* connections made after the first */
    uint64_t requests;          /* commands sent */
    uint64_t failed;            /* requests completed with an error */
};

#define PYKVM_NBD_MAX_PAYLOAD 33554432
#define PYKVM_NBD_TRIM 0x100    /* a FALLOCATE mode bit of this module: NBD_CMD_TRIM */
#define PYKVM_NBD_FUA 0x200     /* a WRITE mode bit: NBD_CMD_FLAG_FUA (the server offers it) */

/* Connect to uri (the NBD URI standard: nbd://, nbd+unix://); NULL with one
 * line in err when it cannot. request_timeout_ms: a connection with requests
 * in flight and no reply for that long is dropped as dead (0: never). */
struct pykvm_nbd *pykvm_nbd_open(const char *uri, uint32_t reconnect_delay_ms,
                                 uint32_t connect_timeout_ms, uint32_t request_timeout_ms,
                                 char *err, size_t errlen);
void pykvm_nbd_get_info(struct pykvm_nbd *c, struct pykvm_nbd_info *info);
/* One request, waited for (a format's metadata, the Python path's workers):
 * bytes done or -errno. */
int64_t pykvm_nbd_sync(struct pykvm_nbd *c, int32_t op, uint64_t offset,
                       const struct iovec *iov, uint32_t iovcnt, int32_t mode, uint64_t length);
/* base:allocation over [offset, offset+length): up to max (length, flags)
 * pairs in out, clipped to the range; the number of pairs or -errno. */
int pykvm_nbd_block_status(struct pykvm_nbd *c, uint64_t offset, uint64_t length,
                           uint64_t *out, uint32_t max);
/* Route requests on key_fd (an fd no one reads) to c in every C engine. */
int pykvm_nbd_route(int key_fd, struct pykvm_nbd *c);
void pykvm_nbd_unroute(int key_fd);
/* Fail what is in flight, stop the pump, free. */
void pykvm_nbd_close(struct pykvm_nbd *c);
