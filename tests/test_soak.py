"""Soak: a real ``balloond serve`` process under tens of thousands of free page reports,
inflates, deflates, statistics refreshes, config reads, target changes and VM pauses, some
of the chains malformed, from a simulated QEMU and guest (``tests/frontend.py``), in equal
phases. After each phase the daemon's resident memory (VmRSS, from /proc), its open fds, its
guest memory mappings and the round-trip latency of a report and of a config read are
taken. They must stay flat: what the daemon keeps per report, per kick or per connection
shows up as growth from phase to phase.

Device ``vm`` keeps one connection for the whole soak (what a device keeps grows with it);
device ``next`` gets a new connection in every phase, which works a little and goes (what a
connection leaves behind adds up).

The CI variant runs 6 phases of about 4,200 reports each (25,000 in all, one chain in 64
malformed, plus 3,600 inflate and deflate buffers), in about 25 s on 2 busy cores. The long
variant (marker ``soak``) runs such phases for ``BALLOOND_SOAK_MINUTES`` minutes (10 by
default)::

    BALLOOND_SOAK_MINUTES=10 .venv/bin/python -m pytest tests/test_soak.py -m soak -s

The leaks the assertions catch, each injected into the daemon and seen to fail the CI
variant, and the numbers measured, are in docs/faults.md.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

import pytest

from balloond.balloon import STAT_ENTRY
from tests.frontend import DESC, F_INDIRECT, F_NEXT, F_WRITE, PAGE, Frontend, Guest, GuestRam, MiB

HUGE = 2 * MiB
HIGH = 4 << 30  # where the high region of the simulated guest RAM starts
HIGH_MIB = 64
LOW_MIB = 16

#: The CI variant: phases, and what each phase does.
PHASES = 6
REPORT_BATCHES = 250  # of BATCH chains, one kick each
BATCH = 16
INFLATES = 300  # buffers of FRAMES frames each, and as many deflates
FRAMES = 256  # what Linux puts in one inflate buffer
STATS_REFRESHES = 20
TARGETS = 10
STATUS_READS = 10
SAMPLES = 150  # timed round trips per phase: single reports, and config reads
#: The long variant (``-m soak``): minutes of phases like the above.
SOAK_MINUTES = float(os.environ.get("BALLOOND_SOAK_MINUTES", "10"))

#: What the daemon may grow by from the second phase to the last (the first warms up: the
#: allocator's arenas, imports done on first use); measured 0.05 to 0.1 MiB. One float kept
#: per report grew it by 0.64 MiB over the 21,000 reports after the first phase; one
#: DiscardJob kept per report by 10.6 MiB.
RSS_GROWTH_LIMIT = MiB // 2
#: How much slower the last phase's median round trip may be than the first's. Other work
#: on a shared machine moves a median by tens of percent; a structure scanned per report
#: that grows with every report multiplies it.
LATENCY_FACTOR = 3.0
#: Phases added at most when the last one is too slow (see :func:`soak`).
EXTRA_PHASES = 2


# -- the daemon, seen from /proc ------------------------------------------------------------


class Served:
    """A ``balloond serve`` process with two devices: ``vm``, whose QEMU stays connected
    for the whole soak, and ``next``, whose QEMU comes and goes."""

    def __init__(self, tmp_path: Path) -> None:
        self.sockets = {"vm": tmp_path / "vm.sock", "next": tmp_path / "next.sock"}
        self.control = tmp_path / "control.sock"
        self.log_path = tmp_path / "balloond.log"
        self.client: socket.socket | None = None
        self.replies: BinaryIO | None = None
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "balloond", "serve",
                 *(f"--socket-path={path}" for path in self.sockets.values()),
                 "--control-socket", str(self.control)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        deadline = time.monotonic() + 30
        while "control on" not in self.log_path.read_text(errors="replace"):
            assert self.process.poll() is None, f"balloond exited:\n{self.log()}"
            assert time.monotonic() < deadline, f"balloond did not start:\n{self.log()}"
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def proc_status(self, field_name: str) -> int:
        """A ``kB`` field of /proc/PID/status, in bytes."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no {field_name} in /proc/{self.pid}/status")

    def cpu_seconds(self) -> float:
        """User and system time the daemon has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def memfd_maps(self) -> int:
        """Mappings of memfd files (guest memory) in the daemon."""
        maps = Path(f"/proc/{self.pid}/maps").read_text().splitlines()
        return sum(1 for line in maps if "/memfd:" in line)

    def send(self, **message: Any) -> None:
        """Send a control request on the one control connection the soak keeps open (so
        that the daemon's fd count does not depend on when it closes a client's)."""
        if self.client is None:
            self.client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.client.settimeout(30)
            self.client.connect(str(self.control))
            self.replies = self.client.makefile("rb")
        self.client.sendall(json.dumps({"version": 1, **message}).encode() + b"\n")

    def receive(self) -> dict[str, Any]:
        """The answer to the request sent last; an error answer fails the test."""
        assert self.replies is not None
        answer = json.loads(self.replies.readline())
        assert answer["ok"], answer
        result: dict[str, Any] = answer["result"]
        return result

    def request(self, **message: Any) -> dict[str, Any]:
        self.send(**message)
        return self.receive()

    def stop(self) -> int:
        if self.client is not None:
            self.client.close()
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    daemon = Served(tmp_path)
    try:
        yield daemon
    finally:
        status = daemon.stop()
    assert status == 0, f"balloond exited {status} on SIGTERM:\n{daemon.log()[-3000:]}"


# -- a guest that keeps the daemon busy ---------------------------------------------------


@dataclass
class Sent:
    """What the guests sent, to check against the daemon's counters."""

    reports: int = 0  # chains the daemon counts as reports (well-formed, maybe skipped)
    bad_chains: int = 0
    inflated: int = 0  # bytes
    deflated: int = 0
    stats: int = 0  # statistics buffers handed to the daemon
    skipped: dict[str, int] = field(default_factory=dict)


