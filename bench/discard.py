"""Item 1: balloond's discard path against the kernel's limit.

The balloond side runs what the daemon runs for each chain, on the same objects: the
device pops the chain from a real split ring in guest memory (``Balloon.process``: ring
walk, frame list or report parsing, ``GuestMemory.discard_plans``), the job is discarded on
the loop's thread if it is small (``service.INLINE``: an inflate buffer) or goes to a
one-thread executor as ``server.Connection`` hands it over (``run_in_executor``: a report),
the native call punches the holes (``Discarder.discard``), and ``Balloon.complete`` puts the
chain on the used ring. Only the eventfd kick and call are left out (bench ``overhead`` has them).
The driver's side (writing descriptors and frame lists) happens between timed intervals.

The raw side is :mod:`bench.rawloop`: ``fallocate(PUNCH_HOLE)`` per range in C, one call
per batch, over the same ranges of the same populated memfd. The sides alternate within
each repeat (which goes first alternates too), the memfd populated again before each.

The memory is populated as a guest's is: by another process that maps it and keeps the
mapping (:class:`Toucher`, in QEMU's place), never through this process's own mapping. A
page this process had written itself would be mapped here, and freeing it from a second
thread of this process costs a TLB flush of the first (measured: the discard thread at 0.65-0.71
of the same call on the writing thread) that neither the daemon, which never maps what it
frees, nor QEMU's device, pays for.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import os
import random
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from balloond.balloon import Balloon
from balloond.device import DiscardJob
from balloond.discard import Discarder, DiscardRange, DiscardResult, total_bytes
from balloond.memory import GuestMemory
from balloond.service import INLINE
from balloond.virtqueue import RingState, Virtqueue
from bench.rawloop import RawLoop
from bench.report import Context, Section
from bench.stats import Spread, ratios
from tests.frontend import GuestRam, MiB, Ring

GiB = 1 << 30
PAGE = 4096
HUGE = 2 * MiB
#: Ring structures and frame lists live in the first MiBs of guest RAM; never discarded.
DRIVER_AREA = 4 * MiB
REPORT_BATCH = 32  # 2 MiB blocks per report chain (Linux's PAGE_REPORTING_CAPACITY)
FRAMES_PER_BUFFER = 256  # frames per inflate buffer (Linux's VIRTIO_BALLOON_ARRAY_PFNS_MAX)
INFLATE, REPORTING = 0, 3  # queue indices with STATS_VQ and PAGE_REPORTING negotiated
#: balloond as the daemon runs it, the raw C loop, and balloond with the discard inline.
SIDES = ("ours", "raw", "inline")
#: Who writes the memory before it is freed: another process that keeps it mapped (as QEMU
#: does; the figures), or this process through its own mapping (for comparison).
ANOTHER_PROCESS, OWN_MAPPING = "another process", "this process's own mapping"


class TimedDiscarder:
    """The real discarder; adds up the seconds spent in its native call."""

    def __init__(self) -> None:
        self.real = Discarder()
        self.seconds = 0.0
        self.timing = True

    def discard(self, ranges: Sequence[DiscardRange]) -> DiscardResult:
        start = time.perf_counter()
        try:
            return self.real.discard(ranges)
        finally:
            if self.timing:
                self.seconds += time.perf_counter() - start


_TOUCH = """
import mmap, sys
fd, size = int(sys.argv[1]), int(sys.argv[2])
memory = mmap.mmap(fd, size, flags=mmap.MAP_SHARED)
chunk = b"\\x5a" * (64 << 20)
for line in sys.stdin:
    start, end = map(int, line.split())
    for at in range(start, end, len(chunk)):
        stop = min(end, at + len(chunk))
        memory[at:stop] = chunk[: stop - at]
    print("ok", flush=True)
