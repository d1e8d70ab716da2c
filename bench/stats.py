"""Statistics for the benchmarks: summaries of repeated samples and ratios against a floor.

Pure functions (tested in tests/test_bench_stats.py); no timing happens here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile (0..100), linear between the closest ranks (numpy's default)."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= p <= 100:
        raise ValueError(f"percentile {p} outside 0..100")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True)
class Summary:
    n: int
    min: float
    p50: float
    p99: float
    max: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        return cls(len(values), min(values), percentile(values, 50), percentile(values, 99),
                   max(values))

    def scaled(self, factor: float) -> Summary:
        return Summary(self.n, self.min * factor, self.p50 * factor, self.p99 * factor,
                       self.max * factor)

    def mmm(self, fmt: str = "{:.1f}") -> str:
        """'min / median / max' in the given format."""
        return " / ".join(fmt.format(v) for v in (self.min, self.p50, self.max))


def ratio(value: float, floor: float) -> float:
    if floor <= 0:
        raise ValueError(f"floor must be positive, got {floor}")
    return value / floor


def ratios(values: Sequence[float], floors: Sequence[float]) -> list[float]:
    """Pairwise ratios of samples taken in the same round (interleaved runs)."""
    if len(values) != len(floors):
        raise ValueError("pairwise ratios need as many floors as values")
    return [ratio(v, f) for v, f in zip(values, floors, strict=True)]


def verdict(value: float, target: float, higher_is_better: bool = False) -> str:
    ok = value >= target if higher_is_better else value <= target
    return "met" if ok else "**missed**"
