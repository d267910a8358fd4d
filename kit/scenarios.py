"""Workloads shared by the end-to-end tests and the demo, run against a started :class:`Guest`."""

from __future__ import annotations

import time
from dataclasses import dataclass

from kit import hostmem
from kit.guest import Guest

MIB = 1 << 20


@dataclass(frozen=True)
class ReturnMeasurement:
    """How much host memory came back after the guest touched and freed ``freed`` bytes.

    ``timeline`` starts right after the guest's ``munmap``; ``baseline`` is RssShmem before
    the guest touched anything.
    """

    freed: int
    baseline: int
    timeline: hostmem.Timeline
    touch_seconds: float

    @property
    def peak(self) -> int:
        return self.timeline.samples[0].rss_shmem

    @property
    def lowest(self) -> int:
        return min(sample.rss_shmem for sample in self.timeline.samples)

    @property
    def returned(self) -> int:
        """How far RssShmem fell from just after the free to its lowest point."""
        return self.peak - self.lowest

    @property
    def returned_fraction(self) -> float:
        return self.returned / self.freed

    def seconds_to(self, fraction: float) -> float | None:
        """When RssShmem had fallen by ``fraction`` of what was freed, if it did."""
        for sample in self.timeline.samples:
            if self.peak - sample.rss_shmem >= fraction * self.freed:
                return sample.seconds
        return None

    def summary(self) -> str:
        t90 = self.seconds_to(0.9)
        return (
            f"freed {self.freed / MIB:.0f} MiB in the guest; host RssShmem before touch "
            f"{self.baseline / MIB:.0f} MiB, after free {self.peak / MIB:.0f} MiB, lowest "
            f"{self.lowest / MIB:.0f} MiB: {self.returned / MIB:.0f} MiB "
            f"({100 * self.returned_fraction:.1f}%) came back"
            + (f", 90% after {t90:.1f} s" if t90 is not None else ", never 90%")
        )


def touch_and_free(
    guest: Guest,
    mib: int = 1024,
    *,
    interval: float = 0.5,
    duration: float = 30.0,
    stop_at: float = 0.98,
    settled: float = 5.0,
) -> ReturnMeasurement:
    """Touch ``mib`` MiB in the guest, free it, and sample host memory.

    Sampling stops after ``duration`` seconds, once ``stop_at`` of the freed memory came back,
    or once 90% came back and RssShmem then stayed unchanged for ``settled`` seconds.
    """
    baseline = guest.rss_shmem()
    result = guest.check(f"workload touch {mib}", timeout=60 + mib / 16)
    freed = mib * MIB
    first = guest.rss_shmem()
    last_change = [0.0, float(first)]

    def enough(sample: hostmem.HostMemory) -> bool:
        if sample.rss_shmem != last_change[1]:
            last_change[:] = [sample.seconds, float(sample.rss_shmem)]
        returned = first - sample.rss_shmem
        if returned >= stop_at * freed:
            return True
        return returned >= 0.9 * freed and sample.seconds - last_change[0] >= settled

    timeline = guest.sample(interval=interval, duration=duration, until=enough)
    return ReturnMeasurement(freed, baseline, timeline, result.seconds)


@dataclass(frozen=True)
class IntegrityResult:
    held_mib: int
    verified: bool
    report: tuple[str, ...]
    memory: ReturnMeasurement


def hold_free_verify(
    guest: Guest,
    held_mib: int = 256,
    freed_mib: int = 1024,
    *,
    seed: int = 0x5EED,
    extra_rounds_seconds: float = 8.0,
) -> IntegrityResult:
    """Fill ``held_mib`` MiB with a seeded pattern, free ``freed_mib`` MiB elsewhere, let the
    guest report free pages for several rounds, then verify every held byte."""
    directory = "/run/held"
    guest.check(f"workload hold {held_mib} {seed} {directory}", timeout=120 + held_mib)
    memory = touch_and_free(guest, freed_mib)
    # Reporting runs at most every 2 s: give it several more rounds, with more memory freed.
    time.sleep(extra_rounds_seconds)
    guest.check(f"workload touch {freed_mib // 2}", timeout=120)
    time.sleep(extra_rounds_seconds)
    result = guest.run(f"workload verify {directory}", timeout=120 + held_mib)
    return IntegrityResult(held_mib, result.rc == 0, result.output, memory)


def verification_can_fail(guest: Guest, directory: str = "/run/held") -> bool:
    """Flip one bit of the held region and check that verification reports it, then release."""
    corrupted = guest.run(f"workload corrupt {directory}", timeout=300)
    guest.run(f"workload release {directory}", timeout=300)
    return corrupted.rc == 1 and any("@@verify-bad" in line for line in corrupted.output)
