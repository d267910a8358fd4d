"""The benchmark suite runs: ``python -m bench --smoke`` at tiny sizes, in seconds.

Benchmarks are not tests: nothing here checks a time, only that every benchmark ran to its
end and wrote its section, so that the suite cannot rot between two ``make bench``.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_run_writes_every_section(tmp_path: Path) -> None:
    out = tmp_path / "PERFORMANCE.md"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    for title in (
        "Discard path against the kernel's limit",
        "Daemon overhead per report",
        "Config latency under load",
        "Footprint",
        "Real guest",
        "The guest's side",
    ):
        assert f"## {title}" in text
    assert "ratio to the raw loop: " in text
    assert "This run failed" not in text
    results = json.loads((tmp_path / "performance" / "results.json").read_text())
    assert set(results) == {"discard", "overhead", "config", "footprint", "guest", "pagefault"}
    # One benchmark again: the file keeps the others as the first run wrote them.
    again = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--only", "config", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert again.returncode == 0, again.stderr[-3000:]

    def section(markdown: str, title: str) -> str:
        return markdown.split(f"## {title}")[1].split("\n## ")[0]

    for kept in ("Discard path", "Footprint"):
        assert section(out.read_text(), kept) == section(text, kept)
    if importlib.util.find_spec("matplotlib") is not None:  # the plots are optional
        assert (tmp_path / "performance" / "report-latency.png").stat().st_size > 0
    else:
        assert "No plot: matplotlib is not installed" in text


def test_real_guest_results_are_written_without_a_guest(tmp_path: Path) -> None:
    """The real-guest sections' tables, targets and plots, from made-up measurements (the
    smoke run boots no guest)."""
    from bench.guest import Move, Return, _write
    from bench.profile import Spy
    from bench.report import Context, Section

    ctx = Context(smoke=False, repeats=2, out=tmp_path / "P.md", plots=tmp_path / "p", command="")
    mib = 1 << 20

    def results(scale: float) -> dict[str, list[object]]:
        trace = [(0.0, 1200 * mib), (2.0, 900 * mib), (8.0, 150 * mib)]
        return {
            "return": [Return(8.0 * scale, 150 * mib, 1200 * mib, trace)] * 2,
            "inflate": [Move(0.02, 5.0 * scale, [(0.0, 0), (5.0 * scale, 1024 * mib)])] * 2,
            "deflate": [Move(0.02, 1.0 * scale, [(0.0, 1024 * mib), (1.0 * scale, 0)])] * 2,
        }

    section = Section("guest", "Real guest", "")
    spy = Spy(0)
    spy.folded = (
        "thread (1): MainThread;main (balloond/cli.py:1);Connection._kicked (balloond/server.py:2)"
        " 30\nthread (1): MainThread;main (balloond/cli.py:1);EpollSelector.select (selectors.py:3)"
        " 10\n"
    )
    summary = spy.summary("a test")
    _write(ctx, section, {"balloond": results(1.5), "QEMU built-in": results(1.0)}, summary)
    text = "\n".join(section.lines)
    assert "| inflate 2 GiB -> 1 GiB, s | 7.50 (7.50-7.50) | 5.00 (5.00-5.00) | 1.50" in text
    assert "`Connection._kicked (server.py)` | 75.0 | 75.0 |" in text
    assert [t[3] for t in section.targets] == ["**missed**", "**missed**", "met"]
