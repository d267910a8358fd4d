"""Where a kick's time goes, across the two processes: the simulated guest's and the daemon's.

Kick to used is measured on the guest's side; this splits it with timestamps taken in both
processes on CLOCK_MONOTONIC, one clock for the whole system:

1. the kick eventfd written (the guest) -> the daemon's ``epoll_wait`` returns with it (the
   kernel's wake-up of the daemon, and the selector's return through Python);
2. -> the kick's reader callback starts (asyncio's dispatch);
3. -> the callback signals (``Connection._signal``): the eventfd read, the engine's turn,
   the chain's completion: balloond's own Python;
4. -> the guest has seen the used index (``signals()``, the call eventfd written, the
   guest's wake-up and its reading of the used ring).

The daemon is ``balloond serve`` as the benchmarks start it, with this module as its runner
(``python -m bench.kicktrace python -m balloond serve ...``): it wraps those three methods,
runs the daemon's own ``main``, and at exit writes what it took to ``$BALLOOND_KICKTRACE``.
"""

from __future__ import annotations

import atexit
import bisect
import itertools
import json
import os
import selectors
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.proc import Daemon
from tests.frontend import Frontend, GiB, Guest, GuestRam, MiB

OUT = "BALLOOND_KICKTRACE"
STEPS = (
    "kick written -> daemon's epoll returns",
    "-> kick callback starts",
    "-> callback signals (balloond's turn)",
    "-> guest has seen the used index",
)


def _now() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def _time_calls(owner: Any, name: str, times: list[int]) -> None:
    """Record the time each call of ``owner.name`` starts."""
    inner = getattr(owner, name)

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        times.append(_now())
        return inner(self, *args, **kwargs)

    setattr(owner, name, timed)


def _time_events(owner: Any, name: str, times: list[int]) -> None:
    """Record the time each call of ``owner.name`` returns something (a selector's events)."""
    inner = getattr(owner, name)

    def timed(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = inner(self, *args, **kwargs)
        if result:
            times.append(_now())
        return result

    setattr(owner, name, timed)


def _daemon_main(argv: list[str]) -> int:
    """Run ``balloond serve`` (``argv``: its command line, from ``serve`` on) timed."""
    from balloond import server
    from balloond.cli import main

    times: dict[str, list[int]] = {"wakes": [], "kicks": [], "signals": []}
    _time_events(selectors.EpollSelector, "select", times["wakes"])
    _time_calls(server.Connection, "_on_kick", times["kicks"])
    _time_calls(server.Connection, "_signal", times["signals"])
    atexit.register(lambda: Path(os.environ[OUT]).write_text(json.dumps(times)))
    return main(argv)


def measure(samples: int, between: Callable[[], object] = lambda: None) -> dict[str, list[float]]:
    """``samples`` 1-entry reports (one 2 MiB block) through a traced ``--no-discard``
    daemon, one at a time: each step's seconds per report (the first 10% left out, warm-up).
    ``between`` runs after each report (``bench.overhead.Echo().round_trip`` puts the echo's
    round trip between them, as the overhead section's table interleaves its kinds)."""
    out = Path(tempfile.mkdtemp(prefix="balloond-kicktrace-")) / "times.json"
    os.environ[OUT] = str(out)
    ram = GuestRam(low=64 * MiB, high=64 * MiB)
    sent: list[tuple[int, int]] = []
    try:
        runner = [sys.executable, "-m", "bench.kicktrace"]
        with Daemon(["vm"], "--no-discard", runner=runner) as daemon:
            frontend = Frontend(daemon.path("vm"), timeout=30)
            guest = Guest(frontend, ram)
            try:
                guest.start()
                ring = guest.rings["reporting"]
                for _ in range(samples):
                    ring.add_chain([(4 * GiB, 2 * MiB)], writable=True)
                    start = _now()
                    ring.notify()
                    ring.wait_used(1)
                    sent.append((start, _now()))
                    between()
            finally:
                guest.close()
                frontend.close()
        times = json.loads(out.read_text())
    finally:
        del os.environ[OUT]
        ram.close()
        out.unlink(missing_ok=True)
        out.parent.rmdir()
    steps: dict[str, list[float]] = {step: [] for step in (*STEPS, "kick to used")}
    wakes, kicks, signals = times["wakes"], times["kicks"], times["signals"]
    for start, done in sent[samples // 10 :]:
        marks = [start]
        for series in (wakes, kicks, signals):  # each the first of its kind after the last
            i = bisect.bisect_left(series, marks[-1])
            if i == len(series) or series[i] > done:
                break
            marks.append(series[i])
        else:
            marks.append(done)
            for step, (a, b) in zip(STEPS, itertools.pairwise(marks), strict=True):
                steps[step].append((b - a) / 1e9)
            steps["kick to used"].append((done - start) / 1e9)
    return steps


if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(_daemon_main(args[args.index("serve") :]))
