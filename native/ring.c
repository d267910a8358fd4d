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
