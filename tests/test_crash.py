"""A SIGKILL of the serving process costs no VM its balloon (``--keep-state``, issue 9).

``balloond serve --keep-state`` runs under the built-in keeper (``python -m balloond.keeper``,
what ``serve --supervise`` runs), which holds every fd the daemon stores and starts a new
daemon with them when one dies. A simulated VM stays connected throughout: it must see no
disconnect, every request answered exactly once and in order, every chain returned exactly
once, memory still freed, and the device's state (target, held statistics buffer, counters)
carried on. docs/never-drop.md, section 5, says which instant each test covers.
"""

from __future__ import annotations

import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloond import wire
from balloond.control import request
from balloond.errors import BalloondError
from balloond.wire import Request
from tests.frontend import Guest, MiB, simulated_vm
from tests.test_reload import (
    HUGE,
    PAGE,
    ConfigAsker,
    check_carried_on,
    device,
    fill,
    still_connected,
)

PYTHON = sys.executable


class Kept:
    """``balloond serve --keep-state`` under the keeper, in a subprocess; the log in a file."""

    def __init__(
        self,
        tmp_path: Path,
        *sockets: str,
        extra: tuple[str, ...] = (),
        worker: tuple[str, ...] = ("-m", "balloond"),
    ) -> None:
        self.control = str(tmp_path / "control.sock")
        self.log_path = tmp_path / "balloond.log"
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        args = [arg for name in sockets for arg in ("--socket-path", str(tmp_path / name))]
        self.process = subprocess.Popen(
            [
                *(PYTHON, "-m", "balloond.keeper", "--restart-delay", "0.05"),
                *("--burst", "1000", "--"),
                *(PYTHON, *worker, "serve", "--keep-state", *args, *extra),
                *("--control-socket", self.control, "--log-level", "debug"),
            ],
            stderr=self.log_file,
            stdin=subprocess.DEVNULL,
        )
        self.pid = self.wait_for_worker(0)

    def log(self) -> str:
        return self.log_path.read_text()

    def status(self) -> dict[str, object]:
        return request(self.control, {"command": "status"}, timeout=5.0)

    def wait_for_worker(self, old: int, timeout: float = 30.0) -> int:
        """The pid of a serving daemon other than ``old``, once it answers."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise AssertionError(f"the keeper exited {self.process.returncode}:\n{self.log()}")
            try:
                pid = self.status()["pid"]
                assert isinstance(pid, int)
                if pid != old:
                    return pid
            except BalloondError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"no new daemon:\n{self.log()[-4000:]}")
            time.sleep(0.02)

    def kill(self) -> int:
        """SIGKILL the serving daemon; the pid of the one that carries on."""
        os.kill(self.pid, signal.SIGKILL)
        self.pid = self.wait_for_worker(self.pid)
        return self.pid

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=30)
        self.log_file.close()
        return code

    def close(self) -> None:
        """The end of a test, whatever happened: the keeper and its daemon gone."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.log_file.close()


@pytest.fixture
def kept(tmp_path: Path) -> Iterator[Kept]:
    daemon = Kept(tmp_path, "vm.sock")
    try:
        yield daemon
    finally:
        daemon.close()


@pytest.fixture
def vm(kept: Kept, tmp_path: Path) -> Iterator[Guest]:
    with simulated_vm(str(tmp_path / "vm.sock")) as guest:
        yield guest