"""


class Toucher:
    """Another process with guest RAM mapped, as QEMU has it: writes ranges of it when
    asked (a guest touching its memory), and keeps the mapping."""

    def __init__(self, fd: int, size: int) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-c", _TOUCH, str(fd), str(size)],
            pass_fds=(fd,),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def touch(self, start: int, end: int) -> None:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(f"{start} {end}\n")
        self.process.stdin.flush()
        if self.process.stdout.readline().strip() != "ok":
            raise RuntimeError("the process touching guest memory died")

    def close(self) -> None:
        self.process.kill()
        self.process.wait()


class Bench:
    """One memfd of guest RAM, a balloon device over it, and the raw loop."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.ram = GuestRam(low=DRIVER_AREA + size, high=0)
        self.region = self.ram.regions[0]
        self.memory = GuestMemory()
        self.memory.replace([(self.region.spec, os.dup(self.region.fd))])
        self.balloon = Balloon()
        self.balloon.set_features(self.balloon.device_features)
        self.rings = {index: Ring(self.ram, index) for index in (INFLATE, REPORTING)}
        for index, ring in self.rings.items():
            state = RingState(size=ring.size, desc=ring.desc, avail=ring.avail, used=ring.used)
            queue = Virtqueue(self.memory, state, event_idx=True, indirect=True)
            self.balloon.start_queue(index, queue)
        self.frame_slots = [self.ram.alloc(4 * FRAMES_PER_BUFFER, 16) for _ in range(16)]
        assert self.ram.alloc(0) <= DRIVER_AREA
        self.discarder = TimedDiscarder()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bench-discard")
        self.raw_loop = RawLoop()
        self._loop = asyncio.new_event_loop()
        self.toucher = Toucher(self.region.fd, DRIVER_AREA + size)

    def close(self) -> None:
        self.toucher.close()
        self.executor.shutdown()
        self.raw_loop.close()
        self._loop.close()
        self.memory.close()
        for ring in self.rings.values():
            ring.close()
        self.ram.close()

    def populate(self, mode: str = ANOTHER_PROCESS) -> None:
        """Make every page of the free area resident (written, like a guest's pages): by
        another process, or (``OWN_MAPPING``) through this process's mapping."""
        if mode == ANOTHER_PROCESS:
            self.toucher.touch(DRIVER_AREA, DRIVER_AREA + self.size)
            return
        chunk = b"\x5a" * (64 * MiB)
        for start in range(DRIVER_AREA, DRIVER_AREA + self.size, len(chunk)):
            end = min(start + len(chunk), DRIVER_AREA + self.size)
            self.region.map[start:end] = chunk[: end - start]

    def resident(self) -> int:
        return self.region.blocks()

    def check_freed(self) -> None:
        """A run that did not free the area measured nothing: refuse its figure."""
        left = self.resident() - DRIVER_AREA
        if left > self.size // 100:
            raise RuntimeError(f"{left // MiB} MiB of {self.size // MiB} MiB still resident")

    # --- the two sides, one unit (a chain's worth of ranges) at a time --------------------

    def ours(self, index: int, add: Callable[[], None], *, inline: bool = False) -> float:
        """Seconds balloond spends on one chain that ``add`` makes available on ring ``index``.

        ``inline``: the discard runs on the event loop's thread whatever its size (the
        daemon does so only up to ``service.INLINE``: what the hand-off costs the rest).
        """
        add()
        return self._loop.run_until_complete(self._ours(index, inline))

    async def _ours(self, index: int, inline: bool) -> float:
        loop = asyncio.get_running_loop()
        start = time.perf_counter()
        jobs = self.balloon.process(index)
        for job in jobs:
            if inline or _small(job):
                result = self.discarder.discard(job.ranges)
            else:
                result = await loop.run_in_executor(
                    self.executor, self.discarder.discard, job.ranges
                )
            self.balloon.complete(job, result)
        seconds = time.perf_counter() - start
        if len(jobs) != 1:
            raise RuntimeError(f"{len(jobs)} jobs for one chain")
        return seconds

    def report_chain(self, blocks: Sequence[int]) -> Callable[[], None]:
        ring = self.rings[REPORTING]
        buffers = [(gpa, HUGE) for gpa in blocks]

        def add() -> None:
            ring.add_chain(buffers, writable=True)

        return add

    def inflate_chain(self, frames: Sequence[int], slot: int) -> Callable[[], None]:
        ring = self.rings[INFLATE]
        gpa = self.frame_slots[slot % len(self.frame_slots)]
        data = struct.pack(f"<{len(frames)}I", *frames)

        def add() -> None:
            self.ram.write(gpa, data)
            ring.add_chain([(gpa, len(data))], writable=False)

        return add

    def raw(self, offsets: ctypes.Array[ctypes.c_uint64], length: int) -> float:
        start = time.perf_counter()
        self.raw_loop.punch(self.region.fd, offsets, length)
        return time.perf_counter() - start


def _small(job: DiscardJob) -> bool:
    """The daemon's rule (``server.Connection._small``): discarded on the loop's thread."""
    most_bytes, most_ranges = INLINE
    return len(job.ranges) <= most_ranges and total_bytes(job.ranges) <= most_bytes


