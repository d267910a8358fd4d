"""Where a target's choices come from: hypothesis draws, or the bytes of a fuzzer's input.

A target asks for integers in a range and for byte strings; everything else is built on
those two, so one target runs unchanged under hypothesis (which shrinks a failure to a
short story) and under atheris (which steers the bytes by coverage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, TypeVar

T = TypeVar("T")


class Exhausted(Exception):
    """The input has no more choices to give: the target ends its run (not a failure)."""


class Source(Protocol):
    def int(self, low: int, high: int) -> int:
        """An integer in ``[low, high]``; smaller is simpler."""
        ...

    def bytes(self, max_size: int) -> bytes:
        """Up to ``max_size`` bytes."""
        ...


def choice(source: Source, options: Sequence[T]) -> T:
    return options[source.int(0, len(options) - 1)]


def flag(source: Source) -> bool:
    return source.int(0, 1) == 1


def weighted(source: Source, options: Sequence[tuple[int, T]]) -> T:
    """One of ``options``, each ``(weight, value)``; the first is the simplest."""
    pick = source.int(0, sum(w for w, _ in options) - 1)
    for weight, value in options:
        if pick < weight:
            return value
        pick -= weight
    raise AssertionError("unreachable")


def number(source: Source, special: Sequence[int], low: int, high: int) -> int:
    """Mostly one of the ``special`` values (edges, sizes that matter), else any in range."""
    if source.int(0, 3):
        return choice(source, special)
    return source.int(low, high)


class BytesSource:
    """Choices from a fuzzer's input, consumed from the front (atheris's provider does the
    same); at the end of the input :class:`Exhausted` ends the run."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def int(self, low: int, high: int) -> int:
        span = high - low
        if span <= 0:
            return low
        width = (span.bit_length() + 7) // 8
        if self.pos + width > len(self.data):
            raise Exhausted
        raw = int.from_bytes(self.data[self.pos : self.pos + width], "little")
        self.pos += width
        return low + raw % (span + 1)

    def bytes(self, max_size: int) -> bytes:
        size = self.int(0, max_size)
        chunk = self.data[self.pos : self.pos + size]
        self.pos += len(chunk)
        return chunk
