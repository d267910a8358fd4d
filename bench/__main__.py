"""``python -m bench``: run the benchmarks and write docs/PERFORMANCE.md.

    python -m bench                      # everything (make bench), about 15 minutes
    python -m bench --only discard       # one benchmark (several --only for more); the
                                         # file keeps the other sections of the last run
    python -m bench --smoke --out DIR/P.md   # tiny sizes, seconds: checks the suite runs
    python -m bench --refresh-findings   # only re-insert bench/FINDINGS.md (hand-written)
    BENCH_REPEATS=9 python -m bench      # more repeats (default 5; 1 with --smoke)

A benchmark that cannot run here (no kit for the real-guest ones) is written down as not
measured, with the reason, and the others still run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from bench import discard, footprint, guest, guestcost, overhead
from bench.report import Context, Section, refresh_findings, revision, write
from bench.report import load as load_sections

ROOT = Path(__file__).resolve().parents[1]

#: name -> what it measures; in the order they run and appear.
BENCHMARKS: dict[str, Callable[[Context], Section]] = {
    "discard": discard.run,
    "overhead": overhead.run_reports,
    "config": overhead.run_config,
    "footprint": footprint.run,
    "guest": guest.run,
    "pagefault": guestcost.run,
}

PREAMBLE = [
    "# balloond performance",
    "",
    "Written by `make bench` (`python -m bench`, the suite in `bench/`); do not edit by hand.",
    "Every comparison alternates its two sides in one run on one machine and gives the ratio",
    "of that run with min/median/max over repeats: these machines are noisy (2 cores, shared",
    "with other work), so a lone absolute time means little. Raw figures of the last run are",
    "in `docs/performance/results.json`. What is not measured yet is said where it belongs.",
    "",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes: seconds, not minutes")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "PERFORMANCE.md")
    parser.add_argument(
        "--repeats", type=int, default=int(os.environ.get("BENCH_REPEATS", "0")) or None
    )
    parser.add_argument(
        "--refresh-findings",
        action="store_true",
        help="only put the current bench/FINDINGS.md into the existing --out file",
    )
    args = parser.parse_args(argv)
    findings = Path(__file__).with_name("FINDINGS.md")
    if args.refresh_findings:
        refresh_findings(args.out, findings)
        return 0
    repeats = args.repeats or (1 if args.smoke else 5)
    out: Path = args.out.resolve()
    command = "python -m bench" + (" --smoke" if args.smoke else "")
    ctx = Context(
        smoke=args.smoke,
        repeats=repeats,
        out=out,
        plots=out.parent / "performance",
        command=command,
    )
    names = args.only or list(BENCHMARKS)
    kept = load_sections(ctx) if args.only else {}
    done: dict[str, Section] = {}
    failed = False
    for name in names:
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        start = time.monotonic()
        load = _loadavg()
        try:
            section = BENCHMARKS[name](ctx)
        except Exception as error:
            failed = True
            traceback.print_exc()
            section = Section(name, f"{name}: not measured", f"python -m bench --only {name}")
            section.say(f"This run failed: `{type(error).__name__}: {error}`.")
        section.seconds = time.monotonic() - start
        section.load = f"{load} before, {_loadavg()} after"
        section.when = (
            f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} at `{revision()}`, "
            f"{ctx.repeats} repeats"
        )
        print(f"bench: {name} done in {section.seconds:.0f} s", file=sys.stderr, flush=True)
        done[name] = section
    # With --only, the sections not run now are kept as the last run wrote them.
    sections = [done.get(name) or kept[name] for name in BENCHMARKS if name in done or name in kept]
    write(ctx, PREAMBLE, sections, findings)
    print(f"bench: wrote {out}", file=sys.stderr)
    return 1 if failed else 0


def _loadavg() -> str:
    """The host's 1-minute load average: how busy the machine was (2 CPUs here)."""
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
