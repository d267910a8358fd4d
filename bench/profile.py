"""py-spy (the "bench" extra) sampling a running daemon: where its time goes.

``py-spy record --nonblocking`` samples without pausing the process, so the profiled run
is nearly as fast as an unprofiled one; samples of threads waiting in a system call that
blocks (epoll, a lock) are left out (py-spy's default), so the percentages are of the time
the daemon's threads were running or runnable.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

#: Frames of the interpreter, asyncio's loop and threading that sit under everything.
_PLUMBING = (
    "<module>",
    "_run_module_as_main",
    "_run_code",
    "main",
    "run",
    "Runner.run",
    "run_until_complete",
    "run_forever",
    "BaseEventLoop.run_until_complete",
    "BaseEventLoop.run_forever",
    "BaseEventLoop._run_once",
    "Handle._run",
    "Thread._bootstrap",
    "Thread._bootstrap_inner",
    "Thread.run",
)


def py_spy() -> str | None:
    found = shutil.which("py-spy")
    beside = Path(sys.executable).with_name("py-spy")
    return found or (str(beside) if beside.exists() else None)


class Spy:
    """``with Spy(pid) as spy: ...`` records the process meanwhile; then ``spy.summary()``."""

    def __init__(self, pid: int, rate: int = 250) -> None:
        self.pid, self.rate = pid, rate
        self.folded = ""
        self.error = ""
        self._dir = tempfile.TemporaryDirectory(prefix="balloond-bench-spy-")
        self._process: subprocess.Popen[str] | None = None

    def __enter__(self) -> Spy:
        spy = py_spy()
        if spy is None:
            self.error = "py-spy is not installed (`pip install py-spy`, the bench extra)"
            return self
        out = Path(self._dir.name) / "profile.folded"
        self._out = out
        self._process = subprocess.Popen(
            [spy, "record", "--pid", str(self.pid), "--rate", str(self.rate), "--nonblocking",
             "--format", "raw", "--output", str(out), "--duration", "600"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        time.sleep(1.0)  # py-spy attaches
        return self

    def __exit__(self, *exc: object) -> None:
        process = self._process
        if process is None:
            return
        process.send_signal(signal.SIGINT)  # py-spy writes what it has and exits
        try:
            _, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            _, err = process.communicate()
        if self._out.exists():
            self.folded = self._out.read_text()
        else:
            self.error = f"py-spy wrote no profile: {err.strip()[-300:]}"
        self._dir.cleanup()

    def summary(self, what: str, top: int = 12) -> list[str]:
        """Markdown: the functions the time was spent in, and balloond's functions under
        which it was spent."""
        if self.error:
            return [f"No profile of {what}: {self.error}."]
        own: Counter[str] = Counter()
        under: Counter[str] = Counter()
        total = 0
        for line in self.folded.splitlines():
            stack, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            frames = [_name(f) for f in stack.split(";") if " (" in f]
            if not frames:
                continue
            count = int(count_text)
            total += count
            own[frames[-1]] += count
            for name in set(frames):
                under[name] += count
        if not total:
            return [f"No profile of {what}: py-spy recorded no samples."]
        lines = [
            f"py-spy (`record --nonblocking`, {self.rate} Hz, threads waiting in a blocking "
            f"call left out) on the daemon during {what}: {total} samples "
            f"({total / self.rate:.1f} s of CPU or waiting for one).",
            "",
            "| function (file) | own % | under it % |",
            "| --- | --- | --- |",
        ]
        shown = 0
        for name, count in under.most_common():
            if name.split(" (")[0] in _PLUMBING or name.startswith("thread ("):
                continue
            lines.append(f"| `{name}` | {100 * own[name] / total:.1f} | "
                         f"{100 * count / total:.1f} |")  # fmt: skip
            shown += 1
            if shown >= top:
                break
        lines.append("")
        lines.append(
            "Own time, the top: "
            + ", ".join(f"`{n}` {100 * c / total:.1f}%" for n, c in own.most_common(8))
            + "."
        )
        lines.append("")
        return lines


def _name(frame: str) -> str:
    """``function (path:line)`` -> ``function (file)``."""
    function, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{function} ({Path(path).name})"
