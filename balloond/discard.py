"""Give guest memory back to the host.

One of the two modules that import the cffi extension `balloond._native` (the other,
`balloond.barriers`, accesses ring indices); nothing else in the package sees `ffi` or
`lib`. Guest RAM behind vhost-user is always shared and fd-backed, so
`madvise(MADV_DONTNEED)` would free nothing: the native helper punches a hole in the
backing file (`fallocate(PUNCH_HOLE | KEEP_SIZE)`) and falls back to
`madvise(MADV_REMOVE)` on the daemon's own `MAP_SHARED` mapping where the file system
cannot punch holes.

A chain's ranges are planned in one native call too (`plan`): cut at region edges, checked
against the backing page, and packed as the discard call reads them (`PackedRanges`), with
no Python object per range.

A batch of ranges is one native call, which releases the GIL, so a caller may run it in a
worker thread while the event loop goes on serving. Arguments are checked here, before the
call: a bad range is a bug in the caller and raises `ValueError`; a range the kernel
refuses is reported in the result with its errno.
"""

from __future__ import annotations

import os
import sys
from array import array
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Final, NamedTuple, Protocol, overload

from balloond.errors import HostError

try:
    from balloond._native import ffi as _ffi_module
    from balloond._native import lib as _lib_module
except ImportError as exc:  # pragma: no cover - only without a built extension
    raise ImportError(
        "balloond._native is not built; install the package (pip install -e .) "
        "so that setuptools compiles native/discard.c"
    ) from exc

_ffi: Any = _ffi_module
_lib: Any = _lib_module

#: `statfs.f_type` of hugetlbfs, and of memfds created with MFD_HUGETLB.
HUGETLBFS_MAGIC: Final = 0x958458F6
#: `statfs.f_type` of tmpfs and shmem, including ordinary memfds.
TMPFS_MAGIC: Final = 0x01021994
#: Means "this range has no file descriptor": only the mapping is used (MADV_REMOVE).
NO_FD: Final = -1
#: Means "this range has no mapping": only the file descriptor is used.
NO_ADDRESS: Final = 0

_PAGE_SIZE: Final = os.sysconf("SC_PAGE_SIZE")
_OFF_T_MAX: Final = (1 << 63) - 1
_ADDRESS_LIMIT: Final = 1 << 64


@dataclass(frozen=True, slots=True)
class DiscardRange:
    """One range of guest memory to give back.

    `offset` and `length` locate it in the file `fd`; `address` is where the daemon's own
    `MAP_SHARED` mapping holds the same bytes (used only when the file cannot punch holes).
    All three must be aligned to the base page size; callers align to the backing page size
    (a huge page on hugetlbfs) themselves, since a partial huge page is not freed.
    """

    fd: int
    offset: int
    length: int
    address: int

    def check(self) -> None:
        """Raise ValueError unless the kernel could be asked to drop this range."""
        if self.fd < NO_FD:
            raise ValueError(f"bad file descriptor {self.fd}")
        if self.fd == NO_FD and self.address == NO_ADDRESS:
            raise ValueError("a range needs a file descriptor or an address")
        if self.offset < 0 or self.length <= 0 or self.address < 0:
            raise ValueError(f"negative or empty range: {self}")
        if self.offset + self.length > _OFF_T_MAX:
            raise ValueError(f"range overflows a file offset: {self}")
        if self.address + self.length > _ADDRESS_LIMIT:
            raise ValueError(f"range overflows the address space: {self}")
        if (self.offset | self.length | self.address) % _PAGE_SIZE:
            raise ValueError(f"range not aligned to {_PAGE_SIZE} bytes: {self}")


@dataclass(frozen=True, slots=True)
class DiscardFailure:
    """A range the kernel refused to drop, with the errno it gave."""

    discard_range: DiscardRange
    errno: int

    def __str__(self) -> str:
        return f"{self.discard_range}: {os.strerror(self.errno)} (errno {self.errno})"


class DiscardResult(NamedTuple):
    """What one batch achieved (a tuple: one is made per chain)."""

    requested_bytes: int
    discarded_bytes: int
    discarded_ranges: int
    failures: tuple[DiscardFailure, ...] = ()

    @property
    def ok(self) -> bool:
        """True when no range failed."""
        return not self.failures


@dataclass(frozen=True, slots=True)
class Backing:
    """The file system behind a guest memory fd."""

    fs_type: int
    page_size: int
    hugetlb: bool


class RangeDiscarder(Protocol):
    """What the device needs from a discarder; tests may pass their own."""

    def discard(self, ranges: Sequence[DiscardRange]) -> DiscardResult: ...


