/*
 * balloond native helpers; see discard.h.
 *
 * On shared memory, madvise(MADV_DONTNEED) only unmaps the caller's page table
 * entries and frees nothing, so it is never used here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/vfs.h>

#include "discard.h"

static int punch_hole(int fd, uint64_t offset, uint64_t length)
{
	int rc;

	do {
		rc = fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
			       (off_t)offset, (off_t)length);
	} while (rc < 0 && errno == EINTR);
	return rc < 0 ? errno : 0;
}

static int remove_pages(void *addr, uint64_t length)
{
	if (addr == NULL)
		return EINVAL;
	return madvise(addr, (size_t)length, MADV_REMOVE) < 0 ? errno : 0;
}

static int discard_one(const struct balloond_range *range)
{
	int err;

	if (range->length == 0 || range->offset > INT64_MAX ||
	    range->length > (uint64_t)INT64_MAX - range->offset)
		return EINVAL;
	if (range->fd < 0)
		return remove_pages(range->addr, range->length);
	err = punch_hole(range->fd, range->offset, range->length);
	if ((err == EOPNOTSUPP || err == ENOSYS) && range->addr != NULL)
		err = remove_pages(range->addr, range->length);
	return err;
}

size_t balloond_discard(const struct balloond_range *ranges, size_t n, int32_t *errors)
{
	size_t freed = 0;

	for (size_t i = 0; i < n; i++) {
		errors[i] = discard_one(&ranges[i]);
		if (errors[i] == 0)
			freed++;
	}
	return freed;
}

int balloond_backing(int fd, uint64_t *fs_type, uint64_t *block_size)
{
	struct statfs st;

	if (fstatfs(fd, &st) < 0)
		return -errno;
	*fs_type = (uint64_t)(unsigned long)st.f_type;
	*block_size = (uint64_t)st.f_bsize;
	return 0;
}
