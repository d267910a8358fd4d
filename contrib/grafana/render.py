"""Draw balloond's Grafana dashboard (``balloond.json``) from a real scrape, without Grafana.

``record`` boots a real Linux guest (the test kit: QEMU 11, TCG) whose balloon a real
``balloond serve --metrics-listen`` serves, scrapes ``/metrics`` once a second while the guest
touches and frees 1 GiB, then sets a balloon target and releases it, saves every scrape as
JSON lines and draws the picture. ``plot`` draws it again from saved scrapes.

The picture is not a Grafana screenshot: every panel's queries are read from the dashboard
JSON and evaluated here over the scraped series, as Prometheus would (``rate``, ``increase``,
``sum by``, ``histogram_quantile``, ``$__rate_interval`` = 4 scrape intervals, ``$__range`` =
the whole recording). A query of a form this script does not know stops it: the picture
always shows the dashboard's own queries, or nothing.

    .venv/bin/pip install -e '.[dev,demo]'          # matplotlib
    .venv/bin/python contrib/grafana/render.py record [--out DIR] [--png FILE]
    .venv/bin/python contrib/grafana/render.py plot DIR/scrape.jsonl [--png FILE]

DIR is demo-out/dashboard/ (the scrapes, balloond's log, the final status), FILE is
docs/dashboard.png. ``record`` takes about 2 minutes with a built kit (``python3 -m kit
build`` makes one). It runs one guest (2 GiB, one vCPU, its balloon behind a PCIe root port)
and one daemon with two devices: ``vm0`` with the guest and ``vm1`` that no VM uses, as on a
host where a VM is shut off. Rates are the slope between the samples in the window, without
Prometheus's extrapolation to the window's edges.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "contrib" / "grafana" / "balloond.json"
MIB = 1 << 20
GIB = 1 << 30
#: Seconds between scrapes, and Grafana's $__rate_interval for it (4 scrape intervals).
SCRAPE_INTERVAL = 1.0
RATE_INTERVAL = 4 * SCRAPE_INTERVAL

Labels = frozenset[tuple[str, str]]


# --- recording ------------------------------------------------------------------------------


class Recorder:
    """Scrapes ``url`` every second into ``path`` (JSON lines), with events in between."""

    def __init__(self, url: str, path: Path, probe: Callable[[], dict[str, Any]]) -> None:
        self.url = url
        self.path = path
        self.probe = probe
        self.file = open(path, "w")  # noqa: SIM115
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.scrapes = 0

    def _write(self, record: dict[str, Any]) -> None:
        with self.lock:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def event(self, text: str) -> None:
        print(f"  {time.strftime('%H:%M:%S')}  {text}", flush=True)
        self._write({"t": time.time(), "event": text})

    def _run(self) -> None:
        from prometheus_client.parser import text_string_to_metric_families

        next_at = time.monotonic()
        while not self.stop.is_set():
            started = time.time()
            try:
                with urllib.request.urlopen(self.url, timeout=5) as answer:
                    text = answer.read().decode()
            except OSError as error:
                self._write({"t": started, "error": str(error)})
            else:
                samples = [
                    [sample.name, sample.labels, sample.value]
                    for family in text_string_to_metric_families(text)
                    for sample in family.samples
                ]
                self._write({"t": started, "samples": samples, "host": self.probe()})
                self.scrapes += 1
            next_at += SCRAPE_INTERVAL
            self.stop.wait(max(0.0, next_at - time.monotonic()))

    def __enter__(self) -> Recorder:
        self.thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop.set()
        self.thread.join()
        self.file.close()


class Daemon:
    """``balloond serve`` with metrics and statistics polling, in a private directory."""

    def __init__(self, directory: Path, port: int, log_path: Path) -> None:
        self.directory = directory
        self.control = directory / "control.sock"
        self.port = port
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def socket(self, name: str) -> Path:
        return self.directory / f"{name}.sock"

    def start(self) -> None:
        argv = [
            sys.executable, "-m", "balloond", "serve",
            "--socket-path", str(self.socket("vm0")), "--socket-path", str(self.socket("vm1")),
            "--control-socket", str(self.control),
            "--metrics-listen", f"127.0.0.1:{self.port}",
            "--stats-interval", "2", "--log-format", "json",
        ]  # fmt: skip
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=log, start_new_session=True
            )
        deadline = time.monotonic() + 15
        while not self.control.exists():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"balloond did not start:\n{self.log_path.read_text()}")
            time.sleep(0.05)

    def client(self, *args: str) -> str:
        argv = [sys.executable, "-m", "balloond", *args, "--control", str(self.control)]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=30)
        if done.returncode != 0:
            raise RuntimeError(f"balloond {' '.join(args)}: {done.stderr.strip()}")
        return done.stdout

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _wait_for(url: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def record(out: Path) -> Path:
    """Run the scenario; returns the JSON-lines file of scrapes and events."""
    sys.path.insert(0, str(ROOT))
    import kit
    from kit import devices
    from kit.guest import Guest, GuestConfig

    out.mkdir(parents=True, exist_ok=True)
    built = kit.build(log=lambda line: print(f"   {line}", flush=True))
    sockets = Path(tempfile.mkdtemp(prefix="balloond-dashboard-"))
    daemon = Daemon(sockets, _free_port(), out / "balloond.log")
    guest: Guest | None = None
    scrape_path = out / "scrape.jsonl"

    def probe() -> dict[str, Any]:
        if guest is None or not guest.running:
            return {}
        with contextlib.suppress(OSError, RuntimeError):
            rss, memfd = guest.host_memory()
            return {"qemu_rss_shmem": rss, "memfd_allocated": memfd}
        return {}

    try:
        daemon.start()
        url = f"http://127.0.0.1:{daemon.port}/metrics"
        _wait_for(url)
        print(f"balloond serves vm0 and vm1; metrics at {url}; log {daemon.log_path}")
        with Recorder(url, scrape_path, probe) as recorder:
            time.sleep(3)
            config = GuestConfig(
                memory_mib=2048,
                device_args=devices.vhost_user_balloon_unpluggable(daemon.socket("vm0")),
                lifetime=900.0,
            )
            guest = Guest(built, out / "guest", config)
            recorder.event("boot a 2 GiB guest on vm0")
            guest.start()
            recorder.event("guest up")
            time.sleep(8)
            recorder.event("workload touch 1024")
            guest.check("workload touch 1024", timeout=300)
            recorder.event("1 GiB freed")
            time.sleep(22)
            recorder.event("set-target vm0 1.5GiB")
            daemon.client("set-target", "vm0", "1.5GiB")
            time.sleep(22)
            recorder.event("set-target vm0 2GiB")
            daemon.client("set-target", "vm0", "2GiB")
            time.sleep(14)
            (out / "status.txt").write_text(daemon.client("status"))
            (out / "status.json").write_text(daemon.client("status", "--json"))
        print(f"{recorder.scrapes} scrapes in {scrape_path}")
        return scrape_path
    finally:
        if guest is not None:
            guest.close()
        daemon.stop()
        shutil.rmtree(sockets, ignore_errors=True)


# --- a little PromQL ----------------------------------------------------------------------


@dataclass
class Recording:
    """Scrapes as series: ``times[i]`` and, per (metric, labels), a value or NaN per scrape."""

    times: list[float]
    series: dict[tuple[str, Labels], list[float]]
    events: list[tuple[float, str]]
    host: list[dict[str, Any]]

    @classmethod
    def load(cls, path: Path) -> Recording:
        scrapes: list[tuple[float, dict[tuple[str, Labels], float], dict[str, Any]]] = []
        events: list[tuple[float, str]] = []
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if "event" in entry:
                events.append((entry["t"], entry["event"]))
            elif "samples" in entry:
                values = {
                    (name, frozenset(labels.items())): float(value)
                    for name, labels, value in entry["samples"]
                }
                scrapes.append((entry["t"], values, entry.get("host", {})))
        keys = {key for _, values, _ in scrapes for key in values}
        series = {key: [values.get(key, math.nan) for _, values, _ in scrapes] for key in keys}
        return cls([t for t, _, _ in scrapes], series, events, [h for _, _, h in scrapes])

    def instant(self, name: str) -> dict[Labels, list[float]]:
        return {labels: values for (n, labels), values in self.series.items() if n == name}

    def _rise(self, name: str, window: float) -> dict[Labels, list[tuple[float, float]]]:
        """At every scrape, (rise, seconds): how much each counter rose over its samples in the
        window (a fall is a reset, counted from 0) and the time they span; (NaN, 0) with
        fewer than two samples."""
        found: dict[Labels, list[tuple[float, float]]] = {}
        for labels, values in self.instant(name).items():
            row = []
            for i, now in enumerate(self.times):
                inside = [
                    (t, v)
                    for t, v in zip(self.times[: i + 1], values[: i + 1], strict=True)
                    if now - window < t and not math.isnan(v)
                ]
                if len(inside) < 2:
                    row.append((math.nan, 0.0))
                    continue
                rise = 0.0
                for (_, before), (_, after) in itertools.pairwise(inside):
                    rise += after - before if after >= before else after
                row.append((rise, inside[-1][0] - inside[0][0]))
            found[labels] = row
        return found

    def rate(self, name: str, window: float) -> dict[Labels, list[float]]:
        """``rate(name[window])``: the rise over the time its samples span. Unlike Prometheus,
        not extrapolated to the window's edges (the same slope, without its guesswork)."""
        return {
            labels: [rise / span if span else math.nan for rise, span in row]
            for labels, row in self._rise(name, window).items()
        }

    def increase(self, name: str, window: float) -> dict[Labels, list[float]]:
        """``increase(name[window])``: the rate times the window."""
        return {
            labels: [value * window for value in row]
            for labels, row in self.rate(name, window).items()
        }

    def increase_since_start(self, name: str) -> dict[Labels, list[float]]:
        """``increase(name[$__range])`` with the recording as the range: the rise so far."""
        window = self.times[-1] - self.times[0] + SCRAPE_INTERVAL
        return {
            labels: [rise for rise, _ in row] for labels, row in self._rise(name, window).items()
        }


