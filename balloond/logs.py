"""Logging: structlog renders every record, the package's own and the standard library's.

The only importer of structlog. Modules log through the standard library
(``logging.getLogger(__name__)``, %-style messages); :func:`configure` puts structlog's
``ProcessorFormatter`` on the root handler, so every line comes out one way: JSON lines when
stderr is not a terminal (journald keeps each whole as the message, for ``jq``), or readable
``key=value`` on a terminal. Under journald (``$JOURNAL_STREAM`` names stderr) each line
starts with its syslog priority (``<4>`` for a warning), which journald takes as the
entry's priority: ``journalctl -p warning`` finds balloond's warnings. Each device's task
binds its name (:func:`bind_device`), so every line logged on its behalf carries
``device=NAME``.

A guest can make the daemon log (a malformed chain, a failing discard): such messages go
through :class:`RateLimit`, so that one guest cannot flood the journal.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog

FORMATS = ("auto", "json", "console")


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Send every log record to ``stream`` (stderr), rendered by structlog."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.stdlib.ExtraAdder(),
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(_JournalPriority(formatter) if _to_journal(stream) else formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


#: Syslog priorities of the logging levels, as sd-daemon(3) prefixes them.
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3}


def _to_journal(stream: TextIO) -> bool:
    """Whether ``stream`` is the journal stream systemd connected (``$JOURNAL_STREAM``)."""
    expected = os.environ.get("JOURNAL_STREAM", "")
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return expected == f"{info.st_dev}:{info.st_ino}"


class _JournalPriority(logging.Formatter):
    """Prefixes each line with its priority, ``<N>``, for journald."""

    def __init__(self, inner: logging.Formatter) -> None:
        super().__init__()
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITY.get(record.levelno, 2 if record.levelno > logging.ERROR else 7)
        return f"<{priority}>{self.inner.format(record)}"


def bind_device(name: str) -> None:
    """Tag every record logged from the current task (and what it starts) with ``device``."""
    structlog.contextvars.bind_contextvars(device=name)


class RateLimit:
    """At most ``burst`` messages per ``interval`` seconds; the rest are counted, and the
    count is logged with the next message let through.

    For what a guest can trigger at will. Not thread-safe: use it from the event loop.
    """

    def __init__(
        self,
        burst: int = 10,
        interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.burst = burst
        self.interval = interval
        self.clock = clock
        self._window_start = -interval
        self._sent = 0
        self.suppressed = 0

    def __call__(self, logger: logging.Logger, level: int, message: str, *args: object) -> None:
        now = self.clock()
        if now - self._window_start >= self.interval:
            self._window_start, self._sent = now, 0
        if self._sent >= self.burst:
            self.suppressed += 1
            return
        self._sent += 1
        if self.suppressed:
            logger.log(
                level,
                message + " (%d similar messages suppressed)",
                *args,
                self.suppressed,
            )
            self.suppressed = 0
        else:
            logger.log(level, message, *args)
