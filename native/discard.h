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

/*
 * Sort n page frame numbers (in place) and merge them into spans of guest memory: spans[]
 * receives {gpa, length} word pairs, at most n, in address order, each run of consecutive
 * frames one span, a frame named twice counted once; a frame is 1 << shift bytes. Returns
 * the number of spans.
 */
size_t balloond_coalesce(uint32_t *frames, size_t n, unsigned int shift, uint64_t *spans);

/* One region of guest RAM as a discard plan reads it. */
struct balloond_plan_region {
	uint64_t gpa;    /* guest-physical start */
	uint64_t size;   /* bytes */
	uint64_t page;   /* a piece is freed only if aligned to this in the file */
	uint64_t offset; /* file offset of gpa */
	uint64_t host;   /* the daemon's MAP_SHARED address of gpa */
	int64_t fd;      /* the file */
};

/* Part of a span that is not freed: outside guest RAM (page 0), or not aligned to page. */
struct balloond_skip {
	uint64_t gpa;
	uint64_t length;
	uint64_t page;
};

/*
 * Plan the discard of nspans guest ranges ({gpa, length} word pairs, sorted by gpa) over
 * nregions regions (sorted by gpa, disjoint): each span is cut at region edges, and each
 * piece becomes a range of ranges[] if it is aligned to its region's page, else a skip.
 * On entry *nranges and *nskips are the arrays' capacities; on return, what was used, and
 * *total the bytes of the ranges. Returns 0, or -ENOSPC if an array was too short.
 */
int balloond_plan(const struct balloond_plan_region *regions, size_t nregions,
		  const uint64_t *spans, size_t nspans, struct balloond_range *ranges,
		  size_t *nranges, struct balloond_skip *skips, size_t *nskips, uint64_t *total);

#endif
