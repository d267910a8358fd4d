"""Items 4 and 5: a real Linux guest on balloond against the same guest on QEMU's built-in
virtio-balloon, in one run, alternated; and a profile of the daemon during an inflate.

Two 2 GiB guests (1 vCPU, TCG, the kit's QEMU 11 and Linux) boot once, one on balloond's
vhost-user device, one on ``virtio-balloon-pci,free-page-reporting=on``; both keep free page
reporting on, as deployed. Each repeat runs, for one device and then the other (the order
alternates by repeat; the other guest idles meanwhile):

1. the guest touches and frees 1 GiB (``workload touch 1024``); host memory (the guest RAM
   memfd's allocated bytes) is sampled every 0.25 s until it has settled;
2. the balloon inflates from 2 GiB to 1 GiB (balloond: the control socket's ``set-target``;
   QEMU: QMP ``balloon``), then deflates back; the guest's ``actual`` is polled every 20 ms
   (balloond: control ``status``; QEMU: QMP ``query-balloon``).

Then, with balloond only, one more inflate and deflate under ``py-spy record`` (sampling the
daemon, not pausing it) to see where the daemon's time goes. Last, the same two guests again on
2 MiB huge pages (``memory-backend-memfd,hugetlb=on``; 2 x 1,100 pages reserved for the
run, given back after): step 1 only, alternated as above.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from balloond.control import request
from bench.plot import pyplot
from bench.proc import Daemon
from bench.profile import Spy
from bench.report import Context, Section
from bench.stats import Spread, ratios

MIB = 1 << 20
GIB = 1 << 30
RAM = 2 * GIB
TARGET = 1 * GIB
POLL = 0.02
#: 2 MiB huge pages per guest on huge pages: its RAM and QEMU's own small needs.
HUGE_PAGES_PER_GUEST = RAM // (2 * MIB) + 76
HUGETLB_MEMORY = "memory-backend-memfd,id=mem,size={size}M,share=on,hugetlb=on,hugetlbsize=2M"


@dataclass
class Move:
    """One inflate or deflate: when ``actual`` first moved and when it reached the target."""

    first_change: float
    seconds: float
    trace: list[tuple[float, int]] = field(default_factory=list)  # (s, balloon bytes)


class Side:
    """One guest and the way to drive its balloon."""

    def __init__(self, name: str, guest: Any) -> None:
        self.name = name
        self.guest = guest

    def set_target(self, target: int) -> None:
        raise NotImplementedError

    def balloon_bytes(self) -> int:
        raise NotImplementedError

    def move(self, target: int, timeout: float = 120.0) -> Move:
        want = RAM - target
        start_size = self.balloon_bytes()
        start = time.monotonic()
        self.set_target(target)
        first = None
        trace = [(0.0, start_size)]
        while True:
            size = self.balloon_bytes()
            now = time.monotonic() - start
            trace.append((now, size))
            if first is None and size != start_size:
                first = now
            if size == want:
                return Move(first if first is not None else now, now, trace)
            if now > timeout:
                raise TimeoutError(f"{self.name}: balloon {size} of {want} bytes after {now:.0f} s")
            time.sleep(POLL)


class BalloondSide(Side):
    def __init__(self, guest: Any, daemon: Daemon) -> None:
        super().__init__("balloond", guest)
        self.daemon = daemon

    def _ask(self, **message: Any) -> dict[str, Any]:
        return request(str(self.daemon.control), {"device": "vm", **message})

    def set_target(self, target: int) -> None:
        self._ask(command="set-target", target_bytes=target)

    def balloon_bytes(self) -> int:
        status = self._ask(command="status")
        return int(status["actual_bytes"])


class QemuSide(Side):
    def __init__(self, guest: Any) -> None:
        super().__init__("QEMU built-in", guest)

    def set_target(self, target: int) -> None:
        self.guest.qmp("balloon", value=target)

    def balloon_bytes(self) -> int:
        return RAM - int(self.guest.qmp("query-balloon")["actual"])


def settle(sides: list[Side], quiet: float = 4.0, timeout: float = 90.0) -> None:
    """Wait until no guest's host memory changed by more than 8 MiB for ``quiet`` seconds."""
    start = time.monotonic()
    last = {s.name: s.guest.memfd_allocated() for s in sides}
    changed = time.monotonic()
    while time.monotonic() - changed < quiet and time.monotonic() - start < timeout:
        time.sleep(0.5)
        for side in sides:
            now = side.guest.memfd_allocated()
            if abs(now - last[side.name]) > 8 * MIB:
                last[side.name], changed = now, time.monotonic()


@dataclass
class Return:
    """Host memory after the guest freed 1 GiB."""

    seconds_to_floor: float  # until within 10% of the floor
    floor: int
    peak: int
    trace: list[tuple[float, int]]


