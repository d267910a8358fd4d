"""What does ``--keep-state`` cost? The same daemon with it and without it, alternated.

    python -m bench.keepstate              # 6 repeats (BENCH_REPEATS=N or --repeats N), ~8 min
    python -m bench.keepstate --smoke      # seconds: checks the probe runs

Not a section of ``make bench``: a probe for one question, written down in bench/FINDINGS.md.
With ``--keep-state`` (docs/never-drop.md, sections 3-4) every request is peeked, committed
(unless it is a query), its reply staged in a pipe and spliced to the socket, and every
publication of used-ring entries is preceded by a commit: a capture of the device's record,
JSON, one ``pwrite`` to a memfd. The kept daemon runs as in production, under the keeper
(``python -m balloond.keeper -- balloond serve --keep-state``); its worker is the process
measured (its pid from the status command; the keeper's CPU is printed beside it).

Each repeat has three parts, with the simulated guest of ``tests/frontend.py``:

- three ``--no-discard`` daemons at once: plain, plain again (an A/A control: the ratio of the
  two plain daemons is the noise of the machine) and kept, served in blocks, the daemons in
  turn (10 blocks, the order rotated from block to block). Per block and daemon: kick to used
  for 100 1-entry direct and 100 32-entry indirect reports, with the daemon's CPU over each
  batch (schedstat of every thread); 200 GET_CONFIG round trips back to back, with the
  daemon's CPU; 100 deflate cycles as a Linux guest makes them per 256-frame buffer
  (GET_CONFIG, the buffer to used, SET_CONFIG of ``actual``), wall time and daemon CPU;
- three discarding daemons the same way (plain, plain A/A, kept): 100 inflate cycles (the
  same, on the inflate queue, the buffer's 256 pages written before each cycle so that each
  frees 1 MiB of resident memory), then 100 reports of one resident 2 MiB block (written
  before each), kick to used and daemon CPU;
- the kept daemon's commits: the sequence number of its state file's latest record (read
  through ``/proc/PID/fd`` from the memfd ``balloond-vm``) before and after each batch gives
  the commits per request, report and cycle, and the record's size.

Then, once per repeat, in this process: the cost of one commit of a 4-ring VM with 2 regions
(the engine of ``tests/test_record.py``: every queue used, a statistics buffer held, a job
out), through ``DeviceKeeping.commit`` as the daemon makes it, and split into ``capture``,
``encode`` and ``StateFile.commit`` (CRC-32 and ``pwrite``); a 64-byte ``pwrite`` to a memfd
for scale.

Printed: per repeat each figure per daemon, the kept daemon's ratio to the first plain one and
its difference, the A/A ratio; then those ratios' and differences' median (min-max) over the
repeats, and the load average before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from balloond.control import request
from balloond.errors import BalloondError
from balloond.statefile import StateFile
from bench.loops import _cycles, _frames, _kick_to_used, _loadavg
from bench.overhead import _config_rtt, _connect
from bench.proc import Daemon, cpu_seconds
from bench.stats import Spread, percentile, ratios
from tests.frontend import GiB, Guest, GuestRam, MiB

HUGE = 2 * MiB
HIGH = 4 * GiB
#: The interleaved parts run the plain daemon twice: "plain A/A" against "plain" is the noise.
SIDES = ("plain", "plain A/A", "kept")
NAME = "vm"
T = TypeVar("T")


class KeptDaemon(Daemon):
    """``balloond serve --keep-state`` under the keeper, as :class:`bench.proc.Daemon` runs
    ``balloond serve``: ``pid`` is the worker's (the daemon that serves), ``stop`` stops the
    keeper and the worker with it."""

    def __init__(self, names: list[str], *extra: str) -> None:
        keeper = [sys.executable, "-m", "balloond.keeper", "--restart-delay", "0.05"]
        super().__init__(names, "--keep-state", *extra, runner=[*keeper, "--burst", "1000", "--"])
        deadline = time.monotonic() + 30
        while (worker := self._worker()) is None:
            if self.process.poll() is not None:
                raise RuntimeError(f"keeper exited {self.process.returncode}: {self.log_text()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"balloond did not serve within 30 s: {self.log_text()}")
            time.sleep(0.02)
        #: The worker that serves; :meth:`check` says if the keeper had to replace it.
        self.worker = worker

    def _worker(self) -> int | None:
        if not all(p.exists() for p in self.sockets.values()):
            return None
        try:
            pid = request(str(self.control), {"command": "status"}, timeout=5.0).get("pid")
        except BalloondError:
            return None
        return pid if isinstance(pid, int) else None

    @property
    def pid(self) -> int:
        return self.worker

    @property
    def keeper_pid(self) -> int:
        return self.process.pid

    def check(self) -> None:
        """Raise unless the first worker still serves (a restart would spoil the figures)."""
        if (pid := self._worker()) != self.worker:
            raise RuntimeError(f"worker {self.worker} replaced by {pid}: {self.log_text()}")


class StateProbe:
    """A device's state file in a kept daemon, read through ``/proc/PID/fd``: the sequence
    number and size of the latest record (the commits made so far, and what each writes)."""

    def __init__(self, pid: int, device: str, suffix: str = "") -> None:
        wanted = f"/memfd:balloond-{device}{suffix}"
        for entry in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{entry}")
            except OSError:
                continue
            if target.removesuffix(" (deleted)") == wanted:
                self.fd = os.open(f"/proc/{pid}/fd/{entry}", os.O_RDONLY | os.O_CLOEXEC)
                return
        raise RuntimeError(f"no state file {wanted} in process {pid}")

    def latest(self) -> tuple[int, int]:
        """(sequence number, bytes of the record) of the latest record; the daemon is idle
        when this is read (every reply and used index waited for), so no write is torn."""
        header, size = StateFile.HEADER, os.fstat(self.fd).st_size
        offsets, slot = [0], StateFile.MIN_SLOT
        while slot < size:
            offsets.append(slot)
            slot *= 2
        best = (0, 0)
        for offset in offsets:
            raw = os.pread(self.fd, header.size, offset)
            if len(raw) == header.size:
                magic, seq, length, _ = header.unpack(raw)
                if magic == StateFile.MAGIC and seq > best[0]:
                    best = (seq, length)
        return best

    def close(self) -> None:
        os.close(self.fd)


def _start(side: str, *extra: str) -> Daemon:
    return KeptDaemon([NAME], *extra) if side == "kept" else Daemon([NAME], *extra)


class Meter:
    """Accumulates, per side and figure, the daemon's CPU seconds and (kept side) its
    commits over batches of ``units`` requests, reports or cycles."""

    def __init__(self, daemons: dict[str, Daemon],
                 probe: StateProbe, progress: StateProbe) -> None:  # fmt: skip
        self.daemons, self.probe, self.progress = daemons, probe, progress
        self.cpu: dict[str, dict[str, float]] = {side: {} for side in daemons}
        self.units: dict[str, dict[str, int]] = {side: {} for side in daemons}
        self.commits: dict[str, int] = {}
        self.progress_commits: dict[str, int] = {}

    def run(self, side: str, figure: str, units: int, batch: Callable[[], T]) -> T:
        pid = self.daemons[side].pid
        seq = self.probe.latest()[0] if side == "kept" else 0
        step = self.progress.latest()[0] if side == "kept" else 0
        before = cpu_seconds(pid)
        out = batch()
        self.cpu[side][figure] = self.cpu[side].get(figure, 0.0) + cpu_seconds(pid) - before
        self.units[side][figure] = self.units[side].get(figure, 0) + units
        if side == "kept":
            self.commits[figure] = self.commits.get(figure, 0) + self.probe.latest()[0] - seq
            steps = self.progress.latest()[0] - step
            self.progress_commits[figure] = self.progress_commits.get(figure, 0) + steps
        return out

    def per_unit_us(self, side: str, figure: str) -> float:
        return self.cpu[side][figure] / self.units[side][figure] * 1e6

    def commits_per_unit(self, figure: str) -> float:
        """Whole records committed per unit (progress documents: :meth:`progress_per_unit`)."""
        return self.commits[figure] / self.units["kept"][figure]

    def progress_per_unit(self, figure: str) -> float:
        return self.progress_commits[figure] / self.units["kept"][figure]


def _serve_in_blocks(
    discard: bool, smoke: bool, block: Callable[[str, Daemon, Guest, Meter, int], None]
) -> tuple[Meter, float, int]:
    """Three daemons (plain, plain A/A, kept) at once, ``block`` run on each in turn, the
    order rotated per block. Returns the meter, the keeper's CPU and the record's bytes."""
    blocks, n = (2, 25) if smoke else (10, 100)
    extra = () if discard else ("--no-discard",)
    rams = {side: GuestRam(low=64 * MiB, high=64 * MiB) for side in SIDES}
    daemons: dict[str, Daemon] = {}
    connections = {}
    probe = None
    try:
        for side in SIDES:
            daemons[side] = _start(side, *extra)
            connections[side] = _connect(daemons[side], NAME, rams[side])
            _kick_to_used(connections[side][1], 1, False, n)  # warm up
        kept = daemons["kept"]
        assert isinstance(kept, KeptDaemon)
        probe = StateProbe(kept.pid, NAME)
        meter = Meter(daemons, probe, StateProbe(kept.pid, NAME, "-progress"))
        keeper_cpu = cpu_seconds(kept.keeper_pid)
        for number in range(blocks):
            order = SIDES[number % len(SIDES) :] + SIDES[: number % len(SIDES)]
            for side in order:
                block(side, daemons[side], connections[side][1], meter, n)
        keeper_cpu = cpu_seconds(kept.keeper_pid) - keeper_cpu
        record_bytes = probe.latest()[1]
        kept.check()
    finally:
        if probe is not None:
            probe.close()
        for frontend, guest in connections.values():
            guest.close()
            frontend.close()
        for side, daemon in daemons.items():
            daemon.stop()
            rams[side].close()
    return meter, keeper_cpu, record_bytes


def _quiet_part(smoke: bool) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Kick to used, GET_CONFIG and deflate cycles on three ``--no-discard`` daemons."""
    samples: dict[str, dict[str, list[float]]] = {side: {} for side in SIDES}
    walls: dict[str, float] = dict.fromkeys(SIDES, 0.0)
    lists: dict[str, int] = {}

    def block(side: str, daemon: Daemon, guest: Guest, meter: Meter, n: int) -> None:
        got = samples[side]
        for label, entries, indirect in (("1", 1, False), ("32", 32, True)):

            def kicks(entries: int = entries, indirect: bool = indirect) -> list[float]:
                return _kick_to_used(guest, entries, indirect, n)

            got.setdefault(f"kick {label}", []).extend(meter.run(side, f"report {label}", n, kicks))
        rtts = meter.run(side, "config", 2 * n,
                         lambda: [_config_rtt(guest.frontend) for _ in range(2 * n)])  # fmt: skip
        got.setdefault("config", []).extend(rtts)
        if side not in lists:
            lists[side] = _frames(guest.ram, 1 << 12)  # inside low RAM
        wall, _ = meter.run(
            side, "deflate", n, lambda: _cycles(daemon, guest, "deflate", lists[side], n, 0)
        )
        walls[side] += wall * n

    meter, keeper_cpu, record_bytes = _serve_in_blocks(False, smoke, block)
    out: dict[str, dict[str, float]] = {}
    for side in SIDES:
        got = samples[side]
        out[side] = {
            "kick 1-entry p50 us": percentile(got["kick 1"], 50) * 1e6,
            "kick 1-entry p99 us": percentile(got["kick 1"], 99) * 1e6,
            "kick 32-entry p50 us": percentile(got["kick 32"], 50) * 1e6,
            "kick 32-entry p99 us": percentile(got["kick 32"], 99) * 1e6,
            "CPU per 1-entry report us (no discard)": meter.per_unit_us(side, "report 1"),
            "CPU per 32-entry report us (no discard)": meter.per_unit_us(side, "report 32"),
            "config p50 us": percentile(got["config"], 50) * 1e6,
            "config p99 us": percentile(got["config"], 99) * 1e6,
            "CPU per GET_CONFIG us": meter.per_unit_us(side, "config"),
            "deflate cycle wall us": walls[side] / meter.units[side]["deflate"] * 1e6,
            "CPU per deflate cycle us": meter.per_unit_us(side, "deflate"),
        }
    kept = {
        "records per 1-entry report": meter.commits_per_unit("report 1"),
        "progress per 1-entry report": meter.progress_per_unit("report 1"),
        "records per 32-entry report": meter.commits_per_unit("report 32"),
        "progress per 32-entry report": meter.progress_per_unit("report 32"),
        "records per GET_CONFIG": meter.commits_per_unit("config"),
        "records per deflate cycle": meter.commits_per_unit("deflate"),
        "progress per deflate cycle": meter.progress_per_unit("deflate"),
        "keeper CPU ms (no-discard part)": keeper_cpu * 1e3,
        "record bytes": float(record_bytes),
    }
    return out, kept


