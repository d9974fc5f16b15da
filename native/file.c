/*
 * file.c - fallocate with flags (punch hole, zero range) for the block layer; the block
 * device ioctls' numbers (BLKDISCARD, BLKZEROOUT) for the file node.
 */
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <linux/falloc.h>
#include <linux/fs.h>

static int pykvm_fallocate(int fd, int mode, int64_t offset, int64_t length)
{
    if (fallocate(fd, mode, offset, length) < 0)
        return -errno;
    return 0;
}
