"""The benchmark suite runs: ``python -m bench --smoke`` at tiny sizes, in seconds.

Benchmarks are not tests: nothing here checks a time, only that every benchmark ran to its
end and wrote its section, so that the suite cannot rot between two ``make bench``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_smoke_run_writes_every_section(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="the plots need matplotlib (the bench extra)")
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
    assert (tmp_path / "performance" / "report-latency.png").stat().st_size > 0
