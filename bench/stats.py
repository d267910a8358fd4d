"""Summaries of repeated measurements: min/median/max, percentiles, ratios."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Spread:
    """Repeats of one figure: its minimum, median and maximum."""

    values: tuple[float, ...]

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(tuple(values))

    @property
    def min(self) -> float:
        return min(self.values) if self.values else math.nan

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else math.nan

    @property
    def max(self) -> float:
        return max(self.values) if self.values else math.nan

    def cell(self, fmt: str = "{:.2f}") -> str:
        """``median (min-max)`` for a table cell."""
        if not self.values:
            return "-"
        return f"{fmt.format(self.median)} ({fmt.format(self.min)}-{fmt.format(self.max)})"


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank: a value that was observed."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def ratios(numerators: Sequence[float], denominators: Sequence[float]) -> Spread:
    """Pairwise ratios of two sides measured in alternation (repeat i of each)."""
    return Spread.of([a / b for a, b in zip(numerators, denominators, strict=True) if b])
