"""Does uvloop earn its place? The daemon on asyncio's loop and on uvloop's, alternated.

    python -m bench.loops                 # 6 repeats (BENCH_REPEATS=N or --repeats N), 2-3 min
    python -m bench.loops --smoke         # seconds: checks the probe runs

Not a section of ``make bench``: a probe for one question (issue 11: "a faster event loop such
as uvloop if it earns its place"), written down in bench/FINDINGS.md. It needs uvloop in the
virtualenv (``pip install uvloop``); the daemon itself never imports it, the probe starts
``balloond serve`` with uvloop's loop policy set (``bench.proc.Daemon(loop="uvloop")``) and
checks in ``/proc/PID/maps`` that uvloop's loop is the one loaded.

Each repeat has two parts, with the simulated guest of ``tests/frontend.py``:

- three ``--no-discard`` daemons at once, on asyncio, on asyncio again (an A/A control: the
  ratio of the two asyncio daemons is the noise of the machine) and on uvloop, served in
  blocks, the daemons in turn (10 blocks, the order rotated from block to block). Per block and
  daemon: kick to used for 100 1-entry direct and 100 32-entry indirect reports (as
  ``--only overhead``); 200 GET_CONFIG round trips back to back, with the daemon's CPU over
  them (schedstat of every thread); 100 deflate cycles as a Linux guest makes them per
  256-frame buffer (GET_CONFIG, the buffer to used, SET_CONFIG of ``actual``), wall time and
  daemon CPU;
- a discarding daemon with two devices, on each loop in turn (the order alternates from
  repeat to repeat): 1,000 inflate cycles (the same, on the inflate queue, 256 frames freed per
  buffer), then GET_CONFIG while device a frees 1 GiB of 2 MiB reports, asked on a's own
  connection and on b's (as ``--only config``).

Printed: per repeat each figure per daemon and its ratio to the first asyncio daemon, then
those ratios' median (min-max) over the repeats, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import time
from pathlib import Path

from bench.overhead import _config_rtt, _connect
from bench.proc import Daemon, cpu_seconds
from bench.stats import Spread, percentile, ratios
from tests.frontend import GiB, Guest, GuestRam, MiB

HUGE = 2 * MiB
HIGH = 4 * GiB
LOOPS = ("asyncio", "uvloop")
#: The interleaved part runs asyncio twice: "asyncio A/A" against "asyncio" is the noise.
SIDES = ("asyncio", "asyncio A/A", "uvloop")


def _loop(side: str) -> str:
    return side.split()[0]


def _loaded(pid: int) -> str:
    """Which event loop the daemon runs: uvloop's extension is mapped only if it was imported."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    return "uvloop" if "uvloop/loop." in maps else "asyncio"


def _frames(ram: GuestRam, first: int) -> int:
    """A 256-frame page-number list (1 KiB) in guest RAM, frames first..first+255."""
    gpa = ram.alloc(1024, 16)
    ram.write(gpa, struct.pack("<256I", *range(first, first + 256)))
    return gpa


def _cycles(daemon: Daemon, guest: Guest, queue: str, list_gpa: int, count: int,
            actual: int) -> tuple[float, float]:  # fmt: skip
    """``count`` cycles of GET_CONFIG, a buffer on ``queue``, SET_CONFIG: (wall, CPU) each."""
    ring, frontend = guest.rings[queue], guest.frontend
    cpu, wall = cpu_seconds(daemon.pid), time.perf_counter()
    for _ in range(count):
        frontend.get_config()
        ring.add_chain([(list_gpa, 1024)], writable=False)
        ring.notify()
        ring.wait_used(1)
        frontend.set_config(struct.pack("<I", actual), offset=4)
    wall = time.perf_counter() - wall
    return wall / count, (cpu_seconds(daemon.pid) - cpu) / count


