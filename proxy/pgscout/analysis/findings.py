"""The one findings model every anti-pattern detector reports into.

Owns: `Finding` (kind, severity, application, first/last seen, occurrences, evidence,
suggestion), the table of findings keyed by (kind, key) in which a repeat of a known problem
updates its entry instead of adding one, the occurrence counts by (kind, severity,
application_name) read by `pgscout_findings_total`, and the rule for the one log event
("finding"): a finding is logged when it first appears and when its severity rises, never per
occurrence. N+1 and duplicate findings enter through `from_nplusone` (the detector's own emit);
connection churn, judged in the data plane, through `observe_churn` with each snapshot.
Read interface: `listing()` (most recently seen first), `counts()`.
Must not: hold SQL literals (evidence carries normalized text only, cut to EVIDENCE_SQL_CHARS),
grow past MAX_FINDINGS entries or MAX_COUNTED_LABEL_SETS label sets, log, or import asyncio,
sockets or prometheus_client.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict
from collections.abc import Callable

from pgscout.dataplane.events import Session

SEVERITIES = ("info", "warning", "critical")
_RANK = {severity: rank for rank, severity in enumerate(SEVERITIES)}
MAX_FINDINGS = 500
MAX_COUNTED_LABEL_SETS = 4096
# Normalized SQL in evidence is cut here: enough to recognise the statement, bounded in bytes.
EVIDENCE_SQL_CHARS = 300


def cut(sql: str | None) -> str | None:
    if sql is None:
        return None
    text = " ".join(sql.split())
    return text if len(text) <= EVIDENCE_SQL_CHARS else text[:EVIDENCE_SQL_CHARS - 1] + "…"


def wall_time(session: Session, monotonic_at: float) -> float:
    """An event's monotonic time on the wall clock (events are judged late: seconds, even)."""
    if session.opened_wall:
        return session.opened_wall + (monotonic_at - session.opened_at)
    return time.time()


def application_of(session: Session, tags: dict[str, str] | None = None) -> dict[str, str]:
    """Who the finding belongs to: the session's names, plus route and trace when comments say."""
    application = {"application_name": session.application_name, "user": session.user,
                   "database": session.database}
    for key in ("route", "controller", "action", "traceparent"):
        value = (tags or {}).get(key)
        if value:
            application[key] = value[:200]
    return application


@dataclasses.dataclass(slots=True)
class Finding:
    kind: str
    key: str  # what makes two occurrences the same problem, within a kind
    severity: str
    application: dict[str, str]
    first_seen: float  # wall clock
    last_seen: float
    occurrences: int
    evidence: dict
    suggestion: str

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Findings:
    def __init__(self, emit: Callable[[dict], object]) -> None:
        self._emit = emit
        self._entries: OrderedDict[tuple[str, str], Finding] = OrderedDict()
        self._counts: dict[tuple[str, str, str], int] = {}
        self._churning: set[str] = set()

    def record(self, kind: str, key: str, severity: str, application: dict[str, str],
               evidence: dict, suggestion: str, at: float | None = None) -> Finding:
        """One occurrence of a problem: a new entry, or the known one with fresher evidence."""
        now = time.time() if at is None else at
        entry_key = (kind, key)
        finding = self._entries.get(entry_key)
        logged = finding is None
        if finding is None:
            while len(self._entries) >= MAX_FINDINGS:
                self._entries.popitem(last=False)
            finding = Finding(kind, key, severity, application, now, now, 0, evidence, suggestion)
            self._entries[entry_key] = finding
        else:
            self._entries.move_to_end(entry_key)
            if _RANK[severity] > _RANK[finding.severity]:
                finding.severity = severity
                logged = True
            finding.last_seen = max(finding.last_seen, now)
            finding.evidence = evidence
            finding.suggestion = suggestion
            finding.application = application
        finding.occurrences += 1
        self._count(kind, severity, application.get("application_name", ""))
        if logged:
            self._emit(finding.to_dict())
        return finding

    def from_nplusone(self, finding) -> None:
        """The N+1 detector's emit: its Finding (analysis/nplusone.py) as an entry of the model."""
        application = {"application_name": finding.application_name, "user": finding.user,
                       "database": finding.database}
        for key in ("route", "controller", "action", "traceparent"):
            if finding.tags.get(key):
                application[key] = finding.tags[key][:200]
        evidence = {
            "owner_sql": cut(finding.owner_sql), "child_sql": cut(finding.child_sql),
            "n": finding.n, "loops": finding.iterations, "n_max": finding.n_max,
            "loop_time_ms": round(finding.loop_time_ms, 3), "waste_ms": round(finding.waste_ms, 3),
            "waste_total_ms": round(finding.waste_total_ms, 3),
            "connections": finding.connections, "confidence": finding.confidence,
        }
        key = f"{finding.owner_fingerprint}/{finding.child_fingerprint}/" \
              f"{application.get('route', '')}/{finding.application_name}"
        entry = self.record(finding.kind, key, finding.severity, application, evidence,
                            finding.suggestion, at=finding.first_seen)
        # A roll-up stands for `iterations` loops: each is an occurrence.
        entry.occurrences += finding.iterations - 1

    def observe_churn(self, churn: list[dict]) -> None:
        """Connection churn is judged in the data plane; its live verdicts arrive with each admin
        request's snapshot. An application that starts churning is one occurrence."""
        now_churning = set()
        for entry in churn:
            application = entry["application_name"]
            now_churning.add(application)
            if application not in self._churning:
                self.record("connection_churn", application, "warning",
                            {"application_name": application},
                            {"opens_per_second": entry["opens_per_second"],
                             "median_lifetime_seconds": entry["median_lifetime_seconds"]},
                            entry["hint"])
        self._churning = now_churning

    def listing(self) -> list[dict]:
        """Every finding, the most recently seen first."""
        return [finding.to_dict() for finding in reversed(self._entries.values())]

    def counts(self) -> dict[tuple[str, str, str], int]:
        return self._counts

    def _count(self, kind: str, severity: str, application_name: str) -> None:
        label_set = (kind, severity, application_name)
        if label_set not in self._counts and len(self._counts) >= MAX_COUNTED_LABEL_SETS:
            label_set = (kind, severity, "other")
        self._counts[label_set] = self._counts.get(label_set, 0) + 1