class SoakGuest:
    """One frontend connection with its guest: rings, indirect tables, frame buffers."""

    def __init__(self, served: Served, rng: random.Random, device: str = "vm") -> None:
        self.rng, self.device = rng, device
        self.sent = Sent()
        self.ram = GuestRam(low=LOW_MIB * MiB, high=HIGH_MIB * MiB)
        self.frontend = Frontend(str(served.sockets[device]), timeout=30)
        self.guest = Guest(self.frontend, self.ram)
        self.guest.start()
        # Linux puts a report of several buffers into an indirect table: one per chain out.
        self.tables = [self.ram.alloc(16 * 4, 16) for _ in range(BATCH)]
        self.frame_buffer = self.ram.alloc(4 * FRAMES)
        self.stats_buffer = self.ram.alloc(16 * STAT_ENTRY.size)
        self.stats_value = 0
        self._offer_stats()

    def close(self) -> None:
        self.guest.close()
        self.frontend.close()
        self.ram.close()

    # -- rings ------------------------------------------------------------------------

    def _indirect(self, name: str, table: int, buffers: list[tuple[int, int]], flags: int) -> int:
        ring = self.guest.rings[name]
        for i, (addr, length) in enumerate(buffers):
            more = F_NEXT if i < len(buffers) - 1 else 0
            self.ram.write(table + 16 * i, DESC.pack(addr, length, flags | more, i + 1))
        head = ring.free_desc % ring.size
        ring.write_desc(head, table, 16 * len(buffers), F_INDIRECT)
        ring.free_desc += 1
        ring.publish(head)
        return head

    def _block(self) -> int:
        """A 2 MiB block of the high region, one page of it touched (so that the daemon's
        hole punch frees something)."""
        gpa = HIGH + HUGE * self.rng.randrange(HIGH_MIB // 2)
        self.ram.write(gpa + PAGE * self.rng.randrange(HUGE // PAGE), b"\x5a")
        return gpa

    def _report_chain(self, slot: int, malformed: int | None) -> None:
        ring = self.guest.rings["reporting"]
        if malformed is None:
            buffers = [(self._block(), HUGE) for _ in range(self.rng.randint(1, 4))]
            self._indirect("reporting", self.tables[slot], buffers, F_WRITE)
            self.sent.reports += 1
        elif malformed == 0:  # device-readable buffers: not a report at all
            ring.add_chain([(self._block(), HUGE)], writable=False)
            self.sent.bad_chains += 1
        elif malformed == 1:  # an indirect table whose last entry points back at its first
            table = self.tables[slot]
            self.ram.write(table, DESC.pack(self._block(), HUGE, F_WRITE | F_NEXT, 1))
            self.ram.write(table + 16, DESC.pack(self._block(), HUGE, F_WRITE | F_NEXT, 0))
            head = ring.free_desc % ring.size
            ring.write_desc(head, table, 32, F_INDIRECT)
            ring.free_desc += 1
            ring.publish(head)
            self.sent.bad_chains += 1
        elif malformed == 2:  # between the regions: not guest RAM
            ring.add_chain([(2 << 30, HUGE)], writable=True)
            self._skip("outside guest RAM", HUGE)
            self.sent.reports += 1
        else:  # not aligned to the backing page: nothing of it can be freed
            ring.add_chain([(self._block() + 512, PAGE)], writable=True)
            self._skip("not aligned", PAGE)
            self.sent.reports += 1

    def _skip(self, reason: str, length: int) -> None:
        self.sent.skipped[reason] = self.sent.skipped.get(reason, 0) + length

    def report_batch(self, malformed: bool) -> None:
        """BATCH chains, one kick, all of them back (one of them malformed, if asked)."""
        odd = self.rng.randrange(BATCH) if malformed else -1
        for slot in range(BATCH):
            self._report_chain(slot, self.rng.randrange(4) if slot == odd else None)
        ring = self.guest.rings["reporting"]
        ring.notify()
        returned = ring.wait_used(BATCH, timeout=30)
        assert all(length == 0 for _, length in returned), returned

    def timed_report(self) -> float:
        began = time.perf_counter()
        self.guest.report([(self._block(), HUGE)], timeout=30)
        self.sent.reports += 1
        return time.perf_counter() - began

    def timed_config(self) -> float:
        began = time.perf_counter()
        self.frontend.get_config()
        return time.perf_counter() - began

    def balloon(self, name: str) -> None:
        """One inflate or deflate buffer of FRAMES frames of the high region."""
        first = (HIGH >> 12) + self.rng.randrange((HIGH_MIB * MiB >> 12) - FRAMES)
        frames = range(first, first + FRAMES)
        self.ram.write(self.frame_buffer, struct.pack(f"<{FRAMES}I", *frames))
        ring = self.guest.rings[name]
        ring.add_chain([(self.frame_buffer, 4 * FRAMES)], writable=False)
        ring.notify()
        ring.wait_used(1, timeout=30)
        if name == "inflate":
            self.sent.inflated += FRAMES * PAGE
        else:
            self.sent.deflated += FRAMES * PAGE

    # -- statistics, config, control ----------------------------------------------------

    def _offer_stats(self) -> None:
        """Fill the statistics buffer (free memory: a running count) and hand it over."""
        self.stats_value += 1
        entries = [(4, self.stats_value)] + [(tag, tag) for tag in range(5, 20)]
        self.ram.write(self.stats_buffer, b"".join(STAT_ENTRY.pack(*e) for e in entries))
        ring = self.guest.rings["stats"]
        ring.add_chain([(self.stats_buffer, 16 * STAT_ENTRY.size)], writable=False)
        ring.notify()
        self.sent.stats += 1

    def refresh_stats(self, served: Served) -> None:
        """``stats --refresh``: the daemon gives the buffer back, the guest fills it again,
        and the answer carries the new values."""
        served.send(command="stats", device=self.device, refresh=True, timeout=30)
        self.guest.rings["stats"].wait_used(1, timeout=30)
        self._offer_stats()
        answer = served.receive()
        assert answer["stats"]["free_bytes"] == self.stats_value, answer

    def set_target(self, served: Served, balloon_pages: int) -> None:
        """A new target: the config change reaches the backend channel, the guest reads it
        and answers with ``actual`` (QEMU's SET_CONFIG)."""
        ram = (LOW_MIB + HIGH_MIB) * MiB
        served.request(
            command="set-target", device=self.device, target_bytes=ram - balloon_pages * PAGE
        )
        channel = self.frontend.backend_channel
        assert channel is not None
        ready, _, _ = select.select([channel], [], [], 30)
        assert ready, "no config change on the backend channel"
        channel.recv(4096)
        num_pages, _ = struct.unpack_from("<II", self.frontend.get_config())
        assert num_pages == balloon_pages
        self.frontend.set_config(struct.pack("<I", num_pages), offset=4)

    def pause_and_resume(self) -> None:
        """A VM pause (every ring disabled and stopped) and resume (started at its base).
        The daemon gives back the statistics buffer it holds when its ring stops, and reads
        it again when the ring starts."""
        for ring in self.guest.rings.values():
            base = self.frontend.stop_ring(ring)
            self.frontend.start_ring(ring, base=base)
        self.sent.stats += 1


# -- phases ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    seconds: float
    cpu: float  # the daemon's CPU time in this phase
    rss: int  # VmRSS, bytes
    rss_anon: int
    fds: int
    memfd_maps: int
    report_median: float
    report_p99: float
    config_median: float

    def row(self, index: int) -> str:
        return (
            f"{index:>5} {self.seconds:6.1f} {self.cpu:6.2f} {self.rss / MiB:8.2f} "
            f"{self.rss_anon / MiB:8.2f} {self.fds:4d} {self.memfd_maps:5d} "
            f"{1e3 * self.report_median:8.3f} {1e3 * self.report_p99:8.3f} "
            f"{1e3 * self.config_median:8.3f}"
        )


HEADER = "phase      s    cpu  RSS/MiB anon/MiB  fds  maps  rep/ms  p99/ms  cfg/ms"


def run_phase(served: Served, guest: SoakGuest, rng: random.Random) -> Phase:
    """One phase of work on the long-lived connection, and one short connection on the
    other device that comes and goes; then the daemon is measured."""
    began, cpu = time.monotonic(), served.cpu_seconds()
    reports: list[float] = []
    configs: list[float] = []
    # Everything interleaved: the timed round trips spread over the whole phase.
    work: list[Callable[[], object]] = []
    work += [partial(guest.report_batch, i % 4 == 0) for i in range(REPORT_BATCHES)]
    work += [lambda: guest.balloon("inflate") for _ in range(INFLATES)]
    work += [lambda: guest.balloon("deflate") for _ in range(INFLATES)]
    work += [lambda: guest.refresh_stats(served) for _ in range(STATS_REFRESHES)]
    work += [partial(guest.set_target, served, 256 * (i % 5)) for i in range(TARGETS)]
    work += [lambda: served.request(command="status", device="vm") for _ in range(STATUS_READS)]
    work += [lambda: reports.append(guest.timed_report()) for _ in range(SAMPLES)]
    work += [lambda: configs.append(guest.timed_config()) for _ in range(SAMPLES)]
    work += [guest.pause_and_resume for _ in range(3)]
    rng.shuffle(work)
    for step in work:
        step()
    check_counters(served, guest)
    # A QEMU that comes, works a little and goes: its fds and mappings must go with it.
    passing = SoakGuest(served, rng, "next")
    try:
        for i in range(4):
            passing.report_batch(malformed=i == 0)
        passing.balloon("inflate")
        passing.refresh_stats(served)
        passing.pause_and_resume()
        check_counters(served, passing)
    finally:
        passing.close()
    wait_disconnected(served, "next")
    reports.sort()
    return Phase(
        seconds=time.monotonic() - began,
        cpu=served.cpu_seconds() - cpu,
        rss=served.proc_status("VmRSS"),
        rss_anon=served.proc_status("RssAnon"),
        fds=served.fds(),
        memfd_maps=served.memfd_maps(),
        report_median=statistics.median(reports),
        report_p99=reports[int(0.99 * (len(reports) - 1))],
        config_median=statistics.median(configs),
    )


def wait_disconnected(served: Served, device: str, timeout: float = 30.0) -> None:
    """Wait until the daemon has let go of ``device``'s frontend (its teardown done)."""
    deadline = time.monotonic() + timeout
    while served.request(command="status", device=device)["connected"]:
        assert time.monotonic() < deadline, f"{device}: still connected after {timeout:.0f} s"
        time.sleep(0.01)


def soak(served: Served, phases: int | None, minutes: float = 0.0) -> list[Phase]:
    """Run ``phases`` phases (or phases until ``minutes`` have passed); print the table."""
    seed = random.randrange(1 << 32)
    rng = random.Random(seed)
    results: list[Phase] = []
    end = time.monotonic() + 60 * minutes
    print(f"\nsoak, seed {seed}\n{HEADER}")
    guest = SoakGuest(served, rng)

    def planned() -> bool:
        if phases is not None:
            return len(results) < phases
        return len(results) < 3 or time.monotonic() < end

    extra = 0
    try:
        while True:
            if not planned():
                # Other work on the machine can slow a phase or two; the slowness a leak
                # causes stays and grows. So a last phase too slow gets up to two more.
                if extra == EXTRA_PHASES or not slower(results[0], results[-1]):
                    break
                extra += 1
            phase = run_phase(served, guest, rng)
            results.append(phase)
            print(phase.row(len(results)), flush=True)
    finally:
        guest.close()
    assert served.process.poll() is None
    assert "Traceback" not in served.log(), served.log()[-3000:]
    check_flat(results, seed)
    return results


def check_counters(served: Served, guest: SoakGuest) -> None:
    """Every chain the guest sent on its connection is accounted for in the daemon's
    counters (a device's counters start again with each connection)."""
    sent = guest.sent
    status = served.request(command="status", device=guest.device)
    counters = status["counters"]
    assert status["connected"] and status["errors"] == {}, status
    for name, value in (
        ("reports", sent.reports),
        ("bad_chains", sent.bad_chains),
        ("inflated_bytes", sent.inflated),
        ("deflated_bytes", sent.deflated),
        ("stats_updates", sent.stats),
    ):
        assert counters[name] == value, f"{name}: {counters[name]}, sent {value}: {counters}"
    skipped = {reason.split(" to ")[0]: n for reason, n in counters["skipped_bytes"].items()}
    assert skipped == sent.skipped, counters["skipped_bytes"]
    assert counters["discard_errors"] == 0, counters


def slower(first: Phase, last: Phase) -> list[str]:
    """The round trips of ``last`` whose median is more than LATENCY_FACTOR times that of
    ``first``."""
    return [
        name
        for name in ("report_median", "config_median")
        if getattr(last, name) > LATENCY_FACTOR * getattr(first, name)
    ]


def check_flat(phases: list[Phase], seed: int) -> None:
    first, last = phases[0], phases[-1]
    # The CI variant measures from the second phase; a long run from its middle: the
    # daemon's heap settles over the first hundred phases or so (see docs/faults.md).
    since = 1 if len(phases) <= 12 else len(phases) // 2
    table = "\n".join([HEADER] + [p.row(i + 1) for i, p in enumerate(phases)])
    grown = last.rss - phases[since].rss
    assert grown < RSS_GROWTH_LIMIT, (
        f"the daemon grew by {grown / MiB:.2f} MiB from phase {since + 1} to {len(phases)} "
        f"(seed {seed}):\n{table}"
    )
    assert all(p.fds == first.fds for p in phases), f"open fds changed (seed {seed}):\n{table}"
    assert all(p.memfd_maps == first.memfd_maps for p in phases), (
        f"guest memory mappings changed (seed {seed}):\n{table}"
    )
    for name in slower(first, last):
        before, after = getattr(first, name), getattr(last, name)
        raise AssertionError(
            f"{name}: {1e3 * after:.3f} ms in the last phase, {1e3 * before:.3f} ms in the "
            f"first (seed {seed}):\n{table}"
        )


def test_soak_resources_stay_flat(served: Served) -> None:
    """Six phases of about 4,200 reports each (one chain in 64 malformed), 600 inflate and
    deflate buffers, statistics refreshes, config reads, target changes, VM pauses and a
    connection that comes and goes: RSS from phase 2 to 6 grows by less than 0.5 MiB, open
    fds and guest memory mappings are the same after every phase, every chain is in the
    daemon's counters, and the median report and config round trips of the last phase are
    within 3x of the first's."""
    soak(served, PHASES)


def soak_selected(config: pytest.Config) -> bool:
    """Whether ``-m`` asks for the soak marker (not merely mentions it to leave it out)."""
    expression = str(config.getoption("markexpr") or "")
    return re.search(r"(?<!not )\bsoak\b", expression) is not None


@pytest.mark.soak
def test_long_soak_resources_stay_flat(served: Served, request: pytest.FixtureRequest) -> None:
    """The soak above for BALLOOND_SOAK_MINUTES minutes; run only with ``-m soak``."""
    if not soak_selected(request.config):
        pytest.skip("a long soak: run it with -m soak (BALLOOND_SOAK_MINUTES, 10 by default)")
    soak(served, None, SOAK_MINUTES)
