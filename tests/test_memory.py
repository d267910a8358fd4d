"""Guest memory's discard plan: a whole chain's ranges planned at once name the same pieces
as each range planned alone, across region edges, gaps and misaligned ranges."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balloond.memory import GuestMemory
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
    ranges, skipped = memory.discard_plans(spans)
    expected_ranges, expected_skipped = [], []
    for gpa, size in sorted(spans):
        found, left = memory.discard_plan(gpa, size)
        expected_ranges += found
        expected_skipped += left
    assert ranges == expected_ranges
    assert skipped == expected_skipped


def test_a_range_across_the_hole_between_regions_is_split(memory: GuestMemory) -> None:
    [low, high], skipped = memory.discard_plans([(2 * MiB - PAGE, 4 * GiB)])
    assert (low.offset, low.length) == (2 * MiB - PAGE, PAGE)
    assert (high.offset, high.length) == (0, 2 * MiB - PAGE)
    assert [(s.gpa, s.length, s.reason) for s in skipped] == [
        (2 * MiB, 4 * GiB - 2 * MiB, "outside guest RAM")
    ]
