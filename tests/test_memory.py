"""Guest memory's discard plan: a whole chain's ranges planned at once (natively) name the
same pieces as each range planned alone by a plain walk over the regions, across region
edges, gaps and misaligned ranges."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloond.discard import DiscardRange, total_bytes
from balloond.memory import GuestMemory, SkippedRange, span_words
from tests.frontend import GiB, GuestRam, MiB

PAGE = 4096


@pytest.fixture(scope="module")
def memory() -> Iterator[GuestMemory]:
    """Two regions, 2 MiB at gpa 0 and 2 MiB at 4 GiB, with a hole between them."""
    ram = GuestRam(low=2 * MiB, high=2 * MiB)
    memory = GuestMemory()
    memory.replace([(r.spec, os.dup(r.fd)) for r in ram.regions])
    yield memory
    memory.close()
    ram.close()


def reference_plan(
    memory: GuestMemory, gpa: int, length: int
) -> tuple[list[DiscardRange], list[SkippedRange]]:
    """One guest range cut at region boundaries; a piece not aligned to its region's backing
    page, or outside guest RAM, skipped whole."""
    ranges: list[DiscardRange] = []
    skipped: list[SkippedRange] = []
    cursor, end = gpa, gpa + length
    for region in memory.regions:
        if cursor >= end:
            break
        lo = max(cursor, region.spec.guest_phys_addr)
        hi = min(end, region.gpa_end)
        if lo >= hi:
            continue
        if lo > cursor:
            skipped.append(SkippedRange(cursor, lo - cursor, "outside guest RAM"))
        page = region.page_size
        offset = region.spec.mmap_offset + lo - region.spec.guest_phys_addr
        if offset % page or (hi - lo) % page:
            skipped.append(
                SkippedRange(lo, hi - lo, f"not aligned to the {page}-byte backing page")
            )
        else:
            address = region.address + lo - region.spec.guest_phys_addr
            ranges.append(DiscardRange(region.fd, offset, hi - lo, address))
        cursor = hi
    if cursor < end:
        skipped.append(SkippedRange(cursor, end - cursor, "outside guest RAM"))
    return ranges, skipped


def reference_plans(
    memory: GuestMemory, spans: list[tuple[int, int]]
) -> tuple[list[DiscardRange], list[SkippedRange]]:
    """:func:`reference_plan` for each range, in the order of their guest addresses."""
    ranges: list[DiscardRange] = []
    skipped: list[SkippedRange] = []
    for gpa, size in sorted(spans):
        found, left = reference_plan(memory, gpa, size)
        ranges += found
        skipped += left
    return ranges, skipped


#: Guest addresses near the regions' edges, in pages or at any byte.
_EDGES = [0, 2 * MiB, 4 * GiB, 4 * GiB + 2 * MiB]
address = st.one_of(
    st.sampled_from(_EDGES).flatmap(
        lambda e: st.integers(-4, 4).map(lambda k: max(0, e + k * PAGE))
    ),
    st.integers(0, 4 * GiB + 3 * MiB),
)
length = st.one_of(st.integers(1, 16).map(lambda k: k * PAGE), st.integers(0, 5 * GiB))


@given(spans=st.lists(st.tuples(address, length), max_size=40))
@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_a_chain_planned_at_once_names_the_pieces_of_each_range_alone(
    memory: GuestMemory, spans: list[tuple[int, int]]
) -> None:
    ranges, skipped = memory.discard_plans(span_words(spans))
    assert (list(ranges), skipped) == reference_plans(memory, spans)
    assert sum(r.length for r in ranges) == total_bytes(ranges)


def test_a_range_across_the_hole_between_regions_is_split(memory: GuestMemory) -> None:
    [low, high], skipped = memory.discard_plans(span_words([(2 * MiB - PAGE, 4 * GiB)]))
    assert (low.offset, low.length) == (2 * MiB - PAGE, PAGE)
    assert (high.offset, high.length) == (0, 2 * MiB - PAGE)
    assert [(s.gpa, s.length, s.reason) for s in skipped] == [
        (2 * MiB, 4 * GiB - 2 * MiB, "outside guest RAM")
    ]


@pytest.mark.parametrize(
    "spans",
    [
        [(0, 5 * GiB)] * 10,  # the same span again and again: more pieces than spans
        [(2**64 - PAGE, PAGE), (2**64 - 1, 1)],  # ending at the top of the address space
        [(0, 0), (PAGE, 0)],  # empty ranges name nothing
    ],
)
def test_spans_a_linux_guest_never_sends_are_planned_like_any_other(
    memory: GuestMemory, spans: list[tuple[int, int]]
) -> None:
    ranges, skipped = memory.discard_plans(span_words(spans))
    assert (list(ranges), skipped) == reference_plans(memory, spans)
