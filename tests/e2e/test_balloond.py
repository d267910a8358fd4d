"""balloond serving a real Linux guest's balloon through QEMU's generic vhost-user device.

Each test starts ``balloond serve`` (the ``balloond`` fixture), boots the kit's guest on it,
and checks both sides: the host (the QEMU process's RssShmem and the guest RAM memfd's
allocated blocks) and the daemon's own account (``balloond status --json``).
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from balloond.balloon import BalloonFeature
from kit import scenarios
from kit.guest import Guest
from kit.hostmem import Timeline

if TYPE_CHECKING:
    from tests.e2e.conftest import Balloond

BootGuest = Callable[..., Guest]
RecordTimeline = Callable[[str, Timeline], Path]

MIB = 1 << 20
GIB = 1 << 30
#: Linux's PAGE_POISON value, as the guest writes it into ``poison_val``.
PAGE_POISON_VAL = 0xAAAAAAAA
#: What the host may give back beyond what balloond says it discarded (sampling jitter).
SLACK = 32 * MIB

pytestmark = pytest.mark.e2e


def bit(feature: BalloonFeature) -> int:
    return 1 << feature


@dataclass(frozen=True)
class Poll:
    """``balloond status`` polled until the guest stopped reporting for a while."""

    status: dict[str, Any]
    #: Reporting bursts seen while polling: increases of ``counters.reports`` more than a
    #: second apart (the guest reports at most every 2 s).
    rounds: int

    @property
    def counters(self) -> dict[str, Any]:
        counters: dict[str, Any] = self.status["counters"]
        return counters


def poll_reports(
    daemon: Balloond,
    *,
    quiet: float = 4.0,
    timeout: float = 90.0,
    until: Callable[[dict[str, Any]], bool] | None = None,
    during: Callable[[], object] | None = None,
) -> Poll:
    """Poll the device's status every 0.25 s until ``until`` holds (if given) and no report
    arrived for ``quiet`` seconds; fail after ``timeout`` seconds (a bound for hangs only).

    ``during`` runs in a thread while polling, and the poll ends only after it returned (its
    exception is raised): the reports a guest command causes before it returns are counted.
    """
    errors: list[BaseException] = []

    def run() -> None:
        try:
            assert during is not None
            during()
        except BaseException as error:
            errors.append(error)

    worker = threading.Thread(target=run, daemon=True)
    if during is not None:
        worker.start()
    start = time.monotonic()
    status = daemon.query()
    reports = status["counters"]["reports"]
    changed = start
    last_round = float("-inf")
    rounds = 0
    while True:
        now = time.monotonic()
        busy = worker.is_alive()
        if errors:
            raise errors[0]
        if not busy and (until is None or until(status)) and now - changed >= quiet:
            return Poll(status, rounds)
        if now - start > timeout:
            raise AssertionError(f"reporting did not settle within {timeout:.0f} s: {status}")
        time.sleep(0.25)
        status = daemon.query()
        if status["counters"]["reports"] != reports:
            reports = status["counters"]["reports"]
            now = time.monotonic()
            if now - last_round > 1.0:
                rounds += 1
            changed = last_round = now


def negotiated_features(daemon: Balloond) -> int:
    """The features of the last ``SET_FEATURES`` in balloond's debug log."""
    values = re.findall(r"<- SET_FEATURES (\d+)", daemon.events())
    assert values, "no SET_FEATURES in balloond's debug log"
    return int(values[-1])


def assert_reporting_negotiated(daemon: Balloond, status: dict[str, Any], poison: bool) -> None:
    """PAGE_REPORTING negotiated, PAGE_POISON exactly when the guest poisons or zeroes free
    pages (Linux drops it otherwise), as both the debug log and the status say."""
    logged = negotiated_features(daemon)
    assert logged & bit(BalloonFeature.PAGE_REPORTING), f"SET_FEATURES {logged:#x}: no REPORTING"
    assert bool(logged & bit(BalloonFeature.PAGE_POISON)) == poison, f"SET_FEATURES {logged:#x}"
    assert status["connected"]
    # Bit 30 (VHOST_USER_F_PROTOCOL_FEATURES) is vhost-user's, not the guest's.
    assert status["features"] == logged & ~(1 << 30), "status and the log disagree"
    assert "reporting" in status["queues"].values(), status["queues"]


