"""Items 2 and 3: the daemon's overhead per report, and config latency under load.

A real ``balloond serve`` process (its own interpreter, as in production) serves simulated
guests (``tests/frontend.py``: a QEMU and a Linux driver in this process, real memfd guest
RAM, real eventfds and a real Unix socket). Latencies are taken on the guest's side:

- kick to used: from the kick eventfd write to the moment the driver sees the used index
  move (after the call eventfd, with EVENT_IDX as Linux re-arms it);
- GET_CONFIG: one request and its reply on the vhost-user socket, as QEMU sends it for each
  guest config read (the vCPU waits that long).
"""

from __future__ import annotations

import os
import select
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench import kicktrace
from bench.plot import pyplot
from bench.proc import Daemon
from bench.profile import Spy
from bench.report import Context, Section
from bench.stats import Spread, percentile
from tests.frontend import Frontend, GiB, Guest, GuestRam, MiB

HUGE = 2 * MiB
HIGH = 4 * GiB
FLOOR = "floor: asyncio eventfd echo"


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.0f}"


def _connect(daemon: Daemon, name: str, ram: GuestRam) -> tuple[Frontend, Guest]:
    frontend = Frontend(daemon.path(name), timeout=30)
    guest = Guest(frontend, ram)
    guest.start()
    return frontend, guest


# --- item 2: kick to used, discards off ------------------------------------------------------


def run_reports(ctx: Context) -> Section:
    samples = 60 if ctx.smoke else 2000
    section = Section(
        "overhead",
        "Daemon overhead per report (kick to used, discards off)",
        "python -m bench --only overhead" + (" --smoke" if ctx.smoke else ""),
    )
    ram = GuestRam(low=64 * MiB, high=64 * MiB)
    with Daemon(["vm"], "--no-discard") as daemon:
        frontend, guest = _connect(daemon, "vm", ram)
        echo = Echo()
        try:
            kinds = _kinds(guest, ram)
            kinds[FLOOR] = echo.round_trip
            latencies: dict[str, list[float]] = {label: [] for label in kinds}
            for i in range(samples + 50):  # the first 50 rounds warm up
                for label, send in kinds.items():
                    seconds = send()
                    if i >= 50:
                        latencies[label].append(seconds)
                if ram.alloc(0) > 48 * MiB:  # indirect tables are never reused: start over
                    ram._next_free = 16 * MiB
            rounds = 0
            with Spy(daemon.pid) as spy:
                until = time.monotonic() + (1 if ctx.smoke else 6)
                while time.monotonic() < until:
                    kinds["1 x 2 MiB, direct"]()
                    kinds["inflate, 256 frames"]()
                    rounds += 1
        finally:
            echo.close()
            guest.close()
            frontend.close()
            ram.close()
    rows = []
    for label, values in latencies.items():
        p50, p99 = percentile(values, 50), percentile(values, 99)
        rows.append([label, _us(p50), _us(p99), _us(min(values)),
                     "yes" if p50 <= 100e-6 else "no"])  # fmt: skip
        if "MiB" in label:
            section.target(f"kick to used, report {label}, p50 (discards off)", "<= 100 us",
                           f"{_us(p50)} us (p99 {_us(p99)} us)", p50 <= 100e-6)  # fmt: skip
    section.data = {"samples": samples, "latency_s": latencies}
    section.say(
        f"{samples} buffers of each kind, the kinds in turn, on one connection: a "
        "`balloond serve --no-discard` process, the simulated guest in this one. Free page "
        "reports of 1 or 32 blocks of 2 MiB, in direct or indirect chains; and, for the "
        "per-buffer cost of an inflate, a buffer of 256 frames (one descriptor, 1 KiB). The "
        "time includes the simulated driver's own Python (writing `used_event`, `select` on "
        "the call eventfd, reading the used index: some 10-20 us). With `--no-discard` the "
        "daemon makes no native call, so it completes every chain on its loop's thread; a "
        "discarding daemon hands a job over 4 MiB (a 32-entry report) to its discard thread, "
        "two thread wake-ups more, beside the 8-20 ms the kernel then takes to free 64 MiB. "
        "The last row is a floor, "
        "measured in turn with the others: another Python process whose asyncio loop only "
        "answers the kick eventfd on the call eventfd (one loop wake-up, two eventfd calls)."
    )
    section.table(["buffer", "p50 us", "p99 us", "min us", "p50 <= 100 us"], rows)
    section.plot(_cdf(ctx, latencies))
    section.lines.append("### Where kick to used goes, across the two processes")
    section.lines.append("")
    traced = kicktrace.measure(samples)
    section.data["kick_trace_s"] = traced
    section.say(
        f"{samples} 1-entry reports, one at a time, through another `--no-discard` daemon "
        "whose loop takes timestamps (`bench/kicktrace.py`: CLOCK_MONOTONIC in both "
        "processes; the first tenth left out). The daemon's own Python is the third step; "
        "the others are the kernel's wake-ups, asyncio's dispatch and the simulated driver."
    )
    section.table(
        ["step", "p50 us", "p90 us"],
        [[step, _us(percentile(values, 50)), _us(percentile(values, 90))]
         for step, values in traced.items() if values],
    )  # fmt: skip
    section.lines.append("### Where the daemon's time goes per buffer")
    section.lines.append("")
    section.say(*spy.summary(
        f"{rounds} rounds of a 1-entry report and a 256-frame inflate buffer"))  # fmt: skip
    return section


