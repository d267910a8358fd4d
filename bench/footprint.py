"""Item 7: the daemon's footprint: resident memory with 1, 8 and 32 connected devices, and
CPU seconds per GiB discarded against the raw C loop's.

QEMU's own device costs no process of its own; the kernel work of freeing (the
``fallocate`` calls) is the same in either, so the raw loop's CPU time is what QEMU's device
spends at least, and balloond's figure above it is what the separate process costs.
"""

from __future__ import annotations

import struct
import time

from bench.proc import Daemon, cpu_seconds, open_fds, status_field
from bench.rawloop import RawLoop
from bench.report import Context, Section
from bench.stats import Spread, ratios
from tests.frontend import Frontend, GiB, Guest, GuestRam, MiB

HUGE = 2 * MiB
HIGH = 4 * GiB


def run(ctx: Context) -> Section:
    section = Section(
        "footprint",
        "Footprint: resident memory per device, CPU per GiB freed",
        "python -m bench --only footprint" + (" --smoke" if ctx.smoke else ""),
    )
    counts = (1, 2) if ctx.smoke else (1, 8, 32)
    rows = []
    rss: dict[int, dict[str, int]] = {}
    for count in counts:
        rss[count] = _rss(count)
        r = rss[count]
        rows.append(
            [count, f"{r['idle'] / MiB:.1f}", f"{r['connected'] / MiB:.1f}", r["fds"],
             r["threads"]]
        )  # fmt: skip
    one = rss[counts[0]]["connected"]
    last = counts[-1]
    per_device = (rss[last]["connected"] - one) / (last - counts[0])
    section.data["rss"] = rss
    section.say(
        "A fresh `balloond serve` with N devices, VmRSS from /proc before any guest connects "
        "(idle) and after each of N simulated guests connected (64 MiB of RAM each, all four "
        "queues) and sent one free page report."
    )
    section.table(["devices", "idle RSS MiB", "all connected RSS MiB", "fds", "threads"], rows)
    section.say(
        f"- one device connected: {one / MiB:.1f} MiB (target <= 40 MiB: "
        f"{'met' if one <= 40 * MiB else 'missed'}); each further device "
        f"{per_device / MiB:.2f} MiB (target <= 2 MiB: "
        f"{'met' if per_device <= 2 * MiB else 'missed'})."
    )
    section.target("daemon RSS, one device connected", "<= 40 MiB", f"{one / MiB:.1f} MiB",
                   one <= 40 * MiB)  # fmt: skip
    section.target("daemon RSS per further device", "<= 2 MiB", f"{per_device / MiB:.2f} MiB",
                   per_device <= 2 * MiB)  # fmt: skip
    size = 64 * MiB if ctx.smoke else GiB
    cpu = _cpu(ctx, size)
    section.data["cpu"] = cpu
    cpu_rows = []
    for kind in ("reports", "inflate"):
        ours, raw = cpu[kind]["daemon"], cpu[kind]["raw"]
        cpu_rows.append(
            [kind, Spread.of(ours).cell("{:.3f}"), Spread.of(raw).cell("{:.3f}"),
             ratios(ours, raw).cell()]
        )  # fmt: skip
    section.say(
        f"CPU seconds per GiB freed: the daemon's (all threads, /proc schedstat) while a "
        f"simulated guest hands it {size // MiB} MiB of resident memory, against the raw C "
        "loop's over the same amount (the kernel's share, which QEMU's built-in device pays "
        "too). Reports: 2 MiB blocks, 32 per indirect chain, all chains at once. Inflate: "
        "buffers of 256 contiguous frames, one at a time as Linux sends them (the raw loop "
        f"frees them page by page, as QEMU's device does). {ctx.repeats} repeats, alternated."
    )
    section.table(["what", "balloond CPU s/GiB", "raw loop CPU s/GiB", "ratio"], cpu_rows)
    return section


