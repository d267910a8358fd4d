"""``make demo``: boot a Linux guest on balloond and watch the memory it frees leave the host.

Steps: build the kit when missing (progress shown), start ``balloond serve``, boot a 2 GiB
guest on it, let the guest touch and free 1 GiB twice, and print one table row per second:
what the host holds for the guest (the QEMU process's RssShmem and the guest RAM memfd's
allocated blocks) next to balloond's own counters (``balloond status --json``). At the end it
writes ``demo-out/balloond-demo.png`` (with matplotlib, the ``demo`` extra; a CSV always)
and prints ``balloond status``. QEMU and balloond are stopped on exit and on Ctrl-C.

    python3 -m kit.demo [--out DIR] [--rounds N] [--mib MIB]
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kit
from kit import devices
from kit.guest import Guest, GuestConfig, GuestError, die_with_parent
from kit.layout import KitError

MIB = 1 << 20
GUEST_MIB = 2048
BAR = 24


@dataclass(frozen=True)
class Row:
    seconds: float
    phase: str
    rss_shmem: int
    memfd: int | None
    reported: int
    discarded: int
    reports: int


def _mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


@contextlib.contextmanager
def step(what: str) -> Iterator[None]:
    """Print ``what`` and, on a terminal, a running clock until the step is done."""
    began = time.monotonic()
    done = threading.Event()
    live = sys.stdout.isatty()

    def tick() -> None:
        while not done.wait(0.25):
            print(f"\r{what} ... {time.monotonic() - began:5.1f} s", end="", flush=True)

    ticker = threading.Thread(target=tick, daemon=True)
    if live:
        ticker.start()
    else:
        print(f"{what} ...", flush=True)
    try:
        yield
    finally:
        done.set()
        if live:
            ticker.join()
            print(f"\r{what} ... {time.monotonic() - began:5.1f} s, done", flush=True)
        else:
            print(f"  done in {time.monotonic() - began:.1f} s", flush=True)


class Daemon:
    """``balloond serve`` on a socket in a private directory, stopped with SIGTERM."""

    def __init__(self, directory: Path, log_path: Path) -> None:
        self.socket_path = directory / "vm.sock"
        self.control_path = directory / "control.sock"
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> None:
        argv = [
            sys.executable, "-m", "balloond", "serve", "--socket-path", str(self.socket_path),
            "--control-socket", str(self.control_path),
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                preexec_fn=die_with_parent,
                # Not in the terminal's process group: Ctrl-C must not stop it before QEMU.
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while not self.control_path.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise KitError(f"balloond did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def client(self, *args: str) -> str:
        argv = [sys.executable, "-m", "balloond", *args, "--control", str(self.control_path)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise KitError(f"balloond {args[0]} failed: {done.stderr.strip()}")
        return done.stdout

    def status(self) -> dict[str, Any]:
        result: dict[str, Any] = json.loads(self.client("status", str(self.socket_path), "--json"))
        return result

    def stop(self) -> int | None:
        process = self.process
        if process is None:
            return None
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        return process.returncode


class Workload(threading.Thread):
    """Runs the guest commands in the background; ``phase`` says what the guest is doing."""

    def __init__(self, guest: Guest, rounds: int, mib: int, pause: float) -> None:
        super().__init__(daemon=True)
        self.guest = guest
        self.rounds = rounds
        self.mib = mib
        self.pause = pause
        self.phase = "idle"
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            time.sleep(3.0)
            for number in range(1, self.rounds + 1):
                self.phase = f"touching {self.mib} MiB ({number}/{self.rounds})"
                self.guest.check(f"workload touch {self.mib}", timeout=300)
                self.phase = f"freed {self.mib} MiB ({number}/{self.rounds})"
                time.sleep(self.pause)
        except BaseException as error:  # reported by the main thread
            self.error = error
        self.phase = "done"


HEAD = (
    f"{'t/s':>5}  {'guest is':<26} {'RssShmem':>8} {'memfd':>6}  {'':<{BAR}}  "
    f"{'reports':>7} {'reported':>8} {'discarded':>9}"
)
UNITS = f"{'':>5}  {'':<26} {'MiB':>8} {'MiB':>6}  {'':<{BAR}}  {'':>7} {'MiB':>8} {'MiB':>9}"


def format_row(row: Row) -> str:
    filled = round(BAR * row.rss_shmem / (GUEST_MIB * MIB))
    bar = "#" * min(filled, BAR) + "." * max(0, BAR - filled)
    return (
        f"{row.seconds:5.0f}  {row.phase:<26} {_mib(row.rss_shmem):>8} {_mib(row.memfd):>6}  "
        f"{bar}  {row.reports:>7} {_mib(row.reported):>8} {_mib(row.discarded):>9}"
    )


def watch(guest: Guest, daemon: Daemon, workload: Workload, tail: float) -> list[Row]:
    """One row a second until the workload is done and ``tail`` seconds passed."""
    rows: list[Row] = []
    print(HEAD)
    print(UNITS)
    began = time.monotonic()
    finished: float | None = None
    while True:
        rss, memfd = guest.host_memory()
        counters = daemon.status().get("counters", {})
        row = Row(
            time.monotonic() - began,
            workload.phase,
            rss,
            memfd,
            counters.get("reported_bytes", 0),
            counters.get("discarded_bytes", 0),
            counters.get("reports", 0),
        )
        rows.append(row)
        print(format_row(row), flush=True)
        if not workload.is_alive():
            finished = finished or time.monotonic()
            if workload.error is not None or time.monotonic() - finished >= tail:
                return rows
        time.sleep(max(0.0, began + len(rows) - time.monotonic()))


def write_csv(rows: list[Row], path: Path) -> None:
    lines = ["seconds,phase,rss_shmem_bytes,memfd_bytes,reports,reported_bytes,discarded_bytes"]
    for r in rows:
        memfd = "" if r.memfd is None else str(r.memfd)
        lines.append(
            f"{r.seconds:.1f},{r.phase},{r.rss_shmem},{memfd},{r.reports},{r.reported},"
            f"{r.discarded}"
        )
    path.write_text("\n".join(lines) + "\n")


def write_png(rows: list[Row], path: Path, title: str) -> bool:
    """Plot host memory and balloond's counters; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    seconds = [r.seconds for r in rows]
    figure, axes = plt.subplots(figsize=(9, 4.5), dpi=110)
    axes.plot(seconds, [r.rss_shmem / MIB for r in rows], label="host: QEMU RssShmem", lw=2)
    if all(r.memfd is not None for r in rows):
        memfd = [(r.memfd or 0) / MIB for r in rows]
        axes.plot(seconds, memfd, label="host: guest RAM memfd allocated", ls="--")
    first = rows[0]
    axes.plot(
        seconds,
        [(r.discarded - first.discarded) / MIB for r in rows],
        label="balloond: discarded since start (includes never-touched free RAM)",
        ls=":",
    )
    for previous, row in itertools.pairwise(rows):
        if row.phase != previous.phase and row.phase.startswith("freed"):
            axes.axvline(row.seconds, color="grey", lw=0.8, alpha=0.6)
    axes.set_xlabel("seconds")
    axes.set_ylabel("MiB")
    axes.set_ylim(bottom=0)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m kit.demo", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo-out"), help="output directory")
    parser.add_argument("--rounds", type=int, default=2, help="touch/free rounds (default 2)")
    parser.add_argument("--mib", type=int, default=1024, help="MiB touched per round")
    args = parser.parse_args(argv)
    out: Path = args.out.absolute()
    out.mkdir(parents=True, exist_ok=True)
    sockets = Path(tempfile.mkdtemp(prefix="balloond-demo-"))
    daemon = Daemon(sockets, out / "balloond.log")
    guest: Guest | None = None
    # Ctrl-C and SIGTERM end the demo the same way, even when started with SIGINT ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        print("== the kit: QEMU 11 and a Linux guest (built once, cached)", flush=True)
        built = kit.build(log=lambda line: print(f"   {line}", flush=True))
        with step("== starting balloond"):
            daemon.start()
        print(f"   balloond serves {daemon.socket_path}; its log: {daemon.log_path}")
        config = GuestConfig(
            memory_mib=GUEST_MIB,
            device_args=devices.vhost_user_balloon(daemon.socket_path),
            lifetime=900.0,
        )
        guest = Guest(built, out / "guest", config)
        with step(f"== booting a {GUEST_MIB} MiB Linux guest on balloond (TCG, about 10 s)"):
            guest.start()
        print(
            f"\n== the guest touches {args.mib} MiB and frees it, {args.rounds} times; the "
            "host's share of guest RAM (RssShmem, # bar) should fall back each time\n"
        )
        workload = Workload(guest, args.rounds, args.mib, pause=14.0)
        workload.start()
        rows = watch(guest, daemon, workload, tail=1.0)
        if workload.error is not None:
            raise workload.error
        csv_path = out / "balloond-demo.csv"
        write_csv(rows, csv_path)
        png_path = out / "balloond-demo.png"
        peak = max(r.rss_shmem for r in rows)
        print(
            f"\nhost RssShmem: peak {_mib(peak)} MiB, now {_mib(rows[-1].rss_shmem)} MiB; "
            f"balloond discarded {_mib(rows[-1].discarded - rows[0].discarded)} MiB meanwhile"
        )
        title = (
            f"A {GUEST_MIB // 1024} GiB guest on balloond touches and frees {args.mib} MiB, "
            f"{args.rounds}x: the host gets it back"
        )
        if write_png(rows, png_path, title):
            print(f"plot: {png_path}")
        else:
            print(f"no plot: matplotlib is missing (pip install -e '.[demo]'); data: {csv_path}")
        print(f"data: {csv_path}\n\n== balloond status {daemon.socket_path}")
        print(daemon.client("status", str(daemon.socket_path)))
        return 0
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    except (KitError, GuestError) as error:
        print(f"demo: {error}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip cleanup
        if guest is not None:
            guest.close()
        status = daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)
        if status not in (None, 0):
            print(f"balloond exited {status}; see {daemon.log_path}", file=sys.stderr)
        signal.signal(signal.SIGINT, signal.default_int_handler)


if __name__ == "__main__":
    sys.exit(main())
