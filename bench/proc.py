"""A ``balloond serve`` process for the benchmarks, and what /proc says about it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

#: ``balloond serve`` on uvloop's event loop instead of asyncio's (``Daemon(..., loop="uvloop")``):
#: the daemon's own ``main`` with uvloop's policy set first, for ``bench/loops.py``.
_UVLOOP_MAIN = (
    "import asyncio, sys, uvloop; asyncio.set_event_loop_policy(uvloop.EventLoopPolicy()); "
    "from balloond.cli import main; sys.exit(main())"
)


class Daemon:
    """``balloond serve`` with one socket per device name, in a temporary directory."""

    def __init__(
        self, names: list[str], *extra: str, loop: str = "asyncio", runner: Sequence[str] = ()
    ) -> None:
        """``runner``: a command the daemon's command line goes after (a keeper's)."""
        self.dir = Path(tempfile.mkdtemp(prefix="balloond-bench-"))
        self.sockets = {name: self.dir / f"{name}.sock" for name in names}
        self.control = self.dir / "control.sock"
        self.log = self.dir / "balloond.log"
        start = ["-c", _UVLOOP_MAIN] if loop == "uvloop" else ["-m", "balloond"]
        argv = [*runner, sys.executable, *start, "serve", "--control-socket", str(self.control)]
        for name, path in self.sockets.items():
            argv += ["--socket-path", f"{name}={path}"]
        argv += ["--log-level", "warning", *extra]
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + 30
        while not (self.control.exists() and all(p.exists() for p in self.sockets.values())):
            if self.process.poll() is not None:
                raise RuntimeError(f"balloond exited {self.process.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"balloond did not listen within 30 s: {self.log_text()}")
            time.sleep(0.02)

    @property
    def pid(self) -> int:
        return self.process.pid

    def path(self, name: str) -> str:
        return str(self.sockets[name])

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Daemon:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def status_field(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` field in bytes (kB fields) or as a count."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            parts = line.split()
            value = int(parts[1])
            return value * 1024 if len(parts) > 2 and parts[2] == "kB" else value
    raise KeyError(field)


def cpu_seconds(pid: int) -> float:
    """CPU time of every thread of ``pid`` so far (schedstat: nanoseconds, all threads)."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            total += int((task / "schedstat").read_text().split()[0])
        except (OSError, IndexError, ValueError):
            continue  # a thread that just ended
    return total / 1e9


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))
