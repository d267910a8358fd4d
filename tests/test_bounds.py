"""What one guest can cost the daemon is bounded, whatever it writes into its rings: checked
on a real ``balloond serve`` process (its own memory, measured from /proc)."""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloond import wire
from balloond.balloon import STAT_ENTRY
from balloond.wire import Request
from tests.conftest import start_balloond
from tests.frontend import Frontend, Guest, GuestRam, MiB


class Served:
    def __init__(self, process: subprocess.Popen[str], socket: Path, control: Path) -> None:
        self.process, self.socket, self.control = process, socket, control

    def peak_rss(self) -> int:
        """The daemon's peak resident memory (VmHWM), in bytes."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        raise AssertionError("no VmHWM")

    def status(self) -> dict[str, object]:
        done = subprocess.run(
            [sys.executable, "-m", "balloond", "status", "vm", "--json", "--control",
             str(self.control)],
            capture_output=True, text=True, timeout=30,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        answer: dict[str, object] = json.loads(done.stdout)
        return answer


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    socket, control = tmp_path / "vm.sock", tmp_path / "control.sock"
    process = start_balloond("--socket-path", str(socket), "--control-socket", str(control))
    yield Served(process, socket, control)
    process.send_signal(signal.SIGTERM)
    process.communicate(timeout=15)


def test_a_huge_stats_buffer_is_read_no_further_than_the_stats(served: Served) -> None:
    ram = GuestRam(low=64 * MiB, high=512 * MiB)
    frontend = Frontend(str(served.socket))
    guest = Guest(frontend, ram)
    guest.start()
    try:
        base = 4 * 1024 * MiB  # the high region: 512 MiB of guest RAM
        ram.write(base, STAT_ENTRY.pack(4, 12345))  # free memory, in the first entry
        before = served.peak_rss()
        ring = guest.rings["stats"]
        ring.add_chain([(base + i * 64 * MiB, 64 * MiB) for i in range(8)], writable=False)
        ring.notify()
        deadline = time.monotonic() + 10
        while (stats := served.status()["stats"]) == {}:
            assert time.monotonic() < deadline, "the guest's statistics never arrived"
            time.sleep(0.1)
        assert isinstance(stats, dict) and stats["free_bytes"] == 12345
        grown = served.peak_rss() - before
        assert grown < 32 * MiB, f"reading 16 statistics cost {grown / MiB:.0f} MiB"
    finally:
        guest.close()
        frontend.close()
        ram.close()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_guest_memory_shrunk_under_the_daemon_costs_only_that_balloon(served: Served) -> None:
    ram = GuestRam(low=64 * MiB, high=0)  # a memfd without seals: the frontend may shrink it
    frontend = Frontend(str(served.socket))
    guest = Guest(frontend, ram)
    guest.start()
    try:
        err = os.eventfd(0, os.EFD_NONBLOCK)
        ring = guest.rings["reporting"]
        frontend.call(Request.SET_VRING_ERR, wire.VringFile(ring.index, False), [err])
        os.ftruncate(ram.regions[0].fd, 0)  # the rings' memory is gone
        ring.notify()  # the daemon's next access to the ring would take SIGBUS
        ready, _, _ = select.select([err], [], [], 10)
        assert ready, "the ring is given up, its error eventfd signalled"
        os.close(err)
        assert served.process.poll() is None, "the daemon survived"
        assert frontend.u64(Request.GET_FEATURES) & (1 << 32)
        assert served.status()["connected"] is True
    finally:
        guest.close()
        frontend.close()
        ram.close()


def test_a_region_that_cannot_be_mapped_leaves_no_fd_behind(served: Served) -> None:
    ram = GuestRam(low=16 * MiB, high=0)
    try:
        frontend = Frontend(str(served.socket))
        frontend.u64(Request.GET_FEATURES)
        before = open_fds(served.process.pid)
        region = ram.regions[0]
        for offset in (1 << 63, 1 << 40):  # past any file offset; past this file's end
            bad = wire.MemoryRegion(0, region.size, region.uaddr, offset)
            frontend.send(Request.SET_MEM_TABLE, wire.MemoryTable((bad,)), [region.fd])
            assert frontend.closed_by_backend(), "a region it cannot map is the frontend's fault"
            frontend.close()
            frontend = Frontend(str(served.socket))
            frontend.u64(Request.GET_FEATURES)
            assert open_fds(served.process.pid) == before, "the region's fd was not closed"
        frontend.close()
    finally:
        ram.close()


LIMIT = 24  # the daemon's whole fd table in the next test: its own fds take about half


def test_fds_lost_to_our_own_fd_limit_are_not_blamed_on_the_frontend(tmp_path: Path) -> None:
    socket_path, control = tmp_path / "vm.sock", tmp_path / "control.sock"

    def small_fd_table() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (LIMIT, LIMIT))

    process = start_balloond(
        "--socket-path", str(socket_path), "--control-socket", str(control),
        preexec_fn=small_fd_table,
    )  # fmt: skip
    served = Served(process, socket_path, control)
    clients: list[socket.socket] = []
    ram = GuestRam(low=16 * MiB, high=0)
    try:
        frontend = Frontend(str(socket_path))
        frontend.u64(Request.GET_FEATURES)
        for _ in range(LIMIT):  # idle control clients fill the daemon's fd table
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.connect(str(control))
            clients.append(client)
            time.sleep(0.02)
            if open_fds(process.pid) >= LIMIT:
                break
        assert open_fds(process.pid) >= LIMIT, "the daemon's fd table never filled up"
        frontend.send(
            Request.SET_MEM_TABLE,
            wire.MemoryTable(tuple(r.spec for r in ram.regions)),
            [r.fd for r in ram.regions],
        )
        assert frontend.closed_by_backend(), "the message lost its fds: the connection ends"
        for client in clients:
            client.close()
        clients.clear()
        deadline = time.monotonic() + 10
        while (errors := served.status()["errors"]) == {}:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        assert errors == {"host": 1}, "the daemon's own fd limit, not a protocol breach"
        frontend.close()
    finally:
        for client in clients:
            client.close()
        ram.close()
        process.send_signal(signal.SIGTERM)
        process.communicate(timeout=15)