def free_and_watch(side: Side, duration: float = 40.0) -> Return:
    guest = side.guest
    guest.check("workload touch 1024", timeout=180)
    start = time.monotonic()
    trace: list[tuple[float, int]] = []
    stable_since = None
    while time.monotonic() - start < duration:
        now = time.monotonic() - start
        trace.append((now, guest.memfd_allocated()))
        if len(trace) > 8 and abs(trace[-1][1] - trace[-9][1]) < 4 * MIB:
            stable_since = stable_since or now
            if now - stable_since > 4 and trace[0][1] - trace[-1][1] > 512 * MIB:
                break
        else:
            stable_since = None
        time.sleep(0.25)
    peak = trace[0][1]
    floor = min(value for _, value in trace)
    bar = floor + 0.1 * (peak - floor)
    reached = next(t for t, value in trace if value <= bar)
    return Return(reached, floor, peak, trace)


def guest_kit(ctx: Context, section: Section, boots: str) -> Any:
    """The real-guest kit, built if needed (a ``kit.Kit``); None, said in ``section``, in a
    smoke run or where the kit cannot be built."""
    if ctx.smoke:
        section.say(f"Not run in a smoke run (it boots {boots} and takes minutes).")
        return None
    import kit

    try:
        return kit.build(log=lambda line: print(f"kit: {line}", file=sys.stderr))
    except kit.KitError as error:
        section.say(f"Not measured: the real-guest kit cannot be built here: {error}")
        return None


def run(ctx: Context) -> Section:
    section = Section(
        "guest",
        "Real guest: balloond against QEMU's built-in balloon",
        "python -m bench --only guest",
    )
    ready = guest_kit(ctx, section, "two guests")
    if ready is None:
        return section
    from kit import devices
    from kit.guest import Guest, GuestConfig

    work = Path(tempfile.mkdtemp(prefix="balloond-bench-guests-"))
    results: dict[str, dict[str, list[Any]]] = {}
    profile_lines: list[str] = []
    with Daemon(["vm"]) as daemon:
        guests = []
        try:
            ours_args = devices.vhost_user_balloon(daemon.sockets["vm"])
            ours = Guest(ready, work / "balloond", GuestConfig(device_args=ours_args))
            guests.append(ours)
            ours.start()
            theirs_args = devices.builtin_balloon()
            theirs = Guest(ready, work / "builtin", GuestConfig(device_args=theirs_args))
            guests.append(theirs)
            theirs.start()
            sides: list[Side] = [BalloondSide(ours, daemon), QemuSide(theirs)]
            settle(sides)
            results = {s.name: {"return": [], "inflate": [], "deflate": []} for s in sides}
            for repeat in range(ctx.repeats):
                order = sides if repeat % 2 == 0 else list(reversed(sides))
                for side in order:
                    print(f"bench: guest repeat {repeat + 1}: {side.name}", file=sys.stderr)
                    results[side.name]["return"].append(free_and_watch(side))
                    settle([side], quiet=2.0)
                    results[side.name]["inflate"].append(side.move(TARGET))
                    results[side.name]["deflate"].append(side.move(RAM))
            profile_lines = profile_inflate(sides[0], daemon)
        finally:
            for guest in reversed(guests):
                guest.close()
        huge = huge_pages_return(ctx, ready, work, daemon, results)
    shutil.rmtree(work, ignore_errors=True)
    _write(ctx, section, results, profile_lines)
    section.say(huge)
    return section


def huge_pages_return(
    ctx: Context, ready: Any, work: Path, daemon: Daemon, results: dict[str, dict[str, list[Any]]]
) -> str:
    """Item 5 on 2 MiB huge pages: each guest frees 1 GiB, host memory is watched; the
    returns go to ``results[side]["return_huge"]``. Says what was done, or why not."""
    from kit import devices
    from kit.guest import Guest, GuestConfig
    from tests import hugepages

    guests = []
    try:
        with hugepages.reserve(2 * HUGE_PAGES_PER_GUEST):
            ours_args = devices.vhost_user_balloon(daemon.sockets["vm"])
            for name, args in (
                ("huge-balloond", ours_args),
                ("huge-builtin", devices.builtin_balloon()),
            ):
                config = GuestConfig(device_args=args, memory_object=HUGETLB_MEMORY)
                guest = Guest(ready, work / name, config)
                guests.append(guest)
                guest.start()
            sides: list[Side] = [BalloondSide(guests[0], daemon), QemuSide(guests[1])]
            settle(sides)
            for side in sides:
                results[side.name]["return_huge"] = []
            for repeat in range(ctx.repeats):
                order = sides if repeat % 2 == 0 else list(reversed(sides))
                for side in order:
                    print(f"bench: guest huge pages, repeat {repeat + 1}: {side.name}",
                          file=sys.stderr)  # fmt: skip
                    results[side.name]["return_huge"].append(free_and_watch(side))
                    settle([side], quiet=2.0)
    except hugepages.Unavailable as why:
        return f"On 2 MiB huge pages: not measured ({why})."
    finally:
        for guest in reversed(guests):
            guest.close()
    return (
        "On 2 MiB huge pages, the rows marked so: both guests' RAM is a hugetlb memfd "
        f"({2 * HUGE_PAGES_PER_GUEST} pages reserved for the run), booted after the rows "
        "above, the devices alternated as there."
    )


