"""Faults with a real guest: what happens to the guest, to host memory and to the daemon when
QEMU is killed in the middle of reporting, when a VM is paused and resumed many times while
its balloon inflates, when the guest is reset in the middle of reporting, and when a guest
never returns its statistics buffer (and when its QEMU dies while a refresh waits for it:
a bug, fixed since). docs/faults.md has the measured numbers.

Every wait here is a liveness bound (generous: TCG on a shared machine), never a pacing
sleep: a condition is polled until it holds or the bound passes. The pauses of the
stop/cont test are the test's input, drawn at random (the seed is printed).

A real-guest soak (marker ``soak``, skipped unless selected) keeps a guest reporting,
inflating, deflating and answering statistics for ``BALLOOND_SOAK_MINUTES`` minutes::

    BALLOOND_SOAK_MINUTES=10 .venv/bin/python -m pytest tests/e2e/test_faults_e2e.py \\
        -m soak -p no:cacheprovider
"""

from __future__ import annotations

import json
import operator
import os
import random
import re
import signal
import socket
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from balloond import control
from kit import scenarios
from kit.guest import Guest, GuestError
from tests.e2e.conftest import Balloond, BootGuest

pytestmark = pytest.mark.e2e

MIB = 1 << 20
GUEST_MIB = 2048
#: Guest kernel lines that mean a virtqueue broke or a task waited too long.
GUEST_TROUBLE = r"blocked for more than|hung_task|not a head|out of range|vring|virtqueue"
#: The guest's hung-task report: a buffer never returned shows (the default is 120 s);
#: a loaded 2-core host can hold a waiting worker for 10 s without anything lost.
HUNG_TASK_SECONDS = 30
#: Liveness bounds: far above what each step takes on 2 busy cores under TCG.
CLEANUP_TIMEOUT = 30.0
TARGET_TIMEOUT = 180.0
REPORT_TIMEOUT = 30.0
#: The inflate of the stop/cont test: about 6 s on TCG unpaused.
INFLATE_MIB = 768
#: What the host holds of a 2 GiB guest that has booted and reported most of its free
#: memory (about 150 MiB once reporting settles: the kernel, the initramfs, the workload).
BOOT_RESIDENT = 400 * MIB


# -- helpers --------------------------------------------------------------------------------


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}", flush=True)


def ask(daemon: Balloond, **message: Any) -> dict[str, Any]:
    """One control request, in this process (a ``balloond`` client process takes a
    second to start on a busy machine; a poll loop needs them fast)."""
    return control.request(str(daemon.control_path), message, timeout=30)


def status(daemon: Balloond) -> dict[str, Any]:
    return ask(daemon, command="status", device="vm")


class ControlLine:
    """One control connection kept open, so that the daemon's fd count does not depend on
    when it gets round to closing a client's."""

    def __init__(self, daemon: Balloond) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(60)
        self.sock.connect(str(daemon.control_path))
        self.replies = self.sock.makefile("rb")

    def __call__(self, **message: Any) -> dict[str, Any]:
        self.sock.sendall(json.dumps({"version": 1, **message}).encode() + b"\n")
        answer = json.loads(self.replies.readline())
        assert answer["ok"], answer
        result: dict[str, Any] = answer["result"]
        return result

    def close(self) -> None:
        self.replies.close()
        self.sock.close()


def counter(state: dict[str, Any], name: str) -> int:
    return int(state["counters"][name])


def wait_until(
    what: str,
    probe: Callable[[], Any],
    check: Callable[[Any], bool],
    timeout: float,
    *,
    every: float = 0.05,
) -> tuple[Any, float]:
    """Poll ``probe`` until ``check`` holds for its value; (value, seconds it took)."""
    began = time.monotonic()
    while True:
        value = probe()
        if check(value):
            return value, time.monotonic() - began
        if time.monotonic() - began > timeout:
            raise AssertionError(f"{what}: not within {timeout:.0f} s; last seen {value!r}")
        time.sleep(every)


def fd_targets(pid: int) -> list[str]:
    """What every open fd of process ``pid`` refers to, sorted."""
    targets = []
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            targets.append(os.readlink(f"/proc/{pid}/fd/{name}"))
        except FileNotFoundError:  # closed meanwhile
            continue
    return sorted(targets)


