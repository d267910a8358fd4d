"""``balloond reload``: the daemon replaces its program image (execve) while a simulated VM
stays connected. QEMU must see nothing: no disconnect, every request answered exactly once
and in order, every chain returned exactly once, memory still freed, the device's state
(target, held statistics buffer, counters) carried on."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloond.control import request
from balloond.errors import BalloondError
from balloond.wire import Request
from tests.frontend import Frontend, Guest, GuestRam, MiB, simulated_vm

HUGE = 2 * MiB
PAGE = 4096
BALLOOND = [sys.executable, "-m", "balloond"]


class Serving:
    """``balloond serve`` in a subprocess, its log in a file."""

    def __init__(self, tmp_path: Path, *sockets: str) -> None:
        self.control = str(tmp_path / "control.sock")
        self.log_path = tmp_path / "balloond.log"
        self.log_file = open(self.log_path, "w")  # noqa: SIM115 (closed in stop)
        args = [arg for name in sockets for arg in ("--socket-path", str(tmp_path / name))]
        self.process = subprocess.Popen(
            [*BALLOOND, "serve", *args, "--control-socket", self.control, "--log-level", "debug"],
            stderr=self.log_file,
            stdin=subprocess.DEVNULL,
        )
        self.wait_for("control on")

    def log(self) -> str:
        return self.log_path.read_text()

    def wait_for(self, text: str, count: int = 1, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while self.log().count(text) < count:
            if self.process.poll() is not None:
                raise AssertionError(f"balloond exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"no {text!r} in the log:\n{self.log()[-3000:]}")
            time.sleep(0.02)

    def status(self) -> dict[str, object]:
        return request(self.control, {"command": "status"})

    def reload(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*BALLOOND, "reload", "--control", self.control, "--timeout", "30"],
            capture_output=True,
            text=True,
            timeout=60,
        )

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout=20)
        self.log_file.close()
        return code


@pytest.fixture
def serving(tmp_path: Path) -> Iterator[Serving]:
    daemon = Serving(tmp_path, "vm.sock", "spare.sock")
    try:
        yield daemon
    finally:
        if daemon.process.poll() is None:
            daemon.process.kill()
            daemon.process.wait()
        daemon.log_file.close()


@pytest.fixture
def vm(serving: Serving, tmp_path: Path) -> Iterator[Guest]:
    with simulated_vm(str(tmp_path / "vm.sock")) as guest:
        yield guest


def fill(ram: GuestRam, gpa: int, length: int, seed: int) -> bytes:
    pattern = (struct.pack("<Q", seed) * (length // 8))[:length]
    ram.write(gpa, pattern)
    return pattern


def still_connected(frontend: Frontend) -> bool:
    """Nothing to read and no EOF: the backend keeps the connection and sent nothing unasked."""
    frontend.sock.settimeout(0.2)
    try:
        frontend.sock.recv(1, socket.MSG_PEEK)
    except TimeoutError:
        return True
    finally:
        frontend.sock.settimeout(5.0)
    return False


def device(status: dict[str, object], name: str = "vm") -> dict[str, object]:
    devices = status["devices"]
    assert isinstance(devices, list)
    return next(d for d in devices if d["device"] == name)


def check_carried_on(vm: Guest, stats_head: int) -> None:
    """After a hand-over (or a death) with 32 MiB ballooned and a statistics buffer held:
    the frontend never saw its connection close and is answered as before, reporting goes
    on (memory really comes back, the data next to it stays), and the statistics buffer
    comes back only when the guest offers the next."""
    ram, frontend, stats = vm.ram, vm.frontend, vm.rings["stats"]
    assert still_connected(frontend)
    num_pages, actual, _, _ = struct.unpack("<IIII", frontend.get_config())
    assert (num_pages, actual) == (32 * MiB // PAGE, 0)
    fill(ram, 16 * MiB, 4 * MiB, 2)
    kept = fill(ram, 20 * MiB, HUGE, 3)
    blocks = ram.blocks()
    vm.report([(16 * MiB, HUGE), (16 * MiB + HUGE, HUGE)])
    assert blocks - ram.blocks() >= 4 * MiB
    assert ram.read(20 * MiB, HUGE) == kept
    assert stats.used_idx() == 0
    stats.add_chain([(ram.alloc(160, 8), 160)], writable=False)
    stats.notify()
    assert stats.wait_used(1) == [(stats_head, 0)]


def test_a_reload_keeps_the_vm_connected_and_its_state(serving: Serving, vm: Guest) -> None:
    ram = vm.ram
    pid = serving.process.pid
    # Before: a report freed, a statistics buffer held, a target set.
    fill(ram, 8 * MiB, 4 * MiB, 1)
    vm.report([(8 * MiB, HUGE), (8 * MiB + HUGE, HUGE)])
    stats = vm.rings["stats"]
    stats_buffer = ram.alloc(160, 8)
    stats_head = stats.add_chain([(stats_buffer, 160)], writable=False)
    stats.notify()
    ram_size = sum(r.size for r in ram.regions)
    request(
        serving.control,
        {"command": "set-target", "device": "vm", "target_bytes": ram_size - 32 * MiB},
    )
    before = device(serving.status())
    assert before["connected"] and before["counters"]["reports"] == 1  # type: ignore[index]

    result = serving.reload()
    assert result.returncode == 0, result.stderr + serving.log()[-3000:]
    assert "reloaded in" in result.stdout and "1 connected" in result.stdout, result.stdout
    after = serving.status()
    assert after["pid"] == pid and after["reloads"] == 1
    carried = device(after)
    assert carried["connected"] and carried["connections"] == 1
    assert carried["target_bytes"] == ram_size - 32 * MiB
    assert carried["counters"]["reports"] == 1  # type: ignore[index]

    check_carried_on(vm, stats_head)
    assert device(serving.status())["counters"]["reports"] == 2  # type: ignore[index]
    assert serving.stop() == 0


class ConfigAsker:
    """A thread asking the backend for the config over and over, each reply checked against
    its request (a reply of another request fails it), while the test does something else;
    ``with`` starts and stops it."""

    def __init__(self, frontend: Frontend) -> None:
        self.frontend = frontend
        self.answered = 0
        self.failure: list[BaseException] = []
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._ask)

    def _ask(self) -> None:
        try:
            while not self._done.is_set():
                assert len(self.frontend.get_config()) == 16
                self.answered += 1
        except BaseException as error:  # reported by the test thread
            self.failure.append(error)

    def __enter__(self) -> ConfigAsker:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._done.set()
        self._thread.join(timeout=30)


def test_requests_and_kicks_during_a_reload_are_each_answered_once(
    serving: Serving, vm: Guest
) -> None:
    """A frontend that keeps asking for its config and a guest that keeps reporting while
    the daemon reloads: every request gets exactly its own reply, in order, and every
    report comes back exactly once."""
    frontend = vm.frontend
    reports = vm.rings["reporting"]
    with ConfigAsker(frontend) as asker:
        reloader = subprocess.Popen(
            [*BALLOOND, "reload", "--control", serving.control],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        heads: list[int] = []
        used: list[tuple[int, int]] = []
        # Reports posted before, during and after the hand-off, one at a time as Linux does.
        while reloader.poll() is None or len(heads) < 20:
            head = reports.add_chain([(24 * MiB + (len(heads) % 4) * HUGE, HUGE)], writable=True)
            heads.append(head)
            reports.notify()
            used += reports.wait_used(1, timeout=20.0)
        _, err = reloader.communicate(timeout=30)
        assert reloader.returncode == 0, err + serving.log()[-3000:]
    assert not asker.failure, asker.failure
    assert asker.answered > 0
    assert [head for head, _ in used] == heads, "each report back exactly once, in order"
    time.sleep(0.2)
    assert reports.used_idx() == len(heads), "no report came back twice"
    assert still_connected(frontend)
    status = device(serving.status())
    assert status["counters"]["reports"] == len(heads)  # type: ignore[index]
    assert serving.stop() == 0


def test_idle_devices_keep_their_sockets_across_reloads(serving: Serving, tmp_path: Path) -> None:
    """A device no VM has connected to yet: after two reloads its socket still takes a VM,
    and a socket file the daemon created is still removed when it stops."""
    for count in (1, 2):
        result = serving.reload()
        assert result.returncode == 0, result.stderr + serving.log()[-3000:]
        assert serving.status()["reloads"] == count
    ram = GuestRam(64 * MiB, 64 * MiB)
    frontend = Frontend(str(tmp_path / "spare.sock"))
    try:
        guest = Guest(frontend, ram)
        guest.start()
        fill(ram, 8 * MiB, HUGE, 4)
        blocks = ram.blocks()
        guest.report([(8 * MiB, HUGE)])
        assert blocks - ram.blocks() >= HUGE
        assert device(serving.status(), "spare")["connected"]
    finally:
        frontend.close()
        ram.close()
    assert serving.stop() == 0
    assert not (tmp_path / "spare.sock").exists()
    assert not (tmp_path / "vm.sock").exists()


def test_a_reload_in_the_middle_of_the_handshake(serving: Serving, tmp_path: Path) -> None:
    """Features, protocol features, the memory table and a backend channel set up; then a
    reload; then the rings: the new image knows everything the old one was told."""
    ram = GuestRam(64 * MiB, 64 * MiB)
    frontend = Frontend(str(tmp_path / "vm.sock"))
    try:
        guest = Guest(frontend, ram)  # negotiated: protocol features, owner, backend channel
        frontend.call(Request.SET_FEATURES, guest.features | (1 << 30))
        frontend.set_mem_table(ram)
        result = serving.reload()
        assert result.returncode == 0, result.stderr + serving.log()[-3000:]
        for ring in guest.rings.values():
            frontend.start_ring(ring)
        fill(ram, 8 * MiB, HUGE, 5)
        blocks = ram.blocks()
        guest.report([(8 * MiB, HUGE)])
        assert blocks - ram.blocks() >= HUGE
        assert still_connected(frontend)
    finally:
        frontend.close()
        ram.close()
    assert serving.stop() == 0


def test_a_device_that_connects_to_qemu_is_carried_over(tmp_path: Path) -> None:
    """``--connect``: balloond connected to a QEMU that listens; after a reload the same
    connection serves on, and the path is still the device's."""
    qemu = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    qemu_path = tmp_path / "qemu.sock"
    qemu.bind(str(qemu_path))
    qemu.listen(1)
    control = str(tmp_path / "control.sock")
    log = tmp_path / "balloond.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen(
            [*BALLOOND, "serve", "--connect", f"vm={qemu_path}", "--control-socket", control],
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    ram = GuestRam(64 * MiB, 64 * MiB)
    try:
        qemu.settimeout(20)
        conn, _ = qemu.accept()
        frontend = Frontend.over(conn)
        guest = Guest(frontend, ram)
        guest.start()
        reloaded = subprocess.run(
            [*BALLOOND, "reload", "--control", control], capture_output=True, text=True, timeout=60
        )
        assert reloaded.returncode == 0, reloaded.stderr + log.read_text()[-3000:]
        fill(ram, 8 * MiB, HUGE, 6)
        blocks = ram.blocks()
        guest.report([(8 * MiB, HUGE)])
        assert blocks - ram.blocks() >= HUGE
        status = request(control, {"command": "status", "device": "vm"})
        assert status["connected"] and status["mode"] == "connect", status
        frontend.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()[-3000:]
        qemu.close()
        ram.close()