def _kick_to_used(guest: Guest, entries: int, indirect: bool, count: int) -> list[float]:
    ring = guest.rings["reporting"]
    buffers = [(HIGH + k * HUGE, HUGE) for k in range(entries)]
    seconds = []
    for _ in range(count):
        ring.add_chain(buffers, writable=True, indirect=indirect)
        start = time.perf_counter()
        ring.notify()
        ring.wait_used(1)
        seconds.append(time.perf_counter() - start)
        if guest.ram.alloc(0) > 48 * MiB:  # indirect tables are never reused: start over
            guest.ram._next_free = 16 * MiB
    return seconds


def _quiet_side(smoke: bool) -> dict[str, dict[str, float]]:
    """Kick to used, idle config and deflate cycles on three ``--no-discard`` daemons at once
    (asyncio, asyncio again as an A/A control, uvloop), in blocks, the daemons in turn."""
    blocks, n = (2, 25) if smoke else (10, 100)
    rams = {side: GuestRam(low=64 * MiB, high=64 * MiB) for side in SIDES}
    daemons = {side: Daemon(["vm"], "--no-discard", loop=_loop(side)) for side in SIDES}
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
    cpu: dict[str, dict[str, float]] = {side: {"config": 0.0, "deflate": 0.0} for side in SIDES}
    walls: dict[str, float] = dict.fromkeys(SIDES, 0.0)
    connections = {}
    try:
        for side in SIDES:
            if _loaded(daemons[side].pid) != _loop(side):
                raise RuntimeError(f"the daemon does not run {_loop(side)}")
            connections[side] = _connect(daemons[side], "vm", rams[side])
            _kick_to_used(connections[side][1], 1, False, n)  # warm up
        lists = {side: _frames(rams[side], 1 << 12) for side in SIDES}  # inside low RAM
        for block in range(blocks):
            order = SIDES[block % len(SIDES) :] + SIDES[: block % len(SIDES)]
            for side in order:
                daemon, (frontend, guest) = daemons[side], connections[side]
                got = samples[side]
                for label, entries, indirect in (("1", 1, False), ("32", 32, True)):
                    got.setdefault(f"kick {label}", []).extend(
                        _kick_to_used(guest, entries, indirect, n))  # fmt: skip
                before = cpu_seconds(daemon.pid)
                got.setdefault("config", []).extend(_config_rtt(frontend) for _ in range(2 * n))
                cpu[side]["config"] += cpu_seconds(daemon.pid) - before
                before = cpu_seconds(daemon.pid)
                wall, _ = _cycles(daemon, guest, "deflate", lists[side], n, 0)
                cpu[side]["deflate"] += cpu_seconds(daemon.pid) - before
                walls[side] += wall * n
    finally:
        for frontend, guest in connections.values():
            guest.close()
            frontend.close()
        for side in SIDES:
            daemons[side].stop()
            rams[side].close()
    out: dict[str, dict[str, float]] = {}
    for side in SIDES:
        got = samples[side]
        out[side] = {
            "kick 1-entry p50 us": percentile(got["kick 1"], 50) * 1e6,
            "kick 1-entry p99 us": percentile(got["kick 1"], 99) * 1e6,
            "kick 32-entry p50 us": percentile(got["kick 32"], 50) * 1e6,
            "kick 32-entry p99 us": percentile(got["kick 32"], 99) * 1e6,
            "config idle p50 us": percentile(got["config"], 50) * 1e6,
            "config idle p99 us": percentile(got["config"], 99) * 1e6,
            "config CPU per request us": cpu[side]["config"] / len(got["config"]) * 1e6,
            "deflate cycle wall us": walls[side] / (blocks * n) * 1e6,
            "deflate cycle CPU us": cpu[side]["deflate"] / (blocks * n) * 1e6,
        }
    return out


