"""Workloads shared by the end-to-end tests and the demo, run against a started :class:`Guest`."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

from kit import hostmem
from kit.guest import Guest

MIB = 1 << 20


@dataclass(frozen=True)
class ReturnMeasurement:
    """Host memory sampled from before the guest touched ``freed`` bytes until they came back.

    The rise and the fall are both in ``timeline``, so memory that returns while the guest is
    still finishing its command (slow under load: the serial console answers late, and the
    guest reports 2 s after the free) counts as returned, not as never resident.
    """

    freed: int
    timeline: hostmem.Timeline
    #: Seconds into ``timeline`` when the guest's touch command returned (memory freed).
    freed_at: float

    def _peak_index(self) -> int:
        samples = self.timeline.samples
        return max(range(len(samples)), key=lambda index: samples[index].rss_shmem)

    @property
    def peak(self) -> hostmem.HostMemory:
        return self.timeline.samples[self._peak_index()]

    @property
    def lowest(self) -> hostmem.HostMemory:
        """The lowest point after the peak."""
        return min(self.timeline.samples[self._peak_index() :], key=lambda s: s.rss_shmem)

    @property
    def returned(self) -> int:
        """How far RssShmem fell from its peak to its lowest point after it."""
        return self.peak.rss_shmem - self.lowest.rss_shmem

    def came_back(self, fraction: float, *, memfd: bool = False) -> bool:
        """Whether ``fraction`` of the freed memory left the host: RssShmem (with ``memfd``,
        the memfd's allocated blocks) fell by that much from its peak, or ended at most the
        rest of it above where it was before the touch. The second counts when the guest
        reported other memory while it touched (its first pass after boot, say): the host
        then never held all of it at once, and the peak is lower than the touch made it."""
        return _came_back(self.timeline.samples, self.freed, fraction, memfd=memfd)

    @property
    def memfd_returned(self) -> int:
        """The same fall, in the guest RAM memfd's allocated blocks."""
        peak, lowest = self.peak.memfd_allocated, self.lowest.memfd_allocated
        assert peak is not None and lowest is not None, "guest RAM is not a memfd"
        return peak - lowest

    def seconds_to(self, fraction: float) -> float | None:
        """Seconds after the free until RssShmem had fallen by ``fraction`` of ``freed``."""
        peak = self.peak.rss_shmem
        for sample in self.timeline.samples[self._peak_index() :]:
            if peak - sample.rss_shmem >= fraction * self.freed:
                return max(0.0, sample.seconds - self.freed_at)
        return None

    def after_free(self) -> hostmem.Timeline:
        """The samples from the free on, with seconds counted from the free."""
        return hostmem.Timeline(
            tuple(
                hostmem.HostMemory(s.seconds - self.freed_at, s.rss_shmem, s.memfd_allocated)
                for s in self.timeline.samples
                if s.seconds >= self.freed_at
            )
        )

    def summary(self) -> str:
        t90 = self.seconds_to(0.9)
        return (
            f"touched and freed {self.freed / MIB:.0f} MiB; host RssShmem before the touch "
            f"{self.timeline.samples[0].rss_shmem_mib:.0f} MiB, peak "
            f"{self.peak.rss_shmem_mib:.0f} MiB, then lowest {self.lowest.rss_shmem_mib:.0f} MiB: "
            f"{self.returned / MIB:.0f} MiB ({100 * self.returned / self.freed:.1f}%) came back"
            + (f", 90% {t90:.1f} s after the free" if t90 is not None else ", never 90%")
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
    """Run ``workload touch MIB`` in the guest while sampling host memory every ``interval``.

    Sampling stops ``duration`` seconds after the free, once ``stop_at`` of the freed memory
    came back, or once 90% came back and RssShmem then stayed unchanged for ``settled`` seconds.
    """
    freed = mib * MIB
    done: list[float] = []
    errors: list[BaseException] = []
    began = time.monotonic()

    def touch() -> None:
        try:
            guest.check(f"workload touch {mib}", timeout=120 + mib / 8)
        except BaseException as error:
            errors.append(error)
        done.append(time.monotonic() - began)

    worker = threading.Thread(target=touch, daemon=True)
    samples: list[hostmem.HostMemory] = []
    change = [0.0, 0]

    def enough(sample: hostmem.HostMemory) -> bool:
        samples.append(sample)
        if sample.rss_shmem != change[1]:
            change[:] = [sample.seconds, sample.rss_shmem]
        if errors:
            return True
        if not done:
            return False
        if _came_back(samples, freed, stop_at) or sample.seconds - done[0] >= duration:
            return True
        return _came_back(samples, freed, 0.9) and sample.seconds - change[0] >= settled

    worker.start()
    timeline = guest.sample(interval=interval, duration=600.0 + duration, until=enough)
    worker.join()
    if errors:
        raise errors[0]
    return ReturnMeasurement(freed, timeline, done[0])


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


def _came_back(
    samples: Sequence[hostmem.HostMemory], freed: int, fraction: float, *, memfd: bool = False
) -> bool:
    """:meth:`ReturnMeasurement.came_back` over ``samples`` (the first taken before the touch)."""

    def value(sample: hostmem.HostMemory) -> int:
        if not memfd:
            return sample.rss_shmem
        assert sample.memfd_allocated is not None, "guest RAM is not a memfd"
        return sample.memfd_allocated

    peak = max(range(len(samples)), key=lambda index: samples[index].rss_shmem)
    lowest = min(value(sample) for sample in samples[peak:])
    top = max(value(samples[peak]), value(samples[0]) + freed)
    return top - lowest >= fraction * freed


def start_churn(guest: Guest, mib: int = 256) -> None:
    """The guest touches and frees ``mib`` MiB over and over, in the background, so that its
    free page reporting never rests; :func:`stop_churn` ends it."""
    guest.check(
        "rm -f /run/churn.stop; "
        f"(while [ ! -e /run/churn.stop ]; do workload touch {mib}; done; rm /run/churn.stop) "
        "</dev/null >/dev/null 2>&1 &"
    )


def stop_churn(guest: Guest, timeout: float = 120.0) -> None:
    """Ask the loop of :func:`start_churn` to stop and wait until its last touch has freed its
    memory and the loop is gone (a slow guest may be in the middle of a touch)."""
    guest.check(
        "touch /run/churn.stop; while [ -e /run/churn.stop ]; do sleep 0.2; done", timeout=timeout
    )
