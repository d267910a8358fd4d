"""A long fuzzing campaign: ``python -m fuzz.campaign [--minutes N]``.

Runs the three atheris targets one after the other (one process at a time: the machine's
cores are shared), each with its corpus in ``fuzz/corpus/TARGET`` (kept between runs, so a
campaign goes on where the last one stopped) and its crash inputs in ``fuzz/crashes/``.
The time is split protocol 60 %, wire 20 %, ring 20 %. At the end it prints, per target,
the executions, the corpus, libFuzzer's coverage counters and any crash file.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARES = {"protocol": 0.6, "wire": 0.2, "ring": 0.2}
#: Sequences matter for the protocol: let its inputs grow to full length at once.
OPTIONS = {"protocol": ["-len_control=0"], "wire": [], "ring": []}
STAT = re.compile(r"^stat::(\w+):\s+(\d+)", re.MULTILINE)
DONE = re.compile(r"#(\d+)\s+DONE\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\d+)(\w*)")


def campaign(minutes: float, extra: list[str]) -> int:
    crashes = HERE / "crashes"
    crashes.mkdir(exist_ok=True)
    found = 0
    for target, share in SHARES.items():
        corpus = HERE / "corpus" / target
        corpus.mkdir(parents=True, exist_ok=True)
        seconds = max(10, int(minutes * 60 * share))
        started = time.monotonic()
        before = set(crashes.iterdir())
        command = [
            sys.executable, "-m", "fuzz", target, str(corpus),
            f"-max_total_time={seconds}", "-max_len=4096", "-print_final_stats=1",
            "-timeout=30", "-rss_limit_mb=2048", f"-artifact_prefix={crashes}/{target}-",
            *OPTIONS[target], *extra,
        ]  # fmt: skip
        print(f"== {target}: {seconds} s, corpus {corpus}", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, cwd=HERE.parent)
        log = done.stderr
        (HERE / "corpus" / f"{target}.log").write_text(log)
        stats = dict(STAT.findall(log))
        last = DONE.findall(log) or re.findall(
            r"#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/(\d+)(\w*)", log
        )
        new = sorted(set(crashes.iterdir()) - before)
        found += len(new)
        summary = {
            "seconds": round(time.monotonic() - started),
            "executions": stats.get("number_of_executed_units"),
            "exec/s": stats.get("average_exec_per_sec"),
            "new units": stats.get("new_units_added"),
            "peak rss MB": stats.get("peak_rss_mb"),
            "corpus files": len(list(corpus.iterdir())),
        }
        if last:
            _, cov, ft, files, size, unit = last[-1]
            summary |= {"cov": cov, "ft": ft, "corpus": f"{files} inputs / {size}{unit}"}
        print("  ", summary)
        for crash in new:
            print(f"   CRASH {crash} (replay: python -m fuzz {target} --replay {crash})")
        if done.returncode and not new:
            print(log[-3000:])
    return 1 if found else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="in all (default 30)")
    options, extra = parser.parse_known_args()
    sys.exit(campaign(options.minutes, extra))


if __name__ == "__main__":
    main()
