"""Fixtures for the end-to-end tests: the kit (built when absent or stale) and booted guests.

Every test here boots a real Linux guest under the kit's QEMU. When the kit cannot be built
the tests fail: they never skip.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from kit import Kit, KitError, build  # noqa: E402
from kit.guest import Guest, GuestConfig  # noqa: E402
from kit.hostmem import Timeline  # noqa: E402

_TIMELINES = pytest.StashKey[dict[str, Timeline]]()

BootGuest = Callable[..., Guest]
RecordTimeline = Callable[[str, Timeline], Path]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: boots a real QEMU guest (slow)")
    config.stash[_TIMELINES] = {}


@pytest.fixture(scope="session")
def guest_kit(pytestconfig: pytest.Config) -> Kit:
    """The ready kit, built first if missing or stale (progress shown live)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        if capture is not None:
            with capture.global_and_fixture_disabled():
                print(line, flush=True)
        else:
            print(line, flush=True)

    try:
        return build(log=log)
    except KitError as error:
        reason = str(error)
    pytest.fail(f"cannot build the end-to-end kit: {reason}", pytrace=False)


@pytest.fixture
def boot_guest(guest_kit: Kit, tmp_path: Path) -> Iterator[BootGuest]:
    """A factory booting guests: ``boot_guest(device_args=[...], **GuestConfig fields)``.

    Each guest's console log, QEMU stderr and command line go to ``tmp_path/<name>``; every
    guest is stopped (QMP quit, then SIGKILL) when the test ends.
    """
    guests: list[Guest] = []

    def boot(device_args: Sequence[str] = (), name: str = "guest", **config: Any) -> Guest:
        workdir = tmp_path / f"{name}{len(guests) or ''}"
        guest = Guest(guest_kit, workdir, GuestConfig(device_args=tuple(device_args), **config))
        guests.append(guest)
        guest.start()
        return guest

    yield boot
    for guest in reversed(guests):
        guest.close()


@pytest.fixture
def record_timeline(pytestconfig: pytest.Config, tmp_path: Path) -> RecordTimeline:
    """Keep a host-memory timeline: written as CSV under ``tmp_path`` and printed at the end
    of the session next to the other recorded timelines."""

    def record(name: str, timeline: Timeline) -> Path:
        path = tmp_path / f"{name}.csv"
        path.write_text(timeline.csv())
        pytestconfig.stash[_TIMELINES][name] = timeline
        return path

    return record


def side_by_side(timelines: dict[str, Timeline]) -> str:
    """RssShmem (MiB) of every timeline, one column each, rows at each timeline's sample times."""
    names = list(timelines)
    rows = max(len(t.samples) for t in timelines.values())
    width = max(12, *(len(name) for name in names))
    head = f"{'t/s':>6}  " + "  ".join(f"{name:>{width}}" for name in names)
    lines = [head]
    for index in range(rows):
        cells: list[str] = []
        seconds = ""
        for name in names:
            samples = timelines[name].samples
            if index < len(samples):
                seconds = seconds or f"{samples[index].seconds:6.1f}"
                cells.append(f"{samples[index].rss_shmem_mib:>{width}.0f}")
            else:
                cells.append(" " * width)
        lines.append(f"{seconds:>6}  " + "  ".join(cells))
    return "\n".join(lines)


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    timelines = config.stash.get(_TIMELINES, {})
    if timelines:
        terminalreporter.section("host-resident guest memory after the guest freed RAM (MiB)")
        terminalreporter.write_line(side_by_side(timelines))
