/*
 * balloond native helpers: give guest memory back to the host.
 *
 * Plain C with no Python dependency. Every function returns 0 or a negative
 * errno, except balloond_discard, which reports per range.
 */
#ifndef BALLOOND_DISCARD_H
#define BALLOOND_DISCARD_H

#include <stddef.h>
#include <stdint.h>

/* One range of a shared, fd-backed mapping to drop. */
struct balloond_range {
	int fd;          /* file backing the range, or -1 to use addr only */
	uint64_t offset; /* byte offset of the range in fd */
	uint64_t length; /* byte length, a multiple of the backing page size */
	void *addr;      /* the caller's own MAP_SHARED mapping of the range, or NULL */
};

/*
 * Free the backing memory of n ranges. For each range, punch a hole in the file
 * (fallocate PUNCH_HOLE | KEEP_SIZE); when the file system cannot punch holes,
 * or fd < 0, use madvise(MADV_REMOVE) on addr instead. errors[i] receives 0 or
 * the errno of range i. Returns the number of ranges freed.
 */
size_t balloond_discard(const struct balloond_range *ranges, size_t n, int32_t *errors);

/*
 * Describe the file system behind fd: its magic number (statfs f_type) and its
 * block size, which for hugetlbfs is the huge page size. Returns 0 or -errno.
 */
int balloond_backing(int fd, uint64_t *fs_type, uint64_t *block_size);

#endif
