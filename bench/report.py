"""What a benchmark hands back, and docs/PERFORMANCE.md written from it."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Context:
    """How this run was asked for: sizes, repeats, where plots go."""

    smoke: bool
    repeats: int
    out: Path  # the markdown file
    plots: Path  # the folder of PNGs and raw results
    command: str  # how to regenerate the whole file

    def plot_path(self, name: str) -> Path:
        self.plots.mkdir(parents=True, exist_ok=True)
        return self.plots / name


@dataclass
class Section:
    """One benchmark's results: markdown lines, the command regenerating them, plots."""

    key: str
    title: str
    command: str
    lines: list[str] = field(default_factory=list)
    plots: list[Path] = field(default_factory=list)
    data: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    #: (figure, target, measured, met) for the table at the top.
    targets: list[tuple[str, str, str, str]] = field(default_factory=list)

    def target(self, figure: str, target: str, measured: str, met: bool | None) -> None:
        verdict = "-" if met is None else ("met" if met else "**missed**")
        self.targets.append((figure, target, measured, verdict))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        self.lines.append("| " + " | ".join(header) + " |")
        self.lines.append("| " + " | ".join("---" for _ in header) + " |")
        for row in rows:
            self.lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
        self.lines.append("")

    def plot(self, path: Path | None) -> None:
        """Show a plot (None: matplotlib is missing, the section says so)."""
        if path is None:
            self.say("(No plot: matplotlib is not installed; `make bench` installs it.)")
        else:
            self.plots.append(path)

    def say(self, *text: str) -> None:
        self.lines.extend(text)
        self.lines.append("")


def machine() -> str:
    """One line about the host: CPUs, kernel, Python."""
    try:
        model = next(
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        )
    except (OSError, StopIteration):
        model = "unknown CPU"
    return (
        f"{os.cpu_count()} CPUs ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def revision() -> str:
    try:
        done = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return done.stdout.strip()


def write(
    ctx: Context,
    preamble: Sequence[str],
    sections: Sequence[Section],
    findings: Path | None = None,
) -> None:
    """Write the markdown file and the raw results (JSON) beside the plots."""
    out = ctx.out
    lines = list(preamble)
    lines.append(
        f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at revision "
        f"`{revision()}` on {machine()}; repeats: {ctx.repeats}"
        + (" (**smoke run: tiny sizes, figures meaningless**)" if ctx.smoke else "")
        + "."
    )
    lines.append("")
    rows = [row for section in sections for row in section.targets]
    if rows:
        lines.append("## Targets at a glance")
        lines.append("")
        lines.append("| figure | target | measured (median of repeats) | |")
        lines.append("| --- | --- | --- | --- |")
        lines.extend("| " + " | ".join(row) + " |" for row in rows)
        lines.append("")
    if findings is not None and findings.exists() and not ctx.smoke:
        lines.extend(findings.read_text().rstrip().splitlines())
        lines.append("")
    for section in sections:
        lines.append(f"## {section.title}")
        lines.append("")
        lines.append(f"Regenerate: `{section.command}` ({section.seconds:.0f} s in this run)")
        lines.append("")
        lines.extend(section.lines)
        for plot in section.plots:
            lines.append(f"![{plot.stem}]({plot.relative_to(out.parent).as_posix()})")
            lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    raw = {s.key: s.data for s in sections}
    (ctx.plots / "results.json").parent.mkdir(parents=True, exist_ok=True)
    (ctx.plots / "results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")
