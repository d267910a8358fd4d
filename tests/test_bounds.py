"""What one guest can cost the daemon is bounded, whatever it writes into its rings: checked
on a real ``balloond serve`` process (its own memory, measured from /proc)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from balloond.balloon import STAT_ENTRY
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
    process = subprocess.Popen(
        [sys.executable, "-m", "balloond", "serve", "--socket-path", str(socket),
         "--control-socket", str(control)],
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert process.stderr is not None
    for line in process.stderr:
        if "control on" in line:
            break
    else:
        raise AssertionError(f"balloond exited {process.wait()}")
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
