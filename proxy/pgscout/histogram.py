"""Fixed-bucket histograms shared by the observers.

Owns: counting observations into fixed buckets (a scan of the bounds per observation), merging,
the cumulative view Prometheus exposes (`le` buckets, +Inf last), and pickling (the data plane's
connection lifetimes reach the analysis process in its snapshot; a mypyc-compiled class pickles
only what `__reduce__` says).
Must not: import prometheus_client (the Collector turns these into metric families at scrape time).
"""

from __future__ import annotations

import math

from mypy_extensions import i64


class Histogram:
    """Fixed-bucket histogram; `counts` are per bucket, `cumulative()` is what Prometheus wants."""

    __slots__ = ("bounds", "counts", "sum", "count")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: list[int] = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def __reduce__(self) -> tuple:
        return _restored, (self.bounds, self.counts, self.sum, self.count)

    def observe(self, value: float) -> None:
        # bisect_left's index, by a scan from the smallest bound: most observations land in the
        # first buckets, and compiled, the scan costs a fraction of the call into bisect.
        index: i64 = 0
        for bound in self.bounds:
            if not bound < value:
                break
            index += 1
        counts = self.counts
        counts[index] = counts[index] + 1  # typed: a native add, where `+=` on an item is generic
        self.sum += value
        self.count += 1

    def merge(self, other: Histogram) -> None:
        for index, count in enumerate(other.counts):
            self.counts[index] += count
        self.sum += other.sum
        self.count += other.count

    def cumulative(self) -> list[tuple[float, int]]:
        running = 0
        buckets = []
        for bound, count in zip((*self.bounds, math.inf), self.counts):
            running += count
            buckets.append((bound, running))
        return buckets


def _restored(bounds: tuple[float, ...], counts: list[int], total: float, count: int) -> Histogram:
    histogram = Histogram(bounds)
    histogram.counts = counts
    histogram.sum = total
    histogram.count = count
    return histogram
