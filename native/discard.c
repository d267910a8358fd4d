/*
 * balloond native helpers; see discard.h.
 *
 * On shared memory, madvise(MADV_DONTNEED) only unmaps the caller's page table
 * entries and frees nothing, so it is never used here.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
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

/* Guest addresses with their end: a span may end at 2^64 exactly. */
typedef unsigned __int128 wide;

static int skip(struct balloond_skip *skips, size_t *used, size_t room, wide gpa, wide end,
		uint64_t page)
{
	if (*used == room)
		return -ENOSPC;
	skips[*used].gpa = (uint64_t)gpa;
	skips[*used].length = (uint64_t)(end - gpa);
	skips[*used].page = page;
	(*used)++;
	return 0;
}

int balloond_plan(const struct balloond_plan_region *regions, size_t nregions,
		  const uint64_t *spans, size_t nspans, struct balloond_range *ranges,
		  size_t *nranges, struct balloond_skip *skips, size_t *nskips, uint64_t *total)
{
	size_t first = 0, range_room = *nranges, skip_room = *nskips;

	*nranges = *nskips = 0;
	*total = 0;
	for (size_t s = 0; s < nspans; s++) {
		wide gpa = spans[2 * s], end = gpa + spans[2 * s + 1], cursor = gpa;

		while (first < nregions && (wide)regions[first].gpa + regions[first].size <= gpa)
			first++;
		for (size_t i = first; cursor < end && i < nregions; i++) {
			const struct balloond_plan_region *r = &regions[i];
			wide lo = cursor > r->gpa ? cursor : r->gpa;
			wide stop = (wide)r->gpa + r->size;
			wide hi = end < stop ? end : stop;
			uint64_t offset, length;

			if (r->gpa >= end)
				break;
			if (lo > cursor && skip(skips, nskips, skip_room, cursor, lo, 0))
				return -ENOSPC;
			offset = r->offset + (uint64_t)(lo - r->gpa);
			length = (uint64_t)(hi - lo);
			if (offset % r->page || length % r->page) {
				if (skip(skips, nskips, skip_room, lo, hi, r->page))
					return -ENOSPC;
			} else {
				if (*nranges == range_room)
					return -ENOSPC;
				ranges[*nranges].fd = (int)r->fd;
				ranges[*nranges].offset = offset;
				ranges[*nranges].length = length;
				ranges[*nranges].addr = (void *)(uintptr_t)(r->host + (uint64_t)(lo - r->gpa));
				(*nranges)++;
				*total += length;
			}
			cursor = hi;
		}
		if (cursor < end && skip(skips, nskips, skip_room, cursor, end, 0))
			return -ENOSPC;
	}
	return 0;
}

static int compare_frames(const void *a, const void *b)
{
	uint32_t x = *(const uint32_t *)a, y = *(const uint32_t *)b;

	return (x > y) - (x < y);
}

size_t balloond_coalesce(uint32_t *frames, size_t n, unsigned int shift, uint64_t *spans)
{
	size_t count = 0;

	qsort(frames, n, sizeof(*frames), compare_frames);
	for (size_t i = 0; i < n;) {
		uint64_t first = frames[i], last = frames[i];

		/* Sorted: the next frame is the last one again, the one after, or a new run. */
		for (i++; i < n && frames[i] <= last + 1; i++)
			last = frames[i];
		spans[2 * count] = first << shift;
		spans[2 * count + 1] = (last - first + 1) << shift;
		count++;
	}
	return count;
}
