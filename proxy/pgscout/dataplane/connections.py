"""Live connections per application/user/database, connection churn, and connection budgets.

Owns: the set of live sessions (SessionOpened to SessionClosed); their counts by
(application_name, user, database, state), computed at read time from the live Session objects so
that no statement ever costs this observer anything; per application the opens per second over a
sliding minute and a histogram of connection lifetimes; the "not pooling" churn verdict; and, per
Budget, the count of matching live sessions, the admission check that refuses a session over an
enforced budget (SQLSTATE 53300), and the warning records for budgets and churn: budget_warning
at 80% and 95% of a budget, budget_exceeded when a session is refused by an enforced budget or
when a budget that is not enforced goes over its limit (at most once a minute per budget, so a
budget that stays over keeps saying so without flooding the log).

States are spelled as pg_stat_activity.state spells them, so one dashboard reads both:
"starting" (pgscout's own) until the session's first ReadyForQuery (SessionReady), then "active"
while the server owes a response, "idle in transaction" inside a transaction block (status T),
"idle in transaction (aborted)" inside a failed one (status E), else "idle". Replication
sessions are never decoded, so they are reported as "replication".
Opens count connection attempts (every StartupMessage); lifetimes are observed only for sessions
that became ready, and a session this tracker refused is neither a lifetime nor part of any count.

Read interface: `live()`, `opened_total`, `opens_per_second()`, `lifetimes()`, `churn()`, `budgets()`,
`refused_total`. `admission(session)` plugs into Server.admissions. `warn(record)` is the
composition root's structured logger call; each record carries its event name under "event"
("budget_warning", "budget_exceeded" or "connection_churn").
Must not: log, keep per-statement state, or import asyncio, sockets or prometheus_client.
"""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable

from pgscout.dataplane.events import Session, SessionClosed, SessionOpened, SessionReady
from pgscout.histogram import Histogram
from pgscout.labels import MAX_APPLICATIONS, OTHER
from pgscout.settings import Budget
from pgscout.dataplane.wire import TOO_MANY_CONNECTIONS

LIFETIME_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 900, 1800, 3600)
STATES = ("starting", "active", "idle", "idle in transaction", "idle in transaction (aborted)",
          "replication")

WINDOW_SECONDS = 60
WARNING_INTERVAL_SECONDS = 60.0
BUDGET_WARNING_RATIO = 0.8
BUDGET_CRITICAL_RATIO = 0.95
# An application opening this many connections per second whose connections live less than
# CHURN_MAX_MEDIAN_LIFETIME seconds (median) is opening one per unit of work: it is not pooling.
CHURN_MIN_OPENS_PER_SECOND = 5.0
CHURN_MAX_MEDIAN_LIFETIME = 1.0


class _RecentActivity:
    """Opens and lifetimes of one application over the last WINDOW_SECONDS, in one-second slots.

    Window totals are kept up to date as slots expire, so a reading costs O(len(LIFETIME_BUCKETS)).
    """

    __slots__ = ("slots", "opens", "lifetime_counts")

    def __init__(self) -> None:
        self.slots: deque[list] = deque()  # [second, opens, lifetime counts per bucket]
        self.opens = 0
        self.lifetime_counts = [0] * (len(LIFETIME_BUCKETS) + 1)

    def _slot(self, now: float) -> list:
        self.expire(now)
        second = math.floor(now)
        if not self.slots or self.slots[-1][0] != second:
            self.slots.append([second, 0, [0] * len(self.lifetime_counts)])
        return self.slots[-1]

    def expire(self, now: float) -> None:
        oldest_kept = math.floor(now) - WINDOW_SECONDS + 1
        while self.slots and self.slots[0][0] < oldest_kept:
            _, opens, counts = self.slots.popleft()
            self.opens -= opens
            for index, count in enumerate(counts):
                self.lifetime_counts[index] -= count

    def opened(self, now: float) -> None:
        self._slot(now)[1] += 1
        self.opens += 1

    def closed(self, now: float, lifetime: float) -> None:
        index = bisect_left(LIFETIME_BUCKETS, lifetime)
        self._slot(now)[2][index] += 1
        self.lifetime_counts[index] += 1

    def median_lifetime(self) -> float | None:
        """The median of recent lifetimes, interpolated inside its bucket; None without any."""
        total = sum(self.lifetime_counts)
        if total == 0:
            return None
        half = total / 2
        running = 0
        lower = 0.0
        for bound, count in zip((*LIFETIME_BUCKETS, math.inf), self.lifetime_counts):
            if count and running + count >= half:
                if bound == math.inf:
                    return lower
                return lower + (bound - lower) * (half - running) / count
            running += count
            lower = bound
        return lower


class _BudgetState:
    __slots__ = ("budget", "refused_total", "warned_level", "last_warning_at", "last_exceeded_at",
                 "refused_since_record")

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.refused_total = 0
        self.warned_level = 0  # 0 below 80%, 1 from 80%, 2 from 95%
        self.last_warning_at: dict[int, float] = {}
        self.last_exceeded_at: float | None = None
        self.refused_since_record = 0