def _inflate_cycles(guest: Guest, list_gpa: int, count: int) -> float:
    """``count`` inflate cycles (GET_CONFIG, a 256-frame buffer, SET_CONFIG), the buffer's
    1 MiB at HIGH written before each so that the daemon frees resident memory; the wall
    time per cycle, the writes left out."""
    ring, frontend, page = guest.rings["inflate"], guest.frontend, b"\x5a" * MiB
    wall = 0.0
    for _ in range(count):
        guest.ram.write(HIGH, page)
        start = time.perf_counter()
        frontend.get_config()
        ring.add_chain([(list_gpa, 1024)], writable=False)
        ring.notify()
        ring.wait_used(1)
        frontend.set_config(struct.pack("<I", 256), offset=4)
        wall += time.perf_counter() - start
    return wall / count


def _resident_reports(guest: Guest, count: int) -> list[float]:
    """``count`` reports of one 2 MiB block (at HIGH + 2 MiB), written before each: kick to
    used of each."""
    ring, block, gpa = guest.rings["reporting"], b"\xa5" * HUGE, HIGH + HUGE
    seconds = []
    for _ in range(count):
        guest.ram.write(gpa, block)
        ring.add_chain([(gpa, HUGE)], writable=True)
        start = time.perf_counter()
        ring.notify()
        ring.wait_used(1)
        seconds.append(time.perf_counter() - start)
    return seconds