_ECHO = """
import asyncio, os, sys
kick, call = int(sys.argv[1]), int(sys.argv[2])
def echo():
    os.eventfd_read(kick)
    os.eventfd_write(call, 1)
loop = asyncio.new_event_loop()
loop.add_reader(kick, echo)
loop.run_forever()
"""


class Echo:
    """The floor under kick to used: another Python process whose asyncio loop answers a kick
    eventfd on a call eventfd and does nothing else (one loop wake-up per round trip)."""

    def __init__(self) -> None:
        self.kick = os.eventfd(0, os.EFD_NONBLOCK)
        self.call = os.eventfd(0, os.EFD_NONBLOCK)
        self.process = subprocess.Popen(
            [sys.executable, "-c", _ECHO, str(self.kick), str(self.call)],
            pass_fds=(self.kick, self.call),
        )

    def round_trip(self) -> float:
        start = time.perf_counter()
        os.eventfd_write(self.kick, 1)
        select.select([self.call], [], [], 5.0)
        os.eventfd_read(self.call)
        return time.perf_counter() - start

    def close(self) -> None:
        self.process.kill()
        self.process.wait()
        os.close(self.kick)
        os.close(self.call)


def _kinds(guest: Guest, ram: GuestRam) -> dict[str, Callable[[], float]]:
    """Label -> send one buffer of that kind and return its kick-to-used seconds."""
    reporting, inflate = guest.rings["reporting"], guest.rings["inflate"]
    frames_gpa = ram.alloc(1024, 16)
    first = HIGH >> 12
    ram.write(frames_gpa, struct.pack("<256I", *range(first, first + 256)))

    def report(entries: int, indirect: bool) -> Callable[[], float]:
        buffers = [(HIGH + k * HUGE, HUGE) for k in range(entries)]

        def send() -> float:
            reporting.add_chain(buffers, writable=True, indirect=indirect)
            start = time.perf_counter()
            reporting.notify()
            reporting.wait_used(1)
            return time.perf_counter() - start

        return send

    def inflate_buffer() -> float:
        inflate.add_chain([(frames_gpa, 1024)], writable=False)
        start = time.perf_counter()
        inflate.notify()
        inflate.wait_used(1)
        return time.perf_counter() - start

    kinds = {
        f"{entries} x 2 MiB, {'indirect' if indirect else 'direct'}": report(entries, indirect)
        for entries in (1, 32)
        for indirect in (False, True)
    }
    kinds["inflate, 256 frames"] = inflate_buffer
    return kinds


def _cdf(ctx: Context, series: dict[str, list[float]]) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, axes = plt.subplots(figsize=(7, 4))
    for label, values in series.items():
        ordered = sorted(v * 1e6 for v in values)
        axes.plot(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], label=label)
    axes.set_xscale("log")
    axes.set_xlabel("kick to used (us, log scale)")
    axes.set_ylabel("fraction of reports")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend()
    path = ctx.plot_path("report-latency.png")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