def sum_by(
    vectors: dict[Labels, list[float]], by: tuple[str, ...] | None
) -> dict[Labels, list[float]]:
    """``sum by (by) (...)`` (``sum(...)`` when ``by`` is None): NaN only where every member
    is absent, as Prometheus drops absent series from a sum."""
    groups: dict[Labels, list[list[float]]] = {}
    for labels, row in vectors.items():
        key = frozenset((k, v) for k, v in labels if by is not None and k in by)
        groups.setdefault(key, []).append(row)
    summed = {}
    for key, rows in groups.items():
        summed[key] = [
            math.nan if all(math.isnan(v) for v in column) else sum(v for v in column if v == v)
            for column in zip(*rows, strict=True)
        ]
    return summed


def histogram_quantile(q: float, buckets: dict[Labels, list[float]]) -> dict[Labels, list[float]]:
    """Prometheus's ``histogram_quantile``: linear interpolation in the bucket the rank falls
    in; the highest finite bound when it falls in +Inf; NaN without observations."""
    by_series: dict[Labels, list[tuple[float, list[float]]]] = {}
    for labels, row in buckets.items():
        bound = float(dict(labels)["le"])
        rest = frozenset((k, v) for k, v in labels if k != "le")
        by_series.setdefault(rest, []).append((bound, row))
    found = {}
    for rest, bounds in by_series.items():
        bounds.sort()
        row = []
        for i in range(len(bounds[0][1])):
            counts = [(le, values[i]) for le, values in bounds]
            total = counts[-1][1]
            if math.isnan(total) or total <= 0:
                row.append(math.nan)
                continue
            rank = q * total
            lower, below = 0.0, 0.0
            value = math.nan
            for le, cumulative in counts:
                if cumulative >= rank:
                    if math.isinf(le):
                        value = lower
                    else:
                        share = (rank - below) / (cumulative - below) if cumulative > below else 1
                        value = lower + (le - lower) * share
                    break
                lower, below = le, cumulative
            row.append(value)
        found[rest] = row
    return found


