/*
 * file.c - fallocate with flags (punch hole, zero range) and fcntl record locks for
 * the block layer; the block device ioctls' numbers (BLKDISCARD, BLKZEROOUT) for the
 * file node.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>
#include <linux/falloc.h>
#include <linux/fs.h>

static int pykvm_fallocate(int fd, int mode, int64_t offset, int64_t length)
{
    if (fallocate(fd, mode, offset, length) < 0)
        return -errno;
    return 0;
}

static int pykvm_lock_range(int fd, int cmd, int type, int64_t start, int64_t length)
{
    struct flock fl;

    memset(&fl, 0, sizeof(fl));     /* l_pid must be 0 for the OFD commands */
    fl.l_type = type;
    fl.l_whence = SEEK_SET;
    fl.l_start = start;
    fl.l_len = length;
    if (fcntl(fd, cmd, &fl) < 0)
        return -errno;
    if (cmd == F_OFD_GETLK || cmd == F_GETLK)
        return fl.l_type;
    return 0;
}