class ConnectionTracker:
    """Bus observer of SessionOpened, SessionReady and SessionClosed; also a Server admission."""

    def __init__(self, budgets: tuple[Budget, ...], warn: Callable[[dict], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._budgets = [_BudgetState(budget) for budget in budgets]
        self._warn = warn
        self._clock = clock
        self._started_at = clock()
        self._live: dict[int, Session] = {}
        self._ready: set[int] = set()
        self._refused: set[int] = set()
        self._recent: dict[str, _RecentActivity] = {}
        self._lifetimes: dict[str, Histogram] = {}
        self._churning: set[str] = set()
        self._last_churn_warning_at: dict[str, float] = {}
        self.refused_total = 0
        self.opened_total: dict[str, int] = {}  # application -> sessions opened since start

    def set_budgets(self, budgets: tuple[Budget, ...]) -> None:
        """Apply a reloaded budget list; a budget keeping its name keeps its counters."""
        known = {state.budget.name: state for state in self._budgets}
        states = []
        for budget in budgets:
            state = known.get(budget.name) or _BudgetState(budget)
            state.budget = budget
            states.append(state)
        self._budgets = states

    # -- events ----------------------------------------------------------------------------
    def on_opened(self, ev: SessionOpened) -> None:
        session = ev.session
        self._live[session.conn_id] = session
        now = self._clock()
        application = self._application_key(session.application_name)
        self.opened_total[application] = self.opened_total.get(application, 0) + 1
        self._recent_activity(application).opened(now)
        self._check_churn(application, now)

    def on_ready(self, ev: SessionReady) -> None:
        session = ev.session
        if session.conn_id not in self._live:
            return
        self._ready.add(session.conn_id)
        self._check_budgets(session, self._clock())

    def on_closed(self, ev: SessionClosed) -> None:
        session = ev.session
        if self._live.pop(session.conn_id, None) is None:
            return
        self._refused.discard(session.conn_id)
        if session.conn_id not in self._ready:  # never connected: refused, or failed to start
            return
        self._ready.discard(session.conn_id)
        now = self._clock()
        self._check_budgets(session, now)  # a budget back under 80% warns again when it returns
        lifetime = max(0.0, ev.at - session.opened_at)
        application = self._application_key(session.application_name)
        histogram = self._lifetimes.get(application)
        if histogram is None:
            histogram = self._lifetimes[application] = Histogram(LIFETIME_BUCKETS)
        histogram.observe(lifetime)
        self._recent_activity(application).closed(now, lifetime)
        self._check_churn(application, now)

    # -- admission -------------------------------------------------------------------------
    def admission(self, session: Session) -> tuple[str, str] | None:
        """Refuse `session` (SQLSTATE 53300) when an enforced budget it matches is full.

        The server publishes SessionOpened before asking, so the session itself is left out of
        the count it is judged against.
        """
        now = self._clock()
        for state in self._budgets:
            budget = state.budget
            if not budget.enforce or not _matches(budget, session):
                continue
            current = self._count(budget, excluding=session.conn_id)
            if current >= budget.max_connections:
                self._refuse(state, session, current, now)
                return TOO_MANY_CONNECTIONS, (
                    f'pgscout: budget "{budget.name}" allows {budget.max_connections} connections '
                    f"for {_describe(budget)}, {current} are open"
                )
        self._check_budgets(session, now)
        return None

    def _refuse(self, state: _BudgetState, session: Session, current: int, now: float) -> None:
        self._refused.add(session.conn_id)
        state.refused_total += 1
        state.refused_since_record += 1
        self.refused_total += 1
        if not self._exceeded_record_due(state, now):
            return
        record = self._budget_record("budget_exceeded", state.budget, current)
        record |= {"refused": state.refused_since_record, "refused_total": state.refused_total,
                   "refused_application_name": session.application_name,
                   "refused_user": session.user, "refused_database": session.database}
        state.refused_since_record = 0
        self._warn(record)

    def _check_budgets(self, session: Session, now: float) -> None:
        """Warn about budgets `session` counts against that reached 80% or 95% of their limit,
        or went over it."""
        for state in self._budgets:
            budget = state.budget
            if not _matches(budget, session):
                continue
            current = self._count(budget)
            if current > budget.max_connections and self._exceeded_record_due(state, now):
                self._warn(self._budget_record("budget_exceeded", budget, current)
                           | {"over_by": current - budget.max_connections})
            usage = current / budget.max_connections
            level = 2 if usage >= BUDGET_CRITICAL_RATIO else 1 if usage >= BUDGET_WARNING_RATIO else 0
            if level <= state.warned_level:
                state.warned_level = level
                continue
            last = state.last_warning_at.get(level)
            if last is not None and now - last < WARNING_INTERVAL_SECONDS:
                continue  # stays unwarned: the next check after the interval reports it
            state.warned_level = level
            state.last_warning_at[level] = now
            self._warn(self._budget_record("budget_warning", budget, current))

    @staticmethod
    def _exceeded_record_due(state: _BudgetState, now: float) -> bool:
        if state.last_exceeded_at is not None and now - state.last_exceeded_at < WARNING_INTERVAL_SECONDS:
            return False
        state.last_exceeded_at = now
        return True

    def _budget_record(self, event: str, budget: Budget, current: int) -> dict:
        return {
            "event": event,
            "budget": budget.name,
            "match": _describe(budget),
            "max_connections": budget.max_connections,
            "current": current,
            "usage": round(current / budget.max_connections, 4),
            "enforce": budget.enforce,
        }

    def _count(self, budget: Budget, excluding: int | None = None) -> int:
        return sum(
            1 for conn_id, session in self._live.items()
            if conn_id != excluding and conn_id not in self._refused and _matches(budget, session)
        )

    # -- churn -----------------------------------------------------------------------------
    def _application_key(self, application_name: str) -> str:
        """application_name is chosen by clients: past MAX_APPLICATIONS names the rest share OTHER."""
        if application_name in self._recent or len(self._recent) < MAX_APPLICATIONS:
            return application_name
        return OTHER

    def _recent_activity(self, application: str) -> _RecentActivity:
        activity = self._recent.get(application)
        if activity is None:
            activity = self._recent[application] = _RecentActivity()
        return activity

    def _rate(self, activity: _RecentActivity, now: float) -> float:
        # Until a whole minute has passed, divide by the time actually observed.
        observed = min(float(WINDOW_SECONDS), max(1.0, now - self._started_at))
        return activity.opens / observed

    def _is_churning(self, activity: _RecentActivity, now: float) -> bool:
        median = activity.median_lifetime()
        return (self._rate(activity, now) > CHURN_MIN_OPENS_PER_SECOND
                and median is not None and median < CHURN_MAX_MEDIAN_LIFETIME)

    def _check_churn(self, application: str, now: float) -> None:
        activity = self._recent[application]
        activity.expire(now)
        if not self._is_churning(activity, now):
            self._churning.discard(application)
            return
        if application in self._churning:
            return
        self._churning.add(application)
        last = self._last_churn_warning_at.get(application)
        if last is not None and now - last < WARNING_INTERVAL_SECONDS:
            return
        self._last_churn_warning_at[application] = now
        self._warn({"event": "connection_churn", **self._churn_entry(application, activity, now)})

    def _churn_entry(self, application: str, activity: _RecentActivity, now: float) -> dict:
        median = activity.median_lifetime()
        return {
            "application_name": application,
            "opens_per_second": round(self._rate(activity, now), 3),
            "median_lifetime_seconds": None if median is None else round(median, 4),
            "hint": "a new connection per unit of work: use a connection pool (or keep the pool's "
                    "connections open longer)",
        }

    # -- reads -----------------------------------------------------------------------------
    def live(self) -> dict[tuple[str, str, str, str], int]:
        """Live sessions counted by (application_name, user, database, state)."""
        counts: dict[tuple[str, str, str, str], int] = {}
        for conn_id, session in self._live.items():
            if conn_id in self._refused:
                continue
            key = (session.application_name, session.user, session.database, self._state(conn_id, session))
            counts[key] = counts.get(key, 0) + 1
        return counts

    def _state(self, conn_id: int, session: Session) -> str:
        if session.replication:
            return "replication"
        if conn_id not in self._ready:
            return "starting"
        if session.active:
            return "active"
        if session.txn_status == "T":
            return "idle in transaction"
        if session.txn_status == "E":
            return "idle in transaction (aborted)"
        return "idle"

    def opens_per_second(self) -> dict[str, float]:
        """Connection attempts per second over the last minute, per application."""
        now = self._clock()
        rates = {}
        for application, activity in self._recent.items():
            activity.expire(now)
            rates[application] = self._rate(activity, now)
        return rates

    def lifetimes(self) -> dict[str, Histogram]:
        """Lifetime histograms per application (live objects; read `cumulative()`, `sum`, `count`)."""
        return self._lifetimes

    def churn(self) -> list[dict]:
        """Applications that are not pooling right now: application_name, opens_per_second,
        median_lifetime_seconds, hint."""
        now = self._clock()
        found = []
        for application, activity in self._recent.items():
            activity.expire(now)
            if self._is_churning(activity, now):
                found.append(self._churn_entry(application, activity, now))
        return found

    def budgets(self) -> list[dict]:
        """Each budget: name, application_name, user, database, max_connections, current, usage
        (current / max), over_budget (more open than allowed: only a budget that is not
        enforced gets there), enforce, refused_total."""
        report = []
        for state in self._budgets:
            budget = state.budget
            current = self._count(budget)
            report.append({
                "name": budget.name,
                "application_name": budget.application_name,
                "user": budget.user,
                "database": budget.database,
                "max_connections": budget.max_connections,
                "current": current,
                "usage": current / budget.max_connections,
                "over_budget": current > budget.max_connections,
                "enforce": budget.enforce,
                "refused_total": state.refused_total,
            })
        return report


def _matches(budget: Budget, session: Session) -> bool:
    return budget.matches(session.application_name, session.user, session.database)


def _describe(budget: Budget) -> str:
    fields = [f"{name}={value}" for name in ("application_name", "user", "database")
              if (value := getattr(budget, name)) is not None]
    return " ".join(fields) or "all sessions"