def profile_inflate(side: Side, daemon: Daemon) -> list[str]:
    """One more inflate and deflate on balloond with py-spy sampling the daemon."""
    with Spy(daemon.pid) as spy:
        inflate, deflate = side.move(TARGET), side.move(RAM)
    what = f"one more inflate ({inflate.seconds:.1f} s) and deflate ({deflate.seconds:.1f} s)"
    return spy.summary(what, top=16)


def _write(
    ctx: Context, section: Section, results: dict[str, dict[str, list[Any]]], profile: list[str]
) -> None:
    ours, theirs = results["balloond"], results["QEMU built-in"]
    rows = []
    section.data = {
        name: {kind: [getattr(m, "__dict__", m) for m in values] for kind, values in per.items()}
        for name, per in results.items()
    }

    def row(
        label: str,
        get: Callable[[Any], float],
        kind: str,
        target: str,
        ok: Callable[[float], bool],
    ) -> None:
        a = [get(m) for m in ours[kind]]
        b = [get(m) for m in theirs[kind]]
        ratio = ratios(a, b)
        rows.append([label, Spread.of(a).cell(), Spread.of(b).cell(), ratio.cell(), target,
                     "yes" if ok(ratio.median) else "no"])  # fmt: skip

    row("inflate 2 GiB -> 1 GiB, s", lambda m: m.seconds, "inflate", "ratio <= 1.0",
        lambda r: r <= 1.0)  # fmt: skip
    row("deflate 1 GiB -> 2 GiB, s", lambda m: m.seconds, "deflate", "ratio <= 1.0",
        lambda r: r <= 1.0)  # fmt: skip
    first = Spread.of([m.first_change for m in ours["inflate"]]).median
    row("inflate: first change of actual, s", lambda m: m.first_change, "inflate",
        "balloond <= 0.1 s", lambda r: first <= 0.1)  # fmt: skip
    row("freed 1 GiB: host memory within 10% of its floor, s", lambda m: m.seconds_to_floor,
        "return", "-", lambda r: True)  # fmt: skip
    row("freed 1 GiB: floor reached, MiB", lambda m: m.floor / MIB, "return", "-",
        lambda r: True)  # fmt: skip
    if ours.get("return_huge") and theirs.get("return_huge"):
        row("huge pages, freed 1 GiB: host memory within 10% of its floor, s",
            lambda m: m.seconds_to_floor, "return_huge", "-", lambda r: True)  # fmt: skip
        row("huge pages, freed 1 GiB: floor reached, MiB", lambda m: m.floor / MIB,
            "return_huge", "-", lambda r: True)  # fmt: skip
    for extra in rows[3:]:
        extra[-1] = "-"
    for label, row_ in zip(("inflate", "deflate"), rows, strict=False):
        section.target(f"real guest: {label} time, balloond / QEMU built-in", "<= 1.0",
                       row_[3], row_[5] == "yes")  # fmt: skip
    section.target("real guest: inflate starts (first change of actual)", "<= 0.1 s",
                   f"{first:.2f} s", first <= 0.1)  # fmt: skip
    section.say(
        f"{ctx.repeats} repeats, devices alternated (order swapped each repeat); median "
        "(min-max) over repeats, ratio balloond / QEMU per repeat. Both guests keep free page "
        "reporting on. Times from the command (control `set-target` / QMP `balloon`) to the "
        "guest's `actual` at the target, polled every 20 ms on both sides; host memory is "
        "the guest RAM memfd's allocated bytes, sampled every 0.25 s from the end of "
        "`workload touch 1024`."
    )
    section.table(["figure", "balloond", "QEMU built-in", "ratio", "target", "met"], rows)
    section.plot(_plot(ctx, results))
    if profile:
        section.lines.append("### Where balloond's time goes during an inflate")
        section.lines.append("")
        section.say(*profile)


def _plot(ctx: Context, results: dict[str, dict[str, list[Any]]]) -> Path | None:
    plt = pyplot()
    if plt is None:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours = {"balloond": "tab:blue", "QEMU built-in": "tab:orange"}
    for name, per in results.items():
        for i, ret in enumerate(per["return"]):
            left.plot([t for t, _ in ret.trace], [v / MIB for _, v in ret.trace],
                      color=colours[name], alpha=0.8 if i == 0 else 0.35,
                      label=name if i == 0 else None)  # fmt: skip
        for i, (inflate, deflate) in enumerate(zip(per["inflate"], per["deflate"], strict=True)):
            trace = inflate.trace + [(inflate.seconds + t, v) for t, v in deflate.trace]
            right.plot([t for t, _ in trace], [v / MIB for _, v in trace], color=colours[name],
                       alpha=0.8 if i == 0 else 0.35, label=name if i == 0 else None)  # fmt: skip
    left.set_title("host memory after the guest frees 1 GiB")
    left.set_xlabel("seconds after the free")
    left.set_ylabel("guest RAM memfd allocated (MiB)")
    right.set_title("balloon size: inflate to 1 GiB, then deflate")
    right.set_xlabel("seconds after the command")
    right.set_ylabel("balloon (MiB)")
    for axes in (left, right):
        axes.grid(True, alpha=0.3)
        axes.legend()
    path = ctx.plot_path("real-guest.png")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
