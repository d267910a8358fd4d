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
A descriptor chain is walked in one native call (`ChainWalker`): every descriptor read
once, checked, and its buffer written to an array of words; the caller turns an error code
into its message.

Every access here runs under a guard (`guard_sigbus` installs it, once, chaining to the
handler before it, such as faulthandler's) that turns such a SIGBUS into `BusError`.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable
from typing import Any, Final

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


def gone(rc: int, address: int) -> BusError:
    """The error of an access at ``address`` that returned ``rc`` (a negative errno)."""
    return BusError(-rc, f"guest memory at {address:#x} is gone (its file was shrunk)")


def _check(rc: int, address: int) -> None:
    if rc < 0:
        raise gone(rc, address)


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


#: The index accesses without the checks, for addresses checked once already (aligned, in a
#: mapping: a ring's parts, :meth:`balloond.virtqueue.Virtqueue._places`), on the path of
#: every kick: a negative errno instead of BusError (see :func:`gone`).
raw_load_u16_acquire: Callable[[int], int] = _lib.balloond_load_u16_acquire
raw_store_u16_release: Callable[[int, int], int] = _lib.balloond_store_u16_release


def full_barrier() -> None:
    """Order every earlier load and store before every later one (a store-load fence)."""
    _lib.balloond_full_barrier()


#: ``enum balloond_chain_error``: why a walk stopped (0: it did not).
CHAIN_OK: Final = 0
CHAIN_LOOP: Final = 1
CHAIN_INDIRECT_OFF: Final = 2
CHAIN_INDIRECT_NESTED: Final = 3
CHAIN_INDIRECT_NEXT: Final = 4
CHAIN_INDIRECT_LENGTH: Final = 5
CHAIN_INDIRECT_LONG: Final = 6
CHAIN_OUTSIDE: Final = 7
CHAIN_OVERFLOW: Final = 8
CHAIN_ORDER: Final = 9
CHAIN_NEXT: Final = 10
CHAIN_FAULT: Final = 11

#: ``struct balloond_region`` is three 64-bit words: guest-physical start, length, and the
#: daemon's address of the start.
REGION_WORDS: Final = 3


class ChainWalker:
    """Walks one queue's descriptor chains, one native call per chain.

    Owns the output array (two words per buffer, room for a whole queue's worth) and the
    walk's arguments; not for two threads at once (a queue is walked on the loop's thread).
    """

    def __init__(self, size: int) -> None:
        self.words = array("Q", bytes(16 * size))
        self._out = _ffi.from_buffer("uint64_t[]", self.words)
        self._walk = _ffi.new("struct balloond_walk *")
        self._walk.size = size

    def walk(self, regions: array[int], table: int, head: int, indirect: bool) -> int:
        """Walk chain ``head`` of the descriptor table at ``table`` (the daemon's address of
        ``size`` descriptors, inside guest RAM), translating indirect tables through
        ``regions`` (``REGION_WORDS`` words per region). Returns a ``CHAIN_*`` code; the
        buffers are the first ``count`` pairs of :attr:`words`."""
        if table <= 0:
            raise ValueError(f"bad descriptor table address {table:#x}")
        w = self._walk
        w.table = table
        w.head = head
        w.indirect = 1 if indirect else 0
        c_regions = _ffi.from_buffer("struct balloond_region[]", regions)
        return int(_lib.balloond_walk_chain(w, c_regions, len(regions) // REGION_WORDS, self._out))

    @property
    def count(self) -> int:
        """Buffers the last walk found."""
        return int(self._walk.count)

    @property
    def readable(self) -> int:
        """How many of them (the first ones) are device-readable."""
        return int(self._walk.readable)

    @property
    def read(self) -> int:
        """Descriptors the last walk read."""
        return int(self._walk.read)

    def detail(self, which: int) -> int:
        """A value the last walk's error names."""
        return int(self._walk.detail[which])