@dataclass
class Unit:
    """One chain's worth of ranges, ready for either side."""

    ours: Callable[[], float]
    raw: Callable[[], float]
    inline: Callable[[], float]

    def side(self, name: str) -> Callable[[], float]:
        return {"ours": self.ours, "raw": self.raw, "inline": self.inline}[name]


@dataclass
class Case:
    name: str
    units: list[Unit]
    raw_name: str
    target: str


def run(ctx: Context) -> Section:
    size = 192 * MiB if ctx.smoke else GiB  # at least one report chain per side
    section = Section(
        "discard",
        "Discard path against the kernel's limit",
        "python -m bench --only discard" + (" --smoke" if ctx.smoke else ""),
    )
    bench = Bench(size)
    native: dict[str, list[float]] = {}
    modes = (ANOTHER_PROCESS, OWN_MAPPING)
    try:
        cases = _cases(bench, size)
        rates = {(m, c.name): {side: [] for side in SIDES} for m in modes for c in cases}
        paired: dict[tuple[str, str], dict[str, list[float]]] = {
            (m, c.name): {"ours": [], "inline": []} for m in modes for c in cases
        }
        for repeat, mode, case in itertools.product(range(ctx.repeats), modes, cases):
            # Both sides free half of the same populated memfd, chain by chain in turn
            # (which side takes the even chains alternates by repeat): whatever else the
            # machine does meanwhile falls on both.
            bench.populate(mode)
            bench.discarder.seconds = 0.0
            times: dict[str, list[float]] = {side: [] for side in SIDES}
            for i, unit in enumerate(case.units):
                side = SIDES[(i + repeat) % len(SIDES)]
                bench.discarder.timing = side == "ours"
                times[side].append(unit.side(side)())
            bench.check_freed()
            per_unit = size / len(case.units)
            for side in SIDES:
                rates[mode, case.name][side].append(
                    len(times[side]) * per_unit / sum(times[side]) / GiB
                )
                # Neighbouring chains of two sides ran within milliseconds of each other:
                # the median of their time ratios shrugs off a burst of other work.
                if side != "raw":
                    pairs = zip(times["raw"], times[side], strict=False)
                    paired[mode, case.name][side].extend(raw / t for raw, t in pairs)
            if mode == ANOTHER_PROCESS:
                native.setdefault(case.name, []).append(
                    bench.discarder.seconds / sum(times["ours"])
                )
    finally:
        bench.close()
    section.data = {
        "size_bytes": size,
        "rates_gib_s": {f"{m}: {c}": r for (m, c), r in rates.items()},
        "native_share": native,
    }
    rows = []
    medians: dict[str, float] = {}
    for case in cases:
        key = (ANOTHER_PROCESS, case.name)
        ours, raw = rates[key]["ours"], rates[key]["raw"]
        ratio = statistics.median(paired[key]["ours"])
        inline = statistics.median(paired[key]["inline"])
        medians[case.name] = ratio
        section.data[f"{case.name} ratio"] = {"paired median": ratio, "inline": inline,
                                              "per repeat": ratios(ours, raw).values}  # fmt: skip
        rows.append(
            [
                case.name,
                Spread.of(ours).cell(),
                f"{case.raw_name}: {Spread.of(raw).cell()}",
                f"{ratio:.2f} (per repeat {ratios(ours, raw).cell()})",
                case.target,
                _verdict(case.name, ratio),
                f"{100 * Spread.of(native[case.name]).median:.0f}%",
                f"{inline:.2f}",
            ]
        )
    section.say(
        f"{size // MiB} MiB of a populated memfd freed per repeat, {ctx.repeats} repeats: "
        "balloond, the raw loop and balloond with the discard inline take turns chain by "
        "chain (32 blocks of 2 MiB, or 256 frames; who starts rotates by repeat), so "
        "whatever else the machine does falls on all three; the memfd is written again "
        "before each repeat, by another process that maps it and keeps it mapped, as QEMU "
        "does (a page written through this process's own mapping costs a TLB flush when "
        "another of its threads frees it, which the daemon, never mapping what it frees, "
        "does not pay: bench/FINDINGS.md). Rates in GiB/s as median (min-max) over "
        "repeats. The ratio is "
        "balloond's rate / the raw loop's: the median over all pairs of neighbouring chains "
        "(one each side, run within milliseconds), then in brackets the spread of the "
        "per-repeat ratio of total rates. 'in the native call' is the share of balloond's "
        "time spent inside `Discarder.discard` (argument checks, cffi, the syscalls); the "
        "rest is the device (ring walk, parsing, discard plan, used ring) and, for a report, "
        "the hand-off to the discard thread (an inflate buffer is discarded on the loop's "
        "thread, as the daemon does: `service.INLINE`). 'discard inline' runs every chain's "
        "native call on the event loop's thread, without the hand-off: for reports not what "
        "the daemon does (it keeps the loop free for config requests), what it would save."
    )
    section.table(
        ["case", "balloond GiB/s", "raw C loop GiB/s", "ratio", "target", "met",
         "in the native call", "ratio, discard inline"],
        rows,
    )  # fmt: skip
    section.say(
        "The same run, with the memory written through this process's own mapping before "
        "each repeat instead (how this bench populated it before), "
        "repeats alternated with the rows above: the raw loop then frees pages this "
        "process has mapped, page by page a TLB flush per call, and balloond's discard "
        "thread flushes the TLB of the thread that wrote them."
    )
    own_rows = []
    for case in cases:
        key = (OWN_MAPPING, case.name)
        own_rows.append(
            [
                case.name,
                Spread.of(rates[key]["ours"]).cell(),
                Spread.of(rates[key]["raw"]).cell(),
                f"{statistics.median(paired[key]['ours']):.2f}",
                f"{statistics.median(paired[key]['inline']):.2f}",
            ]
        )
    section.table(
        ["case (own mapping)", "balloond GiB/s", "raw C loop GiB/s", "ratio",
         "ratio, discard inline"],
        own_rows,
    )  # fmt: skip
    for case in cases:
        ratio = medians[case.name]
        section.lines.append(f"- {case.name}: ratio to the raw loop: {ratio:.2f}")
        if case.target != "none":
            section.target(
                f"discard, {case.name}: balloond / raw fallocate loop",
                case.target,
                f"{ratio:.2f}",
                _verdict(case.name, ratio) == "yes",
            )
    section.lines.append("")
    return section