def _busy_side(loop: str, smoke: bool) -> dict[str, float]:
    """Inflate cycles, and GET_CONFIG while 1 GiB is freed, on a discarding daemon."""
    size = 128 * MiB if smoke else GiB
    out: dict[str, float] = {}
    ram_a = GuestRam(low=64 * MiB, high=size)
    ram_b = GuestRam(low=64 * MiB, high=0)
    with Daemon(["a", "b"], loop=loop) as daemon:
        frontend_a, guest_a = _connect(daemon, "a", ram_a)
        frontend_b, guest_b = _connect(daemon, "b", ram_b)
        try:
            if _loaded(daemon.pid) != loop:
                raise RuntimeError(f"the daemon does not run {loop}")
            frames = _frames(ram_a, HIGH >> 12)
            wall, cpu_per = _cycles(daemon, guest_a, "inflate", frames, 50 if smoke else 1000, 256)
            out["inflate cycle wall us"], out["inflate cycle CPU us"] = wall * 1e6, cpu_per * 1e6
            ring = guest_a.rings["reporting"]
            blocks = [HIGH + i * HUGE for i in range(size // HUGE)]
            chunk = b"\xa5" * (64 * MiB)
            for kind, asker in (("same", frontend_a), ("other", frontend_b)):
                for start in range(0, size, len(chunk)):  # make it resident again
                    ram_a.write(HIGH + start, chunk[: min(len(chunk), size - start)])
                chains = [blocks[i : i + 32] for i in range(0, len(blocks), 32)]
                for batch in chains:
                    ring.add_chain([(gpa, HUGE) for gpa in batch], writable=True, indirect=True)
                target = (ring.used_seen + len(chains)) & 0xFFFF
                rtts: list[float] = []
                began = time.perf_counter()
                ring.notify()
                while True:
                    rtts.append(_config_rtt(asker))
                    if ring.used_idx() == target:
                        break
                    if time.perf_counter() - began > 60:
                        raise TimeoutError("the reports are not back within 60 s")
                out[f"freeing ({kind} device) s"] = time.perf_counter() - began
                ring.wait_used(len(chains))
                out[f"config {kind} device discards p50 us"] = percentile(rtts, 50) * 1e6
                out[f"config {kind} device discards p99 us"] = percentile(rtts, 99) * 1e6
        finally:
            for guest, frontend in ((guest_a, frontend_a), (guest_b, frontend_b)):
                guest.close()
                frontend.close()
            ram_a.close()
            ram_b.close()
    return out


def _loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loops", description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int,
                        default=int(os.environ.get("BENCH_REPEATS", "0")) or None)  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 6)
    print(f"load average before: {_loadavg()}", flush=True)
    results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    for repeat in range(repeats):
        figures = _quiet_side(args.smoke)
        order = LOOPS if repeat % 2 == 0 else LOOPS[::-1]
        busy: dict[str, dict[str, float]] = {}
        for loop in order:
            busy[loop] = _busy_side(loop, args.smoke)
        figures["asyncio"].update(busy["asyncio"])
        figures["uvloop"].update(busy["uvloop"])
        figures["asyncio A/A"].update({key: math.nan for key in busy["asyncio"]})
        for side in SIDES:
            results[side].append(figures[side])
        print(f"repeat {repeat + 1} (load {_loadavg()}):", flush=True)
        for key, a in figures["asyncio"].items():
            aa, u = figures["asyncio A/A"][key], figures["uvloop"][key]
            print(f"  {key:38} asyncio {a:9.2f}  A/A {aa:9.2f}  uvloop {u:9.2f}  "
                  f"uvloop/asyncio {u / a:.2f}  A/A {aa / a:.2f}", flush=True)  # fmt: skip
    print(f"load average after: {_loadavg()}")
    print(f"ratios to asyncio over {repeats} repeats, median (min-max):")
    base = results["asyncio"]
    for key in base[0]:
        line = f"  {key:38}"
        for side in ("uvloop", "asyncio A/A"):
            values = [r[key] for r in results[side]]
            if not any(math.isnan(v) for v in values):
                line += f" {side} {ratios(values, [r[key] for r in base]).cell()}"
        for side in SIDES:
            values = [r[key] for r in results[side]]
            if not any(math.isnan(v) for v in values):
                line += f" | {side} {Spread.of(values).cell('{:.1f}')}"
        print(line)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