def _checked(ranges: Sequence[DiscardRange]) -> int:
    """Check every range; return the bytes requested."""
    for r in ranges:
        r.check()
    return sum(r.length for r in ranges)


#: ``struct balloond_range`` is four 64-bit words on LP64 (``int fd`` and its padding, offset,
#: length, address): a batch is packed into one array of words and handed over without a
#: copy. Elsewhere (another ABI or byte order) each range is converted by cffi.
_WORDS_PER_RANGE: Final = 4
_PACKED: Final = (
    sys.byteorder == "little"
    and _ffi.sizeof("int") == 4
    and _ffi.sizeof("struct balloond_range") == 8 * _WORDS_PER_RANGE
    and _ffi.offsetof("struct balloond_range", "offset") == 8
    and _ffi.offsetof("struct balloond_range", "length") == 16
    and _ffi.offsetof("struct balloond_range", "addr") == 24
)
_FD_MASK: Final = 0xFFFF_FFFF
_PAGE_MASK: Final = _PAGE_SIZE - 1


def _packed(ranges: Sequence[DiscardRange]) -> tuple[int, array[int]]:
    """Check every range (as :meth:`DiscardRange.check`, in one pass) and pack the batch;
    return the bytes requested and the words of a ``struct balloond_range[]``."""
    words: list[int] = []
    extend = words.extend
    requested = 0
    for r in ranges:
        fd, offset, length, address = r.fd, r.offset, r.length, r.address
        if (
            fd < NO_FD
            or offset < 0
            or length <= 0
            or address < 0
            or (fd == NO_FD and address == NO_ADDRESS)
            or offset + length > _OFF_T_MAX
            or address + length > _ADDRESS_LIMIT
            or (offset | length | address) & _PAGE_MASK
        ):
            r.check()  # raises, saying what is wrong
        requested += length
        extend((fd & _FD_MASK, offset, length, address))
    return requested, array("Q", words)


#: ``struct balloond_plan_region``: guest-physical start, size, backing page, file offset of
#: the start, the daemon's address of the start, fd.
PLAN_REGION_WORDS: Final = 6


class PackedRanges(Sequence[DiscardRange]):
    """Ranges as a ``struct balloond_range`` array, made by :func:`plan` only: each one lies
    in a mapped region's file and mapping, page aligned, none empty (what
    :meth:`DiscardRange.check` asks), so the discard call takes the array as it is. Reads as
    a sequence of :class:`DiscardRange` (made on access)."""

    __slots__ = ("_c", "_count", "total")

    def __init__(self, c_ranges: Any, count: int, total: int) -> None:
        self._c = c_ranges
        self._count = count
        #: The bytes of all ranges.
        self.total = total

    def __len__(self) -> int:
        return self._count

    @overload
    def __getitem__(self, index: int) -> DiscardRange: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[DiscardRange]: ...
    def __getitem__(self, index: int | slice) -> DiscardRange | Sequence[DiscardRange]:
        if isinstance(index, slice):
            return tuple(self)[index]
        if index < 0:
            index += self._count
        if not 0 <= index < self._count:
            raise IndexError(index)
        c = self._c[index]
        return DiscardRange(
            int(c.fd), int(c.offset), int(c.length), int(_ffi.cast("uintptr_t", c.addr))
        )

    def __iter__(self) -> Iterator[DiscardRange]:
        return (self[i] for i in range(self._count))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (PackedRanges, tuple, list)):
            return tuple(self) == tuple(other)
        return NotImplemented

    def __hash__(self) -> int:
        return hash(tuple(self))

    def __repr__(self) -> str:
        return f"PackedRanges({list(self)!r})"


def coalesce(frames: Sequence[int], shift: int) -> array[int]:
    """The page frames named (each ``1 << shift`` bytes), sorted and merged into spans of
    guest memory: ``(gpa, length)`` word pairs in address order, one per run of consecutive
    frames, a frame named twice counted once. One native call."""
    sorted_frames = array("I", frames)  # a copy: sorted in place
    spans = array("Q", bytes(16 * len(sorted_frames)))
    count = int(
        _lib.balloond_coalesce(
            _ffi.from_buffer("uint32_t[]", sorted_frames),
            len(sorted_frames),
            shift,
            _ffi.from_buffer("uint64_t[]", spans),
        )
    )
    del spans[2 * count :]
    return spans


