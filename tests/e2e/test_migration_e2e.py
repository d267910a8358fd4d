"""Live migration of a real guest whose balloon balloond serves, with ``balloond-migrate``.

Two QEMU processes on this machine: the source, whose balloon sits on a PCIe root port, and
a destination started with the same command line minus the balloon, plus ``-incoming defer``
(``GuestConfig(incoming=True)``). The tool gets a second QMP monitor on each (a QMP socket
serves one client, and the kit's :class:`~kit.guest.Guest` keeps its own). The guest holds patterned
memory that must verify after the move, returns memory to the host before and after it, and
keeps its balloon target; a migration cancelled half-way leaves the source VM with a working
balloon and its target again.

Host memory across the move is measured on both sides (the memfds' allocated blocks) and
printed; docs/migration.md has the numbers. Guests run under TCG on a shared machine, so the
CI tests keep guests small and migrate with multifd (seconds); the measurements of plain
precopy and of a 2 GiB guest run only with ``BALLOOND_E2E_LONG=1``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from balloond.control import request
from balloond.errors import OperatorError
from kit import devices, scenarios
from kit.guest import Guest, GuestConfig
from kit.layout import Kit
from tests.e2e.conftest import Balloond

pytestmark = pytest.mark.e2e

MIB = 1 << 20
GIB = 1 << 30
PORT = "rp-balloon"
DEVICE_ID = "balloon0"
LONG = pytest.mark.skipif(
    os.environ.get("BALLOOND_E2E_LONG") != "1",
    reason="a long measurement: set BALLOOND_E2E_LONG=1 to run it",
)


def tool_monitor(path: Path) -> tuple[str, ...]:
    """A second QMP monitor, for balloond-migrate."""
    return ("-qmp", f"unix:{path},server=on,wait=off")


@dataclass
class HostMemory:
    """Both sides' memfd allocation, sampled in the background while something runs."""

    source: Guest
    destination: Guest
    samples: list[tuple[float, int, int]] = field(default_factory=list)

    def now(self) -> tuple[int, int]:
        return _allocated(self.source), _allocated(self.destination)

    @contextmanager
    def sampling(self, interval: float = 0.2) -> Iterator[None]:
        stop = threading.Event()
        began = time.monotonic()

        def sample() -> None:
            while not stop.is_set():
                source, destination = self.now()
                self.samples.append((time.monotonic() - began, source, destination))
                stop.wait(interval)

        thread = threading.Thread(target=sample, daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def peaks(self) -> tuple[int, int]:
        return max(s[1] for s in self.samples), max(s[2] for s in self.samples)


def _allocated(guest: Guest) -> int:
    if not guest.running:
        return 0
    try:
        return guest.memfd_allocated() or 0
    except OSError:
        return 0


def status(control: Path, device: str) -> dict[str, Any]:
    return request(str(control), {"command": "status", "device": device})


def wait_until(what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(interval)
    return value


def returns_memory(
    guest: Guest, mib: int, timeout: float = 60.0, fraction: float = 0.8
) -> tuple[int, int]:
    """The guest touches and frees ``mib`` MiB; (peak, lowest) memfd allocation, sampled from
    before the touch, once the allocation has fallen by ``fraction`` of it from the peak (a
    pass of reporting may return memory before the guest's command returns)."""
    measured = scenarios.touch_and_free(guest, mib, duration=timeout)
    assert measured.came_back(fraction, memfd=True), (
        f"{mib} MiB freed by the guest not back on the host: {measured.summary()}"
    )
    peak, lowest = measured.peak.memfd_allocated, measured.lowest.memfd_allocated
    assert peak is not None and lowest is not None, "guest RAM is not a memfd"
    return peak, lowest


def migrate_argv(move: Move, *options: str) -> list[str]:
    """balloond-migrate (as ``python -m balloond.migrate``) from the source's tool monitor to
    the destination's, over a Unix socket, printing its result as JSON."""
    sockets = move.sockets
    return [
        sys.executable, "-m", "balloond.migrate",
        "--source-qmp", str(sockets / "src.qmp"), "--dest-qmp", str(sockets / "dst.qmp"),
        "--source-control", str(move.source_daemon.control_path),
        "--dest-control", str(move.destination_daemon.control_path),
        "--device-id", DEVICE_ID, "--deferred", "--json", *options,
        f"unix:{sockets / 'migrate.sock'}",
    ]  # fmt: skip


def parse_result(code: int, stdout: str, stderr: str) -> dict[str, Any]:
    print(stderr)
    try:
        result: dict[str, Any] = json.loads(stdout)
    except ValueError:
        pytest.fail(f"balloond-migrate printed no result (exit {code}):\n{stderr}")
    return result


def migrate(move: Move, *options: str, timeout: float = 600.0) -> tuple[int, dict[str, Any]]:
    """Run balloond-migrate to the end: (exit status, result)."""
    done = subprocess.run(
        migrate_argv(move, *options), capture_output=True, text=True, timeout=timeout
    )
    return done.returncode, parse_result(done.returncode, done.stdout, done.stderr)


def steps(result: dict[str, Any]) -> list[tuple[str, bool]]:
    return [(step["step"], step["ok"]) for step in result["steps"]]


def start_daemon(directory: Path, log: Path, name: str) -> Balloond:
    daemon = Balloond(directory / f"{name}.sock", log)
    daemon.start()
    return daemon


@dataclass
class Move:
    """A source guest on balloond and a destination waiting for it, with their daemons."""

    kit: Kit
    sockets: Path
    source_daemon: Balloond
    destination_daemon: Balloond
    source: Guest
    destination: Guest

    @property
    def memory(self) -> HostMemory:
        return HostMemory(self.source, self.destination)


@pytest.fixture
def move_factory(guest_kit: Kit, tmp_path: Path) -> Iterator[Callable[..., Move]]:
    """``move_factory(memory_mib, separate_daemons)``: a booted source and a waiting
    destination. With ``separate_daemons`` each side has its own daemon (two hosts); else one
    daemon serves both devices. At the end the guests stop first (a guest whose backend went
    away cannot power off), then the daemons."""
    sockets = Path(tempfile.mkdtemp(prefix="balloond-mig-"))
    daemons: list[Balloond] = []
    guests: list[Guest] = []

    def make(memory_mib: int, separate_daemons: bool = True) -> Move:
        (sockets / "src").mkdir()
        source_daemon = start_daemon(sockets / "src", tmp_path / "balloond-source.log", "vm")
        daemons.append(source_daemon)
        if separate_daemons:
            (sockets / "dst").mkdir()
            # The destination host's daemon serves another VM; the tool adds this one.
            destination_daemon = start_daemon(
                sockets / "dst", tmp_path / "balloond-destination.log", "other"
            )
            daemons.append(destination_daemon)
        else:
            destination_daemon = source_daemon
        source_args = (
            *devices.vhost_user_balloon_unpluggable(source_daemon.socket_path, port=PORT),
            *tool_monitor(sockets / "src.qmp"),
        )
        source = Guest(
            guest_kit,
            tmp_path / "source",
            GuestConfig(memory_mib=memory_mib, device_args=source_args),
        )
        guests.append(source)
        source.start()
        destination_args = (*devices.root_port(PORT), *tool_monitor(sockets / "dst.qmp"))
        destination = Guest(
            guest_kit,
            tmp_path / "destination",
            GuestConfig(memory_mib=memory_mib, device_args=destination_args, incoming=True),
        )
        guests.append(destination)
        destination.start()
        return Move(guest_kit, sockets, source_daemon, destination_daemon, source, destination)

    try:
        yield make
    finally:
        for guest in reversed(guests):
            guest.close()
        for daemon in daemons:
            daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)


# -- the tests ------------------------------------------------------------------------------


def driver_up(control: Path, device: str, timeout: float = 60.0) -> dict[str, Any]:
    return dict(
        wait_until(
            f"{device}: the guest's balloon driver up",
            lambda: (st := status(control, device))["connected"] and st.get("features") and st,
            timeout,
        )
    )


def set_target(control: Path, device: str, target_bytes: int) -> None:
    request(str(control), {"command": "set-target", "device": device, "target_bytes": target_bytes})


def ballooned(control: Path, device: str, take: int, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until the guest's balloon holds ``take`` bytes (its ``actual``)."""
    return dict(
        wait_until(
            f"{device}: the guest's balloon at {take // MIB} MiB",
            lambda: (st := status(control, device))["actual_bytes"] >= take and st,
            timeout,
        )
    )


def move_and_measure(
    move: Move, *, hold_mib: int, touch_mib: int, take_mib: int, multifd: bool, squeeze_mib: int = 0
) -> dict[str, Any]:
    """Before: the guest holds patterned data, returns ``touch_mib`` MiB and inflates
    ``take_mib`` MiB; the move; after: the data verifies, the target is back, memory the guest
    frees comes back on the destination. With ``squeeze_mib`` the balloon takes that much more
    for a moment after the move, then gives it back. Returns the host memory numbers (MiB)."""
    source, destination = move.source, move.destination
    source_control, destination_control = (
        move.source_daemon.control_path,
        move.destination_daemon.control_path,
    )
    ram = source.config.memory_mib * MIB
    numbers: dict[str, Any] = {"ram": ram // MIB, "multifd": multifd}
    driver_up(source_control, "vm")
    source.check(f"workload hold {hold_mib} 42 /tmp/held", timeout=180)
    peak, settled = returns_memory(source, touch_mib)
    numbers["source returned before the move"] = (peak - settled) // MIB
    target = ram - take_mib * MIB
    set_target(source_control, "vm", target)
    ballooned(source_control, "vm", take_mib * MIB)
    time.sleep(1.0)
    memory = move.memory
    before = memory.now()
    numbers["source before the move"] = before[0] // MIB

    assert move.destination_daemon is not move.source_daemon, "two hosts, two daemons"
    destination_socket = move.destination_daemon.socket_path.with_name("vm.sock")
    options = ["--dest-socket", str(destination_socket)]
    with memory.sampling():
        code, result = migrate(move, *options, *(["--multifd"] if multifd else []))
    assert (code, result["outcome"]) == (0, "migrated"), result
    assert steps(result) == [
        (name, True)
        for name in ("check", "serve", "unplug", "migrate", "plug", "driver", "restore", "release")
    ]
    assert result["target_bytes"] == target
    timing = {step["step"]: round(step["seconds"], 2) for step in result["steps"]}
    numbers["step seconds"] = timing
    numbers["migration"] = result["migration"]
    peaks = memory.peaks()
    numbers["source peak during the move"] = peaks[0] // MIB
    after = memory.now()
    numbers["source after the move (QEMU paused, not quit)"] = after[0] // MIB
    numbers["destination on arrival"] = after[1] // MIB

    # The new balloon takes the target back on the destination, and the data is intact.
    arrived = ballooned(destination_control, "vm", take_mib * MIB)
    assert arrived["target_bytes"] == target
    destination.check("workload verify /tmp/held", timeout=180)
    time.sleep(4.0)  # reporting starts 2 s after the driver registers
    numbers["destination after the target is back"] = _allocated(destination) // MIB
    if squeeze_mib:
        set_target(destination_control, "vm", target - squeeze_mib * MIB)
        ballooned(destination_control, "vm", (take_mib + squeeze_mib) * MIB)
        numbers["destination squeezed"] = _allocated(destination) // MIB
        set_target(destination_control, "vm", target)
        wait_until(
            "the balloon back at the target",
            lambda: status(destination_control, "vm")["actual_bytes"] <= take_mib * MIB,
            120,
        )
        time.sleep(4.0)
        numbers["destination after the squeeze"] = _allocated(destination) // MIB
    peak, settled = returns_memory(destination, touch_mib)
    numbers["destination returned after the move"] = (peak - settled) // MIB
    numbers["destination settled"] = settled // MIB
    counters = status(destination_control, "vm")["counters"]
    assert counters["reports"] > 0 and counters["discarded_bytes"] > 0
    with pytest.raises(OperatorError, match="no device"):
        status(source_control, "vm")  # released by the source daemon
    print(json.dumps(numbers, indent=2))
    return numbers


def test_a_guest_moves_with_its_data_its_target_and_its_memory_returns(
    move_factory: Callable[..., Move], tmp_path: Path
) -> None:
    move = move_factory(1536)
    numbers = move_and_measure(move, hold_mib=192, touch_mib=768, take_mib=384, multifd=True)
    (tmp_path / "migration.json").write_text(json.dumps(numbers, indent=2))
    # multifd leaves the guest's free (zero) memory unallocated on the destination.
    assert numbers["destination on arrival"] < 0.75 * numbers["ram"]
    assert numbers["destination returned after the move"] >= 0.8 * 768


def test_a_cancelled_migration_leaves_the_source_its_balloon(
    move_factory: Callable[..., Move],
) -> None:
    move = move_factory(1024, separate_daemons=False)
    source, control = move.source, move.source_daemon.control_path
    driver_up(control, "vm")
    source.check("workload hold 192 7 /tmp/held", timeout=180)
    target = 896 * MIB
    set_target(control, "vm", target)
    ballooned(control, "vm", 128 * MIB)
    # 192 MiB of data at 16 MiB/s: the migration lasts long enough to be cancelled half-way.
    source.qmp("migrate-set-parameters", **{"max-bandwidth": 16 * MIB})
    socket = move.source_daemon.socket_path.with_name("vm-in.sock")
    argv = migrate_argv(move, "--dest-device", "vm-in", "--dest-socket", str(socket))
    memory = move.memory
    before = memory.now()[0]
    tool = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with memory.sampling():
            wait_until(
                "the migration under way",
                lambda: (
                    (m := source.qmp("query-migrate")).get("status") == "active"
                    and m["ram"]["transferred"] > 32 * MIB
                ),
                120,
                interval=0.2,
            )
            source.qmp("migrate_cancel")
            stdout, stderr = tool.communicate(timeout=180)
    finally:
        if tool.poll() is None:
            tool.kill()
    result = parse_result(tool.returncode, stdout, stderr)
    assert (tool.returncode, result["outcome"]) == (1, "rolled-back"), result
    assert result["migration"]["status"] == "cancelled"
    assert steps(result) == [
        ("check", True), ("serve", True), ("unplug", True), ("migrate", False),
        ("replug", True), ("driver", True), ("restore", True),
    ]  # fmt: skip
    # The source has its balloon again, with its target, and the data is intact...
    back = ballooned(control, "vm", 128 * MIB)
    assert back["target_bytes"] == target and back["connections"] == 2
    source.check("workload verify /tmp/held", timeout=180)
    # ...and what the tool added on the destination side is gone.
    listed = request(str(control), {"command": "status"})
    assert [d["device"] for d in listed["devices"]] == ["vm"]
    # Reporting returns memory on the source again.
    time.sleep(4.0)
    after = memory.now()[0]
    peak, settled = returns_memory(source, 320, fraction=0.75)
    print(
        f"source memfd: {before // MIB} MiB before, {memory.peaks()[0] // MIB} MiB at most "
        f"during the cancelled migration, {after // MIB} MiB with the balloon back; then "
        f"{(peak - settled) // MIB} of 320 MiB freed by the guest came back"
    )


@LONG
@pytest.mark.parametrize("multifd", [False, True], ids=["precopy", "multifd"])
def test_measure_a_2gib_guest_that_returned_1gib(
    move_factory: Callable[..., Move], tmp_path: Path, multifd: bool
) -> None:
    move = move_factory(2048)
    numbers = move_and_measure(
        move, hold_mib=256, touch_mib=1024, take_mib=512, multifd=multifd, squeeze_mib=768
    )
    (tmp_path / "migration.json").write_text(json.dumps(numbers, indent=2))
