"""The classic balloon served by balloond for a real Linux guest: a host-set target, inflate
and deflate on 4 KiB and 2 MiB huge-page memory, free page reporting into the host's huge page
pool, guest memory statistics, and a VM pause/resume with a target set.

How inflation is told apart from free page reporting: the inflate measurements run with
``--no-free-page-reporting``, so the guest has no other way to give memory back and every page
the host got back while the balloon inflated is inflation's. (With reporting on, both free
host memory at once and race for the same free pages: a page reporting discarded first and
the balloon took later is freed once but discarded twice. An earlier version of these tests
subtracted the reporting discards from the host drop; on a loaded host, where the guest
inflates slowly, reporting wins more of the race and that lower bound fell below the bar
although nothing was wrong.) balloond still counts each kind of discard
(``counters.discarded_bytes`` is both, ``counters.balloon_discarded_bytes`` inflation only),
and the tests check that reporting discarded nothing.

For inflation to free host memory at all, the pages the guest hands over must be resident on
the host, so the guest first touches and frees a large region (freed pages go to the head of
the guest's free lists, where the balloon's allocations come from), and the target is set
right after. A page the guest zeroes on allocation (``init_on_alloc=1``) that was not resident
only makes the host drop smaller, so the bound stays conservative. ``--no-discard`` is the
control: same inflate, no host drop.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balloond.control import request
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
    """Poll the device's status until ``until`` holds; return the status and the seconds taken.

    In this process (:meth:`Balloond.query`): a client's start-up under load would stretch the
    interval and blur the seconds measured."""
    start = time.monotonic()
    while True:
        status = daemon.query()
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
            f"{self.seconds:.1f} s; host {-self.host_drop / MIB:+.0f} MiB, "
            f"inflation discarded {self.balloon_discarded / MIB:.0f} MiB, reporting "
            f"{self.reporting_discarded / MIB:.0f} MiB, so inflation freed >= "
            f"{self.inflation_share / MIB:.0f} MiB; MemTotal {self.mem_total_before // KIB} -> "
            f"{self.mem_total_after // KIB} kB"
        )


def control(daemon: Balloond, message: dict[str, Any]) -> dict[str, Any]:
    """One request on balloond's control socket, in-process (no CLI start-up delay)."""
    return request(str(daemon.control_path), {"device": str(daemon.socket_path), **message})


def move_to_target(
    daemon: Balloond,
    guest: Guest,
    target: int,
    host_memory: Callable[[], int],
    *,
    touch_mib: int = 0,
) -> Inflation:
    """Set ``target`` and wait until the guest's ``actual`` matches it; measure the host
    memory ``host_memory()`` and both discard counters across that window.

    With ``touch_mib`` the guest first touches and frees that much memory, and the target
    follows as fast as possible: reporting starts 2 s after the free and competes with the
    balloon for those still-resident pages.
    """
    ram: int = daemon.status()["ram_bytes"]
    mem_total = guest.meminfo()["MemTotal"]
    if touch_mib:
        guest.check(f"workload touch {touch_mib}", timeout=120)
    before = control(daemon, {"command": "status"})  # before the first host sample
    host_before = host_memory()
    start = time.monotonic()
    control(daemon, {"command": "set-target", "target_bytes": target})
    wait_status(daemon, actual_is(ram - target), f"actual -> {(ram - target) // MIB} MiB")
    seconds = time.monotonic() - start
    host_after = host_memory()
    after = daemon.status()  # after the last host sample: reporting over-counted, if anything
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


@contextmanager
def daemon_and_guest(
    tmp_path: Path, boot_guest: BootGuest, name: str, *options: str, **boot: Any
) -> Iterator[tuple[Balloond, Guest]]:
    """``balloond serve OPTIONS`` and a guest on it (for options the ``balloond`` fixture does
    not take); the guest stops first, then balloond, which must exit 0."""
    sockets = Path(tempfile.mkdtemp(prefix="balloond-e2e-"))
    daemon = Balloond(sockets / "vm.sock", tmp_path / f"balloond-{name}.log")
    guest: Guest | None = None
    try:
        daemon.start(*options)
        guest = boot_guest(daemon.device_args(), name=name, **boot)
        yield daemon, guest
    finally:
        if guest is not None:
            guest.close()
        status = daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    assert status == 0, f"balloond exited {status}:\n{daemon.log()[-3000:]}"


