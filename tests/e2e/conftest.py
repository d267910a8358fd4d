"""Fixtures for the end-to-end tests: the kit (built when absent or stale) and booted guests.

Every test here boots a real Linux guest under the kit's QEMU. When the kit cannot be built
the tests fail: they never skip.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from balloond.control import request  # noqa: E402
from kit import Kit, KitError, build, devices  # noqa: E402
from kit.guest import Guest, GuestConfig, die_with_parent  # noqa: E402
from kit.hostmem import Timeline  # noqa: E402

_TIMELINES = pytest.StashKey[dict[str, Timeline]]()
#: The guests a test booted, so that the balloond fixture can stop them before the daemon.
_GUESTS = pytest.StashKey[list[Guest]]()

BootGuest = Callable[..., Guest]
RecordTimeline = Callable[[str, Timeline], Path]


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "e2e: boots a real QEMU guest (slow)")
    config.addinivalue_line("markers", "soak: a long soak (minutes); runs only with -m soak")
    config.addinivalue_line("markers", "crashloop: kill loops on real guests; -m crashloop")
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
def boot_guest(
    guest_kit: Kit, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[BootGuest]:
    """A factory booting guests: ``boot_guest(device_args=[...], **GuestConfig fields)``.

    Each guest's console log, QEMU stderr and command line go to ``tmp_path/<name>``; every
    guest is stopped (QMP quit, then SIGKILL) when the test ends.
    """
    guests = request.node.stash.setdefault(_GUESTS, [])

    def boot(device_args: Sequence[str] = (), name: str = "guest", **config: Any) -> Guest:
        workdir = tmp_path / f"{name}{len(guests) or ''}"
        guest = Guest(guest_kit, workdir, GuestConfig(device_args=tuple(device_args), **config))
        guests.append(guest)
        guest.start()
        return guest

    yield boot
    close_guests(guests)


def close_guests(guests: list[Guest]) -> None:
    """Stop every guest (closing one twice is harmless)."""
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


class Balloond:
    """A ``balloond serve`` process (``python -m balloond``) with its debug log in a file."""

    def __init__(self, socket_path: Path, log_path: Path, runner: Sequence[str] = ()) -> None:
        self.socket_path = socket_path
        #: A command that runs the daemon (for example ``setpriv`` dropping privileges).
        self.runner = tuple(runner)
        #: The daemon's control socket, next to the VM's socket.
        self.control_path = socket_path.with_name("control.sock")
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, *extra: str, timeout: float = 15.0) -> None:
        argv = [
            *self.runner, sys.executable, "-m", "balloond", "serve",
            "--socket-path", str(self.socket_path), "--control-socket", str(self.control_path),
            "--log-level", "debug", *extra,
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, preexec_fn=die_with_parent
            )
        deadline = time.monotonic() + timeout
        while not (self.socket_path.exists() and self.control_path.exists()):
            if self.process.poll() is not None:
                raise RuntimeError(f"balloond exited {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"balloond did not listen within {timeout:.0f} s:\n{self.log()}")
            time.sleep(0.05)

    def device_args(self) -> tuple[str, ...]:
        """QEMU arguments for a guest whose balloon balloond serves."""
        return devices.vhost_user_balloon(self.socket_path)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> str:
        """The log's messages, one per line (balloond logs JSON lines to a file)."""
        lines = []
        for line in self.log().splitlines():
            try:
                lines.append(str(json.loads(line)["event"]))
            except (ValueError, KeyError, TypeError):
                lines.append(line)
        return "\n".join(lines)

    def command(self, *args: str, timeout: float = 30.0) -> str:
        """Run ``balloond ARGS... SOCKET``-style client commands; return their output."""
        argv = [sys.executable, "-m", "balloond", *args]
        env = dict(os.environ, BALLOOND_CONTROL=str(self.control_path))
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {done.returncode}: {done.stderr}")
        return done.stdout

    def status(self) -> dict[str, Any]:
        """``balloond status SOCKET --json``, parsed."""
        answer: dict[str, Any] = json.loads(self.command("status", str(self.socket_path), "--json"))
        return answer

    def query(self) -> dict[str, Any]:
        """The device's status from the control socket, in this process: what
        :meth:`status` prints, without starting a client (a poll's pace stays its own)."""
        answer: dict[str, Any] = request(
            str(self.control_path), {"command": "status", "device": str(self.socket_path)}
        )
        return answer

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; returns the exit status."""
        process = self.process
        if process is None:
            return 0
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode


@pytest.fixture
def balloond(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Balloond]:
    """A running ``balloond serve`` for this test, listening before any guest boots.

    Its debug log is ``tmp_path/balloond.log``. At the end of the test the test's guests are
    stopped first (a guest whose backend vanished cannot power off), then balloond gets
    SIGTERM and must exit 0.
    """
    # A short directory: a Unix socket path (plus ".ctl") must fit in 108 bytes.
    sockets = Path(tempfile.mkdtemp(prefix="balloond-e2e-"))
    daemon = Balloond(sockets / "vm.sock", tmp_path / "balloond.log")
    try:
        daemon.start()
        yield daemon
    finally:
        close_guests(request.node.stash.get(_GUESTS, []))
        status = daemon.stop()
        leftovers = sorted(os.listdir(sockets))
        shutil.rmtree(sockets, ignore_errors=True)
    if status != 0:
        tail = "\n".join(daemon.log().splitlines()[-30:])
        pytest.fail(f"balloond exited {status} on SIGTERM; log ends:\n{tail}", pytrace=False)
    assert not leftovers, f"balloond left its sockets behind: {leftovers}"