def test_freed_memory_returns_to_host(
    balloond: Balloond,
    boot_guest: BootGuest,
    record_timeline: RecordTimeline,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The guest touches and frees 1 GiB: >= 90% of it leaves the host within 30 s, and
    balloond's ``discarded_bytes`` accounts for what the host saw."""
    guest = boot_guest(balloond.device_args(), name="balloond")
    before = poll_reports(balloond)  # the guest's first pass reports its boot-time free RAM
    assert_reporting_negotiated(balloond, before.status, poison=False)

    measured = scenarios.touch_and_free(guest, 1024)
    path = record_timeline("balloond", measured.after_free())
    after = poll_reports(balloond, quiet=3.0)
    with capsys.disabled():
        print(f"\nballoond: {measured.summary()}\n{measured.timeline.table()}\n{path}")

    t90 = measured.seconds_to(0.9)
    assert t90 is not None and t90 <= 30.0, measured.summary()
    memfd_drop = measured.memfd_returned
    assert memfd_drop >= 0.9 * measured.freed, f"memfd fell by {memfd_drop / MIB:.0f} MiB only"

    discarded = after.counters["discarded_bytes"] - before.counters["discarded_bytes"]
    reported = after.counters["reported_bytes"] - before.counters["reported_bytes"]
    assert discarded >= 0.9 * GIB, f"balloond discarded {discarded / MIB:.0f} MiB"
    # Punching a hole frees at most what it covers: the host cannot have got back more.
    assert memfd_drop <= discarded + SLACK, (memfd_drop, discarded)
    assert measured.returned <= discarded + SLACK, (measured.returned, discarded)
    assert discarded <= reported
    assert after.counters["kept_bytes"] == 0
    assert after.counters["bad_chains"] == 0
    assert after.counters["discard_errors"] == 0


def test_held_data_survives_reporting(balloond: Balloond, boot_guest: BootGuest) -> None:
    """512 MiB of patterned data stays intact while the guest frees 1.5 GiB elsewhere over
    several reporting rounds."""
    guest = boot_guest(balloond.device_args(), name="balloond-integrity")
    held = "/run/held"
    guest.check(f"workload hold 512 {0xB0A7} {held}", timeout=300)
    before = poll_reports(balloond, quiet=3.0)

    first = poll_reports(
        balloond, quiet=3.0, during=lambda: guest.check("workload touch 1024", timeout=120)
    )
    second = poll_reports(
        balloond, quiet=3.0, during=lambda: guest.check("workload touch 512", timeout=120)
    )
    verify = guest.run(f"workload verify {held}", timeout=300)
    guest.run(f"workload release {held}", timeout=300)

    reports = second.counters["reports"] - before.counters["reports"]
    discarded = second.counters["discarded_bytes"] - before.counters["discarded_bytes"]
    rounds = first.rounds + second.rounds
    # How many reports 1.5 GiB makes depends on the guest's free lists (a report carries up
    # to 32 blocks of 2 or 4 MiB: 9 to 14 seen); the rounds are what this test is about.
    assert rounds >= 4, f"only {rounds} reporting rounds ({reports} reports)"
    assert discarded >= 0.9 * GIB, f"balloond discarded {discarded / MIB:.0f} MiB"
    assert second.counters["bad_chains"] == 0
    assert verify.rc == 0 and any("@@verify-ok" in line for line in verify.output), (
        "held data changed:\n" + verify.text()
    )


def test_page_poisoning_keeps_reported_memory(balloond: Balloond, boot_guest: BootGuest) -> None:
    """``page_poison=1``: the guest poisons free pages with 0xaa, so reported pages must stay
    (a discarded page would come back zeroed). Reporting is negotiated and runs, nothing is
    discarded, and the memfd keeps its blocks."""
    guest = boot_guest(
        balloond.device_args(), name="balloond-page-poison", cmdline_extra=("page_poison=1",)
    )
    before = poll_reports(balloond, quiet=3.0)
    assert_reporting_negotiated(balloond, before.status, poison=True)
    assert before.status["poison_val"] == PAGE_POISON_VAL
    assert before.status["page_poisoning"] is True
    poison_config = re.escape(str(b"\xaa\xaa\xaa\xaa")[2:-1])
    assert re.search(rf"<- SET_CONFIG .*{poison_config}", balloond.events()), (
        "the guest's poison_val write is not in the debug log"
    )
    memfd_before = guest.memfd_allocated()
    assert memfd_before is not None

    guest.check("workload touch 1024", timeout=120)
    kept_before = before.counters["kept_bytes"]
    after = poll_reports(
        balloond, quiet=3.0, until=lambda s: s["counters"]["kept_bytes"] - kept_before >= GIB // 2
    )
    memfd_after = guest.memfd_allocated()
    assert memfd_after is not None

    counters = after.counters
    assert counters["reports"] > 0 and counters["kept_bytes"] > 0, counters
    assert counters["discarded_bytes"] == 0, counters
    assert counters["kept_bytes"] == counters["reported_bytes"], counters
    assert memfd_after >= memfd_before - SLACK, (memfd_before, memfd_after)


def test_init_on_free_still_returns_memory(
    balloond: Balloond, boot_guest: BootGuest, record_timeline: RecordTimeline
) -> None:
    """``init_on_free=1`` zeroes freed pages and leaves ``poison_val`` 0: PAGE_POISON is
    negotiated, and reported memory is discarded as usual."""
    guest = boot_guest(
        balloond.device_args(), name="balloond-init-on-free", cmdline_extra=("init_on_free=1",)
    )
    before = poll_reports(balloond, quiet=3.0)
    assert_reporting_negotiated(balloond, before.status, poison=True)
    assert before.status["poison_val"] == 0
    assert before.status["page_poisoning"] is False

    measured = scenarios.touch_and_free(guest, 1024)
    record_timeline("balloond-init_on_free", measured.after_free())
    after = poll_reports(balloond, quiet=3.0)

    t90 = measured.seconds_to(0.9)
    assert t90 is not None and t90 <= 30.0, measured.summary()
    discarded = after.counters["discarded_bytes"] - before.counters["discarded_bytes"]
    assert discarded >= 0.9 * GIB, f"balloond discarded {discarded / MIB:.0f} MiB"
    assert after.counters["kept_bytes"] == 0
