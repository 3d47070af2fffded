"""Fixed-bucket histograms kept by hand: for observations that travel in messages (a
worker's queue times, in its load reports) and for a process that exports its own state
at scrape time (the scheduler's /metrics). Prometheus' cumulative form:

    bounds     b0     b1     ...  bn-1
    cumulative c0  <= c1  <= ... <= cn-1 <= cn      ci: observations <= bi; cn: all of them

Pure (no prometheus_client), so workers and the wire need nothing more than this.
"""

from __future__ import annotations

import bisect
import itertools
import math

# A worker's queue time: its arrival there to the first step that runs it (vLLM's
# request_queue_time_seconds, with finer low buckets: a free instance starts a request
# within one step). Sent once in Register (queue_time_bounds_s), counts in every report.
QUEUE_TIME_BOUNDS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                       5.0, 10.0, 30.0, 60.0, 120.0, 600.0)


class Buckets:
    """Counts of observations per bucket and their sum. O(log buckets) per observation."""

    __slots__ = ("bounds", "_counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        if not bounds or any(not math.isfinite(b) for b in bounds) \
                or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"bucket bounds must be finite and increasing, got {bounds}")
        self.bounds = tuple(float(b) for b in bounds)
        self._counts = [0] * (len(bounds) + 1)  # per bucket; the last: above every bound
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self._counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    @property
    def count(self) -> int:
        return sum(self._counts)

    def cumulative(self) -> tuple[int, ...]:
        """len(bounds) + 1 counts: observations <= each bound, then all of them."""
        return tuple(itertools.accumulate(self._counts))


def is_cumulative(bounds: tuple[float, ...], counts: tuple[int, ...]) -> bool:
    """counts fit bounds (one more of them) and never decrease: a histogram a peer sent
    that can be exported as it is."""
    return (len(counts) == len(bounds) + 1 and counts[0] >= 0
            and all(a <= b for a, b in itertools.pairwise(counts)))
