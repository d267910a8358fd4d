/*
 * balloond native helpers; see ring.h.
 */
#define _GNU_SOURCE
#include <endian.h>
#include <errno.h>
#include <setjmp.h>
#include <signal.h>
#include <stddef.h>
#include <string.h>

#include "ring.h"

/*
 * Where a guarded access on this thread resumes after a SIGBUS, or NULL. The handler runs
 * with SA_NODEFER and an empty sa_mask, so the thread's signal mask inside it is the one
 * outside: siglongjmp needs no saved mask to restore, and sigsetjmp saves none (saving it
 * is a system call on every guarded access).
 */
static __thread sigjmp_buf *volatile guard;
static struct sigaction previous;

static void on_sigbus(int signo, siginfo_t *info, void *context)
{
	sigjmp_buf *resume = guard;

	if (resume != NULL) {
		guard = NULL;
		siglongjmp(*resume, 1);
	}
	/* Not ours: whoever handled SIGBUS before (faulthandler), else the default. */
	if (previous.sa_flags & SA_SIGINFO) {
		previous.sa_sigaction(signo, info, context);
	} else if (previous.sa_handler != SIG_IGN && previous.sa_handler != SIG_DFL) {
		previous.sa_handler(signo);
	} else {
		signal(signo, SIG_DFL);
		raise(signo);
	}
}

int balloond_guard_sigbus(void)
{
	struct sigaction action;

	memset(&action, 0, sizeof(action));
	action.sa_sigaction = on_sigbus;
	action.sa_flags = SA_SIGINFO | SA_NODEFER;
	sigemptyset(&action.sa_mask);
	return sigaction(SIGBUS, &action, &previous) < 0 ? -errno : 0;
}

int balloond_copy(uintptr_t destination, uintptr_t source, size_t length)
{
	sigjmp_buf resume;

	if (sigsetjmp(resume, 0)) /* no mask to save: see guard */
		return -EFAULT;
	guard = &resume;
	memcpy((void *)destination, (const void *)source, length);
	guard = NULL;
	return 0;
}

int32_t balloond_load_u16_acquire(uintptr_t address)
{
	sigjmp_buf resume;
	uint16_t value;

	if (sigsetjmp(resume, 0))
		return -EFAULT;
	guard = &resume;
	value = __atomic_load_n((const uint16_t *)address, __ATOMIC_ACQUIRE);
	guard = NULL;
	return le16toh(value);
}

int balloond_store_u16_release(uintptr_t address, uint16_t value)
{
	sigjmp_buf resume;

	if (sigsetjmp(resume, 0))
		return -EFAULT;
	guard = &resume;
	__atomic_store_n((uint16_t *)address, htole16(value), __ATOMIC_RELEASE);
	guard = NULL;
	return 0;
}

void balloond_full_barrier(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}

#define DESC_F_NEXT 1
#define DESC_F_WRITE 2
#define DESC_F_INDIRECT 4
#define DESC_SIZE 16

struct desc {
	uint64_t addr;
	uint32_t len;
	uint16_t flags;
	uint16_t next;
};

/* The daemon's address of guest range [gpa, gpa + length), if one region holds all of it. */
static uintptr_t translate(const struct balloond_region *regions, size_t nregions,
			   uint64_t gpa, uint64_t length)
{
	for (size_t i = 0; i < nregions; i++) {
		const struct balloond_region *r = &regions[i];

		if (gpa >= r->gpa && gpa - r->gpa <= r->size && length <= r->size - (gpa - r->gpa))
			return (uintptr_t)(r->host + (gpa - r->gpa));
	}
	return 0;
}

static int walk(struct balloond_walk *w, const struct balloond_region *regions, size_t nregions,
		uint64_t *out)
{
	uintptr_t table = w->table;
	uint32_t table_size = w->size, index = w->head, seen = 0;
	int indirect = 0;

	for (;;) {
		struct desc d;

		seen++;
		w->read++;
		if (seen > w->size)
			return BALLOOND_CHAIN_LOOP;
		/* One read of the descriptor: the guest may change it, we use this copy. */
		memcpy(&d, (const void *)(table + (uintptr_t)DESC_SIZE * index), sizeof(d));
		d.addr = le64toh(d.addr);
		d.len = le32toh(d.len);
		d.flags = le16toh(d.flags);
		d.next = le16toh(d.next);
		if (d.flags & DESC_F_INDIRECT) {
			if (!w->indirect)
				return BALLOOND_CHAIN_INDIRECT_OFF;
			if (indirect)
				return BALLOOND_CHAIN_INDIRECT_NESTED;
			if (d.flags & DESC_F_NEXT)
				return BALLOOND_CHAIN_INDIRECT_NEXT;
			w->detail[0] = d.len;
			if (d.len == 0 || d.len % DESC_SIZE)
				return BALLOOND_CHAIN_INDIRECT_LENGTH;
			if (d.len / DESC_SIZE > w->size)
				return BALLOOND_CHAIN_INDIRECT_LONG;
			table = translate(regions, nregions, d.addr, d.len);
			if (table == 0) {
				w->detail[0] = d.addr;
				w->detail[1] = d.len;
				return BALLOOND_CHAIN_OUTSIDE;
			}
			table_size = d.len / DESC_SIZE;
			index = 0;
			indirect = 1;
			seen--; /* it names a table: the chain's descriptors are the table's */
			continue;
		}
		if (d.addr != 0 && d.len > ~d.addr + 1) {
			w->detail[0] = d.addr;
			w->detail[1] = d.len;
			return BALLOOND_CHAIN_OVERFLOW;
		}
		if (d.flags & DESC_F_WRITE) {
			/* writable ones come after every readable one */
		} else if (w->count > w->readable) {
			return BALLOOND_CHAIN_ORDER;
		} else {
			w->readable++;
		}
		out[2 * w->count] = d.addr;
		out[2 * w->count + 1] = d.len;
		w->count++;
		if (!(d.flags & DESC_F_NEXT))
			return BALLOOND_CHAIN_OK;
		if (d.next >= table_size) {
			w->detail[0] = d.next;
			w->detail[1] = table_size;
			return BALLOOND_CHAIN_NEXT;
		}
		index = d.next;
	}
}

int balloond_walk_chain(struct balloond_walk *w, const struct balloond_region *regions,
			size_t nregions, uint64_t *out)
{
	sigjmp_buf resume;
	int rc;

	w->count = w->readable = w->read = 0;
	w->detail[0] = w->detail[1] = 0;
	if (w->head >= w->size) {
		w->detail[0] = w->head;
		w->detail[1] = w->size;
		return BALLOOND_CHAIN_NEXT;
	}
	if (sigsetjmp(resume, 0))
		return BALLOOND_CHAIN_FAULT;
	guard = &resume;
	rc = walk(w, regions, nregions, out);
	guard = NULL;
	return rc;
}