def _discard_part(smoke: bool) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """Inflate cycles and resident 2 MiB reports on three discarding daemons."""
    walls: dict[str, float] = dict.fromkeys(SIDES, 0.0)
    kicks: dict[str, list[float]] = {side: [] for side in SIDES}
    lists: dict[str, int] = {}

    def block(side: str, daemon: Daemon, guest: Guest, meter: Meter, n: int) -> None:
        if side not in lists:
            lists[side] = _frames(guest.ram, HIGH >> 12)
        wall = meter.run(side, "inflate", n, lambda: _inflate_cycles(guest, lists[side], n))
        walls[side] += wall * n
        seconds = meter.run(side, "report", n, lambda: _resident_reports(guest, n))
        kicks[side].extend(seconds)
        if guest.ram.regions[1].blocks() > MiB:  # what was written is freed again
            raise RuntimeError(f"{side}: the guest's memory was not freed")

    meter, keeper_cpu, _ = _serve_in_blocks(True, smoke, block)
    out: dict[str, dict[str, float]] = {}
    for side in SIDES:
        out[side] = {
            "inflate cycle wall us": walls[side] / meter.units[side]["inflate"] * 1e6,
            "CPU per inflate cycle us": meter.per_unit_us(side, "inflate"),
            "2 MiB report kick p50 us (discarding)": percentile(kicks[side], 50) * 1e6,
            "CPU per 2 MiB report us (discarding)": meter.per_unit_us(side, "report"),
        }
    kept = {
        "records per inflate cycle": meter.commits_per_unit("inflate"),
        "progress per inflate cycle": meter.progress_per_unit("inflate"),
        "records per 2 MiB report (discarding)": meter.commits_per_unit("report"),
        "progress per 2 MiB report (discarding)": meter.progress_per_unit("report"),
        "keeper CPU ms (discarding part)": keeper_cpu * 1e3,
    }
    return out, kept


