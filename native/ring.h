/*
 * balloond native helpers: guest memory access. Ring indices in single-width accesses;
 * copies that survive the memory going away.
 *
 * A ring index shared with a guest must be read and written as one aligned 16-bit
 * access, never byte by byte or after a zero fill (a vCPU polling the used index would
 * see a value that was never published). The barriers are the ones the virtio
 * specification asks of a device (split virtqueues, "Driver Requirements" and "Device
 * Requirements" of the notification sections):
 *
 *   balloond_load_u16_acquire   read avail->idx before reading the ring entries it covers
 *   balloond_store_u16_release  write used elements before publishing used->idx
 *   balloond_full_barrier       order a store (used->idx, avail_event) before a later load
 *                               (used_event / flags, avail->idx): the one reordering x86
 *                               allows, and the one that loses a notification
 *
 * Ring fields are little-endian; addresses are the daemon's own mapping of guest RAM.
 *
 * Guest memory is a file the frontend may shrink under us (a memfd without seals, a file on
 * hugetlbfs): touching a page past its end raises SIGBUS. Every access to guest memory goes
 * through these functions, which turn that SIGBUS into -EFAULT once balloond_guard_sigbus()
 * has installed the handler (a SIGBUS anywhere else goes to the handler installed before).
 */
#ifndef BALLOOND_RING_H
#define BALLOOND_RING_H

#include <stddef.h>
#include <stdint.h>

int balloond_guard_sigbus(void);
int balloond_copy(uintptr_t destination, uintptr_t source, size_t length);
int32_t balloond_load_u16_acquire(uintptr_t address);
int balloond_store_u16_release(uintptr_t address, uint16_t value);
void balloond_full_barrier(void);

#endif