def fd_kinds(now: list[str], before: list[str]) -> str:
    """What the fds in ``now`` but not in ``before`` are, counted by kind."""
    kinds = Counter(re.sub(r"\[\d+\]| \(deleted\)", "", t) for t in now)
    kinds.subtract(re.sub(r"\[\d+\]| \(deleted\)", "", t) for t in before)
    return ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()) if n)


def memfd_mappings(pid: int) -> list[str]:
    """Lines of /proc/PID/maps that map a memfd (guest RAM)."""
    maps = Path(f"/proc/{pid}/maps").read_text().splitlines()
    return [line for line in maps if "/memfd:" in line]


def proc_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def daemon_pid(daemon: Balloond) -> int:
    assert daemon.process is not None
    return daemon.process.pid


def wait_for_report(guest: Guest, timeout: float = REPORT_TIMEOUT) -> float:
    """Wait until the guest RAM memfd shrinks from one look to the next: balloond just
    freed a report, and the guest's reporting worker is about to post (or has posted) its
    next one. Returns how long that took."""
    last = [guest.memfd_allocated()]

    def shrank(now: int | None) -> bool:
        previous, last[0] = last[0], now
        return previous is not None and now is not None and now < previous

    _, seconds = wait_until(
        "a free page report freeing memory", guest.memfd_allocated, shrank, timeout, every=0.005
    )
    return seconds


def system_reset(guest: Guest) -> int:
    """QMP ``system_reset``; returns the console line the new boot starts at. The kit runs
    QEMU with ``-no-reboot`` (a reset exits QEMU); ``set-action`` makes it a reset again."""
    guest.qmp("set-action", reboot="reset")
    start = guest.line_count
    guest.qmp("system_reset")
    return start


def boot_id(guest: Guest) -> str:
    return guest.check("cat /proc/sys/kernel/random/boot_id").output[-1].strip()


def guest_trouble(guest: Guest) -> list[str]:
    found = guest.run(f"dmesg | grep -iE '{GUEST_TROUBLE}'", timeout=60)
    return [line for line in found.output if line.strip()]


def reporting_returns(guest: Guest, mib: int = 1024) -> scenarios.ReturnMeasurement:
    """The guest touches and frees ``mib`` MiB; at least 90% of it must leave the host."""
    measured = scenarios.touch_and_free(guest, mib, duration=60.0)
    assert measured.came_back(0.9), measured.summary()
    return measured


# -- (a) QEMU killed in the middle of reporting ---------------------------------------------


