"""Run ``balloond`` with a SIGKILL planted at one point of its code (tests only).

    python -m tests.killpoint POINT N MARKER -- balloond arguments...

The daemon kills itself right after the N-th time the code at POINT returned (a method
that returns False, "nothing happened", does not count), and creates the file MARKER just
before; a daemon started while MARKER exists plants nothing, so the successor the keeper
starts runs normally. docs/never-drop.md, section 5, names the instants.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

#: Each point: the method whose return is the instant (module, class, method).
POINTS = {
    # a request handled, its effect not committed (section 5, rows 3 and 8)
    "handled": ("balloond.protocol", "VhostUserBackend", "handle"),
    # an fd stored with the keeper, the record that names it not committed (row 10)
    "stored": ("balloond.notify", "Notifier", "store_fds"),
    # a record committed: nothing it explains done yet (rows 4, 15, 22)
    "committed": ("balloond.statefile", "StateFile", "commit"),
    # a reply staged, its request not consumed (row 5)
    "staged": ("balloond.server", "Connection", "_stage"),
    # a request consumed, its reply still in the pipe (row 6)
    "consumed": ("balloond.server", "Connection", "_consume"),
    # a chain pushed, its record not committed (row 14)
    "completed": ("balloond.protocol", "VhostUserBackend", "complete"),
    # a used index published, the call not signalled (row 16)
    "published": ("balloond.virtqueue", "Virtqueue", "publish_used"),
    # a target committed, the config-change message not sent (row 22)
    "announcing": ("balloond.protocol", "VhostUserBackend", "config_change_message"),
    # a reload: every device held and committed, the execve not made (row 25)
    "reloading": ("balloond.handoff", "", "flush_logs"),
}


def plant(point: str, count: int, marker: str) -> None:
    module, owner, name = POINTS[point]
    cls = importlib.import_module(module)
    if owner:
        cls = getattr(cls, owner)
    original: Callable[..., Any] = getattr(cls, name)
    calls = 0

    @functools.wraps(original)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        result = original(*args, **kwargs)
        if result is not False:
            calls += 1
            if calls == count:
                with open(marker, "w") as file:
                    file.write(f"{point} {count} {os.getpid()}\n")
                os.kill(os.getpid(), signal.SIGKILL)
        return result

    setattr(cls, name, wrapper)


def fail_the_watchdog_task(seconds: float, marker: str) -> None:
    """Point ``error``: the daemon's watchdog task raises after ``seconds`` (an internal error
    that ends the daemon, not one connection)."""
    import balloond.daemon

    async def failing(notifier: object) -> None:
        import asyncio

        await asyncio.sleep(seconds)
        with open(marker, "w") as file:
            file.write(f"error {os.getpid()}\n")
        raise RuntimeError("planted by tests/killpoint.py")

    balloond.daemon.watchdog_loop = failing  # type: ignore[assignment]


def main() -> int:
    point, count, marker, *argv = sys.argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    if os.path.exists(marker):
        pass
    elif point == "error":
        fail_the_watchdog_task(float(count), marker)
    else:
        plant(point, int(count), marker)
    from balloond.cli import main as balloond

    return balloond(argv)


if __name__ == "__main__":
    sys.exit(main())
