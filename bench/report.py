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
    load: str = ""
    #: When and at which revision it was measured (sections of several runs may be merged).
    when: str = ""
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


FINDINGS_BEGIN = "<!-- findings: bench/FINDINGS.md -->"
FINDINGS_END = "<!-- end of findings -->"


def refresh_findings(out: Path, findings: Path) -> None:
    """Put the current bench/FINDINGS.md into an existing PERFORMANCE.md (no measuring)."""
    text = out.read_text()
    head, _, rest = text.partition(FINDINGS_BEGIN + "\n")
    _, _, tail = rest.partition(FINDINGS_END)
    out.write_text(head + FINDINGS_BEGIN + "\n" + findings.read_text().rstrip() + "\n"
                   + FINDINGS_END + tail)  # fmt: skip


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
        f"Written {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {machine()}; "
        "each section says when it was measured, at which revision, with how many repeats"
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
    lines.append(FINDINGS_BEGIN)
    if findings is not None and findings.exists() and not ctx.smoke:
        lines.extend(findings.read_text().rstrip().splitlines())
    lines.append(FINDINGS_END)
    lines.append("")
    for section in sections:
        lines.append(f"## {section.title}")
        lines.append("")
        lines.append(
            f"Regenerate: `{section.command}` (measured {section.when}, "
            f"{section.seconds:.0f} s; load average {section.load})"
        )
        lines.append("")
        lines.extend(section.lines)
        for plot in section.plots:
            lines.append(f"![{plot.stem}]({plot.relative_to(out.parent).as_posix()})")
            lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines).rstrip() + "\n")
    raw = {s.key: {"section": _saved(s, out.parent), "data": _compact(s.data)} for s in sections}
    (ctx.plots / "results.json").parent.mkdir(parents=True, exist_ok=True)
    (ctx.plots / "results.json").write_text(json.dumps(raw, indent=1, default=str) + "\n")


def _compact(value: Any) -> Any:
    """Results for the JSON file: floats to 4 significant digits, long series summarised."""
    if isinstance(value, float):
        return float(f"{value:.4g}")
    if isinstance(value, dict):
        return {str(k): _compact(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        if len(value) > 100 and all(isinstance(v, int | float) for v in value):
            ordered = sorted(value)

            def at(q: float) -> Any:
                return _compact(ordered[min(len(ordered) - 1, int(q * len(ordered)))])

            return {"n": len(ordered), "min": _compact(ordered[0]), "p50": at(0.5),
                    "p90": at(0.9), "p99": at(0.99), "max": _compact(ordered[-1])}  # fmt: skip
        if len(value) > 100:
            return f"{len(value)} items (see the plots)"
        return [_compact(v) for v in value]
    if hasattr(value, "__dict__"):
        return _compact(vars(value))
    return value


def _saved(section: Section, base: Path) -> dict[str, Any]:
    """What :func:`load` needs to write the section again without measuring it."""
    return {
        "title": section.title,
        "command": section.command,
        "lines": section.lines,
        "plots": [p.relative_to(base).as_posix() for p in section.plots],
        "seconds": section.seconds,
        "load": section.load,
        "when": section.when,
        "targets": section.targets,
    }


def load(ctx: Context) -> dict[str, Section]:
    """The sections of the last run's results.json (for ``--only``: the others are kept)."""
    path = ctx.plots / "results.json"
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    sections = {}
    for key, entry in raw.items():
        saved = entry.get("section") if isinstance(entry, dict) else None
        if not saved:
            continue
        sections[key] = Section(
            key,
            saved["title"],
            saved["command"],
            lines=list(saved["lines"]),
            plots=[ctx.out.parent / p for p in saved["plots"]],
            data=entry.get("data", {}),
            seconds=saved["seconds"],
            load=saved["load"],
            when=saved["when"],
            targets=[tuple(t) for t in saved["targets"]],
        )
    return sections
