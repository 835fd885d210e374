"""A small log-bucketed latency histogram: bounded memory, mergeable across processes."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

# Buckets grow by 1 % each, from 1 µs: any percentile is reported within 1 % of the true sample.
_GROWTH = 1.01
_LOG_GROWTH = math.log(_GROWTH)
_FLOOR = 1e-6  # seconds; samples below (and negative ones, e.g. from clock skew) land in bucket 0


@dataclass
class Histogram:
    """Counts of latencies (seconds) in 1 %-wide buckets; picklable and mergeable."""

    counts: dict[int, int] = field(default_factory=dict)
    count: int = 0
    total: float = 0.0
    max: float = 0.0
    min: float = math.inf

    def record(self, seconds: float) -> None:
        """Add one sample."""
        bucket = int(math.log(seconds / _FLOOR) / _LOG_GROWTH) if seconds > _FLOOR else 0
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.count += 1
        self.total += seconds
        if seconds > self.max:
            self.max = seconds
        if seconds < self.min:
            self.min = seconds

    def merge(self, other: Histogram) -> None:
        """Add every sample of ``other``."""
        for bucket, n in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + n
        self.count += other.count
        self.total += other.total
        self.max = max(self.max, other.max)
        self.min = min(self.min, other.min)

    @classmethod
    def merged(cls, histograms: Iterable[Histogram]) -> Histogram:
        """One histogram holding the samples of all of ``histograms``."""
        result = cls()
        for histogram in histograms:
            result.merge(histogram)
        return result

    def percentile(self, p: float) -> float:
        """The ``p``-th percentile (0–100) in seconds: the upper edge of its bucket, capped by the max."""
        if not self.count:
            return math.nan
        rank = max(1, math.ceil(self.count * p / 100))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return min(_FLOOR * _GROWTH ** (bucket + 1), self.max)
        return self.max

    def summary_ms(self) -> dict[str, float | int]:
        """count, mean, p50, p99, p99.9 and max, in milliseconds."""
        if not self.count:
            return {"count": 0}
        return {
            "count": self.count,
            "mean_ms": 1000 * self.total / self.count,
            "p50_ms": 1000 * self.percentile(50),
            "p99_ms": 1000 * self.percentile(99),
            "p99_9_ms": 1000 * self.percentile(99.9),
            "max_ms": 1000 * self.max,
        }