_SELECTOR = r"\{(?P<sel>[^}]*)\}"
_ALLOWED_MATCHERS = {'instance="$instance"', 'device=~"$device"'}
_FORMS: list[tuple[str, str]] = [
    ("instant", rf"(?P<name>\w+){_SELECTOR}"),
    ("sum", rf"sum\((?P<name>\w+){_SELECTOR}\)"),
    ("sum_increase_range", rf"sum\(increase\((?P<name>\w+){_SELECTOR}\[\$__range\]\)\)"),
    (
        "sum_by_range_fn",
        rf"sum by \((?P<by>[\w, ]+)\) \((?P<fn>rate|increase)\((?P<name>\w+){_SELECTOR}"
        r"\[\$__rate_interval\]\)\)",
    ),
    (
        "quantile",
        rf"histogram_quantile\((?P<q>[\d.]+), sum by \(device, le\) \(rate\((?P<name>\w+)"
        rf"{_SELECTOR}\[\$__rate_interval\]\)\)\)",
    ),
]


class UnknownQuery(Exception):
    pass


def evaluate(expr: str, rec: Recording) -> dict[Labels, list[float]]:
    """One of the dashboard's queries over the recording, at every scrape."""
    for kind, pattern in _FORMS:
        match = re.fullmatch(pattern, expr)
        if match is None:
            continue
        matchers = {m.strip() for m in match.group("sel").split(",") if m.strip()}
        if not matchers <= _ALLOWED_MATCHERS:
            raise UnknownQuery(f"selector {match.group('sel')!r} in {expr!r}")
        name = match.group("name")
        if kind == "instant":
            return rec.instant(name)
        if kind == "sum":
            return sum_by(rec.instant(name), None)
        if kind == "sum_increase_range":
            return sum_by(rec.increase_since_start(name), None)
        if kind == "sum_by_range_fn":
            by = tuple(part.strip() for part in match.group("by").split(","))
            fn = rec.rate if match.group("fn") == "rate" else rec.increase
            return sum_by(fn(name, RATE_INTERVAL), by)
        if kind == "quantile":
            buckets = sum_by(rec.rate(name, RATE_INTERVAL), ("device", "le"))
            return histogram_quantile(float(match.group("q")), buckets)
    # A / B of two of the above (the mean latency): both sides matched by label set.
    left, slash, right = expr.partition(" / ")
    if slash:
        top, bottom = evaluate(left, rec), evaluate(right, rec)
        return {
            labels: [a / b if b else math.nan for a, b in zip(row, bottom[labels], strict=True)]
            for labels, row in top.items()
            if labels in bottom
        }
    raise UnknownQuery(expr)


