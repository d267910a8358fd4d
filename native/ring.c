/*
 * balloond native helpers; see ring.h.
 */
#include <endian.h>

#include "ring.h"

uint16_t balloond_load_u16_acquire(uintptr_t address)
{
	return le16toh(__atomic_load_n((const uint16_t *)address, __ATOMIC_ACQUIRE));
}

void balloond_store_u16_release(uintptr_t address, uint16_t value)
{
	__atomic_store_n((uint16_t *)address, htole16(value), __ATOMIC_RELEASE);
}

void balloond_full_barrier(void)
{
	__atomic_thread_fence(__ATOMIC_SEQ_CST);
}