class PoolSampler:
    """Samples the host's huge page pool in use every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._start = time.monotonic()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.monotonic() - self._start, huge_pages_used()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PoolSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak(self) -> int:
        return max(used for _, used in self.samples)

    @property
    def last(self) -> int:
        return self.samples[-1][1]

    def steady_for(self, seconds: float) -> bool:
        """The pool has not changed for the last ``seconds``."""
        now, used = self.samples[-1]
        recent = [value for at, value in self.samples if at >= now - seconds]
        return now - self.samples[0][0] >= seconds and all(value == used for value in recent)

    def wait(self, until: Callable[[int], bool], timeout: float) -> float | None:
        """Seconds until ``until(used)`` held for a sample, or None after ``timeout``."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.samples and until(self.samples[-1][1]):
                return self.samples[-1][0]
            time.sleep(self.interval)
        return None


# -- 1, 2: target, inflate, deflate ----------------------------------------------------------


#: The inflate measurements' daemons: the balloon is the guest's only way to give memory back.
NO_REPORTING = "--no-free-page-reporting"


@pytest.fixture
def no_discard(tmp_path: Path, boot_guest: BootGuest) -> Iterator[tuple[Balloond, Guest]]:
    """balloond with ``--no-discard`` and a guest on it; the guest stops first."""
    with daemon_and_guest(tmp_path, boot_guest, "no-discard", "--no-discard", NO_REPORTING) as pair:
        yield pair


@pytest.fixture
def no_reporting(tmp_path: Path, boot_guest: BootGuest) -> Iterator[tuple[Balloond, Guest]]:
    """balloond with ``--no-free-page-reporting`` and a guest on it."""
    with daemon_and_guest(tmp_path, boot_guest, "inflate-4k", NO_REPORTING) as pair:
        yield pair


def test_inflate_and_deflate_on_4k_memory(
    no_reporting: tuple[Balloond, Guest], capsys: pytest.CaptureFixture[str]
) -> None:
    """A target 512 MiB below RAM: ``actual`` reaches 512 MiB, MemTotal shrinks by 512 MiB, the
    guest RAM memfd shrinks by >= 90% of 512 MiB (the guest cannot report free pages here);
    back to full RAM: ``actual`` 0 and MemTotal as before."""
    daemon, guest = no_reporting
    ram = daemon.status()["ram_bytes"]
    assert ram == GUEST_MIB * MIB
    inflate = move_to_target(daemon, guest, ram - 512 * MIB, memfd_bytes(guest), touch_mib=1400)
    report(capsys, f"4 KiB inflate by 512 MiB: {inflate.summary()}")
    assert inflate.mem_total_before - inflate.mem_total_after == 512 * MIB, inflate.summary()
    assert inflate.balloon_discarded >= 500 * MIB, inflate.summary()
    assert inflate.balloon_discarded <= 512 * MIB, "discarded more than the guest ballooned"
    assert inflate.reporting_discarded == 0, inflate.summary()
    assert inflate.host_drop >= 0.9 * 512 * MIB, inflate.summary()
    # Holes punched cannot free more than they cover.
    assert inflate.host_drop <= inflate.balloon_discarded + SLACK, inflate.summary()
    assert counters(inflate.status)["inflated_bytes"] >= 512 * MIB

    deflate = move_to_target(daemon, guest, ram, memfd_bytes(guest))
    report(capsys, f"4 KiB deflate: {deflate.summary()}")
    assert deflate.mem_total_after == inflate.mem_total_before, deflate.summary()
    assert deflate.balloon_discarded == 0
    assert counters(deflate.status)["deflated_bytes"] >= 512 * MIB
    assert deflate.status["balloon_target_bytes"] == 0
    assert counters(deflate.status)["discard_errors"] == 0