def test_sighup_reloads_too(serving: Serving) -> None:
    pid = serving.process.pid
    os.kill(pid, signal.SIGHUP)
    deadline = time.monotonic() + 30
    while True:
        with contextlib.suppress(BalloondError):  # the new image is not listening yet
            if serving.status()["reloads"] == 1:
                break
        assert time.monotonic() < deadline, serving.log()[-3000:]
        time.sleep(0.05)
    assert serving.status()["pid"] == pid
    assert json.loads(json.dumps(serving.status()))["reload_error"] is None
    assert serving.stop() == 0


def test_a_daemon_going_away_mid_request_is_an_operator_error(tmp_path: Path) -> None:
    """What a client meets while the daemon execs (a reload): its connection was accepted
    by the old image and closes with the request unread, which the kernel answers with a
    reset. The client says the daemon closed the connection (``balloond reload`` then asks
    again) instead of failing on ConnectionResetError."""
    path = str(tmp_path / "control.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def accept_and_drop() -> None:
        conn, _ = listener.accept()
        time.sleep(0.2)  # the request arrives, unread
        conn.close()

    dropper = threading.Thread(target=accept_and_drop)
    dropper.start()
    try:
        with pytest.raises(BalloondError, match="closed the connection"):
            request(path, {"command": "status"}, timeout=5)
    finally:
        dropper.join()
        listener.close()


def test_a_device_on_a_passed_fd_keeps_its_socket_across_a_reload(tmp_path: Path) -> None:
    """``serve --fd N``: the new image is started with the same command line, so it is told
    about fd N again; that fd is the listener the record carries, and it stays open."""
    path = tmp_path / "vm.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)
    control = str(tmp_path / "control.sock")
    log = tmp_path / "balloond.log"
    with open(log, "w") as out:
        daemon = subprocess.Popen(
            [*BALLOOND, "serve", "--fd", str(listener.fileno()), "--control-socket", control],
            pass_fds=[listener.fileno()],
            stderr=out,
            stdin=subprocess.DEVNULL,
        )
    listener.close()
    ram = GuestRam(64 * MiB, 64 * MiB)
    try:
        deadline = time.monotonic() + 20
        while not os.path.exists(control):
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        for _ in range(2):
            reloaded = subprocess.run(
                [*BALLOOND, "reload", "--control", control],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert reloaded.returncode == 0, reloaded.stderr + log.read_text()[-3000:]
        frontend = Frontend(str(path), timeout=15)
        guest = Guest(frontend, ram)
        guest.start()
        fill(ram, 8 * MiB, HUGE, 7)
        blocks = ram.blocks()
        guest.report([(8 * MiB, HUGE)])
        assert blocks - ram.blocks() >= HUGE
        frontend.close()
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=20) == 0, log.read_text()[-3000:]
        ram.close()