def commit_cost(iterations: int) -> dict[str, float]:
    """One commit of a 4-ring, 2-region VM's record, in this process: the whole of
    ``DeviceKeeping.commit`` and its parts; median microseconds over ``iterations``."""
    from balloond import record, wire
    from balloond.keeping import DeviceKeeping
    from balloond.notify import Notifier, NotifySettings
    from balloond.record import DeviceSettings, RequestDigest
    from balloond.wire import Request
    from tests.test_record import Engine  # a VM set up as QEMU does, every queue used

    engine = Engine()
    state = StateFile.create("balloond-bench")
    pipe = os.pipe2(os.O_CLOEXEC)
    floor_fd = os.memfd_create("balloond-bench-floor", os.MFD_CLOEXEC)
    options = engine.balloon.options
    settings = DeviceSettings(deflate_on_oom=options.deflate_on_oom,
                              free_page_reporting=options.free_page_reporting,
                              socket_path="/run/balloond/vm.sock", owns_socket=True)  # fmt: skip
    digest = RequestDigest.of(
        wire.encode_request(Request.SET_CONFIG, wire.ConfigSpace(4, 4, 0, bytes(4)))
    )

    def capture() -> record.DeviceRecord:  # as Service.capture makes it
        return record.capture(engine.backend, engine.balloon, NAME,
                              socket=engine.conn.fileno(), settings=settings,
                              listener=engine.listener.fileno(), last_request=digest,
                              reply_pipe=pipe, connections=1, errors={})  # fmt: skip

    class Store(Notifier):  # takes every fd: the cost of the store is the keeper's
        def store_fds(self, name: str, fds: Sequence[int], *, poll: bool = True) -> bool:
            return True

        def remove_fds(self, name: str) -> bool:
            return True

    progress = StateFile.create("balloond-bench-progress")
    keeping = DeviceKeeping(Store(NotifySettings()), NAME, state, capture, progress=progress)
    keeping.capture_progress = lambda base: record.encode_progress(
        engine.backend.state, engine.balloon.state, digest, base, clock=engine.balloon.clock
    )
    keeping.commit()  # every fd named once
    keys = dict(keeping.keys)
    times: dict[str, list[float]] = {
        k: [] for k in ("commit", "capture", "boot id", "encode", "write", "progress")
    }
    cursors = struct.Struct("<8sQ4H4H")
    clock = time.perf_counter
    try:
        for _ in range(iterations):
            t0 = clock()
            keeping.commit()
            t1 = clock()
            rec = capture()
            t2 = clock()
            record.current_boot_id()
            t3 = clock()
            data, _ = record.encode(rec, keys=lambda fd, role: keys[(fd, role)])
            t4 = clock()
            state.commit(data)
            t5 = clock()
            times["commit"].append(t1 - t0)
            times["capture"].append(t2 - t1)
            times["boot id"].append(t3 - t2)
            times["encode"].append(t4 - t3)
            times["write"].append(t5 - t4)
            t6 = clock()
            keeping.commit_progress()
            times["progress"].append(clock() - t6)
        floor = []
        for i in range(iterations):
            t0 = clock()
            os.pwrite(floor_fd, cursors.pack(b"cursors\n", i, 1, 2, 3, 4, 5, 6, 7, 8), 0)
            floor.append(clock() - t0)
        times["floor"] = floor
        size = len(data)
    finally:
        engine.close()
        for fd in (state.fd, progress.fd, floor_fd, *pipe):
            os.close(fd)
    out = {f"{k} median us": statistics.median(v) * 1e6 for k, v in times.items()}
    out["commit mean us"] = statistics.fmean(times["commit"]) * 1e6
    out["record bytes"] = float(size)
    return out