def test_a_killed_daemon_is_replaced_and_the_vm_never_notices(kept: Kept, vm: Guest) -> None:
    ram = vm.ram
    # Before: a report freed, a statistics buffer held, a target set.
    fill(ram, 8 * MiB, 4 * MiB, 1)
    vm.report([(8 * MiB, HUGE), (8 * MiB + HUGE, HUGE)])
    stats = vm.rings["stats"]
    stats_head = stats.add_chain([(ram.alloc(160, 8), 160)], writable=False)
    stats.notify()
    ram_size = sum(r.size for r in ram.regions)
    request(
        kept.control, {"command": "set-target", "device": "vm", "target_bytes": ram_size - 32 * MiB}
    )
    first = kept.pid

    second = kept.kill()
    assert second != first
    carried = device(kept.status())
    assert carried["connected"] and carried["connections"] == 1
    assert carried["pid"] == second
    assert carried["target_bytes"] == ram_size - 32 * MiB
    assert carried["counters"]["reports"] == 1  # type: ignore[index]

    check_carried_on(vm, stats_head)
    assert device(kept.status())["counters"]["reports"] == 2  # type: ignore[index]
    assert kept.stop() == 0


def test_kills_at_random_instants_lose_no_request_and_no_chain(kept: Kept, vm: Guest) -> None:
    """A frontend that keeps asking for its config and a guest that keeps reporting while
    the daemon is killed again and again: every request gets exactly its own reply, in
    order, and every report comes back exactly once, in order."""
    frontend = vm.frontend
    kills = 0
    stop_killing = threading.Event()

    def killer() -> None:
        nonlocal kills
        rng = random.Random(int(os.environ.get("BALLOOND_KILL_SEED", "9")))
        while not stop_killing.wait(rng.uniform(0.05, 0.4)):
            kept.kill()
            kills += 1

    reports = vm.rings["reporting"]
    heads: list[int] = []
    used: list[tuple[int, int]] = []
    with ConfigAsker(frontend) as asker:
        murderer = threading.Thread(target=killer)
        murderer.start()
        try:
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline or kills < 5:
                slot = 24 * MiB + (len(heads) % 4) * HUGE
                heads.append(reports.add_chain([(slot, HUGE)], writable=True))
                reports.notify()
                used += reports.wait_used(1, timeout=30.0)
        finally:
            stop_killing.set()
            murderer.join(timeout=60)
    assert not asker.failure, f"{asker.failure!r}\n{kept.log()[-4000:]}"
    assert asker.answered > 0 and kills >= 5
    assert [head for head, _ in used] == heads, "each report back exactly once, in order"
    time.sleep(0.3)
    assert reports.used_idx() == len(heads), "no report came back twice"
    assert still_connected(frontend)
    assert kept.stop() == 0


#: Where each test kills the daemon: (point in tests/killpoint.py, its N-th passage).
KILLS = [
    ("handled", 5),  # in the handshake: GET_QUEUE_NUM, a query
    ("handled", 9),  # SET_MEM_TABLE, with the region fds
    ("handled", 30),  # config traffic
    ("stored", 1),  # the state file stored, no record yet
    ("stored", 3),  # the connection's socket stored, not yet named by a record
    ("stored", 6),  # a region's fd stored, SET_MEM_TABLE not committed
    ("committed", 2),  # the connection committed before its first request
    ("committed", 8),  # in the handshake
    ("committed", 20),  # a ring started, or a report returned and not yet published
    ("staged", 2),
    ("staged", 10),
    ("staged", 25),
    ("consumed", 3),
    ("consumed", 18),
    ("completed", 1),
    ("completed", 4),
    ("published", 1),
    ("published", 4),
]


@pytest.mark.parametrize(("point", "count"), KILLS, ids=[f"{p}-{n}" for p, n in KILLS])
def test_a_kill_at_each_instant(tmp_path: Path, point: str, count: int) -> None:
    """The daemon killed at one instant of docs/never-drop.md, section 5, while a simulated
    VM connects, reports, asks for its config, gets a target and hands over a statistics
    buffer: its requests are answered once each, its reports come back once each, and it
    never sees the connection close."""
    marker = tmp_path / "killed"
    worker = ("-m", "tests.killpoint", point, str(count), str(marker), "--")
    daemon = Kept(tmp_path, "vm.sock", worker=worker)
    try:
        with simulated_vm(str(tmp_path / "vm.sock"), timeout=20.0) as guest:
            _exercise(daemon, guest, marker, f"{point} {count}")
    except BaseException:
        print(daemon.log()[-6000:])
        raise
    finally:
        daemon.close()


