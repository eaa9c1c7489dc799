"""Slow-query log: one structured record per statement slower than its threshold.

Owns: the threshold decision (`per_application[application_name]` in ms overrides `threshold_ms`;
a statement is slow when its duration is at least the threshold), the rate limit (a token bucket
refilled at `max_per_second` per second of event time, holding at most `max_per_second` tokens;
`max_per_second <= 0` means no limit), the record, and the last `keep` emitted records.
Records carry the normalized SQL (literals redacted by the fingerprinter), never `ev.sql`;
parameter values only when `log_parameters` is on. Suppressed statements are counted, and the
next emitted record says how many were suppressed since the one before it.

Read interface: `recent()` (emitted records, oldest first), `slow_total` (slow statements seen)
and `slow_by_application`,
`suppressed_total` (slow statements not emitted because of the rate limit).
`emit(record)` is the composition root's structured logger call (event "slow_query").
Must not: put SQL literals or, unless asked, parameter values in a record; import asyncio,
sockets or prometheus_client.
"""

from __future__ import annotations

import re
import time
from collections import deque
from collections.abc import Callable

from pgscout.analysis.bus import StatementObserver
from pgscout.dataplane.events import StatementDone
from pgscout.labels import MAX_APPLICATIONS

MAX_PARAMETER_CHARS = 200
MAX_LOGGED_PARAMETERS = 64
_CONTROL_CHARACTER = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


class SlowLog(StatementObserver):
    def __init__(
        self,
        threshold_ms: float,
        per_application: dict[str, float],
        log_parameters: bool,
        max_per_second: float,
        keep: int,
        emit: Callable[[dict], object],
    ) -> None:
        self.reconfigure(threshold_ms, per_application, log_parameters, max_per_second)
        self._tokens = float(max_per_second)
        self._tokens_at: float | None = None
        self._emit = emit
        self._recent: deque[dict] = deque(maxlen=keep)
        self._suppressed_since_emit = 0
        self.slow_total = 0
        self.slow_by_application: dict[str, int] = {}  # at most MAX_APPLICATIONS names
        self.suppressed_total = 0

    def reconfigure(self, threshold_ms: float, per_application: dict[str, float],
                    log_parameters: bool, max_per_second: float) -> None:
        """Apply reloaded settings; counters and the recent records stay."""
        self._threshold_seconds = threshold_ms / 1000
        self._threshold_seconds_by_application = {
            application: ms / 1000 for application, ms in per_application.items()
        }
        self._log_parameters = log_parameters
        self._rate = max_per_second

    def on_statement(self, ev: StatementDone) -> None:
        session = ev.session
        thresholds = self._threshold_seconds_by_application
        # Most configurations set no per-application threshold: no look-up per statement then.
        threshold = (thresholds.get(session.application_name, self._threshold_seconds)
                     if thresholds else self._threshold_seconds)
        duration = ev.duration
        if duration < threshold:
            return
        self.slow_total += 1
        application = session.application_name
        if application in self.slow_by_application or len(self.slow_by_application) < MAX_APPLICATIONS:
            self.slow_by_application[application] = self.slow_by_application.get(application, 0) + 1
        if not self._take_token(ev.done_at):
            self._suppressed_since_emit += 1
            self.suppressed_total += 1
            return
        record = {
            "fingerprint": ev.fingerprint,
            "normalized": ev.normalized,
            "duration_ms": round(duration * 1000, 3),
            "rows": ev.rows,
            "sqlstate": ev.sqlstate,
            "user": session.user,
            "database": session.database,
            "application_name": session.application_name,
            "client_addr": session.client_addr,
            "backend_pid": session.backend_pid,
            "txn_status": ev.txn_status,
            "tags": dict(ev.tags),
            "at": time.time(),
        }
        if self._log_parameters:
            record["n_params"] = ev.n_params
            record["parameters"] = (
                None if ev.params is None else [_show(p) for p in ev.params[:MAX_LOGGED_PARAMETERS]]
            )
        if self._suppressed_since_emit:
            record["suppressed"] = self._suppressed_since_emit
            self._suppressed_since_emit = 0
        self._recent.append(record)
        self._emit(record)

    def recent(self) -> list[dict]:
        return list(self._recent)

    def _take_token(self, now: float) -> bool:
        if self._rate <= 0:
            return True
        if self._tokens_at is not None:
            self._tokens = min(self._rate, self._tokens + (now - self._tokens_at) * self._rate)
        self._tokens_at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


def _show(value: bytes | None) -> str | None:
    """A parameter for display: text format values as UTF-8 (invalid bytes replaced), values with
    control characters (binary format) as `\\x` hex; either cut at MAX_PARAMETER_CHARS."""
    if value is None:
        return None
    # 4 bytes per character at most: decoding this much always yields enough characters.
    text = value[: 4 * MAX_PARAMETER_CHARS].decode("utf-8", "replace")[:MAX_PARAMETER_CHARS]
    if _CONTROL_CHARACTER.search(text) is None:
        return text
    return "\\x" + value[: (MAX_PARAMETER_CHARS - 2) // 2].hex()