def test_qemu_killed_mid_report_leaves_nothing_and_the_next_qemu_is_served(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGKILL to QEMU while its guest reports free pages: the daemon lives, ends the
    connection without counting an error, and closes every fd and unmaps all guest memory
    of that VM (its fds are exactly those it had before QEMU came, /proc/PID/maps has no
    memfd); a new QEMU on the same socket is served, and its freed memory comes back."""
    pid = daemon_pid(balloond)
    line = ControlLine(balloond)  # one control connection: the fd lists compare exactly
    try:
        assert not line(command="status", device="vm")["connected"]  # (accepted by now)
        idle = fd_targets(pid)
        assert memfd_mappings(pid) == []

        first = boot_guest(balloond.device_args(), name="killed", memory_mib=GUEST_MIB)
        connected = line(command="status", device="vm")
        assert connected["connected"] and connected["connections"] == 1, connected
        serving = fd_targets(pid)
        assert any(t.startswith("/memfd:") for t in serving), serving
        mapped = memfd_mappings(pid)
        assert mapped, "the daemon maps the guest's memory while it serves it"

        scenarios.start_churn(first)
        # Kill once reporting is in full swing, just as a report freed memory.
        waited = wait_for_report(first)
        while counter(line(command="status", device="vm"), "reports") < 4:
            waited += wait_for_report(first)
        before_kill = line(command="status", device="vm")
        held_by_guest = first.memfd_allocated() or 0
        os.kill(first.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert first.close() == -signal.SIGKILL
        reaped = time.monotonic() - killed_at

        after, _ = wait_until(
            "the daemon letting go of the killed VM",
            lambda: (
                line(command="status", device="vm")["connected"],
                fd_targets(pid),
                memfd_mappings(pid),
            ),
            lambda seen: seen == (False, idle, []),
            CLEANUP_TIMEOUT,
            every=0.01,
        )
        cleanup = time.monotonic() - killed_at
        gone = line(command="status", device="vm")
        assert balloond.process is not None and balloond.process.poll() is None
        assert gone["errors"] == {}, f"a QEMU that dies is not a protocol error: {gone}"
        assert counter(gone, "discard_errors") == 0, gone["counters"]
        rss_shmem_kib = proc_kib(pid, "RssShmem")

        second = boot_guest(balloond.device_args(), name="next", memory_mib=GUEST_MIB)
        served = line(command="status", device="vm")
        assert served["connected"] and served["connections"] == 2, served
        again = fd_targets(pid)
        assert len(again) == len(serving), (serving, again)
        measured = reporting_returns(second)
        assert counter(line(command="status", device="vm"), "reports") > 0
    finally:
        line.close()

    report(
        capsys,
        f"QEMU killed mid-report ({counter(before_kill, 'reports')} reports served; killed "
        f"as a report freed memory, {waited:.1f} s into the churn; guest RAM memfd "
        f"{held_by_guest // MIB} MiB allocated): the daemon closed its "
        f"{len(serving) - len(idle)} fds of the VM ({fd_kinds(serving, idle)}) and unmapped "
        f"{len(mapped)} guest memory "
        f"mappings within {cleanup:.2f} s (QEMU reaped after {reaped:.2f} s); daemon fds "
        f"{len(idle)} idle, {len(serving)} serving, {len(after[1])} after the kill; daemon "
        f"RssShmem after {rss_shmem_kib} KiB; next QEMU: {measured.summary()}",
    )


# -- (b) many pauses while the balloon inflates ---------------------------------------------


def test_inflate_reaches_its_target_through_many_pauses(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """A 768 MiB inflate while the VM is paused and resumed (QMP stop/cont) over and over:
    every stop returns within 10 s, ``actual`` reaches the target, every inflated page was
    discarded, the host holds no more than the guest's RAM less the balloon even after the
    guest touched all it could, the guest logged no hung task or broken ring, and after the
    deflate the guest can use its memory again."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    guest = boot_guest(balloond.device_args(), name="paused", memory_mib=GUEST_MIB)
    ram = status(balloond)["ram_bytes"]
    balloon = INFLATE_MIB * MIB
    guest.check(f"echo {HUNG_TASK_SECONDS} > /proc/sys/kernel/hung_task_timeout_secs")
    # Make the guest's free memory resident on the host, so that inflating it frees some.
    guest.check("workload touch 1600", timeout=300)
    before = status(balloond)
    resident_before = guest.memfd_allocated()
    ask(balloond, command="set-target", device="vm", target_bytes=ram - balloon)
    began = time.monotonic()
    # QEMU 11.1 crashes when a config change reaches it while the VM is stopped: pause only
    # once the guest has answered this one (it started inflating).
    wait_until(
        "the guest starting to inflate",
        lambda: counter(status(balloond), "inflated_bytes"),
        lambda inflated: inflated > counter(before, "inflated_bytes"),
        TARGET_TIMEOUT,
    )
    stops: list[float] = []
    paused_for = 0.0
    while (state := status(balloond))["actual_bytes"] != balloon:
        assert time.monotonic() - began < TARGET_TIMEOUT, (
            f"the balloon is at {state['actual_bytes'] // MIB} MiB after "
            f"{TARGET_TIMEOUT:.0f} s and {len(stops)} pauses (seed {seed})"
        )
        stop_began = time.monotonic()
        try:
            guest.qmp("stop")
        except (OSError, GuestError) as error:
            raise AssertionError(f"QMP stop did not return: {error!r}") from error
        stops.append(time.monotonic() - stop_began)
        pause = rng.uniform(0.02, 0.3)
        time.sleep(pause)  # the pause itself: the test's input
        paused_for += pause
        guest.qmp("cont")
        time.sleep(rng.uniform(0.02, 0.3))  # and the time the guest runs before the next
    reached = time.monotonic() - began
    assert max(stops) <= 10.0, f"a QMP stop took {max(stops):.1f} s"
    assert len(stops) >= 10, f"only {len(stops)} pauses during the inflate: it tests little"

    inflated = counter(state, "inflated_bytes") - counter(before, "inflated_bytes")
    discarded = counter(state, "balloon_discarded_bytes") - counter(
        before, "balloon_discarded_bytes"
    )
    assert inflated >= balloon, state["counters"]
    assert discarded >= inflated, f"inflated {inflated} bytes, discarded {discarded}"
    assert counter(state, "bad_chains") == 0 and counter(state, "discard_errors") == 0, state
    assert guest_trouble(guest) == [], "the guest kernel complained"
    # The guest touches all it has left: the host holds no more than its RAM less the
    # balloon (plus what the guest cannot free: its kernel, its page tables).
    guest.check(f"workload touch {GUEST_MIB - INFLATE_MIB - 250}", timeout=300)
    resident_full = guest.memfd_allocated()
    assert resident_full is not None, "the guest RAM is not a memfd"
    assert resident_full <= ram - balloon + 160 * MIB, (
        f"the host holds {resident_full // MIB} MiB of a guest of {ram // MIB} MiB with a "
        f"{balloon // MIB} MiB balloon"
    )

    ask(balloond, command="set-target", device="vm", target_bytes=ram)
    _, deflated = wait_until(
        "the deflate",
        lambda: status(balloond)["actual_bytes"],
        lambda actual: actual == 0,
        TARGET_TIMEOUT,
    )
    guest.check("workload touch 1500", timeout=300)  # the memory is the guest's again
    report(
        capsys,
        f"inflate of {balloon // MIB} MiB through {len(stops)} pauses (seed {seed}): target "
        f"reached {reached:.1f} s after set-target, {paused_for:.1f} s of it paused; QMP stop "
        f"{1000 * max(stops):.0f} ms at most, {1000 * sorted(stops)[len(stops) // 2]:.0f} ms "
        f"median; discarded {discarded // MIB} MiB of {inflated // MIB} MiB inflated; guest "
        f"memfd {resident_before and resident_before // MIB} MiB before, "
        f"{resident_full // MIB} MiB with the guest full; deflate {deflated:.1f} s",
    )


# -- (c) a guest reset in the middle of reporting -------------------------------------------


def test_guest_reset_mid_report_and_the_new_boot_reports(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """QMP ``system_reset`` while the guest reports free pages: the daemon keeps the
    connection (a device reset, not an error), the new kernel boots, its driver comes back,
    the memory the old kernel had touched leaves the host as the new kernel reports it, and
    reporting in the new boot gives back 90% of a freed 1 GiB."""
    guest = boot_guest(balloond.device_args(), name="reset", memory_mib=GUEST_MIB)
    old_boot = boot_id(guest)
    scenarios.start_churn(guest, 1024)
    # Reset while a report frees memory and much of the old kernel's memory is resident.
    resident_at_reset = 0
    while resident_at_reset < 600 * MIB:
        wait_for_report(guest)
        resident_at_reset = guest.memfd_allocated() or 0
    before = status(balloond)
    reset_at = time.monotonic()
    start = system_reset(guest)
    guest.wait_for(r"@@ready", 180.0, start=start)
    booted = time.monotonic() - reset_at
    modules = guest.wait_for(r"@@modules rc=(\d+)", 1.0, start=start)
    assert modules.group(1) == "0", "the new boot could not load the balloon driver"
    assert boot_id(guest) != old_boot, "the guest did not boot again"

    after = status(balloond)
    assert after["connected"] and after["connections"] == 1, after
    assert after["errors"] == {}, after
    assert counter(after, "bad_chains") == 0, after["counters"]
    assert counter(after, "discard_errors") == 0, after["counters"]
    resident_booted = guest.memfd_allocated()
    # The new kernel reports its free memory, which the old one had made resident.
    settled, settle = wait_until(
        "the new kernel reporting the old kernel's memory",
        guest.memfd_allocated,
        lambda now: now is not None and now <= BOOT_RESIDENT,
        120.0,
    )
    assert counter(status(balloond), "reports") > counter(after, "reports")
    measured = reporting_returns(guest)
    assert guest_trouble(guest) == [], "the guest kernel complained"
    report(
        capsys,
        f"reset mid-report: guest RAM memfd {resident_at_reset // MIB} "
        f"MiB allocated at the reset ({counter(before, 'reports')} reports so far), new boot "
        f"ready {booted:.1f} s later with {resident_booted and resident_booted // MIB} MiB, "
        f"{settled // MIB} MiB {settle:.1f} s after that; then {measured.summary()}",
    )


# -- (d) a guest that never returns its statistics buffer -----------------------------------


def refresh(daemon: Balloond, timeout: float) -> tuple[dict[str, Any] | str, float]:
    """``stats --refresh``: the answer or the error's message, and how long it took."""
    began = time.monotonic()
    try:
        answer: dict[str, Any] | str = ask(
            daemon, command="stats", device="vm", refresh=True, timeout=timeout
        )
    except Exception as error:  # OperatorError: the daemon's one-line answer
        answer = str(error)
    return answer, time.monotonic() - began


def test_a_guest_that_never_returns_its_stats_buffer(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """A frozen guest (QEMU stopped with SIGSTOP: its vCPU never runs, while its rings stay
    started) keeps the statistics buffer the daemon gave back for a refresh: the refresh
    fails after its timeout with a message saying so; meanwhile the daemon answers status
    at once and the last statistics stay readable; once QEMU runs again the guest returns
    the buffer and a refresh succeeds. A VM paused with QMP ``stop`` (rings stopped) is
    refused at once, and answers again after ``cont``."""
    guest = boot_guest(balloond.device_args(), name="stats", memory_mib=GUEST_MIB)
    wait_until(
        "the guest's first statistics",
        lambda: refresh(balloond, 10.0)[0],
        lambda answer: isinstance(answer, dict) and "free_bytes" in answer["stats"],
        60.0,
    )
    fresh, fresh_seconds = refresh(balloond, 10.0)
    assert isinstance(fresh, dict), fresh

    guest.qmp("stop")
    paused, paused_seconds = refresh(balloond, 5.0)
    assert isinstance(paused, str) and "not running" in paused, paused
    assert paused_seconds < 5.0, f"a paused VM's refresh took {paused_seconds:.1f} s"
    guest.qmp("cont")
    resumed, _ = wait_until(
        "statistics after cont",
        lambda: refresh(balloond, 10.0)[0],
        lambda answer: isinstance(answer, dict),
        60.0,
    )

    timeout = 3.0
    os.kill(guest.pid, signal.SIGSTOP)
    try:
        outcome: list[tuple[dict[str, Any] | str, float]] = []
        waiting = threading.Thread(target=lambda: outcome.append(refresh(balloond, timeout)))
        waiting.start()
        status_seconds = []
        while waiting.is_alive():
            began = time.monotonic()
            state = status(balloond)
            status_seconds.append(time.monotonic() - began)
            assert state["connected"], state
            time.sleep(0.1)
        waiting.join()
        [(frozen, frozen_seconds)] = outcome
        assert isinstance(frozen, str), frozen
        assert f"did not answer within {timeout:g} s" in frozen, frozen
        assert timeout <= frozen_seconds < timeout + 5.0, frozen_seconds
        # A bound that a blocked loop breaks (it would take the refresh's whole timeout), with
        # room for a loaded host's scheduling.
        assert max(status_seconds) < 3.0, f"status took {max(status_seconds):.2f} s meanwhile"
        kept = ask(balloond, command="stats", device="vm")
        assert kept["stats"] == resumed["stats"], "the last statistics stay readable"
        age_while_frozen = kept["stats_age_seconds"]
    finally:
        os.kill(guest.pid, signal.SIGCONT)
    thawed, thawed_seconds = wait_until(
        "statistics after SIGCONT",
        lambda: refresh(balloond, 10.0)[0],
        lambda answer: isinstance(answer, dict),
        60.0,
    )
    assert thawed["stats_age_seconds"] < 1.0, thawed
    guest.check("true")  # the guest runs on
    report(
        capsys,
        f"stats: refresh {fresh_seconds * 1000:.0f} ms on a running guest; paused VM refused "
        f"in {paused_seconds * 1000:.0f} ms ({paused}); frozen QEMU: refresh failed after "
        f"{frozen_seconds:.2f} s ({frozen}), status meanwhile "
        f"{1000 * max(status_seconds):.0f} ms at most over {len(status_seconds)} reads, last "
        f"statistics kept (age {age_while_frozen} s); after SIGCONT fresh statistics within "
        f"{1000 * thawed_seconds:.0f} ms",
    )


def test_a_refresh_whose_vm_goes_away_fails_at_once(
    balloond: Balloond, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """A refresh is waiting for a frozen guest (QEMU stopped with SIGSTOP) when QEMU is
    killed: the refresh fails within seconds, saying the VM is gone, not after its whole
    timeout blaming a guest that no longer exists. (Measured: it waits the full 20 s and
    answers "the guest did not answer within 20 s".)"""
    guest = boot_guest(balloond.device_args(), name="gone", memory_mib=GUEST_MIB)
    wait_until(
        "the guest's first statistics",
        lambda: refresh(balloond, 10.0)[0],
        lambda answer: isinstance(answer, dict) and "free_bytes" in answer["stats"],
        60.0,
    )
    timeout = 20.0
    os.kill(guest.pid, signal.SIGSTOP)
    outcome: list[tuple[dict[str, Any] | str, float]] = []
    waiting = threading.Thread(target=lambda: outcome.append(refresh(balloond, timeout)))
    waiting.start()
    # The refresh has reached the daemon once a few later requests have been answered.
    for _ in range(5):
        assert status(balloond)["connected"]
    os.kill(guest.pid, signal.SIGKILL)
    guest.close()
    wait_until(
        "the daemon letting go of the killed VM",
        lambda: status(balloond)["connected"],
        lambda connected: connected is False,
        CLEANUP_TIMEOUT,
    )
    waiting.join()
    [(answer, seconds)] = outcome
    report(capsys, f"refresh whose VM was killed: {answer!r} after {seconds:.1f} s")
    assert isinstance(answer, str), answer
    assert seconds < 10.0, f"the refresh waited {seconds:.1f} s for a VM that was gone"
    assert "did not answer" not in answer, answer


# -- a long run with a real guest (marker soak) ---------------------------------------------

#: The real-guest soak: how long, and how long each measured phase is.
SOAK_MINUTES = float(os.environ.get("BALLOOND_SOAK_MINUTES", "10"))
SOAK_PHASE_SECONDS = 60.0


def soak_selected(config: pytest.Config) -> bool:
    """Whether ``-m`` asks for the soak marker (not merely mentions it to leave it out)."""
    expression = str(config.getoption("markexpr") or "")
    return re.search(r"(?<!not )\bsoak\b", expression) is not None


@dataclass(frozen=True)
class SoakPhase:
    reports: int
    reported_mib: float
    report_ms: float  # mean kick-to-return time of the phase's reports (the daemon's own)
    inflate_s: float  # median time for the balloon to reach 256 MiB and come back
    refresh_ms: float  # median stats --refresh
    rss_kib: int
    fds: int
    maps: int
    guest_memfd_mib: int

    def row(self, index: int) -> str:
        return (
            f"{index:>5} {self.reports:7d} {self.reported_mib:8.0f} {self.report_ms:8.2f} "
            f"{self.inflate_s:7.1f} {self.refresh_ms:8.1f} {self.rss_kib / 1024:8.2f} "
            f"{self.fds:4d} {self.maps:4d} {self.guest_memfd_mib:6d}"
        )


SOAK_HEADER = "phase reports rep/MiB   rep/ms infl/s  stats/ms  RSS/MiB  fds maps mfd/MiB"


@pytest.mark.soak
def test_real_guest_soak_stays_flat(
    balloond: Balloond,
    boot_guest: BootGuest,
    request: pytest.FixtureRequest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A real guest that frees memory all the time while its balloon inflates to 256 MiB
    and deflates over and over, and its statistics are refreshed, for BALLOOND_SOAK_MINUTES
    minutes (run only with ``-m soak``): per minute the daemon's RSS, fds, guest memory
    mappings and report latency stay flat, and the guest logs no trouble."""
    if not soak_selected(request.config):
        pytest.skip("a long soak: run it with -m soak (BALLOOND_SOAK_MINUTES, 10 by default)")
    guest = boot_guest(balloond.device_args(), name="soak", lifetime=60 * SOAK_MINUTES + 900)
    line = ControlLine(balloond)
    pid = daemon_pid(balloond)
    try:
        ram = line(command="status", device="vm")["ram_bytes"]
        guest.check(f"echo {HUNG_TASK_SECONDS} > /proc/sys/kernel/hung_task_timeout_secs")
        scenarios.start_churn(guest, 512)
        phases: list[SoakPhase] = []
        end = time.monotonic() + 60 * SOAK_MINUTES
        with capsys.disabled():
            print(f"\nreal-guest soak, {SOAK_MINUTES:g} min\n{SOAK_HEADER}", flush=True)
        while len(phases) < 3 or time.monotonic() < end:
            phases.append(soak_phase(line, guest, ram, pid))
            with capsys.disabled():
                print(phases[-1].row(len(phases)), flush=True)
        scenarios.stop_churn(guest)
        assert guest_trouble(guest) == [], "the guest kernel complained"
        final = line(command="status", device="vm")
    finally:
        line.close()
    assert final["errors"] == {} and counter(final, "bad_chains") == 0, final
    assert counter(final, "discard_errors") == 0, final["counters"]
    table = "\n".join([SOAK_HEADER] + [p.row(i + 1) for i, p in enumerate(phases)])
    since = phases[len(phases) // 2]
    assert phases[-1].rss_kib - since.rss_kib < 1024, f"the daemon grew:\n{table}"
    assert all(p.fds == phases[0].fds for p in phases), f"open fds changed:\n{table}"
    assert all(p.maps == phases[0].maps for p in phases), f"mappings changed:\n{table}"
    assert phases[-1].report_ms <= 3 * max(phases[0].report_ms, 1.0), table
    assert phases[-1].inflate_s <= 3 * phases[0].inflate_s, table


def soak_phase(line: ControlLine, guest: Guest, ram: int, pid: int) -> SoakPhase:
    """One minute of inflates, deflates and refreshes while the guest churns; measured."""
    before = line(command="status", device="vm")
    inflates: list[float] = []
    refreshes: list[float] = []
    end = time.monotonic() + SOAK_PHASE_SECONDS
    while time.monotonic() < end:
        began = time.monotonic()
        for target, actual in ((ram - 256 * MIB, 256 * MIB), (ram, 0)):
            line(command="set-target", device="vm", target_bytes=target)
            wait_until(
                f"the balloon at {actual // MIB} MiB",
                lambda: line(command="status", device="vm")["actual_bytes"],
                partial(operator.eq, actual),
                TARGET_TIMEOUT,
                every=0.2,
            )
        inflates.append(time.monotonic() - began)
        began = time.monotonic()
        answer = line(command="stats", device="vm", refresh=True, timeout=30)
        assert "free_bytes" in answer["stats"], answer
        refreshes.append(time.monotonic() - began)
    after = line(command="status", device="vm")
    reports = counter(after, "reports") - counter(before, "reports")
    latency = after["counters"]["report_latency"]["total"]
    latency -= before["counters"]["report_latency"]["total"]
    return SoakPhase(
        reports=reports,
        reported_mib=(counter(after, "reported_bytes") - counter(before, "reported_bytes")) / MIB,
        report_ms=1000 * latency / max(reports, 1),
        inflate_s=statistics.median(inflates),
        refresh_ms=1000 * statistics.median(refreshes),
        rss_kib=proc_kib(pid, "VmRSS"),
        fds=len(fd_targets(pid)),
        maps=len(memfd_mappings(pid)),
        guest_memfd_mib=(guest.memfd_allocated() or 0) // MIB,
    )
