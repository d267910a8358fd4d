"""Fixtures: a real daemon on a real Unix socket, and simulated guests talking to it."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from balloond.balloon import Balloon, BalloonOptions
from balloond.discard import Discarder, DiscardRange, DiscardResult, RangeDiscarder
from balloond.memory import GuestMemory
from balloond.server import DeviceServer, listen
from tests.frontend import Frontend, Guest, GuestRam, MiB, Ring

HUGE = 2 * MiB


def start_balloond(*args: str, **popen: Any) -> subprocess.Popen[str]:
    """``balloond serve ARGS`` as a process, returned once it serves (its "control on" log
    line, the last at start); its stderr stays readable through ``process.stderr``."""
    process = subprocess.Popen(
        [sys.executable, "-m", "balloond", "serve", *args],
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    assert process.stderr is not None
    for line in process.stderr:
        if "control on" in line:
            return process
    raise AssertionError(f"balloond exited {process.wait()} before serving")


class Daemon:
    """A DeviceServer on its own event loop thread, as ``balloond serve`` runs it."""

    def __init__(
        self, path: Path, discarder: RangeDiscarder, options: BalloonOptions | None = None
    ) -> None:
        self.path = str(path)
        self.devices: list[Balloon] = []

        def factory() -> Balloon:
            device = Balloon(options)
            self.devices.append(device)
            return device

        self.server = DeviceServer(listen(self.path), factory, discarder)
        self.loop = asyncio.new_event_loop()
        self._stop = asyncio.Event()
        self._thread = threading.Thread(target=self._run, name="daemon", daemon=True)

    def _run(self) -> None:
        self.loop.run_until_complete(self._main())
        self.loop.close()

    async def _main(self) -> None:
        serving = asyncio.create_task(self.server.serve())
        await self._stop.wait()
        serving.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await serving

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if not self._thread.is_alive():
            return  # stopped already
        self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        assert not self._thread.is_alive(), "daemon did not stop"
        self.server.listener.close()

    @property
    def device(self) -> Balloon:
        return self.devices[-1]

    def run(self, function: Callable[[], object]) -> object:
        """Run ``function`` on the daemon's loop thread (to read state consistently)."""

        async def call() -> object:
            return function()

        return asyncio.run_coroutine_threadsafe(call(), self.loop).result(timeout=10)


@pytest.fixture
def make_daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    daemons: list[Daemon] = []

    def make(
        discarder: RangeDiscarder | None = None, options: BalloonOptions | None = None
    ) -> Daemon:
        daemon = Daemon(tmp_path / f"vm{len(daemons)}.sock", discarder or Discarder(), options)
        daemon.start()
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        daemon.stop()


@pytest.fixture
def daemon(make_daemon: Callable[..., Daemon]) -> Daemon:
    return make_daemon()


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    memory = GuestRam()
    yield memory
    memory.close()


@pytest.fixture
def frontend(daemon: Daemon) -> Iterator[Frontend]:
    connection = Frontend(daemon.path)
    yield connection
    connection.close()


@pytest.fixture
def guest(frontend: Frontend, ram: GuestRam) -> Iterator[Guest]:
    driver = Guest(frontend, ram)
    driver.start()
    yield driver
    driver.close()


class GatedDiscarder:
    """The real discarder, held at a gate: a discard that takes as long as the test wants."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.real = Discarder()

    def discard(self, ranges: Sequence[DiscardRange]) -> DiscardResult:
        self.entered.set()
        assert self.gate.wait(10), "test never opened the gate"
        return self.real.discard(ranges)


@dataclass
class InFlight:
    """A report whose discard is held at the gate in the daemon's worker thread."""

    discarder: GatedDiscarder
    frontend: Frontend
    ring: Ring
    head: int
    daemon: Daemon


@pytest.fixture
def report_in_flight(make_daemon: Callable[..., Daemon], ram: GuestRam) -> Iterator[InFlight]:
    discarder = GatedDiscarder()
    daemon = make_daemon(discarder)
    frontend = Frontend(daemon.path)
    guest = Guest(frontend, ram)
    guest.start()
    ram.write(16 * MiB, b"\x08" * HUGE)
    ring = guest.rings["reporting"]
    head = ring.add_chain([(16 * MiB, HUGE)], writable=True)
    ring.notify()
    assert discarder.entered.wait(5)
    yield InFlight(discarder, frontend, ring, head, daemon)
    discarder.gate.set()  # never leave the worker thread waiting, also when a test failed
    guest.close()
    frontend.close()


@pytest.fixture(scope="module")
def small_ram() -> Iterator[tuple[GuestRam, GuestMemory]]:
    """2 MiB of guest RAM (1 MiB at gpa 0, 1 MiB at 4 GiB) and the daemon's map of it, shared
    by a module's tests (ring and walk tests write what they need into it)."""
    ram = GuestRam(low=1 * MiB, high=1 * MiB)
    memory = GuestMemory()
    memory.replace([(r.spec, os.dup(r.fd)) for r in ram.regions])
    yield ram, memory
    memory.close()
    ram.close()
