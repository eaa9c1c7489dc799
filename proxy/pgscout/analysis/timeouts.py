"""No statement timeout: applications whose sessions run with statement_timeout = 0.

Owns: each live session's effective statement_timeout, worked out as PostgreSQL does: the
server's value, overridden by the database's, the role's and the role-in-database defaults (read
over the catalog connection and handed in with `set_defaults`), then by the StartupMessage
(`statement_timeout` given directly, or `-c statement_timeout=...` in `options`), then by
successful `SET [SESSION] statement_timeout`, `set_config('statement_timeout', ..., false)` and
`RESET statement_timeout` / `RESET ALL` / `DISCARD ALL` seen in the session, and for the rest of
its transaction `SET LOCAL` and `set_config(..., true)`; and the verdict: a
statement of at least `min_statement_ms` in a session whose timeout is 0 is an occurrence of the
application's finding, with its slowest statement and how long such statements held a backend.
A session whose timeout cannot be known (catalog not read yet, a value it cannot parse) is never
judged.
Must not: keep more than MAX_APPLICATIONS applications' figures, look at a statement's text unless it mentions
statement_timeout, or see more than the session's own settings.
"""

from __future__ import annotations

import re

from pgscout.analysis.bus import StatementObserver
from pgscout.analysis.findings import Findings, application_of, cut, wall_time
from pgscout.labels import MAX_APPLICATIONS
from pgscout.dataplane.events import SessionClosed, StatementDone

_SET = re.compile(r"\bset\s+(session\s+|local\s+)?statement_timeout\s*(?:=|\bto\b)\s*"
                  r"(?:'([^']*)'|\"([^\"]*)\"|([^\s;]+))", re.IGNORECASE)
_SET_CONFIG = re.compile(r"set_config\s*\(\s*'statement_timeout'\s*,\s*'([^']*)'\s*,\s*(\w+)\s*\)",
                         re.IGNORECASE)
_RESET = re.compile(r"\breset\s+(statement_timeout|all)\b|\bdiscard\s+all\b", re.IGNORECASE)
_OPTION = re.compile(r"(?:-c\s*|--)statement[_-]timeout=((?:\\.|\S)+)")
_MENTIONS = re.compile(r"statement_timeout|reset|discard", re.IGNORECASE)
_NUMBER = re.compile(r"\s*(-?\d+(?:\.\d*)?)\s*([a-z]*)\s*", re.IGNORECASE)
_UNITS = ("", "us", "ms", "s", "min", "h", "d")
SUGGESTION = ("set a statement_timeout for the application's role (ALTER ROLE {user} SET "
              "statement_timeout = '30s') or in its driver's connection options "
              "(options=-c statement_timeout=30s): a runaway statement then ends on its own "
              "instead of holding a backend and its locks")


def is_zero(value: str | None) -> bool | None:
    """Whether a statement_timeout setting means no timeout; None when it cannot be told."""
    if value is None:
        return None
    match = _NUMBER.fullmatch(value)
    if match is None or match.group(2).lower() not in _UNITS:
        return None
    return float(match.group(1)) == 0


class _SessionTimeout:
    __slots__ = ("startup", "set_value", "local_value")

    def __init__(self, startup: str | None) -> None:
        self.startup = startup
        self.set_value: str | None = None
        self.local_value: str | None = None  # SET LOCAL: to the end of the transaction


