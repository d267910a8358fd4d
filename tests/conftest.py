"""Fixtures: a real daemon on a real Unix socket, and simulated guests talking to it."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from balloond.balloon import Balloon, BalloonOptions
from balloond.discard import Discarder, RangeDiscarder
from balloond.server import DeviceServer, listen
from tests.frontend import Frontend, Guest, GuestRam


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