def legend(template: str, labels: Labels) -> str:
    values = dict(labels)
    return re.sub(r"\{\{\s*(\w+)\s*\}\}", lambda m: values.get(m.group(1), ""), template)


# --- drawing ----------------------------------------------------------------------------------

BACKGROUND = "#111217"
PANEL = "#181b1f"
BORDER = "#2c3235"
TEXT = "#ccccdc"
DIM = "#8e8e99"
GREEN, RED, MARK = "#73bf69", "#f2495c", "#8ab8ff"
PALETTE = [GREEN, "#fade2a", "#5794f2", "#ff9830", RED, "#b877d9", "#8ab8ff", "#ffb357",
           "#96d98d", "#ca95e5"]  # fmt: skip
#: Figure size: inches per grid row (Grafana's is 30 px) and the whole width (24 columns).
ROW_INCH = 0.36
WIDTH_INCH = 15.0
HEADER_ROWS = 2.4
#: Events not marked on the panels (the guest's init answering is no change on the host).
UNMARKED = ("guest up",)


@dataclass
class Series:
    name: str
    values: list[float]
    unit: str
    right: bool = False


def _scale(unit: str, peak: float) -> tuple[float, str]:
    """(divisor, suffix) for Grafana's unit ``unit`` at magnitude ``peak``."""
    if unit in ("bytes", "Bps"):
        per = "/s" if unit == "Bps" else ""
        for factor, name in ((float(GIB), "GiB"), (float(MIB), "MiB"), (1024.0, "KiB")):
            if peak >= factor:
                return factor, name + per
        return 1.0, "B" + per
    if unit == "s":
        for factor, name in ((1.0, "s"), (1e-3, "ms")):
            if peak >= factor:
                return factor, name
        return 1e-6, "µs"
    return 1.0, ""