class StatementTimeouts(StatementObserver):
    def __init__(self, findings: Findings, min_statement_ms: float) -> None:
        self._findings = findings
        self.reconfigure(min_statement_ms)
        self._defaults: dict[tuple[str, str], str] | None = None
        self._sessions: dict[int, _SessionTimeout] = {}
        self._held: dict[tuple[str, str, str], list] = {}  # application -> [seconds, sessions]

    def reconfigure(self, min_statement_ms: float) -> None:
        self._min_seconds = min_statement_ms / 1000

    @property
    def has_defaults(self) -> bool:
        return self._defaults is not None

    def set_defaults(self, defaults: dict[tuple[str, str], str]) -> None:
        """(role, database) -> value from the catalog; ("", "") is the server's, ("", db) the
        database's, (role, "") the role's."""
        self._defaults = defaults

    def on_statement(self, ev: StatementDone) -> None:
        state = self._sessions.get(ev.session.conn_id)
        if state is None:
            state = self._sessions[ev.session.conn_id] = _SessionTimeout(_startup(ev.session.startup))
        # SET, RESET and DISCARD are utility statements; a query only changes the setting through
        # set_config (the fingerprinter tells both, once per text). Only those texts are searched
        # (the raw text: the value is what matters).
        if ev.sqlstate is None and (ev.may_change_settings or ev.statement_count > 1) \
                and _MENTIONS.search(ev.sql):
            self._follow(state, ev.sql)
        slow = ev.duration >= self._min_seconds
        effective = self._effective(ev, state) if slow else None
        if ev.txn_status not in ("T", "E"):
            state.local_value = None
        if not slow or is_zero(effective) is not True:
            return
        session = ev.session
        key = (session.application_name, session.user, session.database)
        held = self._held.get(key)
        if held is None:
            if len(self._held) >= MAX_APPLICATIONS:
                return  # the findings table is bounded too; the applications seen first stay
            held = self._held[key] = [0.0, set(), 0.0, ""]
        held[0] += ev.duration
        if len(held[1]) < 1000:
            held[1].add(session.conn_id)
        if ev.duration > held[2]:
            held[2], held[3] = ev.duration, ev.normalized
        evidence = {
            "slowest_statement": cut(held[3]),
            "slowest_ms": round(held[2] * 1000, 1),
            "backend_seconds_held": round(held[0], 3),
            "sessions": len(held[1]),
            "threshold_ms": round(self._min_seconds * 1000, 1),
        }
        self._findings.record("no_statement_timeout", "/".join(key), "warning",
                              application_of(session, ev.tags), evidence,
                              SUGGESTION.format(user=session.user or "app"),
                              at=wall_time(session, ev.done_at))

    def on_session_closed(self, ev: SessionClosed) -> None:
        self._sessions.pop(ev.session.conn_id, None)

    def _effective(self, ev: StatementDone, state: _SessionTimeout) -> str | None:
        if state.local_value is not None:
            return state.local_value
        if state.set_value is not None:
            return state.set_value
        if state.startup is not None:
            return state.startup
        defaults = self._defaults
        if defaults is None:
            return None
        user, database = ev.session.user, ev.session.database
        for key in ((user, database), (user, ""), ("", database), ("", "")):
            if key in defaults:
                return defaults[key]
        return None

    @staticmethod
    def _follow(state: _SessionTimeout, sql: str) -> None:
        """Settings changes in the statement's text, in order of appearance: SET [SESSION] and
        set_config(..., false) for the session, SET LOCAL and set_config(..., true) to the end of
        the transaction, RESET for both."""
        changes = []
        for match in _SET.finditer(sql):
            local = (match.group(1) or "").strip().lower() == "local"
            value = next(g for g in match.groups()[1:] if g is not None)
            changes.append((match.start(), local, value))
        for match in _SET_CONFIG.finditer(sql):
            changes.append((match.start(), match.group(2).lower() == "true", match.group(1)))
        for match in _RESET.finditer(sql):
            changes.append((match.start(), False, None))
        for _, local, value in sorted(changes, key=lambda change: change[0]):
            if value is not None and value.lower() == "default":
                value = None
            if local:
                state.local_value = value
            else:
                state.set_value = value
                state.local_value = None


def _startup(startup: dict[str, str]) -> str | None:
    value = startup.get("statement_timeout")
    for match in _OPTION.finditer(startup.get("options", "")):
        value = match.group(1).replace("\\", "")
    return value