def _exercise(daemon: Kept, guest: Guest, marker: Path, where: str) -> None:
    """What a VM does while its daemon is killed once, at ``where``: connect (done),
    report, ask for its config, hold a statistics buffer, get a target, report again."""
    ram, frontend = guest.ram, guest.frontend
    reports = 0
    for i in range(3):
        guest.report([(8 * MiB + i * HUGE, HUGE)], timeout=20.0)
        reports += 1
    for _ in range(12):
        assert len(frontend.get_config()) == 16
    stats = guest.rings["stats"]
    stats_head = stats.add_chain([(ram.alloc(160, 8), 160)], writable=False)
    stats.notify()
    target = sum(r.size for r in ram.regions) - 16 * MiB
    for _ in range(3):  # the command fails if the daemon dies under it: ask again
        try:
            request(
                daemon.control,
                {"command": "set-target", "device": "vm", "target_bytes": target},
                timeout=5.0,
            )
            break
        except BalloondError:
            daemon.pid = daemon.wait_for_worker(daemon.pid)
    fill(ram, 16 * MiB, 4 * MiB, 7)
    blocks = ram.blocks()
    for i in range(3):
        guest.report([(16 * MiB + i * HUGE, HUGE)], timeout=20.0)
        reports += 1
    assert blocks - ram.blocks() >= 4 * MiB, "reported memory was freed"
    assert marker.exists(), f"the daemon was never killed at {where}"
    time.sleep(0.2)
    assert guest.rings["reporting"].used_idx() == reports, "no report came back twice"
    assert stats.used_idx() == 0, "the statistics buffer is still held"
    num_pages, _, _, _ = struct.unpack("<IIII", frontend.get_config())
    assert num_pages == 16 * MiB // PAGE
    assert still_connected(frontend)
    carried = device(daemon.status())
    assert carried["connected"] and carried["connections"] == 1
    stats.add_chain([(ram.alloc(160, 8), 160)], writable=False)
    stats.notify()
    assert stats.wait_used(1, timeout=20.0) == [(stats_head, 0)]
    assert daemon.stop() == 0


def kept_fds(log: str) -> int:
    """How many fds the keeper passed to the last daemon it started."""
    return int(log.rsplit("started with ", 1)[1].split()[0])