def plan(regions: array[int], spans: array[int]) -> tuple[PackedRanges, list[tuple[int, int, int]]]:
    """Cut guest ``spans`` (``(gpa, length)`` word pairs, sorted by gpa) at the edges of ``regions``
    (``PLAN_REGION_WORDS`` words each, sorted, disjoint): the pieces aligned to their region's
    page in its file, packed; and the others as ``(gpa, length, page)``, page 0 for a piece
    outside guest RAM. The words of ``regions`` are trusted: the file offsets, addresses and
    pages of mapped regions (pages a multiple of the base page)."""
    count, nspans = len(regions) // PLAN_REGION_WORDS, len(spans) // 2
    c_regions = _ffi.from_buffer("struct balloond_plan_region[]", regions)
    c_spans = _ffi.from_buffer("uint64_t[]", spans)
    # Room for every span cut once at every edge; more only when the guest's spans overlap
    # or cross many regions (a Linux guest's never do).
    for room in (nspans + count, nspans * (count + 1) + 1):
        c_ranges = _ffi.new("struct balloond_range[]", room)
        c_skips = _ffi.new("struct balloond_skip[]", 2 * room + nspans)
        used = _ffi.new("size_t[2]", [room, 2 * room + nspans])
        total = _ffi.new("uint64_t *")
        rc = int(
            _lib.balloond_plan(
                c_regions, count, c_spans, nspans, c_ranges, used, c_skips, used + 1, total
            )
        )
        if rc == 0:
            skipped = [
                (int(c_skips[i].gpa), int(c_skips[i].length), int(c_skips[i].page))
                for i in range(used[1])
            ]
            return PackedRanges(c_ranges, int(used[0]), int(total[0])), skipped
    raise RuntimeError("the discard plan needs more room than any span can take")


def total_bytes(ranges: Sequence[DiscardRange]) -> int:
    """The bytes of ``ranges``."""
    if isinstance(ranges, PackedRanges):
        return ranges.total
    return sum(r.length for r in ranges)


class Discarder:
    """Frees memory for real, one native call per batch. Safe to use from any thread."""

    def discard(self, ranges: Sequence[DiscardRange]) -> DiscardResult:
        """Drop the host memory behind `ranges`; the bytes read back as zeros afterwards.

        Raises ValueError, before anything is dropped, if any range is malformed. Ranges the
        kernel refuses are listed in the result's `failures`; the others are still dropped.
        """
        n = len(ranges)
        if n == 0:
            return DiscardResult(requested_bytes=0, discarded_bytes=0, discarded_ranges=0)
        if isinstance(ranges, PackedRanges):
            requested, c_ranges = ranges.total, ranges._c
        elif _PACKED:
            requested, words = _packed(ranges)
            c_ranges = _ffi.from_buffer("struct balloond_range[]", words)
        else:  # pragma: no cover - only on a platform other than LP64 little-endian
            requested = _checked(ranges)
            c_ranges = _ffi.new(
                "struct balloond_range[]",
                [(r.fd, r.offset, r.length, _ffi.cast("void *", r.address)) for r in ranges],
            )
        c_errors = _ffi.new("int32_t[]", n)
        freed = int(_lib.balloond_discard(c_ranges, n, c_errors))
        failures: tuple[DiscardFailure, ...] = ()
        if freed != n:
            failures = tuple(
                DiscardFailure(r, int(c_errors[i])) for i, r in enumerate(ranges) if c_errors[i]
            )
        return DiscardResult(
            requested_bytes=requested,
            discarded_bytes=requested - sum(f.discard_range.length for f in failures),
            discarded_ranges=freed,
            failures=failures,
        )


class NullDiscarder:
    """For `--no-discard`: checks ranges like `Discarder`, frees nothing."""

    def discard(self, ranges: Sequence[DiscardRange]) -> DiscardResult:
        requested = ranges.total if isinstance(ranges, PackedRanges) else _checked(ranges)
        return DiscardResult(requested_bytes=requested, discarded_bytes=0, discarded_ranges=0)


def backing(fd: int) -> Backing:
    """Tell what file system backs `fd` and its page size (a huge page on hugetlbfs).

    Raises HostError if the kernel cannot say (a closed fd, for instance).
    """
    if fd < 0:
        raise ValueError(f"bad file descriptor {fd}")
    fs_type = _ffi.new("uint64_t *")
    block_size = _ffi.new("uint64_t *")
    rc = int(_lib.balloond_backing(fd, fs_type, block_size))
    if rc < 0:
        raise HostError(f"fstatfs on fd {fd}", -rc)
    magic = int(fs_type[0])
    return Backing(fs_type=magic, page_size=int(block_size[0]), hugetlb=magic == HUGETLBFS_MAGIC)
