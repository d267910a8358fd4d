"""Item 6: the guest's side of the bargain: will-it-scale's page_fault1 in the guest.

Free page reporting costs the guest re-faulting (and the host zeroing) the pages the host
took back. Four 2 GiB guests (2 vCPUs, TCG, transparent huge pages ``always``) boot once:
no balloon device; balloond with ``--no-discard`` (reporting on, nothing freed); balloond;
QEMU's built-in ``virtio-balloon-pci,free-page-reporting=on``. Each repeat runs
``workload pagefault1 SECONDS 2`` (one task per vCPU; each maps 128 MiB, writes every page,
unmaps, repeats) in each guest in turn, the order rotating by repeat; the other guests idle
meanwhile. Throughput is pages touched per second, relative to the guest without a balloon
in the same repeat.
"""

from __future__ import annotations

import math
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from bench.guest import guest_kit
from bench.proc import Daemon
from bench.report import Context, Section
from bench.stats import Spread

THP = "/sys/kernel/mm/transparent_hugepage/enabled"
CONFIGS = ("no balloon", "balloond --no-discard", "balloond", "QEMU built-in")


def run(ctx: Context) -> Section:
    section = Section(
        "pagefault",
        "The guest's side: page_fault1 throughput in the guest",
        "python -m bench --only pagefault",
    )
    ready = guest_kit(ctx, section, "four guests")
    if ready is None:
        return section
    from kit import devices
    from kit.guest import Guest, GuestConfig

    seconds = 8
    work = Path(tempfile.mkdtemp(prefix="balloond-bench-pf-"))
    rates: dict[str, list[float]] = {name: [] for name in CONFIGS}
    with Daemon(["vm"]) as discarding, Daemon(["vm"], "--no-discard") as keeping:
        args = {
            "no balloon": (),
            "balloond --no-discard": devices.vhost_user_balloon(keeping.sockets["vm"]),
            "balloond": devices.vhost_user_balloon(discarding.sockets["vm"]),
            "QEMU built-in": devices.builtin_balloon(),
        }
        guests = {}
        try:
            for i, name in enumerate(CONFIGS):
                config = GuestConfig(cpus=2, device_args=tuple(args[name]))
                guests[name] = Guest(ready, work / f"g{i}", config)
                guests[name].start()
                guests[name].check(f"echo always > {THP}")
            for repeat in range(2 * ctx.repeats):  # twice: TCG makes this the noisiest figure
                order = CONFIGS[repeat % 4 :] + CONFIGS[: repeat % 4]
                for name in order:
                    print(f"bench: pagefault1 repeat {repeat + 1}: {name}", file=sys.stderr)
                    out = guests[name].check(f"workload pagefault1 {seconds} 2", timeout=120)
                    match = re.search(r"per_second=(\d+)", out.text())
                    if match is None:
                        raise RuntimeError(f"no result from pagefault1: {out.text()}")
                    rates[name].append(float(match.group(1)))
        finally:
            for guest in guests.values():
                guest.close()
    shutil.rmtree(work, ignore_errors=True)
    section.data = {"seconds": seconds, "pages_per_second": rates}
    base = rates["no balloon"]
    rows = []
    for name in CONFIGS:
        relative = [a / b for a, b in zip(rates[name], base, strict=True)]
        mean, half = _interval(relative)
        rows.append([name, Spread.of([r / 1e3 for r in rates[name]]).cell("{:.0f}"),
                     Spread.of(relative).cell("{:.3f}"), f"{mean:.3f} +- {half:.3f}"])  # fmt: skip
        section.data[f"{name} relative"] = relative
    versus = [a / b for a, b in zip(rates["balloond"], rates["QEMU built-in"], strict=True)]
    mean, half = _interval(versus)
    section.data["balloond / QEMU built-in"] = versus
    section.say(
        f"{2 * ctx.repeats} repeats of {seconds} s in each guest, rotating; thousands of pages "
        "per second as median (min-max); relative to the guest without a balloon in the same "
        "repeat, median (min-max) and mean +- a 95% interval (1.96 standard errors)."
    )
    section.table(["guest", "k pages/s", "relative to no balloon", "mean +- 95%"], rows)
    section.say(
        f"balloond / QEMU built-in, per repeat: {Spread.of(versus).cell('{:.3f}')}; mean "
        f"{mean:.3f} +- {half:.3f}."
    )
    section.target("page_fault1 in the guest, balloond / QEMU built-in",
                   "no costlier: >= 1 within the 95% interval",
                   f"{mean:.3f} +- {half:.3f}", mean + half >= 1.0)  # fmt: skip
    return section


def _interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of a 95% interval (1.96 standard errors; NaN for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, math.nan
    return mean, 1.96 * statistics.stdev(values) / math.sqrt(len(values))
