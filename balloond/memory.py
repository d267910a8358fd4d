"""Guest memory: the frontend's regions, mapped from their fds, and the two translations.

A region arrives as ``{guest_phys_addr, memory_size, userspace_addr, mmap_offset}`` plus
an fd. Ring addresses from SET_VRING_ADDR are frontend (QEMU) virtual addresses and go
through ``userspace_addr``; addresses inside the rings are guest-physical and go through
``guest_phys_addr``. Every access is bounds-checked against one region; nothing here
hands out a pointer or a long-lived memoryview, so a region can be unmapped at any time.
"""

from __future__ import annotations

import ctypes
import itertools
import mmap
import os
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

from balloond import barriers
from balloond.discard import PLAN_REGION_WORDS, DiscardRange, backing, plan
from balloond.errors import FrontendError, GuestError, HostError
from balloond.wire import MemoryRegion

#: Regions a frontend may add with ADD_MEM_REG (the reply to GET_MAX_MEM_SLOTS).
MAX_MEM_SLOTS = 32
_OFF_T_MAX = (1 << 63) - 1


class GuestMemoryError(GuestError):
    """The guest named memory that is not guest RAM, or crosses a region's end."""


@dataclass(frozen=True)
class SkippedRange:
    """Part of a discard request that was not discarded, and why."""

    gpa: int
    length: int
    reason: str  # "outside guest RAM" or "not aligned to the N-byte backing page"


class MappedRegion:
    """One region mapped MAP_SHARED; owns its fd (from the start: closed if mapping fails)
    and its mapping."""

    def __init__(self, spec: MemoryRegion, fd: int) -> None:
        try:
            self._open(spec, fd)
        except BaseException:
            os.close(fd)
            raise

    def _open(self, spec: MemoryRegion, fd: int) -> None:
        self.spec = spec
        self.fd = fd
        end = spec.mmap_offset + spec.memory_size
        if spec.memory_size == 0 or end > _OFF_T_MAX:
            raise FrontendError(
                f"region at gpa {spec.guest_phys_addr:#x}: {spec.memory_size} bytes at fd "
                f"offset {spec.mmap_offset:#x} is not a range of a file"
            )
        try:
            info = backing(fd)
            size = os.fstat(fd).st_size
        except (HostError, OSError) as error:
            raise FrontendError(f"region at gpa {spec.guest_phys_addr:#x}: {error}") from None
        if end > size:
            raise FrontendError(
                f"region at gpa {spec.guest_phys_addr:#x} ends at {end:#x}, past the end of "
                f"its file ({size:#x} bytes)"
            )
        barriers.guard_sigbus()  # before the first access: the file may shrink later
        self.page_size = info.page_size
        self.hugetlb = info.hugetlb
        aligned = spec.mmap_offset - spec.mmap_offset % mmap.ALLOCATIONGRANULARITY
        if self.hugetlb:
            aligned = spec.mmap_offset - spec.mmap_offset % self.page_size
        self._skew = spec.mmap_offset - aligned
        length = self._skew + spec.memory_size
        try:
            self._map = mmap.mmap(
                fd,
                length,
                flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=aligned,
            )
        except (OSError, ValueError) as error:
            raise FrontendError(
                f"cannot map region at gpa {spec.guest_phys_addr:#x} "
                f"({spec.memory_size} bytes at fd offset {spec.mmap_offset:#x}): {error}"
            ) from None
        anchor = ctypes.c_char.from_buffer(self._map)
        self.address = ctypes.addressof(anchor) + self._skew
        del anchor

    @property
    def gpa_end(self) -> int:
        return self.spec.guest_phys_addr + self.spec.memory_size

    def contains_gpa(self, gpa: int, length: int) -> bool:
        start = self.spec.guest_phys_addr
        return start <= gpa and gpa + length <= self.gpa_end

    def offset_of(self, gpa: int) -> int:
        """Offset of ``gpa`` inside our mapping."""
        return self._skew + gpa - self.spec.guest_phys_addr

    def close(self) -> None:
        self._map.close()
        os.close(self.fd)


