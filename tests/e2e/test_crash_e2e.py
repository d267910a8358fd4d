"""A real guest across SIGKILLs of the serving daemon (``serve --keep-state`` under the
built-in keeper, what ``serve --supervise`` runs): QEMU must notice nothing. Memory the guest
frees afterwards keeps coming back, its one connection stays, nothing counts as an error or a
bad chain, a VM pause still works, the balloon driver still unloads (it waits for every buffer
it handed over) and the guest powers off cleanly.

Three kills while the guest reports, one during an inflate, and one run of each loop (kills
at random instants of a reporting guest; a kill during the connect handshake) run with the
real-guest suite. The loops' other runs, each its own guest, run only when asked for::

    BALLOOND_CRASH_RUNS=10 .venv/bin/python -m pytest tests/e2e/test_crash_e2e.py -m crashloop
"""

from __future__ import annotations

import os
import random
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kit import scenarios
from tests.e2e.conftest import Balloond, BootGuest
from tests.e2e.test_faults_e2e import (
    GUEST_MIB,
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
from tests.e2e.test_reload_e2e import check_guest_is_well, reload

pytestmark = pytest.mark.e2e

KEEPER = (
    *(sys.executable, "-m", "balloond.keeper", "--restart-delay", "0.05"),
    *("--burst", "1000", "--"),
)
RUNS = int(os.environ.get("BALLOOND_CRASH_RUNS", "10"))


@pytest.fixture
def kept(balloond: Balloond) -> Iterator[Balloond]:
    """The ``balloond`` fixture's daemon, started under the keeper with --keep-state (the
    fixture's checks at the end apply: SIGTERM ends it with status 0, no socket left)."""
    balloond.stop()
    balloond.runner = KEEPER
    balloond.start("--keep-state")
    yield balloond


def worker(daemon: Balloond) -> int:
    pid = ask(daemon, command="status")["pid"]
    assert isinstance(pid, int)
    return pid


def kill(daemon: Balloond) -> float:
    """SIGKILL the serving daemon; seconds until its successor answers."""
    old = worker(daemon)
    began = time.monotonic()
    os.kill(old, signal.SIGKILL)
    deadline = began + 30
    while True:
        try:
            if worker(daemon) != old:
                return time.monotonic() - began
        except Exception:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"no new daemon after a kill:\n{daemon.events()[-3000:]}")
        time.sleep(0.01)


def check_carried(daemon: Balloond) -> dict[str, Any]:
    state = status(daemon)
    assert state["connected"] and state["connections"] == 1, state
    assert state["errors"] == {}, state
    assert counter(state, "bad_chains") == 0, state["counters"]
    assert counter(state, "discard_errors") == 0, state["counters"]
    return state


