"""The kit's measurement of memory a guest frees (kit.scenarios.ReturnMeasurement), on made-up
timelines: it must see memory come back when it did, and only then."""

from __future__ import annotations

from kit.hostmem import HostMemory, Timeline
from kit.scenarios import ReturnMeasurement

MIB = 1 << 20
FREED = 1024 * MIB


def measured(*mib: int, freed_at: float = 1.0) -> ReturnMeasurement:
    samples = tuple(HostMemory(0.5 * i, m * MIB, m * MIB) for i, m in enumerate(mib))
    return ReturnMeasurement(FREED, Timeline(samples), freed_at)


def test_memory_that_fell_from_its_peak_came_back() -> None:
    m = measured(200, 700, 1224, 1224, 900, 400, 210)
    assert m.returned == 1014 * MIB
    assert m.came_back(0.9) and m.came_back(0.9, memfd=True)


def test_memory_that_stays_did_not_come_back() -> None:
    """No balloon: the freed GiB stays on the host."""
    m = measured(200, 700, 1224, 1224, 1224, 1224)
    assert not m.came_back(0.9) and not m.came_back(0.1, memfd=True)


def test_half_of_it_is_not_ninety_percent() -> None:
    m = measured(200, 1224, 1224, 712, 712)
    assert m.came_back(0.5) and not m.came_back(0.9)


def test_back_where_it_was_counts_when_reporting_overlapped_the_touch() -> None:
    """The guest reported other memory while it touched (its first pass after boot): the peak
    is 300 MiB lower than the touch made it, and the host ends where it was before."""
    m = measured(400, 600, 924, 924, 500, 380)
    assert m.returned == 544 * MIB  # from the peak: not 90% of what was freed
    assert m.came_back(0.9)


def test_ending_above_where_it_was_by_more_than_the_rest_does_not_count() -> None:
    m = measured(400, 600, 924, 924, 700, 600)
    assert not m.came_back(0.9)
