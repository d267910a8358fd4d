"""How much of a guest's RAM the host really holds, seen from outside the QEMU process.

Two views: the QEMU process's ``RssShmem`` (shared memory it has mapped and touched), and the
allocated blocks of the memfd behind guest RAM (what a punched hole gives back). They differ
when another process (a vhost-user backend) has touched pages QEMU has not.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

MIB = 1 << 20


@dataclass(frozen=True)
class HostMemory:
    """One sample. ``seconds`` is relative to the start of the timeline it belongs to."""

    seconds: float
    rss_shmem: int
    memfd_allocated: int | None  # None when the guest RAM is not a memfd

    @property
    def rss_shmem_mib(self) -> float:
        return self.rss_shmem / MIB

    @property
    def memfd_mib(self) -> float | None:
        return None if self.memfd_allocated is None else self.memfd_allocated / MIB


def rss_shmem(pid: int) -> int:
    """The ``RssShmem`` of process ``pid``, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssShmem:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no RssShmem in /proc/{pid}/status")


def find_memfd(pid: int, min_size: int = 0) -> str | None:
    """The ``/proc/PID/fd/N`` path of the largest memfd process ``pid`` holds, if any."""
    best: tuple[int, str] | None = None
    fd_dir = f"/proc/{pid}/fd"
    for name in os.listdir(fd_dir):
        path = f"{fd_dir}/{name}"
        try:
            if not os.readlink(path).startswith("/memfd:"):
                continue
            size = os.stat(path).st_size
        except OSError:
            continue
        if size >= min_size and (best is None or size > best[0]):
            best = (size, path)
    return None if best is None else best[1]


def allocated_bytes(path: str) -> int:
    """Bytes allocated to a file (``st_blocks`` counts 512-byte units)."""
    return os.stat(path).st_blocks * 512


@dataclass(frozen=True)
class Timeline:
    samples: tuple[HostMemory, ...]

    def table(self, title: str = "") -> str:
        lines = [title] if title else []
        lines.append(f"{'t/s':>7} {'RssShmem/MiB':>13} {'memfd/MiB':>10}")
        for sample in self.samples:
            memfd = "-" if sample.memfd_mib is None else f"{sample.memfd_mib:10.1f}"
            lines.append(f"{sample.seconds:7.1f} {sample.rss_shmem_mib:13.1f} {memfd:>10}")
        return "\n".join(lines)

    def csv(self) -> str:
        rows = ["seconds,rss_shmem_bytes,memfd_allocated_bytes"]
        for sample in self.samples:
            memfd = "" if sample.memfd_allocated is None else str(sample.memfd_allocated)
            rows.append(f"{sample.seconds:.2f},{sample.rss_shmem},{memfd}")
        return "\n".join(rows) + "\n"


def sample(
    probe: Callable[[], tuple[int, int | None]],
    *,
    interval: float,
    duration: float,
    until: Callable[[HostMemory], bool] | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Timeline:
    """Sample ``probe`` (returning RssShmem and memfd bytes) every ``interval`` seconds.

    Stops after ``duration`` seconds, or at the first sample for which ``until`` is true.
    """
    start = clock()
    samples: list[HostMemory] = []
    while True:
        rss, memfd = probe()
        elapsed = clock() - start
        point = HostMemory(elapsed, rss, memfd)
        samples.append(point)
        if (until is not None and until(point)) or elapsed >= duration:
            return Timeline(tuple(samples))
        sleep(max(0.0, start + len(samples) * interval - clock()))