def _imported_from() -> str:
    """Where a daemon started from here imports balloond from (it must be this tree)."""
    done = subprocess.run([sys.executable, "-c", "import balloond; print(balloond.__file__)"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return done.stdout.strip()


def _summary(results: dict[str, list[dict[str, float]]]) -> None:
    base = results["plain"]
    for key in base[0]:
        plain = [r[key] for r in base]
        kept = [r[key] for r in results["kept"]]
        aa = [r[key] for r in results["plain A/A"]]
        added = Spread.of([k - p for k, p in zip(kept, plain, strict=True)])
        print(f"  {key:42} kept {ratios(kept, plain).cell()}  A/A {ratios(aa, plain).cell()}"
              f"  kept-plain {added.cell('{:+.1f}')}  | plain {Spread.of(plain).cell('{:.1f}')}"
              f"  kept {Spread.of(kept).cell('{:.1f}')}")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.keepstate", description=__doc__)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--repeats", type=int,
                        default=int(os.environ.get("BENCH_REPEATS", "0")) or None)  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.smoke else 6)
    print(f"daemons import {_imported_from()}", flush=True)
    print(f"load average before: {_loadavg()}", flush=True)
    results: dict[str, list[dict[str, float]]] = {side: [] for side in SIDES}
    commits: list[dict[str, float]] = []
    costs: list[dict[str, float]] = []
    for repeat in range(repeats):
        quiet, quiet_kept = _quiet_part(args.smoke)
        busy, busy_kept = _discard_part(args.smoke)
        for side in SIDES:
            results[side].append({**quiet[side], **busy[side]})
        commits.append({**quiet_kept, **busy_kept})
        costs.append(commit_cost(200 if args.smoke else 2000))
        print(f"repeat {repeat + 1} (load {_loadavg()}):", flush=True)
        figures = {side: results[side][-1] for side in SIDES}
        for key, p in figures["plain"].items():
            aa, k = figures["plain A/A"][key], figures["kept"][key]
            print(f"  {key:42} plain {p:8.1f}  A/A {aa:8.1f}  kept {k:8.1f}  kept/plain "
                  f"{k / p:.2f} ({k - p:+.1f})  A/A {aa / p:.2f}", flush=True)  # fmt: skip
        for key, value in commits[-1].items():
            print(f"  kept: {key:40} {value:.2f}", flush=True)
        for key, value in costs[-1].items():
            print(f"  one commit, in this process: {key:27} {value:.1f}", flush=True)
    print(f"load average after: {_loadavg()}")
    print(f"ratios to plain over {repeats} repeats, median (min-max):")
    _summary(results)
    print("the kept daemon, median (min-max):")
    for key in commits[0]:
        print(f"  {key:42} {Spread.of([c[key] for c in commits]).cell()}")
    print("one commit in this process (4 rings, 2 regions), median (min-max) over repeats:")
    for key in costs[0]:
        print(f"  {key:42} {Spread.of([c[key] for c in costs]).cell('{:.1f}')}")
    if args.json:
        args.json.write_text(json.dumps({"results": results, "commits": commits,
                                         "commit_cost": costs}, indent=1))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
