"""The classic balloon served by balloond for a real Linux guest: a host-set target, inflate
and deflate on 4 KiB and 2 MiB huge-page memory, free page reporting into the host's huge page
pool, guest memory statistics, and a VM pause/resume with a target set.

How inflation is told apart from free page reporting: the guest keeps reporting free memory
while it inflates, and both free host memory. balloond counts what each of them discarded
(``counters.discarded_bytes`` is both, ``counters.balloon_discarded_bytes`` inflation only).
Punching a hole frees at most what it covers, so of the host memory that disappeared while the
balloon inflated, at most the reporting discards (counted from a status read *before* the first
host sample to one *after* the last, so over-counted if anything) can be reporting's; the rest
is inflation's. The tests assert that this remainder alone meets the bar.

For inflation to free host memory at all, the pages the guest hands over must be resident on
the host. A guest that has settled holds no resident free memory: reporting gave it back. So
the guest first touches and frees a large region (freed pages go to the head of the guest's
free lists, where the balloon's allocations come from, while reported pages are put back at
the tail), and the target is set right after: the balloon takes mostly resident pages, while
reporting, which waits 2 s and then returns about 256 MiB per 2 s, takes the rest.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from kit.guest import Guest
from tests import hugepages
from tests.e2e.conftest import Balloond

BootGuest = Callable[..., Guest]

KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
HUGE = hugepages.HUGE
GUEST_MIB = 2048
#: 2 MiB huge pages reserved on the host for a 2 GiB guest (plus QEMU's own small needs).
HUGE_PAGES = GUEST_MIB // 2 + 76
HUGETLB_MEMORY = "memory-backend-memfd,id=mem,size={size}M,share=on,hugetlb=on,hugetlbsize=2M"
#: Host memory that may change for other reasons while we measure (sampling jitter, the
#: guest's own small allocations).
SLACK = 32 * MIB
#: The guest's balloon reaches a target in a few seconds (3.9 s for 512 MiB measured here).
TARGET_TIMEOUT = 60.0
STATS_INTERVAL = 2.0

pytestmark = pytest.mark.e2e


# -- helpers --------------------------------------------------------------------------------


def set_target(daemon: Balloond, target_bytes: int) -> None:
    daemon.command("set-target", str(daemon.socket_path), str(target_bytes))


def counters(status: dict[str, Any]) -> dict[str, Any]:
    table: dict[str, Any] = status["counters"]
    return table


def grew(before: dict[str, Any], after: dict[str, Any], counter: str) -> int:
    """How much a counter grew between two status reads."""
    return int(counters(after)[counter]) - int(counters(before)[counter])


def wait_status(
    daemon: Balloond,
    until: Callable[[dict[str, Any]], bool],
    what: str,
    *,
    timeout: float = TARGET_TIMEOUT,
    interval: float = 0.25,
) -> tuple[dict[str, Any], float]:
    """Poll ``balloond status`` until ``until`` holds; return the status and the seconds taken."""
    start = time.monotonic()
    while True:
        status = daemon.status()
        elapsed = time.monotonic() - start
        if until(status):
            return status, elapsed
        if elapsed > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; last status {status}")
        time.sleep(interval)


def settle_reporting(daemon: Balloond, *, quiet: float = 4.0, timeout: float = 60.0) -> None:
    """Wait until the guest has not reported free memory for ``quiet`` seconds (after a boot
    it first reports all of its free RAM)."""
    start = changed = time.monotonic()
    reports = counters(daemon.status())["reports"]
    while time.monotonic() - changed < quiet:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"reporting did not settle within {timeout:.0f} s")
        time.sleep(0.5)
        now = counters(daemon.status())["reports"]
        if now != reports:
            reports, changed = now, time.monotonic()


def actual_is(size: int) -> Callable[[dict[str, Any]], bool]:
    return lambda status: status["actual_bytes"] == size


@dataclass(frozen=True)
class Inflation:
    """One inflate (or deflate) toward a target, measured on both sides."""

    seconds: float
    host_drop: int  # host-resident guest memory before minus after (bytes)
    balloon_discarded: int  # inflation discards during the window
    reporting_discarded: int  # reporting discards during the window (an upper bound)
    mem_total_before: int
    mem_total_after: int
    status: dict[str, Any]

    @property
    def inflation_share(self) -> int:
        """Host memory freed that reporting cannot account for."""
        return self.host_drop - self.reporting_discarded

    def summary(self) -> str:
        return (
            f"{self.seconds:.1f} s; host -{self.host_drop / MIB:.0f} MiB, "
            f"inflation discarded {self.balloon_discarded / MIB:.0f} MiB, reporting "
            f"{self.reporting_discarded / MIB:.0f} MiB, so inflation freed >= "
            f"{self.inflation_share / MIB:.0f} MiB; MemTotal {self.mem_total_before // KIB} -> "
            f"{self.mem_total_after // KIB} kB"
        )


def move_to_target(
    daemon: Balloond, guest: Guest, target: int, host_memory: Callable[[], int]
) -> Inflation:
    """Set ``target`` and wait until the guest's ``actual`` matches it; measure the host
    memory ``host_memory()`` and both discard counters across that window."""
    ram: int = daemon.status()["ram_bytes"]
    mem_total = guest.meminfo()["MemTotal"]
    before = daemon.status()  # read before the first host sample: over-counts reporting
    host_before = host_memory()
    start = time.monotonic()
    set_target(daemon, target)
    wait_status(daemon, actual_is(ram - target), f"actual -> {(ram - target) // MIB} MiB")
    seconds = time.monotonic() - start
    host_after = host_memory()
    after = daemon.status()  # read after the last host sample: over-counts reporting
    assert after["target_bytes"] == target, after
    balloon = grew(before, after, "balloon_discarded_bytes")
    total = grew(before, after, "discarded_bytes")
    return Inflation(
        seconds=seconds,
        host_drop=host_before - host_after,
        balloon_discarded=balloon,
        reporting_discarded=total - balloon,
        mem_total_before=mem_total,
        mem_total_after=guest.meminfo()["MemTotal"],
        status=after,
    )


def memfd_bytes(guest: Guest) -> Callable[[], int]:
    def probe() -> int:
        allocated = guest.memfd_allocated()
        assert allocated is not None, "guest RAM is not a memfd"
        return allocated

    return probe


def huge_pages_used() -> int:
    """Bytes of the host's 2 MiB huge page pool in use (it falls as pages come back)."""
    return (hugepages.meminfo("HugePages_Total") - hugepages.meminfo("HugePages_Free")) * HUGE


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


