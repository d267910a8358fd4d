"""``balloond reload`` under a real guest: the daemon replaces its program image while the
guest reports free memory, and while its balloon inflates to a target. QEMU must notice
nothing: the same connection, memory still coming back, a VM pause that still works, a
balloon driver that still unloads (it waits for every buffer it handed over) and a clean
power-off. The pause each reload causes is measured from the daemon's log."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from kit import scenarios
from kit.guest import Guest
from tests.e2e.conftest import Balloond, BootGuest
from tests.e2e.test_faults_e2e import (
    GUEST_MIB,
    GUEST_TROUBLE,
    MIB,
    TARGET_TIMEOUT,
    ask,
    counter,
    report,
    reporting_returns,
    status,
    wait_for_report,
    wait_until,
)

pytestmark = pytest.mark.e2e

RELOADS = 3


def reload(daemon: Balloond) -> float:
    """``balloond reload``; the pause it caused: from the hold to the new image serving
    (the daemon logs it), in seconds."""
    before = len(pauses(daemon))
    output = daemon.command("reload", "--timeout", "60", timeout=90)
    assert "reloaded in" in output, output
    seen = pauses(daemon)
    assert len(seen) == before + 1, daemon.events()[-2000:]
    return seen[-1]


def pauses(daemon: Balloond) -> list[float]:
    found = re.findall(r"carried on, (\d+) ms after they were held", daemon.events())
    return [int(ms) / 1000 for ms in found]


def check_guest_is_well(guest: Guest, daemon: Balloond) -> None:
    """No complaint in the guest kernel; a VM pause works; the driver unloads."""
    trouble = guest.run(f"dmesg | grep -iE '{GUEST_TROUBLE}'", timeout=60)
    assert not [line for line in trouble.output if line.strip()], trouble.text()
    guest.qmp("stop")
    guest.qmp("cont")
    unload = guest.run("rmmod virtio_balloon", timeout=60)
    assert unload.rc == 0, unload.text()
    guest.send_line("0 poweroff -f")


def test_reloads_while_the_guest_reports(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three reloads, each right after a report freed memory while the guest keeps
    reporting: the daemon keeps its pid and the VM its one connection, nothing is counted
    as an error or a bad chain, and afterwards 90% of a freed GiB still comes back."""
    assert balloond.process is not None
    pid = balloond.process.pid
    guest = boot_guest(balloond.device_args(), name="reload-report", memory_mib=GUEST_MIB)
    scenarios.start_churn(guest)
    taken = []
    for _ in range(RELOADS):
        wait_for_report(guest)
        taken.append(reload(balloond))
    reports_after = counter(status(balloond), "reports")
    wait_for_report(guest)  # reporting goes on by itself
    scenarios.stop_churn(guest)
    measured = reporting_returns(guest)
    state = status(balloond)
    top = ask(balloond, command="status")
    assert top["pid"] == pid and top["reloads"] == RELOADS, top
    assert state["connected"] and state["connections"] == 1, state
    assert state["errors"] == {}, state
    assert counter(state, "bad_chains") == 0, state["counters"]
    assert counter(state, "discard_errors") == 0, state["counters"]
    assert counter(state, "reports") > reports_after
    check_guest_is_well(guest, balloond)
    report(
        capsys,
        f"{RELOADS} reloads while the guest reports: paused "
        f"{', '.join(f'{1000 * t:.0f}' for t in taken)} ms; then {measured.summary()}",
    )


def test_a_reload_during_an_inflate(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """A reload while the balloon inflates by 768 MiB: ``actual`` still reaches the target,
    the new image frees the rest, the guest's statistics still answer, and the balloon
    deflates back to 0."""
    guest = boot_guest(balloond.device_args(), name="reload-inflate", memory_mib=GUEST_MIB)
    ram = status(balloond)["ram_bytes"]
    target = ram - 768 * MIB
    ask(balloond, command="set-target", device="vm", target_bytes=target)
    wait_until(
        "the balloon starting to inflate",
        lambda: status(balloond)["actual_bytes"],
        lambda actual: actual > 0,
        TARGET_TIMEOUT,
    )
    paused = reload(balloond)
    at_reload = status(balloond)
    _, took = wait_until(
        "actual reaching the target",
        lambda: status(balloond)["actual_bytes"],
        lambda actual: actual == 768 * MIB,
        TARGET_TIMEOUT,
    )
    inflated = status(balloond)
    assert inflated["target_bytes"] == target
    assert counter(inflated, "inflated_bytes") >= 768 * MIB, inflated["counters"]
    assert counter(inflated, "bad_chains") == 0, inflated["counters"]
    answer: dict[str, Any] = json.loads(
        balloond.command("stats", "vm", "--refresh", "--timeout", "10", "--json")
    )
    assert "free_bytes" in answer["stats"], answer
    ask(balloond, command="set-target", device="vm", target_bytes=ram)
    wait_until(
        "the balloon deflating",
        lambda: status(balloond)["actual_bytes"],
        lambda actual: actual == 0,
        TARGET_TIMEOUT,
    )
    assert status(balloond)["connections"] == 1
    check_guest_is_well(guest, balloond)
    report(
        capsys,
        f"reload during a 768 MiB inflate at {at_reload['actual_bytes'] // MIB} MiB: paused "
        f"{1000 * paused:.0f} ms; target reached {took:.1f} s later",
    )
