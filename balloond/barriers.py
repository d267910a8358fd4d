"""Ring indices in guest memory: one aligned 16-bit access each, with the virtio barriers.

The second and last importer of the cffi extension (`balloond.discard` is the other). A
virtqueue index is shared with a running vCPU, so it is never read or written through
`struct`, which packs byte by byte after zero-filling its buffer: a guest polling the
used index could see 0, or half of a new value. The native helpers make each access one
aligned 16-bit load or store and add the barrier the virtio specification asks for:

- `load_u16_acquire`: the available index, before the ring entries it covers are read;
- `store_u16_release`: the used index (and ``avail_event``), after the used elements;
- `full_barrier`: between publishing an index and reading the guest's next decision
  (``used_event``, the avail flags, the available index again), where a store-load
  reordering would lose a notification.

Callers pass addresses inside the daemon's own mapping of guest RAM, already bounds
checked (`balloond.memory.GuestMemory` does); here only the alignment is checked.
"""

from __future__ import annotations

from typing import Any

from balloond._native import lib as _lib_module

_lib: Any = _lib_module


def load_u16_acquire(address: int) -> int:
    """Read the little-endian 16-bit value at ``address`` in one access (acquire)."""
    if address <= 0 or address % 2:
        raise ValueError(f"unaligned 16-bit ring access at {address:#x}")
    return int(_lib.balloond_load_u16_acquire(address))


def store_u16_release(address: int, value: int) -> None:
    """Publish ``value`` at ``address`` in one 16-bit store, after all earlier writes."""
    if address <= 0 or address % 2:
        raise ValueError(f"unaligned 16-bit ring access at {address:#x}")
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value} does not fit 16 bits")
    _lib.balloond_store_u16_release(address, value)


def full_barrier() -> None:
    """Order every earlier load and store before every later one (a store-load fence)."""
    _lib.balloond_full_barrier()