@pytest.fixture
def huge_pages() -> Iterator[None]:
    """2 MiB huge pages for one 2 GiB guest; ``nr_hugepages`` restored afterwards."""
    with hugepages.reserved(HUGE_PAGES):
        yield


# -- 1, 2: target, inflate, deflate ----------------------------------------------------------


def test_inflate_and_deflate_on_4k_memory(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """A target 512 MiB below RAM: ``actual`` reaches 512 MiB, MemTotal shrinks by 512 MiB, the
    guest RAM memfd shrinks by >= 90% of 512 MiB beyond anything reporting discarded meanwhile;
    back to full RAM: ``actual`` 0 and MemTotal as before."""
    guest = boot_guest(balloond.device_args(), name="inflate-4k")
    settle_reporting(balloond)
    ram = balloond.status()["ram_bytes"]
    assert ram == GUEST_MIB * MIB
    guest.check("workload touch 1400", timeout=120)  # resident, freed, not yet reported

    inflate = move_to_target(balloond, guest, ram - 512 * MIB, memfd_bytes(guest))
    report(capsys, f"4 KiB inflate by 512 MiB: {inflate.summary()}")
    assert inflate.mem_total_before - inflate.mem_total_after == 512 * MIB, inflate.summary()
    assert inflate.balloon_discarded >= 500 * MIB, inflate.summary()
    assert inflate.balloon_discarded <= 512 * MIB, "discarded more than the guest ballooned"
    assert inflate.inflation_share >= 0.9 * 512 * MIB, inflate.summary()
    # Holes punched cannot free more than they cover.
    assert inflate.host_drop <= inflate.balloon_discarded + inflate.reporting_discarded + SLACK
    assert counters(inflate.status)["inflated_bytes"] >= 512 * MIB

    deflate = move_to_target(balloond, guest, ram, memfd_bytes(guest))
    report(capsys, f"4 KiB deflate: {deflate.summary()}")
    assert deflate.mem_total_after == inflate.mem_total_before, deflate.summary()
    assert deflate.balloon_discarded == 0
    assert counters(deflate.status)["deflated_bytes"] >= 512 * MIB
    assert deflate.status["balloon_target_bytes"] == 0
    assert counters(deflate.status)["discard_errors"] == 0