def test_a_reload_then_a_kill(kept: Kept, vm: Guest) -> None:
    """``balloond reload`` under --keep-state hands the names the fds are kept by to the new
    image: a kill after the reload finds every fd of the VM in the store, as many as a kill
    before the reload found (none lost, none kept twice)."""
    frontend = vm.frontend
    vm.report([(8 * MiB, HUGE)])
    kept.kill()
    before = kept_fds(kept.log())
    reload = subprocess.run(
        [PYTHON, "-m", "balloond", "reload", "--control", kept.control, "--timeout", "30"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert reload.returncode == 0, reload.stderr + kept.log()[-3000:]
    assert "1 connected" in reload.stdout, reload.stdout
    assert device(kept.status())["pid"] == kept.pid, "a reload keeps the pid"
    vm.report([(10 * MiB, HUGE)])
    kept.kill()
    assert kept_fds(kept.log()) == before
    assert still_connected(frontend)
    fill(vm.ram, 16 * MiB, 2 * HUGE, 5)
    blocks = vm.ram.blocks()
    vm.report([(16 * MiB, HUGE), (16 * MiB + HUGE, HUGE)])
    assert blocks - vm.ram.blocks() >= 2 * HUGE
    assert device(kept.status())["counters"]["reports"] == 3  # type: ignore[index]
    assert kept.stop() == 0


def test_replaced_fds_leave_the_store(kept: Kept, vm: Guest) -> None:
    """A frontend that gives a ring a new call eventfd again and again (QEMU does when it
    switches interrupts): the store holds the latest one only, and the new daemon after a
    kill signals that one."""
    frontend, reporting = vm.frontend, vm.rings["reporting"]
    kept.kill()
    before = kept_fds(kept.log())
    calls = [os.eventfd(0, os.EFD_NONBLOCK) for _ in range(20)]
    try:
        for call in calls:
            frontend.call(Request.SET_VRING_CALL, wire.VringFile(reporting.index, False), [call])
        kept.kill()
        assert kept_fds(kept.log()) == before
        assert os.eventfd_read(calls[-1]) >= 1, "the new daemon signals the latest call fd"
        for call in calls[:-1]:
            with pytest.raises(BlockingIOError):
                os.eventfd_read(call)
    finally:
        for call in calls:
            os.close(call)
    assert still_connected(frontend)
    assert kept.stop() == 0


def test_a_stop_is_a_stop(kept: Kept, vm: Guest) -> None:
    """SIGTERM still ends the daemon and its keeper, with --keep-state too: the VM's
    connection closes (nothing keeps it), and the daemon says once, as an error, that this
    VM's balloon stays dead until the VM restarts."""
    vm.report([(8 * MiB, HUGE)])
    assert kept.stop() == 0
    assert vm.frontend.closed_by_backend()
    lines = [line for line in kept.log().splitlines() if "stopping with a VM connected" in line]
    assert len(lines) == 1 and '"level": "error"' in lines[0], lines


def test_a_target_set_while_the_vm_is_paused_survives_a_kill(kept: Kept, vm: Guest) -> None:
    """A target set while the VM is paused (the guest hears of it when the VM runs again) is
    recorded at once: a kill before the VM runs again keeps it, and the guest reads it."""
    frontend = vm.frontend
    for ring in vm.rings.values():
        frontend.stop_ring(ring)
    target = sum(r.size for r in vm.ram.regions) - 8 * MiB
    answer = request(
        kept.control, {"command": "set-target", "device": "vm", "target_bytes": target}
    )
    assert answer["guest_notified"] is False
    kept.kill()
    assert device(kept.status())["target_bytes"] == target
    for ring in vm.rings.values():
        frontend.start_ring(ring)
    num_pages, _, _, _ = struct.unpack("<IIII", frontend.get_config())
    assert num_pages == 8 * MiB // PAGE
    assert kept.stop() == 0


def test_two_kills_in_a_row_while_the_vm_is_paused(kept: Kept, vm: Guest) -> None:
    """A paused VM (nothing runs, so nothing is committed after a restore): a second kill
    finds every fd of the VM still in the store. The restored device's first record once
    said it had no connection, and the store let go of the VM's socket."""
    frontend = vm.frontend
    for ring in vm.rings.values():
        frontend.stop_ring(ring)
    kept.kill()
    before = kept_fds(kept.log())
    kept.kill()
    assert kept_fds(kept.log()) == before
    assert still_connected(frontend)
    assert frontend.u64(Request.GET_FEATURES) != 0
    assert kept.stop() == 0


def test_fd_is_refused_with_keep_state(tmp_path: Path) -> None:
    """``--fd N`` names a socket by its number, which a store gives back elsewhere."""
    done = subprocess.run(
        [PYTHON, "-m", "balloond", "serve", "--fd", "0", "--keep-state"],
        capture_output=True,
        text=True,
        timeout=30,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1
    assert "--fd cannot be used with --keep-state" in done.stderr, done.stderr


def test_an_internal_error_that_ends_the_daemon_keeps_the_vm(tmp_path: Path) -> None:
    """An exception that ends the whole daemon (here its watchdog task fails) is a crash, not
    a stop, with the state kept: the daemon exits at once, the keeper starts the next, and
    the VM is carried on."""
    marker = tmp_path / "failed"
    worker = ("-m", "tests.killpoint", "error", "1.5", str(marker), "--")
    daemon = Kept(tmp_path, "vm.sock", worker=worker)
    try:
        with simulated_vm(str(tmp_path / "vm.sock"), timeout=20.0) as guest:
            _carried_on_after_an_error(daemon, guest, marker)
    finally:
        daemon.close()


def _carried_on_after_an_error(daemon: Kept, guest: Guest, marker: Path) -> None:
    ram, frontend = guest.ram, guest.frontend
    first = daemon.pid
    daemon.pid = daemon.wait_for_worker(first)
    assert marker.exists()
    assert "worker died (exit status 70)" in daemon.log()
    assert "every VM's state kept for the next daemon" in daemon.log()
    assert still_connected(frontend)
    fill(ram, 8 * MiB, HUGE, 3)
    blocks = ram.blocks()
    guest.report([(8 * MiB, HUGE)], timeout=20.0)
    assert blocks - ram.blocks() >= HUGE
    assert daemon.stop() == 0


def test_a_kill_in_the_middle_of_a_reload(tmp_path: Path) -> None:
    """The daemon killed in a reload, every device held and committed but the new image not
    started (row 25): the next daemon carries the VM on, as after any other kill."""
    marker = tmp_path / "killed"
    worker = ("-m", "tests.killpoint", "reloading", "1", str(marker), "--")
    daemon = Kept(tmp_path, "vm.sock", worker=worker)
    try:
        with simulated_vm(str(tmp_path / "vm.sock"), timeout=20.0) as guest:
            guest.report([(8 * MiB, HUGE)], timeout=20.0)
            first = daemon.pid
            reload = subprocess.run(
                [PYTHON, "-m", "balloond", "reload", "--control", daemon.control, "--timeout", "3"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert reload.returncode != 0, "the reload died with its daemon"
            assert marker.exists()
            daemon.pid = daemon.wait_for_worker(first)
            assert still_connected(guest.frontend)
            fill(guest.ram, 16 * MiB, HUGE, 4)
            blocks = guest.ram.blocks()
            guest.report([(16 * MiB, HUGE)], timeout=20.0)
            assert blocks - guest.ram.blocks() >= HUGE
            assert device(daemon.status())["counters"]["reports"] == 2  # type: ignore[index]
            assert daemon.stop() == 0
    finally:
        daemon.close()


def test_a_kill_between_a_target_and_its_announcement(tmp_path: Path) -> None:
    """The daemon killed after a target is committed and before the config-change message
    goes out (row 22): the operator's command fails with the daemon, but the target is in
    the record, and the next daemon announces it (the guest hears of it once at least)."""
    marker = tmp_path / "killed"
    worker = ("-m", "tests.killpoint", "announcing", "1", str(marker), "--")
    daemon = Kept(tmp_path, "vm.sock", worker=worker)
    try:
        with simulated_vm(str(tmp_path / "vm.sock"), timeout=20.0) as guest:
            channel = guest.frontend.backend_channel
            assert channel is not None
            target = sum(r.size for r in guest.ram.regions) - 8 * MiB
            first = daemon.pid
            with pytest.raises(BalloondError):
                request(
                    daemon.control,
                    {"command": "set-target", "device": "vm", "target_bytes": target},
                    timeout=10.0,
                )
            assert marker.exists()
            daemon.pid = daemon.wait_for_worker(first)
            assert device(daemon.status())["target_bytes"] == target
            channel.settimeout(10.0)
            kind, _, _ = struct.unpack("<III", channel.recv(wire.HEADER_SIZE))
            assert kind == wire.BackendRequest.CONFIG_CHANGE_MSG, "the next daemon announces it"
            num_pages, _, _, _ = struct.unpack("<IIII", guest.frontend.get_config())
            assert num_pages == 8 * MiB // PAGE
            assert daemon.stop() == 0
    finally:
        daemon.close()