def _format(value: float, unit: str) -> str:
    if math.isnan(value):
        return "No data"
    factor, suffix = _scale(unit, abs(value))
    scaled = value / factor
    text = f"{scaled:.3g}" if abs(scaled) < 100 else f"{scaled:.0f}"
    return f"{text} {suffix}".strip()


def _last(values: list[float]) -> float:
    """Grafana's default reduction: the last value that is not null."""
    return next((v for v in reversed(values) if not math.isnan(v)), math.nan)


def _override(panel: dict[str, Any], name: str) -> dict[str, Any]:
    """The properties the panel's overrides give the series ``name`` (byRegexp matchers)."""
    found: dict[str, Any] = {}
    for override in panel.get("fieldConfig", {}).get("overrides", []):
        matcher = override.get("matcher", {})
        if matcher.get("id") == "byRegexp" and re.fullmatch(matcher.get("options", ""), name):
            found.update({p["id"]: p["value"] for p in override.get("properties", [])})
    return found


def panel_series(panel: dict[str, Any], rec: Recording) -> list[Series]:
    """Every series of a panel: each target's query, one series per label set, named by its
    legend format, with the unit and axis its overrides give it."""
    unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit", "short")
    found = []
    for target in panel.get("targets", []):
        result = evaluate(target["expr"], rec)
        for labels in sorted(result, key=sorted):
            name = legend(target.get("legendFormat", ""), labels)
            override = _override(panel, name)
            found.append(
                Series(
                    name,
                    result[labels],
                    override.get("unit", unit),
                    override.get("custom.axisPlacement") == "right",
                )
            )
    return found


class Canvas:
    """The figure, with Grafana's grid: 24 columns, rows of ROW_INCH, a header on top."""

    def __init__(self, rows: int) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plt.rcParams.update({"font.size": 8.5, "font.family": "DejaVu Sans"})
        self.plt = plt
        self.height = (rows + HEADER_ROWS) * ROW_INCH
        self.figure = plt.figure(figsize=(WIDTH_INCH, self.height), dpi=100)
        self.figure.set_facecolor(BACKGROUND)

    def y(self, rows: float) -> float:
        """Figure height fraction of ``rows`` grid rows."""
        return rows * ROW_INCH / self.height

    def x(self, inches: float) -> float:
        return inches / WIDTH_INCH

    def text(self, x: float, y: float, text: str, **style: Any) -> None:
        self.figure.text(x, y, text, **{"color": TEXT, "va": "center", **style})

    def panel(self, grid: dict[str, int], title: str) -> tuple[float, float, float, float]:
        """Draw a panel's box and title; returns its inner area (left, bottom, width, height)."""
        from matplotlib.patches import Rectangle

        gap = self.x(0.06)
        left = grid["x"] / 24 + gap
        width = grid["w"] / 24 - 2 * gap
        top = 1 - self.y(HEADER_ROWS + grid["y"]) - self.y(0.1)
        tall = self.y(grid["h"]) - self.y(0.2)
        bottom = top - tall
        box = Rectangle((left, bottom), width, tall, transform=self.figure.transFigure,
                        facecolor=PANEL, edgecolor=BORDER, lw=0.8, zorder=-5)  # fmt: skip
        self.figure.patches.append(box)
        title_h = self.y(0.75)
        self.text(left + self.x(0.1), top - title_h / 2, title, fontsize=9.5, fontweight="bold")
        return left, bottom, width, tall - title_h

    def save(self, path: Path) -> None:
        self.figure.savefig(path, facecolor=BACKGROUND)
        self.plt.close(self.figure)


