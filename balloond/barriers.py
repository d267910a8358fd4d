"""Guest memory access: ring indices in one aligned 16-bit access each, with the virtio
barriers, and copies that survive the memory going away.

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

Guest memory is a file the frontend could shrink under the mapping: touching a page past
the file's end raises SIGBUS, which would kill the daemon and every VM's balloon with it.
Every access here runs under a guard (`guard_sigbus` installs it, once, chaining to the
handler before it, such as faulthandler's) that turns such a SIGBUS into `BusError`.
"""

from __future__ import annotations

from typing import Any

from balloond._native import ffi as _ffi_module
from balloond._native import lib as _lib_module

_ffi: Any = _ffi_module
_lib: Any = _lib_module
_guarded = False


class BusError(OSError):
    """Guest memory is gone under the mapping (its file was shrunk): SIGBUS, caught."""


def guard_sigbus() -> None:
    """Install the SIGBUS guard (once; after faulthandler, so that it comes first)."""
    global _guarded
    if not _guarded:
        rc = int(_lib.balloond_guard_sigbus())
        if rc < 0:
            raise OSError(-rc, "cannot install the SIGBUS handler")
        _guarded = True


def _check(rc: int, address: int) -> None:
    if rc < 0:
        raise BusError(-rc, f"guest memory at {address:#x} is gone (its file was shrunk)")


def read(address: int, length: int) -> bytes:
    """Copy ``length`` bytes of guest memory at ``address``."""
    out = bytearray(length)
    if length:
        target = int(_ffi.cast("uintptr_t", _ffi.from_buffer(out)))
        _check(int(_lib.balloond_copy(target, address, length)), address)
    return bytes(out)


def write(address: int, data: bytes) -> None:
    """Copy ``data`` into guest memory at ``address`` (nothing a vCPU reads concurrently)."""
    if data:
        source = int(_ffi.cast("uintptr_t", _ffi.from_buffer(data)))
        _check(int(_lib.balloond_copy(address, source, len(data))), address)


def load_u16_acquire(address: int) -> int:
    """Read the little-endian 16-bit value at ``address`` in one access (acquire)."""
    if address <= 0 or address % 2:
        raise ValueError(f"unaligned 16-bit ring access at {address:#x}")
    value = int(_lib.balloond_load_u16_acquire(address))
    _check(value, address)
    return value


def store_u16_release(address: int, value: int) -> None:
    """Publish ``value`` at ``address`` in one 16-bit store, after all earlier writes."""
    if address <= 0 or address % 2:
        raise ValueError(f"unaligned 16-bit ring access at {address:#x}")
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value} does not fit 16 bits")
    _check(int(_lib.balloond_store_u16_release(address, value)), address)


def full_barrier() -> None:
    """Order every earlier load and store before every later one (a store-load fence)."""
    _lib.balloond_full_barrier()
