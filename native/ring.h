/*
 * balloond native helpers: single-width accesses to virtqueue indices in guest memory.
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
 */
#ifndef BALLOOND_RING_H
#define BALLOOND_RING_H

#include <stdint.h>

uint16_t balloond_load_u16_acquire(uintptr_t address);
void balloond_store_u16_release(uintptr_t address, uint16_t value);
void balloond_full_barrier(void);

#endif