def _legend_layout(names: list[str], width: float) -> tuple[list[tuple[float, int]], int]:
    """Where each legend entry goes (x offset as a figure fraction, line), wrapping at
    ``width``; and how many lines it takes."""
    places = []
    x, line = 0.0, 0
    for name in names:
        size = (0.22 + 0.056 * len(name) + 0.2) / WIDTH_INCH
        if x and x + size > width:
            x, line = 0.0, line + 1
        places.append((x, line))
        x += size
    return places, line + 1 if names else 0


def draw(rec: Recording, png: Path, dashboard: dict[str, Any]) -> list[str]:
    """Draw every panel of ``dashboard`` at its grid position; returns a summary of values."""
    import matplotlib.dates as mdates

    panels = dashboard["panels"]
    canvas = Canvas(max(p["gridPos"]["y"] + p["gridPos"]["h"] for p in panels))
    times = [mdates.date2num(_local(t)) for t in rec.times]
    start, end = rec.times[0], rec.times[-1]
    marks = [(t, text) for t, text in rec.events if start <= t <= end and text not in UNMARKED]
    summary: list[str] = []

    top = 1 - canvas.y(0.7)
    canvas.text(canvas.x(0.12), top, dashboard["title"], fontsize=15, fontweight="bold")
    clock = "%H:%M:%S"
    canvas.text(
        canvas.x(1.25),
        top,
        f"Host 127.0.0.1    VM All    {time.strftime(clock, time.localtime(start))} to "
        f"{time.strftime(clock, time.localtime(end))}    scraped every {SCRAPE_INTERVAL:g} s, "
        f"$__rate_interval = {RATE_INTERVAL:g} s",
        color=DIM,
        fontsize=9,
    )
    canvas.text(
        1 - canvas.x(0.12),
        top,
        "drawn by contrib/grafana/render.py: the dashboard's queries over a real scrape, "
        "not a Grafana screenshot",
        color=DIM,
        fontsize=8.5,
        ha="right",
        style="italic",
    )
    annotations = "    ".join(
        f"({number}) {time.strftime(clock, time.localtime(t))} {text}"
        for number, (t, text) in enumerate(marks, 1)
    )
    canvas.text(canvas.x(0.12), 1 - canvas.y(1.65), f"annotations:    {annotations}",
                color=MARK, fontsize=8.5)  # fmt: skip

    for panel in panels:
        series = panel_series(panel, rec)
        left, bottom, width, tall = canvas.panel(panel["gridPos"], panel["title"])
        if panel["type"] == "stat":
            summary.append(_stat(canvas, (left, bottom, width, tall), series, times, panel))
            continue
        if panel["type"] == "state-timeline":
            names = ["connected", "not connected"]
            colors = [GREEN, RED]
        else:
            names = [s.name for s in series]
            colors = [PALETTE[i % len(PALETTE)] for i in range(len(series))]
        places, lines = _legend_layout(names, width - canvas.x(0.2))
        line_h = canvas.y(0.42)
        legend_h = (lines + 0.4) * line_h
        for name, color, (dx, line) in zip(names, colors, places, strict=True):
            y = bottom + legend_h - (line + 0.7) * line_h
            canvas.text(left + canvas.x(0.1) + dx, y, "\u25ac", color=color, fontsize=9)
            canvas.text(left + canvas.x(0.28) + dx, y, name, fontsize=7.5)
        right = canvas.x(0.55) if any(s.right for s in series) else 0.0
        area = (
            left + canvas.x(0.72),
            bottom + legend_h + canvas.y(0.55),
            width - canvas.x(0.85) - right,
            tall - legend_h - canvas.y(0.65),
        )
        ax = canvas.figure.add_axes(area)
        _style(ax, times)
        if panel["type"] == "state-timeline":
            _state_timeline(ax, series, times)
            continue
        summary.extend(_timeseries(ax, panel["title"], series, times, colors))
        for number, (t, _) in enumerate(marks, 1):
            x = mdates.date2num(_local(t))
            ax.axvline(x, color=MARK, lw=0.8, ls=(0, (3, 3)), alpha=0.6)
            ax.annotate(str(number), (x, 1), xycoords=("data", "axes fraction"),
                        xytext=(2, -2), textcoords="offset points", color=MARK, fontsize=7,
                        va="top")  # fmt: skip
    for t, text in marks:
        summary.append(f"event at +{t - start:.0f} s: {text}")
    canvas.save(png)
    return summary