def test_inflation_without_discard_frees_nothing(
    no_discard: tuple[Balloond, Guest], capsys: pytest.CaptureFixture[str]
) -> None:
    """The control for the measurement above: the same inflate with ``--no-discard`` reaches
    its target, but the host gets back nothing beyond what reporting could."""
    daemon, guest = no_discard
    ram = daemon.status()["ram_bytes"]
    inflate = move_to_target(daemon, guest, ram - 512 * MIB, memfd_bytes(guest), touch_mib=1400)
    report(capsys, f"4 KiB inflate by 512 MiB with --no-discard: {inflate.summary()}")
    assert inflate.mem_total_before - inflate.mem_total_after == 512 * MIB, inflate.summary()
    assert inflate.balloon_discarded == 0
    assert inflate.host_drop <= SLACK, inflate.summary()


def test_inflate_frees_huge_pages(
    huge_pages: None,
    tmp_path: Path,
    boot_guest: BootGuest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """On 2 MiB huge-page memory a 1 GiB inflate of a guest whose memory was in use gives at
    least 900 MiB back to the host's huge page pool (``HugePages_Free`` rises) beyond what
    reporting could have (the guest cannot report free pages here: module docstring); QEMU's
    own device frees nothing here, since no buffer of 256 frames covers a whole huge page.
    Then deflate: ``actual`` 0, MemTotal back."""
    with daemon_and_guest(
        tmp_path, boot_guest, "inflate-2m", NO_REPORTING, memory_object=HUGETLB_MEMORY
    ) as (daemon, guest):
        inflate_and_deflate_huge(daemon, guest, capsys)


def inflate_and_deflate_huge(
    daemon: Balloond, guest: Guest, capsys: pytest.CaptureFixture[str]
) -> None:
    ram = daemon.status()["ram_bytes"]
    assert ram == GUEST_MIB * MIB
    inflate = move_to_target(daemon, guest, ram - GIB, huge_pages_used, touch_mib=1700)
    report(capsys, f"2 MiB inflate by 1 GiB: {inflate.summary()}")
    assert inflate.mem_total_before - inflate.mem_total_after == GIB, inflate.summary()
    assert inflate.balloon_discarded >= 900 * MIB, inflate.summary()
    assert inflate.reporting_discarded == 0, inflate.summary()
    assert inflate.host_drop >= 900 * MIB, inflate.summary()
    assert inflate.host_drop <= inflate.balloon_discarded + SLACK, inflate.summary()
    # Every discard is whole huge pages: nothing was skipped as unaligned.
    assert not counters(inflate.status)["skipped_bytes"], inflate.status["counters"]

    deflate = move_to_target(daemon, guest, ram, huge_pages_used)
    report(capsys, f"2 MiB deflate: {deflate.summary()}")
    assert deflate.mem_total_after == inflate.mem_total_before, deflate.summary()
    assert deflate.status["balloon_target_bytes"] == 0
    assert counters(deflate.status)["deflated_bytes"] >= GIB
    assert counters(deflate.status)["discard_errors"] == 0


# -- 3: free page reporting on huge pages -----------------------------------------------------


def test_reporting_returns_huge_pages(
    huge_pages: None,
    balloond: Balloond,
    boot_guest: BootGuest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The guest touches and frees 1 GiB of 2 MiB huge-page memory: within 30 s the host's
    pool in use falls by >= 90% of it from its peak (``HugePages_Free`` rises), and balloond's
    reporting discards account for it."""
    guest = boot_guest(balloond.device_args(), name="report-2m", memory_object=HUGETLB_MEMORY)
    settle_reporting(balloond)
    before = balloond.status()
    with PoolSampler() as pool:
        assert pool.wait(lambda used: True, timeout=5.0) is not None
        touch = guest.check("workload touch 1024", timeout=120)
        freed = time.monotonic()
        peak = pool.peak
        back = pool.wait(lambda used: peak - used >= 0.9 * GIB, timeout=30.0)
        seconds = None if back is None else time.monotonic() - freed
        # Then until the pool stays put for 4 s (the guest reports every 2 s), for the record.
        pool.wait(lambda used: pool.steady_for(4.0), timeout=30.0)
    after = balloond.status()
    first = pool.samples[0][1]
    returned = peak - pool.last
    reported = grew(before, after, "discarded_bytes") - grew(
        before, after, "balloon_discarded_bytes"
    )
    report(
        capsys,
        f"2 MiB reporting: pool in use {first / MIB:.0f} MiB -> peak {peak / MIB:.0f} MiB "
        f"(touch {touch.seconds:.1f} s) -> {pool.last / MIB:.0f} MiB; 90% of 1 GiB back "
        f"{seconds and round(seconds, 1)} s after the touch ended; balloond discarded "
        f"{reported / MIB:.0f} MiB by reporting",
    )
    # The touch must have taken huge pages from the host (free memory that was still
    # resident after the settling counts too, so a little less than 1 GiB).
    assert peak - first >= 0.8 * GIB, "the touch did not use host huge pages"
    assert seconds is not None, f"only {returned / MIB:.0f} MiB of 1024 came back in 30 s"
    assert reported >= 0.9 * GIB
    assert returned <= reported + SLACK, "more came back than balloond discarded"
    assert not counters(after)["skipped_bytes"], after["counters"]


# -- 4: statistics -------------------------------------------------------------------------


@pytest.fixture
def polled(tmp_path: Path, boot_guest: BootGuest) -> Iterator[tuple[Balloond, Guest]]:
    """balloond with ``--stats-interval 2`` and a guest on it; the guest stops first.

    Without free page reporting: while a report is out the guest holds up to 128 MiB off its
    free lists, which would move MemFree between the statistics and /proc/meminfo."""
    interval = ("--stats-interval", str(STATS_INTERVAL))
    with daemon_and_guest(tmp_path, boot_guest, "stats", *interval, NO_REPORTING) as pair:
        yield pair


STAT_FIELDS = ("free_bytes", "total_bytes", "available_bytes", "disk_caches_bytes")


def stats_of(status: dict[str, Any]) -> dict[str, int]:
    stats: dict[str, int] = status.get("stats") or {}
    return stats


def test_stats_polled_from_the_guest(
    polled: tuple[Balloond, Guest], capsys: pytest.CaptureFixture[str]
) -> None:
    """With ``--stats-interval 2`` the guest's statistics reach ``balloond status`` and stay
    at most two intervals old; they agree with the guest's /proc/meminfo; they follow the
    guest holding 512 MiB (two intervals on a quiet host: reported, bounded only against
    hangs); ``balloond stats --refresh`` answers."""
    daemon, guest = polled
    status, seconds = wait_status(
        daemon,
        lambda s: all(name in stats_of(s) for name in STAT_FIELDS),
        "stats in status",
        timeout=2 * STATS_INTERVAL,
    )
    first_updates = counters(status)["stats_updates"]
    ages: list[float] = []
    end = time.monotonic() + 3 * STATS_INTERVAL
    while time.monotonic() < end:
        ages.append(daemon.status()["stats_age_seconds"])
        time.sleep(0.5)
    status = daemon.status()
    updates = counters(status)["stats_updates"] - first_updates
    assert max(ages) <= 2 * STATS_INTERVAL, f"stats got stale: ages {ages}"
    assert updates >= 2, f"{updates} updates in {3 * STATS_INTERVAL:.0f} s"

    meminfo = guest.meminfo()
    stats = stats_of(daemon.status())
    total = meminfo["MemTotal"]
    pairs = {
        "total_bytes": "MemTotal",
        "free_bytes": "MemFree",
        "available_bytes": "MemAvailable",
        "disk_caches_bytes": "Cached",
    }
    for name, field in pairs.items():
        assert abs(stats[name] - meminfo[field]) <= 0.03 * total, (name, stats, meminfo)
    assert stats["total_bytes"] == total  # the balloon is empty: nothing to disagree about

    free_before = stats["free_bytes"]
    guest.check("workload hold 512 7 /run/held", timeout=120)
    held = time.monotonic()
    status, _ = wait_status(
        daemon,
        lambda s: stats_of(s)["free_bytes"] <= free_before - 480 * MIB,
        "free_bytes after the guest holds 512 MiB",
        timeout=3 * STATS_INTERVAL + 5.0,  # a bound for hangs; `follow` is the measurement
    )
    follow = time.monotonic() - held
    meminfo = guest.meminfo()
    assert abs(stats_of(status)["free_bytes"] - meminfo["MemFree"]) <= 0.03 * total
    guest.check("workload release /run/held", timeout=120)

    began = time.monotonic()
    answer: dict[str, Any] = json.loads(
        daemon.command("stats", str(daemon.socket_path), "--refresh", "--json")
    )
    refresh = time.monotonic() - began
    assert all(name in answer["stats"] for name in STAT_FIELDS), answer
    assert answer["stats_age_seconds"] < 1.0, answer
    # The holder is gone: a fresh answer sees the 512 MiB free again. The first refresh may
    # join one the poll asked for before the release (a refresh already out is waited for,
    # not asked again), so refresh until one does, within two intervals.
    deadline = time.monotonic() + 2 * STATS_INTERVAL + 5.0
    while answer["stats"]["free_bytes"] < free_before - 64 * MIB:
        assert time.monotonic() < deadline, answer
        answer = json.loads(daemon.command("stats", str(daemon.socket_path), "--refresh", "--json"))
    report(
        capsys,
        f"stats: present {seconds:.1f} s after boot; ages over {3 * STATS_INTERVAL:.0f} s "
        f"{min(ages):.1f}-{max(ages):.1f} s, {updates} updates; followed a 512 MiB hold in "
        f"{follow:.1f} s; balloond stats --refresh {refresh:.2f} s (CLI start included)",
    )


# -- 5: pause and resume --------------------------------------------------------------------


def refresh_stats(daemon: Balloond, timeout: float = 2.0) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(
        daemon.command(
            "stats", str(daemon.socket_path), "--refresh", "--timeout", str(timeout), "--json"
        )
    )
    return answer


def test_pause_resume_keeps_target_and_stats(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """With a target reached, a QMP ``stop``/``cont`` keeps target and ``actual``; a stats
    refresh fails while the guest is frozen (within its timeout) and succeeds after ``cont``
    (the stats buffer balloond held was given back at the ring stop, DOMAIN.md §4); the
    balloon still deflates afterwards."""
    guest = boot_guest(balloond.device_args(), name="pause")
    ram = balloond.status()["ram_bytes"]
    target = ram - 256 * MIB
    assert "free_bytes" in refresh_stats(balloond, timeout=10.0)["stats"]  # the guest just booted
    set_target(balloond, target)
    wait_status(balloond, actual_is(256 * MIB), "actual -> 256 MiB")
    mem_total = guest.meminfo()["MemTotal"]

    guest.qmp("stop")
    time.sleep(1.0)
    paused = balloond.status()
    assert paused["connected"], paused
    assert (paused["target_bytes"], paused["actual_bytes"]) == (target, 256 * MIB), paused
    began = time.monotonic()
    with pytest.raises(RuntimeError) as refused:
        refresh_stats(balloond, timeout=2.0)
    frozen = time.monotonic() - began
    assert frozen < 10.0, f"a refresh of a frozen guest took {frozen:.1f} s"

    guest.qmp("cont")
    resumed = time.monotonic()
    errors: list[str] = []
    answer: dict[str, Any] | None = None
    while answer is None and time.monotonic() - resumed < 15.0:
        try:
            answer = refresh_stats(balloond, timeout=2.0)
        except RuntimeError as error:
            errors.append(str(error).strip())
    assert answer is not None, f"stats never came back after cont: {errors}"
    after_cont = time.monotonic() - resumed
    assert "free_bytes" in answer["stats"], answer
    assert answer["stats_age_seconds"] < 1.0, answer
    status = balloond.status()
    assert (status["target_bytes"], status["actual_bytes"]) == (target, 256 * MIB), status
    assert guest.meminfo()["MemTotal"] == mem_total

    set_target(balloond, ram)
    status, deflate = wait_status(balloond, actual_is(0), "deflate after resume")
    assert guest.meminfo()["MemTotal"] == mem_total + 256 * MIB
    report(
        capsys,
        f"pause/resume: refresh while paused failed in {frozen:.1f} s "
        f"({str(refused.value).strip()}); fresh stats "
        f"{after_cont:.1f} s after cont ({len(errors)} failed tries); deflate {deflate:.1f} s",
    )
