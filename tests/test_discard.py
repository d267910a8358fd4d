"""The native discard helper frees shared fd-backed memory for real, and only what it is told.

Every test works on real memfd memory and measures the result the way the host would:
the memfd's allocated blocks (`st_blocks`), or the kernel's free huge page count.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balloond.discard import (
    HUGETLBFS_MAGIC,
    NO_ADDRESS,
    NO_FD,
    TMPFS_MAGIC,
    Discarder,
    DiscardRange,
    NullDiscarder,
    backing,
)
from balloond.errors import BalloondError, HostError
from tests.hugepages import reserved

MiB = 1 << 20
PAGE = mmap.PAGESIZE
HUGE = 2 * MiB


@dataclass
class Memory:
    """A memfd mapped MAP_SHARED, like one guest RAM region seen from the daemon."""

    fd: int
    map: mmap.mmap
    address: int
    size: int

    def range(
        self, offset: int, length: int, *, fd: bool = True, address: bool = True
    ) -> DiscardRange:
        return DiscardRange(
            fd=self.fd if fd else NO_FD,
            offset=offset,
            length=length,
            address=self.address + offset if address else NO_ADDRESS,
        )

    def allocated(self) -> int:
        """Bytes the host really holds for this memory."""
        return os.fstat(self.fd).st_blocks * 512


def _address_of(m: mmap.mmap) -> int:
    view = ctypes.c_char.from_buffer(m)
    try:
        return ctypes.addressof(view)
    finally:
        del view


def _pattern(size: int) -> bytes:
    """Non-zero bytes that differ from page to page, so a misplaced discard shows."""
    block = bytes((i * 7 + 1) % 251 + 1 for i in range(4096))
    return b"".join(bytes([p % 255 + 1]) + block[1:] for p in range(size // 4096))


def _open_memory(size: int, flags: int = 0) -> Memory:
    fd = os.memfd_create("balloond-test", flags)
    os.ftruncate(fd, size)
    m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return Memory(fd=fd, map=m, address=_address_of(m), size=size)


def _close_memory(mem: Memory) -> None:
    mem.map.close()
    os.close(mem.fd)


@pytest.fixture
def memory() -> Iterator[Memory]:
    """8 MiB of populated shmem."""
    mem = _open_memory(8 * MiB)
    mem.map[:] = _pattern(mem.size)
    assert mem.allocated() == mem.size
    yield mem
    _close_memory(mem)


def test_discard_frees_exactly_the_range_and_keeps_the_rest(memory: Memory) -> None:
    before = bytes(memory.map)
    result = Discarder().discard([memory.range(2 * MiB, 2 * MiB)])

    assert result.ok
    assert result.discarded_bytes == result.requested_bytes == 2 * MiB
    assert result.discarded_ranges == 1
    assert memory.allocated() == memory.size - 2 * MiB
    assert memory.map[2 * MiB : 4 * MiB] == bytes(2 * MiB)
    assert memory.map[: 2 * MiB] == before[: 2 * MiB]
    assert memory.map[4 * MiB :] == before[4 * MiB :]


def test_discarded_memory_is_usable_again(memory: Memory) -> None:
    Discarder().discard([memory.range(0, 2 * MiB)])
    memory.map[0:4] = b"back"
    assert memory.map[0:4] == b"back"
    assert memory.allocated() == memory.size - 2 * MiB + PAGE


def test_a_batch_of_ranges_in_one_call(memory: Memory) -> None:
    before = bytes(memory.map)
    spans = [(0, PAGE), (1 * MiB, 3 * PAGE), (2 * MiB, 2 * MiB), (7 * MiB, MiB)]
    discarder = Discarder()
    result = discarder.discard([memory.range(off, n) for off, n in spans])

    total = sum(n for _, n in spans)
    assert result.ok
    assert result.discarded_ranges == len(spans)
    assert result.discarded_bytes == total
    assert memory.allocated() == memory.size - total
    expected = bytearray(before)
    for off, n in spans:
        expected[off : off + n] = bytes(n)
    assert memory.map[:] == bytes(expected)


def test_an_empty_batch_does_nothing() -> None:
    result = Discarder().discard([])
    assert result.ok
    assert (result.requested_bytes, result.discarded_bytes, result.discarded_ranges) == (0, 0, 0)


def test_madvise_remove_fallback_frees_memory_without_an_fd(memory: Memory) -> None:
    before = bytes(memory.map)
    result = Discarder().discard([memory.range(4 * MiB, 2 * MiB, fd=False)])

    assert result.ok
    assert memory.allocated() == memory.size - 2 * MiB
    assert memory.map[4 * MiB : 6 * MiB] == bytes(2 * MiB)
    assert memory.map[: 4 * MiB] == before[: 4 * MiB]
    assert memory.map[6 * MiB :] == before[6 * MiB :]


def test_a_bad_fd_is_reported_per_range_and_the_rest_of_the_batch_still_runs(
    memory: Memory,
) -> None:
    closed = os.dup(memory.fd)
    os.close(closed)
    read_only = os.open(f"/proc/self/fd/{memory.fd}", os.O_RDONLY)
    try:
        ranges = [
            DiscardRange(fd=closed, offset=0, length=PAGE, address=NO_ADDRESS),
            memory.range(0, 2 * MiB),
            DiscardRange(fd=read_only, offset=4 * MiB, length=PAGE, address=NO_ADDRESS),
        ]
        result = Discarder().discard(ranges)
    finally:
        os.close(read_only)

    assert not result.ok
    assert [(f.discard_range, f.errno) for f in result.failures] == [
        (ranges[0], errno.EBADF),
        (ranges[2], errno.EBADF),
    ]
    assert "Bad file descriptor" in str(result.failures[0])
    assert result.discarded_ranges == 1
    assert result.discarded_bytes == 2 * MiB
    assert memory.allocated() == memory.size - 2 * MiB
    assert memory.map[4 * MiB : 4 * MiB + PAGE] != bytes(PAGE)


def test_a_file_that_cannot_punch_holes_and_has_no_mapping_reports_the_errno() -> None:
    r, w = os.pipe()
    try:
        result = Discarder().discard([DiscardRange(fd=w, offset=0, length=PAGE, address=0)])
    finally:
        os.close(r)
        os.close(w)
    assert [f.errno for f in result.failures] == [errno.ESPIPE]


def test_an_unmapped_address_is_reported_not_a_crash(memory: Memory) -> None:
    hole = mmap.mmap(-1, 4 * PAGE)
    address = _address_of(hole)
    hole.close()
    result = Discarder().discard([DiscardRange(fd=NO_FD, offset=0, length=PAGE, address=address)])
    assert [f.errno for f in result.failures] == [errno.ENOMEM]


def test_madvise_remove_refuses_a_private_mapping() -> None:
    private = mmap.mmap(-1, 4 * PAGE, mmap.MAP_PRIVATE)
    address = _address_of(private)
    try:
        result = Discarder().discard([DiscardRange(NO_FD, 0, PAGE, address)])
    finally:
        private.close()
    assert [f.errno for f in result.failures] == [errno.EINVAL]


@pytest.mark.parametrize(
    ("fd", "offset", "length", "address"),
    [
        pytest.param(-2, 0, PAGE, 0, id="fd-below-minus-one"),
        pytest.param(NO_FD, 0, PAGE, NO_ADDRESS, id="neither-fd-nor-address"),
        pytest.param(3, -PAGE, PAGE, 0, id="negative-offset"),
        pytest.param(3, 0, 0, 0, id="empty"),
        pytest.param(3, 0, -PAGE, 0, id="negative-length"),
        pytest.param(3, 0, PAGE, -PAGE, id="negative-address"),
        pytest.param(3, 1 << 63, PAGE, 0, id="offset-past-off_t"),
        pytest.param(3, (1 << 63) - PAGE, PAGE, 0, id="end-past-off_t"),
        pytest.param(NO_FD, 0, PAGE, (1 << 64) - PAGE + PAGE, id="address-past-64-bits"),
        pytest.param(NO_FD, 0, 2 * PAGE, (1 << 64) - PAGE, id="end-past-64-bits"),
        pytest.param(3, 1, PAGE, 0, id="unaligned-offset"),
        pytest.param(3, 0, PAGE + 512, 0, id="unaligned-length"),
        pytest.param(NO_FD, 0, PAGE, 0x1000_0010, id="unaligned-address"),
    ],
)
def test_malformed_ranges_are_refused_before_anything_is_discarded(
    memory: Memory, fd: int, offset: int, length: int, address: int
) -> None:
    good = memory.range(0, 2 * MiB)
    bad = DiscardRange(fd=fd, offset=offset, length=length, address=address)
    for discarder in (Discarder(), NullDiscarder()):
        with pytest.raises(ValueError):
            discarder.discard([good, bad])
    assert memory.allocated() == memory.size


def test_null_discarder_counts_but_frees_nothing(memory: Memory) -> None:
    before = bytes(memory.map)
    null = NullDiscarder()
    result = null.discard([memory.range(0, 2 * MiB), memory.range(4 * MiB, MiB)])

    assert result.ok
    assert (result.requested_bytes, result.discarded_bytes, result.discarded_ranges) == (
        3 * MiB,
        0,
        0,
    )
    assert memory.allocated() == memory.size
    assert memory.map[:] == before


@settings(max_examples=40, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 255), st.integers(1, 16), st.booleans()), max_size=6)
)
def test_any_set_of_page_ranges_frees_exactly_those_pages(
    spans: list[tuple[int, int, bool]],
) -> None:
    mem = _open_memory(MiB)
    try:
        pages = mem.size // PAGE
        pattern = _pattern(mem.size)
        mem.map[:] = pattern
        ranges, dropped = [], set()
        for first, count, with_fd in spans:
            count = min(count, pages - first)
            ranges.append(mem.range(first * PAGE, count * PAGE, fd=with_fd))
            dropped.update(range(first, first + count))
        result = Discarder().discard(ranges)

        assert result.ok
        assert mem.allocated() == (pages - len(dropped)) * PAGE
        for p in range(pages):
            want = bytes(PAGE) if p in dropped else pattern[p * PAGE : (p + 1) * PAGE]
            assert mem.map[p * PAGE : (p + 1) * PAGE] == want, f"page {p}"
    finally:
        _close_memory(mem)


def test_backing_of_a_plain_memfd_is_shmem_with_base_pages(memory: Memory) -> None:
    b = backing(memory.fd)
    assert (b.fs_type, b.page_size, b.hugetlb) == (TMPFS_MAGIC, PAGE, False)


def test_backing_of_a_closed_fd_is_a_host_error() -> None:
    fd = os.memfd_create("closed")
    os.close(fd)
    with pytest.raises(HostError) as info:
        backing(fd)
    assert info.value.errno == errno.EBADF
    assert isinstance(info.value, BalloondError)


def test_backing_of_a_negative_fd_is_refused() -> None:
    with pytest.raises(ValueError):
        backing(-1)


# --- hugetlb ---------------------------------------------------------------------------


@pytest.fixture
def huge_pages() -> Iterator[int]:
    """At least two free 2 MiB huge pages."""
    with reserved(2):
        yield HUGE


def test_discarding_a_huge_page_returns_it_to_the_host(huge_pages: int) -> None:
    mem = _open_memory(2 * HUGE, os.MFD_HUGETLB)
    try:
        b = backing(mem.fd)
        assert (b.fs_type, b.page_size, b.hugetlb) == (HUGETLBFS_MAGIC, HUGE, True)

        mem.map[:] = _pattern(mem.size)
        held_before = os.fstat(mem.fd).st_blocks * 512
        result = Discarder().discard([mem.range(0, HUGE)])

        assert result.ok
        assert os.fstat(mem.fd).st_blocks * 512 == held_before - HUGE, "the huge page went back"
        assert mem.map[:HUGE] == bytes(HUGE)
        assert mem.map[HUGE:] == _pattern(mem.size)[HUGE:]
    finally:
        _close_memory(mem)


def test_madvise_remove_frees_a_huge_page_too(huge_pages: int) -> None:
    mem = _open_memory(2 * HUGE, os.MFD_HUGETLB)
    try:
        mem.map[:] = _pattern(mem.size)
        held_before = os.fstat(mem.fd).st_blocks * 512
        result = Discarder().discard([mem.range(HUGE, HUGE, fd=False)])

        assert result.ok
        assert os.fstat(mem.fd).st_blocks * 512 == held_before - HUGE, "the huge page went back"
        assert mem.map[:HUGE] == _pattern(mem.size)[:HUGE]
    finally:
        _close_memory(mem)