def _local(t: float) -> Any:
    from datetime import datetime

    return datetime.fromtimestamp(t)


def _style(ax: Any, times: list[float]) -> None:
    import matplotlib.dates as mdates

    ax.set_facecolor(PANEL)
    for spine in ax.spines.values():
        spine.set_visible(False)
    ax.tick_params(colors=DIM, labelsize=7.5, length=0)
    ax.set_xlim(times[0], times[-1])
    span = (times[-1] - times[0]) * 86400
    step = next((s for s in (5, 10, 15, 20, 30, 60, 120, 300) if span / s <= 7), 600)
    ax.xaxis.set_major_locator(
        mdates.SecondLocator(bysecond=range(0, 60, step))
        if step < 60
        else mdates.MinuteLocator(byminute=range(0, 60, step // 60))
    )
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%H:%M:%S"))


def _stat(
    canvas: Canvas,
    area: tuple[float, float, float, float],
    series: list[Series],
    times: list[float],
    panel: dict[str, Any],
) -> str:
    """A stat panel: the first series' last value, over its sparkline (Grafana's defaults)."""
    left, bottom, width, tall = area
    ax = canvas.figure.add_axes((left, bottom + canvas.y(0.05), width, tall - canvas.y(0.1)))
    ax.set_axis_off()
    value = _last(series[0].values) if series else math.nan
    text = _format(value, series[0].unit if series else "short")
    if series:
        values = series[0].values
        ax.fill_between(times, [0 if math.isnan(v) else v for v in values], color=GREEN,
                        alpha=0.16, lw=0)  # fmt: skip
        ax.plot(times, values, color=GREEN, lw=0.8, alpha=0.55)
        ax.set_xlim(times[0], times[-1])
        peak = max((v for v in values if not math.isnan(v)), default=0.0)
        ax.set_ylim(0, peak * 1.9 if peak else 1)  # the sparkline in the lower half
    ax.text(0.5, 0.55, text, transform=ax.transAxes, ha="center", va="center", fontsize=22,
            fontweight="bold", color=GREEN if series else DIM)  # fmt: skip
    return f"{panel['title']}: {text}"


def _timeseries(
    ax: Any, title: str, series: list[Series], times: list[float], colors: list[str]
) -> list[str]:
    """Lines on the left axis, and on a right one for series an override puts there."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    summary = []
    sides = [(ax, [i for i, s in enumerate(series) if not s.right])]
    if any(s.right for s in series):
        twin = ax.twinx()
        _style(twin, times)
        sides.append((twin, [i for i, s in enumerate(series) if s.right]))
    for axis, members in sides:
        unit = series[members[0]].unit if members else "short"
        finite = [v for i in members for v in series[i].values if not math.isnan(v)]
        peak = max((abs(v) for v in finite), default=0.0)
        factor, suffix = _scale(unit, peak)
        for i in members:
            s = series[i]
            axis.plot(times, [v / factor for v in s.values], color=colors[i], lw=1.3)
            values = [v for v in s.values if not math.isnan(v)]
            if values:
                summary.append(
                    f"{title} / {s.name}: last {_format(_last(s.values), unit)}, max "
                    f"{_format(max(values), unit)}, min {_format(min(values), unit)}"
                )
            else:
                summary.append(f"{title} / {s.name}: no data")
        if not finite:
            axis.text(0.5, 0.5, "No data", transform=axis.transAxes, ha="center", va="center",
                      color=DIM, fontsize=11)  # fmt: skip
            axis.set_yticks([])
            continue
        axis.set_ylim(0, peak / factor * 1.08 if peak else 1)
        if peak:
            axis.yaxis.set_major_locator(MaxNLocator(5, steps=[1, 2, 2.5, 5, 10]))
        else:
            axis.set_yticks([0])
        axis.yaxis.set_major_formatter(
            FuncFormatter(lambda v, _, s=suffix: f"{v:g} {s}".strip() if v else "0")
        )
        if axis is ax:
            axis.grid(color=BORDER, lw=0.6)
    return summary


def _state_timeline(ax: Any, series: list[Series], times: list[float]) -> None:
    """One row per series: runs of equal values as bars (mergeValues), by value mapping."""
    colors = {0.0: RED, 1.0: GREEN}
    step = times[1] - times[0]
    ax.set_ylim(len(series) - 0.5, -0.5)
    ax.set_yticks(range(len(series)), [s.name for s in series])
    for row, s in enumerate(series):
        run_start, run_value = None, math.nan
        for x, value in [*zip(times, s.values, strict=True), (times[-1] + step, math.nan)]:
            if value == run_value:
                continue
            if run_start is not None and not math.isnan(run_value):
                color = colors.get(run_value, DIM)
                ax.barh(row, x - run_start, left=run_start, height=0.8, color=color, lw=0)
            run_start, run_value = x, value
    ax.set_xlim(times[0], times[-1] + step)


def check_queries(dashboard: dict[str, Any], rec: Recording) -> None:
    """Every query of the dashboard is one this script evaluates (UnknownQuery otherwise)."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            evaluate(target["expr"], rec)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="render.py", description=(__doc__ or "").split("\n", 1)[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    rec_cmd = commands.add_parser("record", help="boot a guest on balloond, scrape, draw")
    rec_cmd.add_argument("--out", type=Path, default=ROOT / "demo-out" / "dashboard")
    rec_cmd.add_argument("--png", type=Path, default=ROOT / "docs" / "dashboard.png")
    plot_cmd = commands.add_parser("plot", help="draw from saved scrapes")
    plot_cmd.add_argument("scrape", type=Path)
    plot_cmd.add_argument("--png", type=Path, default=ROOT / "docs" / "dashboard.png")
    args = parser.parse_args(argv)
    dashboard = json.loads(DASHBOARD.read_text())
    try:
        with _sigterm_as_interrupt():
            path = record(args.out.absolute()) if args.command == "record" else args.scrape
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    rec = Recording.load(path)
    if len(rec.times) < 2:
        print(f"{path}: fewer than two scrapes", file=sys.stderr)
        return 1
    try:
        check_queries(dashboard, rec)
    except UnknownQuery as error:
        print(f"render.py cannot evaluate a query of {DASHBOARD.name}: {error}", file=sys.stderr)
        return 1
    for line in draw(rec, args.png, dashboard):
        print(line)
    print(f"picture: {args.png} ({os.path.getsize(args.png) // 1024} KiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