def _rss(count: int) -> dict[str, int]:
    names = [f"vm{i}" for i in range(count)]
    with Daemon(names) as daemon:
        time.sleep(0.5)
        idle = status_field(daemon.pid, "VmRSS")
        rams, frontends, guests = [], [], []
        try:
            for name in names:
                ram = GuestRam(low=32 * MiB, high=32 * MiB)
                frontend = Frontend(daemon.path(name), timeout=30)
                guest = Guest(frontend, ram)
                guest.start()
                ram.write(HIGH, b"\x01" * HUGE)
                guest.report([(HIGH, HUGE)])
                rams.append(ram)
                frontends.append(frontend)
                guests.append(guest)
            time.sleep(0.5)
            return {
                "idle": idle,
                "connected": status_field(daemon.pid, "VmRSS"),
                "fds": open_fds(daemon.pid),
                "threads": status_field(daemon.pid, "Threads"),
            }
        finally:
            for guest, frontend, ram in zip(guests, frontends, rams, strict=True):
                guest.close()
                frontend.close()
                ram.close()


def _cpu(ctx: Context, size: int) -> dict[str, dict[str, list[float]]]:
    result: dict[str, dict[str, list[float]]] = {
        kind: {"daemon": [], "raw": []} for kind in ("reports", "inflate")
    }
    raw = RawLoop()
    ram = GuestRam(low=64 * MiB, high=size)
    chunk = b"\x3c" * (64 * MiB)
    region = ram.regions[1]

    def populate() -> None:
        for start in range(0, size, len(chunk)):
            ram.write(HIGH + start, chunk[: min(len(chunk), size - start)])

    try:
        with Daemon(["vm"]) as daemon:
            frontend = Frontend(daemon.path("vm"), timeout=60)
            guest = Guest(frontend, ram)
            guest.start()
            reporting, inflate = guest.rings["reporting"], guest.rings["inflate"]
            frames_gpa = ram.alloc(4 * 256, 16)
            try:
                for repeat in range(ctx.repeats):
                    sides = ["daemon", "raw"]
                    if repeat % 2:
                        sides.reverse()
                    for kind in ("reports", "inflate"):
                        for side in sides:
                            populate()
                            if side == "raw":
                                unit = HUGE if kind == "reports" else 4096
                                offsets = raw.prepare(list(range(0, size, unit)))
                                before = time.thread_time()
                                raw.punch(region.fd, offsets, unit)
                                spent = time.thread_time() - before
                            else:
                                before_cpu = cpu_seconds(daemon.pid)
                                if kind == "reports":
                                    _report_all(reporting, size)
                                else:
                                    _inflate_all(ram, inflate, frames_gpa, size)
                                spent = cpu_seconds(daemon.pid) - before_cpu
                            if region.blocks() > size // 50:
                                raise RuntimeError(f"{kind} ({side}) did not free the memory")
                            result[kind][side].append(spent * GiB / size)
            finally:
                guest.close()
                frontend.close()
    finally:
        ram.close()
        raw.close()
    return result


def _report_all(ring: object, size: int) -> None:
    from tests.frontend import Ring

    assert isinstance(ring, Ring)
    blocks = [HIGH + i * HUGE for i in range(size // HUGE)]
    chains = [blocks[i : i + 32] for i in range(0, len(blocks), 32)]
    for batch in chains:
        ring.add_chain([(gpa, HUGE) for gpa in batch], writable=True, indirect=True)
    ring.notify()
    ring.wait_used(len(chains), timeout=120)
    ring.ram._next_free = 16 * MiB  # the indirect tables are done with


def _inflate_all(ram: GuestRam, ring: object, frames_gpa: int, size: int) -> None:
    from tests.frontend import Ring

    assert isinstance(ring, Ring)
    first = HIGH >> 12
    for start in range(0, size >> 12, 256):
        ram.write(frames_gpa, struct.pack("<256I", *range(first + start, first + start + 256)))
        ring.add_chain([(frames_gpa, 1024)], writable=False)
        ring.notify()
        ring.wait_used(1)
