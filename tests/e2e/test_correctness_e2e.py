"""balloond keeps a real guest's data and buffers across a guest reset and many VM pauses.

A balloon device that frees memory the guest still uses, or keeps a buffer the guest waits
for, does worse than no balloon at all (issue 7). Each test drives a real guest into such a
situation and checks what the guest's user sees: bytes compared, memory given back, a driver
that still unloads, a VM that keeps running.

**Guest reset on huge pages.** On 2 MiB huge-page memory balloond frees a huge page once the
guest has ballooned all 512 of its 4 KiB pieces, however many buffers that takes, and
remembers the pieces of huge pages that are only partly ballooned. A reset voids that record:
the next kernel owns every page again. A daemon that kept it frees a huge page as soon as the
new kernel balloons the *other* pieces, zeroing whatever the new kernel keeps in the first
ones. The test makes such pieces plentiful. With the guest's transparent huge pages off, eight
processes filling memory at once interleave their 4 KiB pages within most huge pages; seven
exit and the balloon takes their pages back, so nearly every ballooned piece lies in a huge
page the eighth still uses (the inflate frees almost no huge page, which the test checks).
After the reset the new kernel does the same, and the eighth process's data must read back.
Measured on the engine before the fix (3dd1729), every run failed: in 6, 1611 to 4405 of the
24576 data pages came back zeroed; in 1 the rebooted guest's busybox crashed on its first
command (the driver's first inflate had freed pages of the new kernel's own). With one other
process instead of seven, 7 runs of 7 failed, 482 to 1550 pages zeroed.

**A target set while the device is stopped.** QEMU 11.1.3 crashes (SIGSEGV) when a backend's
config change notification reaches it while the device is stopped: while the VM is paused, or
while the guest reboots. The test is marked xfail until balloond holds the notification for
the next start.

**VM stop/cont during reporting.** QMP ``stop`` disables and stops every ring while the guest
may have a free page report or an inflate buffer in flight; ``cont`` starts them again. A
daemon that never answers the stop hangs QEMU; one that drops a chain it was handling leaves
the guest's reporting worker (or its balloon worker) waiting forever: no memory comes back any
more, hung tasks, and the driver never unloads. The test pauses a guest that keeps freeing
memory, and inflates, many times, each pause aimed at the moment a report was just returned
(when the guest posts its next one), and then checks all of that. QEMU pauses the vCPUs before
it stops the rings, so a Linux guest cannot post a buffer while the daemon drains: the races
of issue 7 (a kick handled during the drain, a drain that never ends) did not happen with a
real guest on the engine before the fix, 0 of 648 pauses; the simulator tests
(``tests/test_inflight.py``) drive them. This test guards the whole path with a real guest.
``BALLOOND_STOP_CONT_CYCLES`` sets the number of pauses (24 by default, about 25 s); a long
run::

    BALLOOND_STOP_CONT_CYCLES=1000 .venv/bin/python -m pytest \\
        tests/e2e/test_correctness_e2e.py -k stop_cont -p no:cacheprovider
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from kit import scenarios
from kit.guest import Guest, GuestError
from tests import hugepages
from tests.e2e.conftest import Balloond

BootGuest = Callable[..., Guest]

MIB = 1 << 20
GIB = 1 << 30
GUEST_MIB = 2048
#: 2 MiB huge pages reserved on the host for a 2 GiB guest (plus QEMU's own small needs).
HUGE_PAGES = GUEST_MIB // 2 + 76
HUGETLB_MEMORY = "memory-backend-memfd,id=mem,size={size}M,share=on,hugetlb=on,hugetlbsize=2M"
#: The reset test: each boot fills memory with one process whose data counts and OTHERS more
#: at the same time, SLICE_MIB each; the balloon then takes what the others held.
OTHERS = 7
SLICE_MIB = 96
BALLOONED = OTHERS * SLICE_MIB * MIB
#: The guest's balloon reaches a target in a few seconds (672 MiB: about 5 s here).
TARGET_TIMEOUT = 90.0
#: Longest a QMP ``stop`` may take; it takes milliseconds when the daemon answers.
STOP_LIMIT = 10.0
#: VM pauses in the stop/cont test.
#: How long a pause waits for the guest's next report before it goes ahead (seconds).
REPORT_WINDOW = 5.0
STOP_CONT_CYCLES = int(os.environ.get("BALLOOND_STOP_CONT_CYCLES", "24"))
#: Guest kernel lines that mean a virtqueue broke or a task waited too long.
GUEST_TROUBLE = r"blocked for more than|hung_task|not a head|out of range|vring|virtqueue"
#: The guest's hung-task report: a buffer never returned shows (the default is 120 s);
#: a loaded 2-core host can hold a waiting worker for 10 s without anything lost.
HUNG_TASK_SECONDS = 30

pytestmark = pytest.mark.e2e


# -- helpers --------------------------------------------------------------------------------


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def set_target(daemon: Balloond, target_bytes: int) -> None:
    daemon.command("set-target", str(daemon.socket_path), str(target_bytes))


def counter(status: dict[str, Any], name: str) -> int:
    return int(status["counters"][name])


def grew(before: dict[str, Any], after: dict[str, Any], name: str) -> int:
    """How much a counter grew between two status reads."""
    return counter(after, name) - counter(before, name)


def wait_balloon(
    daemon: Balloond, actual: int, inflated_since: dict[str, Any], inflated: int
) -> dict[str, Any]:
    """Wait until the guest's balloon holds ``actual`` bytes and the guest has inflated at least
    ``inflated`` bytes since the status ``inflated_since`` (``actual`` alone may be the
    previous boot's); return the status."""
    start = time.monotonic()
    while True:
        status = daemon.status()
        grown = grew(inflated_since, status, "inflated_bytes")
        if status["actual_bytes"] == actual and grown >= inflated:
            return status
        if time.monotonic() - start > TARGET_TIMEOUT:
            raise AssertionError(
                f"balloon not at {actual // MIB} MiB after {TARGET_TIMEOUT:.0f} s "
                f"(inflated {grown // MIB} MiB since): {status}"
            )
        time.sleep(0.25)


def boot_id(guest: Guest) -> str:
    return guest.check("cat /proc/sys/kernel/random/boot_id").output[-1].strip()


def system_reset(guest: Guest) -> int:
    """QMP ``system_reset``; returns the console line the new boot starts at.

    The kit runs QEMU with ``-no-reboot``, which turns a reset into an exit; ``set-action``
    makes it a reset again for this guest.
    """
    guest.qmp("set-action", reboot="reset")
    start = guest.line_count
    guest.qmp("system_reset")
    return start


def wait_booted(guest: Guest, start: int, timeout: float = 180.0) -> None:
    """Wait until the boot that began at console line ``start`` serves commands."""
    guest.wait_for(r"@@ready", timeout, start=start)
    modules = guest.wait_for(r"@@modules rc=(\d+)", 1.0, start=start)
    assert modules.group(1) == "0", "the new boot could not load its modules"


def small_pages_only(guest: Guest) -> None:
    """Turn off transparent huge pages: each process then takes 4 KiB pages, and processes
    filling memory at once share most 2 MiB pages instead of taking whole ones."""
    guest.check("echo never > /sys/kernel/mm/transparent_hugepage/enabled")


def hold_among_others(guest: Guest, kept: str, seed: int, others: str) -> None:
    """Fill ``kept`` with a pattern from ``seed`` while ``OTHERS`` other processes fill as
    much at the same time: the kept data ends up spread thinly over many huge pages, among
    theirs. The others hold their memory in ``{others}0``, ``{others}1``, ..."""
    background = " ".join(f"workload hold {SLICE_MIB} {i} {others}{i} &" for i in range(OTHERS))
    guest.check(f"{background} workload hold {SLICE_MIB} {seed} {kept} && wait", timeout=300)


def release_others(guest: Guest, others: str) -> None:
    """End the other processes: their memory is free again, and the balloon takes it next."""
    guest.check(" && ".join(f"workload release {others}{i}" for i in range(OTHERS)), timeout=300)


@pytest.fixture
def huge_pages() -> Iterator[None]:
    """2 MiB huge pages for one 2 GiB guest; ``nr_hugepages`` restored afterwards."""
    with hugepages.reserved(HUGE_PAGES):
        yield


# -- a guest reset in the middle of a balloon on huge pages -----------------------------------


def test_reset_mid_balloon_keeps_new_kernel_data_on_huge_pages(
    huge_pages: None,
    balloond: Balloond,
    boot_guest: BootGuest,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A guest on 2 MiB huge pages balloons 672 MiB of 4 KiB pieces spread over huge pages it
    still partly uses, and is reset without deflating. The new kernel holds 96 MiB of
    patterned data spread over many huge pages and balloons 672 MiB more from the pages
    around it: every byte of the data reads back as written. (A daemon that remembered the
    old kernel's pieces over the reset frees huge pages holding the new kernel's data.)"""
    guest = boot_guest(balloond.device_args(), name="reset-2m", memory_object=HUGETLB_MEMORY)
    ram = balloond.status()["ram_bytes"]
    assert ram == GUEST_MIB * MIB
    first_boot = boot_id(guest)

    # First boot: the balloon takes back what the other processes held.
    small_pages_only(guest)
    hold_among_others(guest, "/run/old", 0x01D, "/run/old-other")
    release_others(guest, "/run/old-other")
    before = balloond.status()
    set_target(balloond, ram - BALLOONED)
    first = wait_balloon(balloond, BALLOONED, before, BALLOONED)
    first_freed = grew(before, first, "balloon_discarded_bytes")
    # The situation the test needs: most ballooned pieces lie in huge pages the guest still
    # partly uses, so balloond could free few of them.
    assert first_freed <= BALLOONED // 2, (
        f"the first inflate freed {first_freed // MIB} MiB of {BALLOONED // MIB}: its pieces "
        "did not share huge pages with the guest's data, so the reset below tests nothing"
    )

    # A reset without deflating; the target stays, and the new kernel's driver inflates the
    # balloon to it again as soon as it loads.
    wait_booted(guest, system_reset(guest))
    try:
        second_boot = boot_id(guest)
    except GuestError as error:  # seen when the new kernel's own pages were freed
        raise AssertionError(f"the rebooted guest cannot run a command: {error}") from error
    assert second_boot != first_boot, "the guest did not boot again"
    reloaded = wait_balloon(balloond, BALLOONED, first, BALLOONED)

    # Second boot: data that must survive, among pages the balloon then takes.
    small_pages_only(guest)
    hold_among_others(guest, "/run/new", 0x2E5E7, "/run/new-other")
    release_others(guest, "/run/new-other")
    set_target(balloond, ram - 2 * BALLOONED)
    second = wait_balloon(balloond, 2 * BALLOONED, reloaded, BALLOONED)
    verify = guest.run("workload verify /run/new", timeout=300)
    # The holder lists the first mismatched words, then a summary: keep two of the first.
    mismatches = [line for line in verify.output if line.startswith("mismatch")]
    verdict = [line for line in verify.output if not line.startswith("mismatch")]

    def freed(since: dict[str, Any], until: dict[str, Any]) -> int:
        return grew(since, until, "balloon_discarded_bytes") // MIB

    report(
        capsys,
        f"reset on huge pages: the first inflate of {BALLOONED // MIB} MiB freed "
        f"{first_freed // MIB} MiB; after the reset the driver inflated it again, freeing "
        f"{freed(first, reloaded)} MiB; the second inflate freed {freed(reloaded, second)} "
        "MiB; verify: " + " / ".join(verdict),
    )
    assert verify.rc == 0 and any("@@verify-ok" in line for line in verify.output), (
        "the new kernel's data changed after the balloon took pages next to it:\n"
        + "\n".join(mismatches[:2] + verdict)
    )
    assert counter(second, "discard_errors") == 0, second["counters"]
    assert scenarios.verification_can_fail(guest, "/run/new"), "a flipped bit went unnoticed"


# -- a new target while the device is stopped ------------------------------------------------


def assert_qemu_alive(guest: Guest, when: str) -> None:
    time.sleep(1.0)  # QEMU handles the daemon's message within milliseconds
    if not guest.running:
        status = guest.close()
        raise AssertionError(f"QEMU died (exit status {status}) after a target set {when}")


def test_target_set_while_paused_or_rebooting_reaches_the_guest(
    balloond: Balloond, boot_guest: BootGuest
) -> None:
    """A target set while the VM is paused (QMP ``stop``) leaves QEMU running and reaches the
    guest after ``cont``; one set while the guest reboots (before its driver is back) leaves
    QEMU running and the new kernel's balloon reaches it. (Measured on QEMU 11.1.3: a config
    change notification reaching QEMU while the device is stopped kills QEMU with SIGSEGV,
    both while paused and while rebooting.)"""
    guest = boot_guest(balloond.device_args(), name="paused-target")
    ram = balloond.status()["ram_bytes"]

    guest.qmp("stop")
    before = balloond.status()
    set_target(balloond, ram - 256 * MIB)
    assert_qemu_alive(guest, "while the VM was paused")
    guest.qmp("cont")
    paused = wait_balloon(balloond, 256 * MIB, before, 256 * MIB)

    start = system_reset(guest)
    set_target(balloond, ram - 128 * MIB)
    assert_qemu_alive(guest, "while the guest rebooted")
    wait_booted(guest, start)
    wait_balloon(balloond, 128 * MIB, paused, 128 * MIB)


# -- VM stop/cont while the guest reports and inflates --------------------------------------


@contextmanager
def balloond_with(tmp_path: Path, *options: str) -> Iterator[Balloond]:
    """``balloond serve OPTIONS`` for this test; it must exit 0 on SIGTERM at the end (the
    caller stops its guest first)."""
    sockets = Path(tempfile.mkdtemp(prefix="balloond-e2e-"))
    daemon = Balloond(sockets / "vm.sock", tmp_path / "balloond.log")
    try:
        daemon.start(*options)
        yield daemon
    finally:
        status = daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)
    assert status == 0, f"balloond exited {status}:\n{daemon.log()[-3000:]}"


def wait_for_report(guest: Guest, timeout: float) -> bool:
    """Wait until the guest RAM memfd shrinks (balloond just freed a report); False if it
    did not within ``timeout`` seconds."""
    first = guest.memfd_allocated()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = guest.memfd_allocated()
        if first is not None and now is not None and now < first:
            return True
        time.sleep(0.005)
    return False


def timed_stop(guest: Guest) -> float:
    """QMP ``stop``; seconds it took. A stop that does not return fails the test."""
    began = time.monotonic()
    try:
        guest.qmp("stop")
    except (OSError, GuestError) as error:  # the QMP client gives up after 30 s
        raise AssertionError(
            f"QMP stop did not return ({error!r}) after {time.monotonic() - began:.1f} s"
        ) from error
    return time.monotonic() - began


def test_stop_cont_during_reporting_loses_nothing(
    tmp_path: Path, boot_guest: BootGuest, capsys: pytest.CaptureFixture[str]
) -> None:
    """Many QMP stop/cont pauses while the guest keeps freeing memory (free page reports) and
    its balloon inflates and deflates: every stop returns within 10 s; afterwards reporting
    still gives >= 90% of a freed 1 GiB back, the balloon still reaches a target and comes
    back, statistics still answer, the guest logged no hung task or broken ring, and its
    balloon driver unloads (it waits for every buffer it handed over) before a clean
    poweroff."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    with balloond_with(tmp_path, "--stats-interval", "1") as daemon:
        guest = boot_guest(daemon.device_args(), name="stop-cont")
        try:
            run_stop_cont(daemon, guest, rng, seed, capsys)
        finally:
            guest.close()


def run_stop_cont(
    daemon: Balloond,
    guest: Guest,
    rng: random.Random,
    seed: int,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ram = daemon.status()["ram_bytes"]
    guest.check(f"echo {HUNG_TASK_SECONDS} > /proc/sys/kernel/hung_task_timeout_secs")
    scenarios.start_churn(guest)
    stops: list[float] = []
    aimed = 0
    started = time.monotonic()
    for cycle in range(STOP_CONT_CYCLES):
        if cycle % 8 == 0:
            # Inflate 512 MiB, then deflate, while the pauses go on. A config change must not
            # reach QEMU 11.1 while the VM is stopped (it crashes), so give it time first.
            set_target(daemon, ram - (512 * MIB if cycle % 16 == 0 else 0))
            time.sleep(0.5)
        # A report comes 2 s after the guest frees memory, later on a loaded host; a pause
        # that finds none within the window goes ahead anyway (``aimed`` counts the others).
        aimed += wait_for_report(guest, timeout=REPORT_WINDOW)
        time.sleep(rng.uniform(0.0, 0.03))
        stops.append(timed_stop(guest))
        time.sleep(rng.uniform(0.01, 0.3))
        guest.qmp("cont")
    paused_for = time.monotonic() - started
    scenarios.stop_churn(guest)
    report(
        capsys,
        f"stop/cont: {len(stops)} pauses in {paused_for:.0f} s (seed {seed}), {aimed} right "
        f"after a report; stop took {1000 * max(stops):.0f} ms at most, "
        f"{1000 * sorted(stops)[len(stops) // 2]:.0f} ms median",
    )
    assert max(stops) <= STOP_LIMIT, f"a stop took {max(stops):.1f} s"
    # Measured: 18 of 24 aimed on a quiet host, 11 of 24 under CI load with a 1.5 s window.
    assert aimed >= len(stops) // 4, "the pauses missed the guest's reporting"

    # Free page reporting still works: a freed 1 GiB comes back to the host, with the balloon
    # empty again (the loop may have left it inflated).
    set_target(daemon, ram)
    wait_balloon(daemon, 0, daemon.status(), 0)
    before = daemon.status()
    measured = scenarios.touch_and_free(guest, 1024)
    after = daemon.status()
    memfd_back = measured.memfd_returned
    report(capsys, f"after the pauses: {measured.summary()}")
    assert measured.came_back(0.9), measured.summary()
    assert measured.came_back(0.9, memfd=True), f"the memfd gave back {memfd_back // MIB} MiB"
    discarded = grew(before, after, "discarded_bytes")
    assert discarded >= 0.9 * GIB, f"balloond discarded {discarded // MIB} MiB"

    # The balloon's own rings: inflate to a target and back.
    start = daemon.status()
    set_target(daemon, ram - 256 * MIB)
    wait_balloon(daemon, 256 * MIB, start, 0)
    set_target(daemon, ram)
    status = wait_balloon(daemon, 0, start, 0)
    assert counter(status, "bad_chains") == 0, status["counters"]
    assert counter(status, "discard_errors") == 0, status["counters"]

    # Statistics: the buffer balloond holds went back at every stop and came again.
    answer: dict[str, Any] = json.loads(
        daemon.command("stats", str(daemon.socket_path), "--refresh", "--timeout", "5", "--json")
    )
    assert "free_bytes" in answer["stats"], answer

    trouble = guest.run(f"dmesg | grep -iE '{GUEST_TROUBLE}'", timeout=30)
    assert not [line for line in trouble.output if line.strip()], (
        "the guest kernel complained:\n" + trouble.text()
    )
    # Unloading the driver waits for the reporting worker and every balloon buffer: it hangs
    # if balloond kept one.
    unload = guest.run("rmmod virtio_balloon", timeout=60)
    assert unload.rc == 0, unload.text()
    guest.send_line("0 poweroff -f")
    deadline = time.monotonic() + 60.0
    while guest.running and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not guest.running, "the guest did not power off"
    assert guest.close() == 0
