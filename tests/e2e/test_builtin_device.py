"""QEMU's built-in balloon device with free page reporting: the reference that balloond's
end-to-end tests are compared against."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from kit import devices, scenarios
from kit.guest import Guest
from kit.hostmem import Timeline

BootGuest = Callable[..., Guest]
RecordTimeline = Callable[[str, Timeline], Path]

BUILTIN_BALLOON = devices.builtin_balloon()
MIB = 1 << 20

pytestmark = pytest.mark.e2e


def test_freed_memory_returns_to_host(
    boot_guest: BootGuest, record_timeline: RecordTimeline, capsys: pytest.CaptureFixture[str]
) -> None:
    guest = boot_guest(BUILTIN_BALLOON, name="builtin")
    measured = scenarios.touch_and_free(guest, 1024)
    path = record_timeline("qemu-builtin", measured.after_free())
    with capsys.disabled():
        print(f"\nQEMU built-in device: {measured.summary()}\n{measured.timeline.table()}\n{path}")
    assert measured.came_back(0.9), measured.summary()
    # The memfd's own blocks agree: the memory was given back, not just unmapped from QEMU.
    assert measured.came_back(0.9, memfd=True), measured.summary()


def test_held_data_survives_reporting(
    boot_guest: BootGuest, record_timeline: RecordTimeline, capsys: pytest.CaptureFixture[str]
) -> None:
    guest = boot_guest(BUILTIN_BALLOON, name="builtin-integrity")
    result = scenarios.hold_free_verify(guest, held_mib=256, freed_mib=1024)
    record_timeline("qemu-builtin-integrity", result.memory.after_free())
    with capsys.disabled():
        print(f"\nintegrity run: {result.memory.summary()}\n" + "\n".join(result.report))
    assert result.memory.came_back(0.9), "reporting did not run: " + result.memory.summary()
    assert result.verified, "held data changed:\n" + "\n".join(result.report)
    assert scenarios.verification_can_fail(guest), "a flipped bit went unnoticed"


def test_nothing_returns_without_a_balloon(boot_guest: BootGuest) -> None:
    """The measurement itself can fail: with no balloon device the memory stays on the host."""
    guest = boot_guest(name="no-balloon")
    measured = scenarios.touch_and_free(guest, 512, duration=8.0)
    assert measured.returned < 0.1 * measured.freed, measured.summary()
