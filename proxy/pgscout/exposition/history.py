"""The status page's short history: the overview's cumulative counters, sampled in the process.

Owns: one sample every SAMPLE_SECONDS of what the page derives its charts from (wall clock,
statements, statement seconds, cumulative latency buckets), the last HISTORY_SECONDS of them in a
ring of fixed length, so a page opened now draws the last 15 minutes at once instead of starting
empty. Memory is bounded: HISTORY_SECONDS / SAMPLE_SECONDS samples of a few hundred bytes.
Must not: compute rates (the page does, from consecutive samples, as it does from its polls), or
read anything but the function it is given.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

HISTORY_SECONDS = 900
SAMPLE_SECONDS = 5.0


class History:
    def __init__(self, read: Callable[[], dict]):
        self._read = read
        self._samples: deque[dict] = deque(maxlen=int(HISTORY_SECONDS / SAMPLE_SECONDS))

    def sample(self) -> None:
        self._samples.append(self._read())

    def samples(self) -> list[dict]:
        """Oldest first."""
        return list(self._samples)