# --- item 3: GET_CONFIG under load -------------------------------------------------------


def run_config(ctx: Context) -> Section:
    size = 128 * MiB if ctx.smoke else GiB
    section = Section(
        "config",
        "Config latency under load (GET_CONFIG round trip)",
        "python -m bench --only config" + (" --smoke" if ctx.smoke else ""),
    )
    idle_count = 100 if ctx.smoke else 500
    samples: dict[str, list[float]] = {"idle": [], "same device discards": [],
                                       "other device discards": []}  # fmt: skip
    busy_seconds: list[float] = []
    ram_a = GuestRam(low=64 * MiB, high=size)
    ram_b = GuestRam(low=64 * MiB, high=0)
    with Daemon(["a", "b"]) as daemon:
        frontend_a, guest_a = _connect(daemon, "a", ram_a)
        frontend_b, guest_b = _connect(daemon, "b", ram_b)
        try:
            ring = guest_a.rings["reporting"]
            blocks = [HIGH + i * HUGE for i in range(size // HUGE)]
            chunk = b"\xa5" * (64 * MiB)
            for repeat in range(ctx.repeats):
                order = ["same device discards", "other device discards"]
                if repeat % 2:
                    order.reverse()
                for kind in order:
                    for _ in range(idle_count):
                        samples["idle"].append(_config_rtt(frontend_b))
                    for start in range(0, size, len(chunk)):  # make it resident again
                        ram_a.write(HIGH + start, chunk[: min(len(chunk), size - start)])
                    chains = [blocks[i : i + 32] for i in range(0, len(blocks), 32)]
                    for batch in chains:
                        ring.add_chain([(gpa, HUGE) for gpa in batch], writable=True,
                                       indirect=True)  # fmt: skip
                    target = (ring.used_seen + len(chains)) & 0xFFFF
                    asker = frontend_a if kind == "same device discards" else frontend_b
                    began = time.perf_counter()
                    ring.notify()
                    while True:  # one sample at least, sent while the discard starts
                        samples[kind].append(_config_rtt(asker))
                        if ring.used_idx() == target:
                            break
                        if time.perf_counter() - began > 60:
                            raise TimeoutError("the reports are not back within 60 s")
                    busy_seconds.append(time.perf_counter() - began)
                    ring.wait_used(len(chains))
                    if ram_a.regions[1].blocks() > size // 50:
                        raise RuntimeError("the reports did not free the guest's memory")
        finally:
            for guest, frontend in ((guest_a, frontend_a), (guest_b, frontend_b)):
                guest.close()
                frontend.close()
            ram_a.close()
            ram_b.close()
    rows = []
    for kind, values in samples.items():
        p99 = percentile(values, 99)
        rows.append(
            [kind, len(values), _us(percentile(values, 50)), _us(p99),
             _us(max(values)), "yes" if p99 <= 1e-3 else "no"]
        )  # fmt: skip
        if kind != "idle":
            section.target(f"GET_CONFIG round trip p99, {kind}", "<= 1 ms",
                           f"{_us(p99)} us", p99 <= 1e-3)  # fmt: skip
    section.data = {"size_bytes": size, "rtt_s": samples, "discard_seconds": busy_seconds}
    section.say(
        f"One `balloond serve` with two devices, discards on. Device a's guest reports "
        f"{size // MiB} MiB (resident: written before each repeat) as 2 MiB blocks, 32 per "
        "indirect chain, all at once; while the daemon frees it, GET_CONFIG requests are "
        "sent back to back on a's own connection, or on device b's. `idle`: b's, with "
        f"nothing to discard. {ctx.repeats} repeats of each, alternated; freeing took "
        f"{Spread.of(busy_seconds).cell('{:.2f}')} s per repeat."
    )
    section.table(["GET_CONFIG while", "samples", "p50 us", "p99 us", "max us",
                   "p99 <= 1 ms"], rows)  # fmt: skip
    return section


def _config_rtt(frontend: Frontend, clock: Callable[[], float] = time.perf_counter) -> float:
    start = clock()
    reply = frontend.get_config()
    seconds = clock() - start
    struct.unpack("<IIII", reply)
    return seconds