def test_kills_while_the_guest_reports(
    kept: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Three SIGKILLs, each right after a report freed memory while the guest keeps
    reporting, with a ``balloond reload`` between the second and the third (the new image
    takes over the names its fds are kept by): a new daemon carries the VM on each time,
    and afterwards 90% of a freed GiB still comes back."""
    guest = boot_guest(kept.device_args(), name="kill-report", memory_mib=GUEST_MIB)
    scenarios.start_churn(guest)
    taken = []
    for turn in range(3):
        if turn == 2:
            wait_for_report(guest)
            paused = reload(kept)
        wait_for_report(guest)
        taken.append(kill(kept))
    reports_after = counter(status(kept), "reports")
    wait_for_report(guest)  # reporting goes on by itself
    scenarios.stop_churn(guest)
    measured = reporting_returns(guest)
    state = check_carried(kept)
    assert counter(state, "reports") > reports_after
    check_guest_is_well(guest, kept)
    report(
        capsys,
        f"3 kills and a reload while the guest reports: a new daemon served after "
        f"{', '.join(f'{1000 * t:.0f}' for t in taken)} ms, the reload paused it "
        f"{1000 * paused:.0f} ms; then {measured.summary()}",
    )


def test_a_kill_during_an_inflate(
    kept: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """A SIGKILL while the balloon inflates by 768 MiB: ``actual`` still reaches the target,
    the guest's statistics still answer, and the balloon deflates back to 0."""
    guest = boot_guest(kept.device_args(), name="kill-inflate", memory_mib=GUEST_MIB)
    ram = status(kept)["ram_bytes"]
    target = ram - 768 * MIB
    ask(kept, command="set-target", device="vm", target_bytes=target)
    wait_until(
        "the balloon starting to inflate",
        lambda: status(kept)["actual_bytes"],
        lambda actual: actual > 0,
        TARGET_TIMEOUT,
    )
    at_kill = status(kept)["actual_bytes"]
    taken = kill(kept)
    _, took = wait_until(
        "actual reaching the target",
        lambda: status(kept)["actual_bytes"],
        lambda actual: actual == 768 * MIB,
        TARGET_TIMEOUT,
    )
    inflated = check_carried(kept)
    assert inflated["target_bytes"] == target
    assert counter(inflated, "inflated_bytes") >= 768 * MIB, inflated["counters"]
    answer = ask(kept, command="stats", device="vm", refresh=True, timeout=10)
    assert "free_bytes" in answer["stats"], answer
    ask(kept, command="set-target", device="vm", target_bytes=ram)
    wait_until(
        "the balloon deflating",
        lambda: status(kept)["actual_bytes"],
        lambda actual: actual == 0,
        TARGET_TIMEOUT,
    )
    check_carried(kept)
    check_guest_is_well(guest, kept)
    report(
        capsys,
        f"kill during a 768 MiB inflate at {at_kill // MIB} MiB: a new daemon served after "
        f"{1000 * taken:.0f} ms; target reached {took:.1f} s later",
    )


# -- the loops: -m crashloop -------------------------------------------------------------


def _asked(config: pytest.Config) -> bool:
    return "crashloop" in (config.getoption("-m") or "").replace("not crashloop", "")


#: Run 0 of each loop runs with the real-guest suite; the others with -m crashloop.
LOOP = [0, *(pytest.param(run, marks=pytest.mark.crashloop) for run in range(1, RUNS))]


@pytest.fixture
def loop_only(request: pytest.FixtureRequest, run: int) -> None:
    if run and not _asked(request.config):
        pytest.skip("a kill loop on many guests: run it with -m crashloop (BALLOOND_CRASH_RUNS)")


@pytest.mark.parametrize("run", LOOP)
def test_kills_at_random_instants(
    loop_only: None, kept: Balloond, boot_guest: BootGuest, run: int, tmp_path: Path
) -> None:
    """Its own guest reporting under churn, and three kills at random instants (not timed
    to a report): the guest is carried on every time."""
    rng = random.Random(f"{os.environ.get('BALLOOND_KILL_SEED', '')}{run}")
    guest = boot_guest(kept.device_args(), name=f"kill-loop-{run}", memory_mib=GUEST_MIB)
    scenarios.start_churn(guest)
    for _ in range(3):
        time.sleep(rng.uniform(0.0, 4.0))
        kill(kept)
    scenarios.stop_churn(guest)
    reporting_returns(guest)
    check_carried(kept)
    check_guest_is_well(guest, kept)


@pytest.mark.parametrize("run", LOOP)
def test_a_kill_during_the_connect_handshake(
    loop_only: None, kept: Balloond, boot_guest: BootGuest, run: int
) -> None:
    """The daemon killed at a random instant while QEMU connects and the guest's driver
    sets the device up (the first seconds of a boot)."""
    rng = random.Random(f"{os.environ.get('BALLOOND_KILL_SEED', '')}{run}")
    delay = rng.uniform(0.0, 6.0)
    killed: list[float] = []

    def later() -> None:
        time.sleep(delay)
        killed.append(kill(kept))

    killer = threading.Thread(target=later)
    killer.start()
    guest = boot_guest(kept.device_args(), name=f"kill-connect-{run}", memory_mib=GUEST_MIB)
    killer.join(timeout=60)
    assert killed, "the kill did not happen"
    reporting_returns(guest)
    check_carried(kept)
    check_guest_is_well(guest, kept)