def _verdict(name: str, ratio: float) -> str:
    if name.startswith("2 MiB"):
        return "yes" if ratio >= 0.97 else "no"
    if name.startswith("inflate, contiguous"):
        return "yes" if ratio >= 3.0 else "no"
    return "-"


def _cases(bench: Bench, size: int) -> list[Case]:
    blocks = [DRIVER_AREA + i * HUGE for i in range(size // HUGE)]
    contiguous = [(DRIVER_AREA >> 12) + i for i in range(size // PAGE)]
    shuffled = list(contiguous)
    random.Random(11).shuffle(shuffled)

    def reports() -> list[Unit]:
        units = []
        for i in range(0, len(blocks), REPORT_BATCH):
            batch = blocks[i : i + REPORT_BATCH]
            add = bench.report_chain(batch)
            offsets = bench.raw_loop.prepare(batch)
            units.append(
                Unit(
                    lambda add=add: bench.ours(REPORTING, add),  # type: ignore[misc]
                    lambda offsets=offsets: bench.raw(offsets, HUGE),  # type: ignore[misc]
                    lambda add=add: bench.ours(REPORTING, add, inline=True),  # type: ignore[misc]
                )
            )
        return units

    def inflates(frames: Sequence[int]) -> list[Unit]:
        units = []
        for n, i in enumerate(range(0, len(frames), FRAMES_PER_BUFFER)):
            buffer = frames[i : i + FRAMES_PER_BUFFER]
            add = bench.inflate_chain(buffer, n)
            offsets = bench.raw_loop.prepare([pfn << 12 for pfn in buffer])
            units.append(
                Unit(
                    lambda add=add: bench.ours(INFLATE, add),  # type: ignore[misc]
                    lambda offsets=offsets: bench.raw(offsets, PAGE),  # type: ignore[misc]
                    lambda add=add: bench.ours(INFLATE, add, inline=True),  # type: ignore[misc]
                )
            )
        return units

    return [
        Case("2 MiB reports, 32 per chain", reports(), "2 MiB per call", ">= 0.97"),
        Case(
            "inflate, contiguous frames, 256 per buffer",
            inflates(contiguous),
            "4 KiB per call",
            ">= 3 (x page by page)",
        ),
        Case(
            "inflate, random frames, 256 per buffer", inflates(shuffled), "4 KiB per call", "none"
        ),
    ]