class GuestMemory:
    """The current memory table: a set of non-overlapping mapped regions.

    :attr:`generation` counts the table's changes: an address in the daemon's mapping that a
    caller keeps (a ring's, see :class:`balloond.virtqueue.Virtqueue`) is valid only while
    the generation it was worked out in lasts. :attr:`native_table` is the table as the
    native chain walk reads it, and ``_plan_table`` as the native discard plan does: both
    replaced (never changed in place) with every generation.
    """

    def __init__(self) -> None:
        self._regions: list[MappedRegion] = []
        self.generation = 0
        self.native_table = array("Q")
        self._plan_table = array("Q")

    def _set(self, regions: list[MappedRegion]) -> list[MappedRegion]:
        """Make ``regions`` the table (sorted here); return the old one, to be closed after."""
        old = self._regions
        self._regions = sorted(regions, key=lambda r: r.spec.guest_phys_addr)
        self.native_table = array(
            "Q",
            [
                word
                for r in self._regions
                for word in (r.spec.guest_phys_addr, r.spec.memory_size, r.address)
            ],
        )
        self._plan_table = array(
            "Q",
            [
                word
                for r in self._regions
                for word in (
                    r.spec.guest_phys_addr,
                    r.spec.memory_size,
                    max(r.page_size, mmap.PAGESIZE),  # a piece is at least a page
                    r.spec.mmap_offset,
                    r.address,
                    r.fd,
                )
            ],
        )
        assert len(self._plan_table) == PLAN_REGION_WORDS * len(self._regions)
        self.generation += 1
        return old

    # --- the table -------------------------------------------------------------------

    @property
    def regions(self) -> tuple[MappedRegion, ...]:
        return tuple(self._regions)

    def __iter__(self) -> Iterator[MappedRegion]:
        return iter(self._regions)

    def __len__(self) -> int:
        return len(self._regions)

    @property
    def size(self) -> int:
        return sum(r.spec.memory_size for r in self._regions)

    @property
    def largest_page(self) -> int:
        """The largest backing page of any region (0 with no memory)."""
        return max((r.page_size for r in self._regions), default=0)

    def replace(self, table: Iterable[tuple[MemoryRegion, int]]) -> None:
        """SET_MEM_TABLE: map all new regions, then drop the old ones.

        Takes ownership of every fd, also when it raises.
        """
        pending = list(table)
        new: list[MappedRegion] = []
        try:
            while pending:
                spec, fd = pending.pop(0)
                new.append(MappedRegion(spec, fd))
            _check_disjoint(new)
        except BaseException:
            for region in new:
                region.close()
            for _, fd in pending:
                os.close(fd)
            raise
        for region in self._set(new):
            region.close()

    def add(self, spec: MemoryRegion, fd: int) -> None:
        """ADD_MEM_REG; takes ownership of ``fd``.

        A region equal to one already in the table replaces it: QEMU forgets what the
        backend holds when the device is unplugged and plugged again on the same
        connection, and sends every region anew.
        """
        same = [r for r in self._regions if r.spec == spec]
        others = [r for r in self._regions if r.spec != spec]
        if len(others) >= MAX_MEM_SLOTS:
            os.close(fd)
            raise FrontendError(f"ADD_MEM_REG beyond {MAX_MEM_SLOTS} memory slots")
        region = MappedRegion(spec, fd)
        try:
            _check_disjoint([*others, region])
        except FrontendError:
            region.close()
            raise
        self._set([*others, region])
        for old in same:
            old.close()

    def remove(self, spec: MemoryRegion) -> None:
        """REM_MEM_REG: drop the region with this guest address and size."""
        for region in self._regions:
            if (region.spec.guest_phys_addr, region.spec.memory_size) == (
                spec.guest_phys_addr,
                spec.memory_size,
            ):
                self._set([r for r in self._regions if r is not region])
                region.close()
                return
        raise FrontendError(
            f"REM_MEM_REG for unknown region at gpa {spec.guest_phys_addr:#x}"
            f" size {spec.memory_size:#x}"
        )

    def close(self) -> None:
        for region in self._set([]):
            region.close()

    def snapshot(self) -> tuple[tuple[MemoryRegion, int], ...]:
        """The table as plain values (region spec, fd): enough to map it again."""
        return tuple((r.spec, r.fd) for r in self._regions)

    # --- translations ----------------------------------------------------------------

    def uaddr_to_gpa(self, uaddr: int, length: int) -> int:
        """Translate a frontend virtual address range that lies inside one region."""
        for region in self._regions:
            start = region.spec.userspace_addr
            if start <= uaddr and uaddr + length <= start + region.spec.memory_size:
                return region.spec.guest_phys_addr + uaddr - start
        raise FrontendError(f"frontend address {uaddr:#x}+{length:#x} is not in guest memory")

    def _region_for(self, gpa: int, length: int) -> MappedRegion:
        for region in self._regions:
            if region.contains_gpa(gpa, length):
                return region
        raise GuestMemoryError(f"guest address {gpa:#x}+{length:#x} is not inside one region")

    def check(self, gpa: int, length: int) -> None:
        """Raise GuestMemoryError unless ``[gpa, gpa+length)`` lies inside one region."""
        self._region_for(gpa, length)

    def host_address(self, gpa: int, length: int) -> int:
        """The daemon's address of ``[gpa, gpa+length)``, which one region must hold; valid
        while :attr:`generation` stays as it is."""
        region = self._region_for(gpa, length)
        return region.address + gpa - region.spec.guest_phys_addr

    def read(self, gpa: int, length: int) -> bytes:
        try:
            return barriers.read(self.host_address(gpa, length), length)
        except barriers.BusError as error:
            raise GuestMemoryError(str(error)) from None

    def write(self, gpa: int, data: bytes) -> None:
        try:
            barriers.write(self.host_address(gpa, len(data)), data)
        except barriers.BusError as error:
            raise GuestMemoryError(str(error)) from None

    def u16_host_address(self, gpa: int) -> int:
        """:meth:`host_address` of a ring index, checked for the alignment a single 16-bit
        access needs."""
        if gpa % 2:
            raise GuestMemoryError(f"ring index at {gpa:#x} is not 2-byte aligned")
        region = self._region_for(gpa, 2)
        address = region.address + gpa - region.spec.guest_phys_addr
        if address % 2:  # an odd mmap_offset: the frontend's doing, but the guest's ring
            raise GuestMemoryError(f"ring index at {gpa:#x} is not 2-byte aligned in memory")
        return address

    def load_u16(self, gpa: int) -> int:
        """Read a ring index the guest may be writing: one 16-bit load, with acquire."""
        try:
            return barriers.load_u16_acquire(self.u16_host_address(gpa))
        except barriers.BusError as error:
            raise GuestMemoryError(str(error)) from None

    def host_page(self, gpa: int) -> tuple[int, int] | None:
        """The backing page holding ``gpa`` as ``(gpa of its start, page size)``, or None.

        Backing pages are aligned in the memory file, so their guest address depends on
        the region's ``mmap_offset``; the page is clipped to nothing if it would cross the
        region's edge (None then: it can never be freed whole).
        """
        for region in self._regions:
            if region.contains_gpa(gpa, 1):
                spec, page = region.spec, region.page_size
                offset = spec.mmap_offset + gpa - spec.guest_phys_addr
                start = gpa - offset % page
                if start < spec.guest_phys_addr or start + page > region.gpa_end:
                    return None
                return start, page
        return None

    def discard_plans(self, spans: array[int]) -> tuple[Sequence[DiscardRange], list[SkippedRange]]:
        """Split a chain's guest ranges, ``(gpa, length)`` word pairs sorted by gpa (as
        :func:`span_words` and :func:`balloond.discard.coalesce` make them), into what can be
        discarded and what must be skipped, in the order of the ranges' guest addresses.

        Pieces are cut at region boundaries; a piece that is not aligned to its region's
        backing page size, or lies outside guest RAM, is skipped whole. One native call
        (:func:`balloond.discard.plan`).
        """
        ranges, skips = plan(self._plan_table, spans)
        skipped = [
            SkippedRange(
                gpa,
                length,
                f"not aligned to the {page}-byte backing page" if page else "outside guest RAM",
            )
            for gpa, length, page in skips
        ]
        return ranges, skipped


def span_words(spans: Iterable[tuple[int, int]]) -> array[int]:
    """``(gpa, length)`` pairs as :meth:`GuestMemory.discard_plans` takes them: word pairs,
    sorted by gpa."""
    return array("Q", [word for span in sorted(spans) for word in span])


def _check_disjoint(regions: list[MappedRegion]) -> None:
    for field_name, space in (
        ("guest_phys_addr", "guest physical"),
        ("userspace_addr", "frontend virtual"),
    ):
        spans = sorted(
            (getattr(r.spec, field_name), getattr(r.spec, field_name) + r.spec.memory_size)
            for r in regions
        )
        for (_, end), (start, _) in itertools.pairwise(spans):
            if end > start:
                raise FrontendError(f"memory regions overlap in {space} address space")
