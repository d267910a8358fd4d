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

/*
 * Descriptor chains. A chain is walked in one call: every descriptor is read from guest
 * memory once, into locals, and checked as the virtio specification asks of a device
 * (split virtqueues, "The Virtqueue Descriptor Table" and "Indirect Descriptors"). The
 * guest may rewrite the table meanwhile; whatever it writes, the walk reads at most
 * `size` descriptors, direct and indirect together, and stops at the first fault.
 */

/* One region of guest RAM: guest-physical start and length, and where the daemon maps it. */
struct balloond_region {
	uint64_t gpa;
	uint64_t size;
	uint64_t host;
};

/* Why a walk stopped; detail[] holds the values a message names. */
enum balloond_chain_error {
	BALLOOND_CHAIN_OK = 0,
	BALLOOND_CHAIN_LOOP,             /* more descriptors than the queue size */
	BALLOOND_CHAIN_INDIRECT_OFF,     /* INDIRECT without VIRTIO_RING_F_INDIRECT_DESC */
	BALLOOND_CHAIN_INDIRECT_NESTED,  /* INDIRECT inside an indirect table */
	BALLOOND_CHAIN_INDIRECT_NEXT,    /* INDIRECT together with NEXT */
	BALLOOND_CHAIN_INDIRECT_LENGTH,  /* detail[0]: a table length not a multiple of 16 */
	BALLOOND_CHAIN_INDIRECT_LONG,    /* detail[0]: entries of a table longer than the queue */
	BALLOOND_CHAIN_OUTSIDE,          /* detail[0..1]: a table outside every region */
	BALLOOND_CHAIN_OVERFLOW,         /* detail[0..1]: addr + len past 2^64 */
	BALLOOND_CHAIN_ORDER,            /* a device-readable buffer after a device-writable one */
	BALLOOND_CHAIN_NEXT,             /* detail[0..1]: next index past the table's end */
	BALLOOND_CHAIN_FAULT,            /* guest memory went away (SIGBUS) */
};

struct balloond_walk {
	/* In: the ring's descriptor table (the daemon's address, `size` entries, inside one
	 * region), the queue size, the chain's head (< size), and whether indirect tables
	 * were negotiated. */
	uintptr_t table;
	uint32_t size;
	uint32_t head;
	uint32_t indirect;
	/* Out: buffers found (`readable` of them device-readable, first), descriptors read,
	 * and the values of an error's message. */
	uint32_t count;
	uint32_t readable;
	uint32_t read;
	uint64_t detail[2];
};

/*
 * Walk the chain at walk->head. out receives {addr, len} pairs of 64-bit words, at most
 * walk->size pairs. Returns an enum balloond_chain_error; the buffers found up to an error
 * are in out all the same, but a chain with an error is completed unused.
 */
int balloond_walk_chain(struct balloond_walk *walk, const struct balloond_region *regions,
			size_t nregions, uint64_t *out);

#endif
