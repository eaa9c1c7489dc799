"""Prometheus exposition: one custom Collector that reads observer state at scrape time.

Owns: metric names, types, help texts and labels (a public interface: dashboards and alerts use
them), and bounding label cardinality: only the top-K fingerprints by total time get their own
`fingerprint` label, everything else is summed under fingerprint="other"; SQL text appears only in
the truncated `pgscout_fingerprint_info` series, never as a label of every series; no label per
client address or parameter value.
Must not: be touched on the hot path (observers keep plain counters; this runs per scrape), or
change observer state.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import ProcessCollector
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily,
                                    InfoMetricFamily)
from prometheus_client.registry import Collector, CollectorRegistry

from pgscout import __version__
from pgscout.histogram import Histogram
from pgscout.analysis.fingerprint import abandoned_parses
from pgscout.analysis.statements import FingerprintStats, StatementStats
from pgscout.labels import OTHER



@dataclass
class Sources:
    """The objects the collector reads. The analysis observers are live; `server`,
    `connections`, `limits` and `dataplane` are the data-plane process's snapshot taken for the
    request being answered (dataplane/handoff.py `DataPlaneSnapshot`)."""

    server: object
    statements: StatementStats
    fingerprinter: object
    slowlog: object
    transactions: object
    nplusone: object
    connections: object
    limits: object  # control.UpstreamLimits
    bus: object
    dataplane: object
    findings: object = None  # analysis.findings.Findings
    catalog: object = None  # control.catalog.Catalog, None until the worker starts it


class FingerprintLabels:
    """Decides which fingerprints are exported under their own label.

    A labelled fingerprint exports its own totals, which only grow while it is tracked. The
    "other" series is an accumulator of what unlabelled fingerprints added between scrapes, so
    it never decreases either. Membership is sticky: a labelled fingerprint keeps its label while
    it stays within the top 2K, so series do not flap between scrapes.
    """

    def __init__(self, top_k: int):
        self.top_k = top_k
        self.labelled: set[str] = set()
        self._seen: dict[str, tuple[int, float, int, int]] = {}
        self._other_seen = (0, 0.0, 0, 0)
        self.other = [0, 0.0, 0, 0]  # calls, seconds, rows, errors

    def refresh(self, stats: StatementStats) -> list[FingerprintStats]:
        entries = {entry.fingerprint: entry for entry in stats.entries()}
        keep = {entry.fingerprint for entry in stats.top(2 * self.top_k)}
        self.labelled &= keep
        for entry in stats.top(self.top_k):
            if len(self.labelled) >= self.top_k:
                break
            self.labelled.add(entry.fingerprint)
        delta = [0, 0.0, 0, 0]
        # Evicted entries were folded into stats.other() whole; what was already exported of them
        # must not be counted twice.
        for fingerprint in [f for f in self._seen if f not in entries]:
            _accumulate(delta, self._seen.pop(fingerprint), -1)
        other_now = _snapshot(stats.other())
        _accumulate(delta, other_now, 1)
        _accumulate(delta, self._other_seen, -1)
        self._other_seen = other_now
        for fingerprint, entry in entries.items():
            now = _snapshot(entry)
            before = self._seen.get(fingerprint)
            if before != now:
                if fingerprint not in self.labelled:
                    _accumulate(delta, now, 1)
                    if before is not None:
                        _accumulate(delta, before, -1)
                self._seen[fingerprint] = now
        for index in range(4):
            self.other[index] += max(delta[index], 0)
        return [entries[f] for f in self.labelled if f in entries]


def _snapshot(entry: FingerprintStats) -> tuple[int, float, int, int]:
    return entry.calls, entry.total_seconds, entry.rows, entry.error_count


def _accumulate(total: list, values: tuple, sign: int) -> None:
    for index, value in enumerate(values):
        total[index] += sign * value


def _histogram(family: HistogramMetricFamily, labels: list[str], histogram: Histogram) -> None:
    buckets = [("+Inf" if math.isinf(bound) else _le(bound), count)
               for bound, count in histogram.cumulative()]
    family.add_metric(labels, buckets, histogram.sum)


def _le(bound: float) -> str:
    return repr(float(bound))


def _one_line(sql: str) -> str:
    """SQL with each run of whitespace (newlines, indentation) as one space: a label value is
    shown on one line by every Prometheus tool."""
    return " ".join(sql.split())


class PgscoutCollector(Collector):
    def __init__(self, sources: Sources, top_k: int, sql_text_max_chars: int):
        self.sources = sources
        self.labels = FingerprintLabels(top_k)
        self.sql_text_max_chars = sql_text_max_chars

    def collect(self) -> Iterable:
        yield from self._proxy()
        yield from self._statements()
        yield from self._transactions()
        yield from self._findings()
        yield from self._connections()
        yield from self._upstream()

    # -- the proxy itself ------------------------------------------------------------------
    def _proxy(self):
        s = self.sources
        server = s.server
        info = InfoMetricFamily("pgscout_build", "pgscout version")
        info.add_metric([], {"version": __version__})
        yield info
        yield GaugeMetricFamily("pgscout_draining", "1 while pgscout drains after SIGTERM",
                                value=int(server.draining))
        yield CounterMetricFamily("pgscout_upstream_connect_errors", "Sessions pgscout could not "
                                  "establish upstream: connect, TLS or startup failures the server "
                                  "is to blame for (not wrong credentials)",
                                  value=server.upstream_errors_total)
        yield CounterMetricFamily("pgscout_startup_errors", "Connections closed before a valid "
                                  "StartupMessage (garbage, bad lengths, direct TLS)",
                                  value=server.startup_errors_total)
        yield CounterMetricFamily("pgscout_accept_fd_exhausted", "accept() failures for want of file descriptors (clients wait in the backlog)", value=server.accept_fd_exhausted_total)
        yield CounterMetricFamily("pgscout_self_loops", "Connections refused because the upstream is pgscout itself", value=server.self_loops_total)
        yield CounterMetricFamily("pgscout_cancel_requests", "CancelRequests forwarded upstream "
                                  "(from clients and for clients that hung up mid-statement)",
                                  value=server.cancels_forwarded_total)
        traffic = CounterMetricFamily("pgscout_bytes", "Bytes relayed", labels=["direction"])
        from_client, from_server = server.bytes_relayed()
        traffic.add_metric(["client_to_server"], from_client)
        traffic.add_metric(["server_to_client"], from_server)
        yield traffic
        yield CounterMetricFamily("pgscout_decoder_desyncs", "Sessions whose traffic pgscout "
                                  "stopped decoding (bytes kept flowing)", value=server.desyncs_total)
        handoff = s.dataplane.handoff
        yield CounterMetricFamily("pgscout_analysis_records", "Statement and session records the "
                                  "data plane handed to the analysis process",
                                  value=handoff.records_sent)
        yield CounterMetricFamily("pgscout_analysis_records_shed", "Statement records dropped "
                                  "unanalysed because the analysis process was behind or down "
                                  "(forwarding never waits for analysis)", value=handoff.records_shed)
        yield CounterMetricFamily("pgscout_analysis_restarts", "Times the analysis process was "
                                  "started again after it died", value=handoff.restarts)
        yield GaugeMetricFamily("pgscout_analysis_backlog_bytes", "Records written to the "
                                "analysis process and not yet read by it", value=handoff.backlog_bytes)
        errors = CounterMetricFamily("pgscout_observer_errors", "Exceptions raised by observers",
                                     labels=["observer"])
        for name, count in s.bus.errors.items():
            errors.add_metric([name], count)
        yield errors
        hits, misses, _, size = s.fingerprinter.cache_info()
        cache = CounterMetricFamily("pgscout_fingerprint_cache_lookups", "Fingerprint cache lookups",
                                    labels=["result"])
        cache.add_metric(["hit"], hits)
        cache.add_metric(["miss"], misses)
        yield cache
        yield GaugeMetricFamily("pgscout_fingerprint_cache_entries", "Distinct SQL texts cached",
                                value=size)
        yield CounterMetricFamily("pgscout_fingerprint_parses_abandoned", "Statements whose parse "
                                  "ran past its time budget (deeply nested SQL) and were described "
                                  "by the lexer instead", value=abandoned_parses())

    # -- statements ------------------------------------------------------------------------
    def _statements(self):
        stats = self.sources.statements
        totals = stats.totals()
        calls = CounterMetricFamily("pgscout_statements", "Completed statement executions",
                                    labels=["application"])
        seconds = CounterMetricFamily("pgscout_statement_seconds", "Time from sending a statement "
                                      "to its completion, summed", labels=["application"])
        latency = HistogramMetricFamily("pgscout_statement_duration_seconds",
                                        "Statement latency as seen from the sidecar",
                                        labels=["application"])
        errors = CounterMetricFamily("pgscout_statement_errors", "Statements that ended in an "
                                     "ErrorResponse", labels=["application", "sqlstate"])
        for application, usage in totals.per_application.items():
            calls.add_metric([application], usage.calls)
            seconds.add_metric([application], usage.seconds)
            _histogram(latency, [application], usage.histogram)
            for sqlstate, count in usage.errors.items():
                errors.add_metric([application, sqlstate], count)
        yield from (calls, seconds, latency, errors)

        labelled = self.labels.refresh(stats)
        fp_calls = CounterMetricFamily("pgscout_fingerprint_calls", "Executions per fingerprint "
                                       "(top-K by total time, the rest as other)", labels=["fingerprint"])
        fp_seconds = CounterMetricFamily("pgscout_fingerprint_seconds", "Execution time per fingerprint",
                                         labels=["fingerprint"])
        fp_rows = CounterMetricFamily("pgscout_fingerprint_rows", "Rows returned or affected per "
                                      "fingerprint", labels=["fingerprint"])
        fp_errors = CounterMetricFamily("pgscout_fingerprint_errors", "Errors per fingerprint",
                                        labels=["fingerprint"])
        fp_latency = HistogramMetricFamily("pgscout_fingerprint_duration_seconds",
                                           "Latency per top-K fingerprint", labels=["fingerprint"])
        fp_info = InfoMetricFamily("pgscout_fingerprint", "Normalized SQL (literals redacted, "
                                   "truncated) of each labelled fingerprint",
                                   labels=["fingerprint"])
        for entry in labelled:
            label = [entry.fingerprint]
            fp_calls.add_metric(label, entry.calls)
            fp_seconds.add_metric(label, entry.total_seconds)
            fp_rows.add_metric(label, entry.rows)
            fp_errors.add_metric(label, entry.error_count)
            _histogram(fp_latency, label, entry.histogram)
            fp_info.add_metric(label, {"kind": entry.kind, "query": _one_line(entry.normalized)
                                       [:self.sql_text_max_chars]})
        other = self.labels.other
        fp_calls.add_metric([OTHER], other[0])
        fp_seconds.add_metric([OTHER], other[1])
        fp_rows.add_metric([OTHER], other[2])
        fp_errors.add_metric([OTHER], other[3])
        yield from (fp_calls, fp_seconds, fp_rows, fp_errors, fp_latency, fp_info)
        yield GaugeMetricFamily("pgscout_fingerprints_tracked", "Fingerprints held in memory",
                                value=len(stats.entries()))

        slowlog = self.sources.slowlog
        slow = CounterMetricFamily("pgscout_slow_statements", "Statements over their slow-log "
                                   "threshold", labels=["application"])
        for application, count in slowlog.slow_by_application.items():
            slow.add_metric([application], count)
        yield slow
        yield CounterMetricFamily("pgscout_slow_log_suppressed", "Slow statements not logged "
                                  "because of the rate limit", value=slowlog.suppressed_total)

    # -- transactions ----------------------------------------------------------------------
    def _transactions(self):
        per_app = self.sources.transactions.per_application()
        ended = CounterMetricFamily("pgscout_transactions", "Transaction blocks ended, by outcome",
                                    labels=["application", "outcome"])
        duration = HistogramMetricFamily("pgscout_transaction_duration_seconds",
                                         "Transaction block duration", labels=["application"])
        idle = HistogramMetricFamily("pgscout_transaction_idle_seconds", "Time a transaction block "
                                     "waited on the client (idle in transaction)",
                                     labels=["application"])
        for application, totals in per_app.items():
            for outcome, count in totals.outcomes.items():
                ended.add_metric([application, outcome], count)
            _histogram(duration, [application], totals.duration)
            _histogram(idle, [application], totals.idle)
        yield from (ended, duration, idle)

    # -- N+1 -------------------------------------------------------------------------------
    def _findings(self):
        labelled = self.labels.labelled
        findings = CounterMetricFamily(
            "pgscout_nplusone_findings", "N+1 loops and duplicate queries detected, by child "
            "fingerprint (top-K, the rest as other)",
            labels=["finding", "fingerprint", "application", "severity"])
        folded: dict[tuple[str, str, str, str], int] = {}
        for (kind, fingerprint, application, severity), count in self.sources.nplusone.counts().items():
            key = (kind, fingerprint if fingerprint in labelled else OTHER, application, severity)
            folded[key] = folded.get(key, 0) + count
        for key, count in folded.items():
            findings.add_metric(list(key), count)
        yield findings
        every = CounterMetricFamily(
            "pgscout_findings", "Occurrences of anti-patterns found (blocking migrations, no "
            "statement timeout, long or idle transactions, missing indexes, N+1 and duplicate "
            "queries, connection churn), as listed by /api/findings",
            labels=["kind", "severity", "application"])
        for (kind, severity, application), count in self.sources.findings.counts().items():
            every.add_metric([kind, severity, application], count)
        yield every

    # -- connections and budgets -----------------------------------------------------------
    def _connections(self):
        tracker = self.sources.connections
        live = GaugeMetricFamily("pgscout_client_connections", "Open client sessions by state",
                                 labels=["application", "user", "database", "state"])
        for (application, user, database, state), count in tracker.live().items():
            live.add_metric([application, user, database, state], count)
        yield live
        # A counter, not a rate: PromQL's rate() picks the window (the demo's page and the
        # churn verdict use the tracker's own one-minute window).
        opened = CounterMetricFamily("pgscout_client_connections_opened", "Client sessions started "
                                     "(StartupMessage received)", labels=["application"])
        for application, count in tracker.opened_total.items():
            opened.add_metric([application], count)
        yield opened
        lifetime = HistogramMetricFamily("pgscout_client_connection_lifetime_seconds",
                                         "Lifetime of closed client sessions", labels=["application"])
        for application, histogram in tracker.lifetimes().items():
            _histogram(lifetime, [application], histogram)
        yield lifetime
        churn = GaugeMetricFamily("pgscout_client_connection_churn", "1 for an application that "
                                  "opens many short-lived connections (not pooling)",
                                  labels=["application"])
        for entry in tracker.churn():
            churn.add_metric([entry["application_name"]], 1)
        yield churn
        limit = GaugeMetricFamily("pgscout_budget_max_connections", "Configured connection budget",
                                  labels=["budget"])
        used = GaugeMetricFamily("pgscout_budget_connections", "Open sessions matching the budget",
                                 labels=["budget"])
        refused = CounterMetricFamily("pgscout_budget_refused", "Sessions refused by an enforced "
                                      "budget (SQLSTATE 53300)", labels=["budget"])
        info = InfoMetricFamily("pgscout_budget", "What each connection budget matches ('' = any)",
                                labels=["budget"])
        for budget in tracker.budgets():
            info.add_metric([budget["name"]], {
                "application": budget["application_name"] or "", "user": budget["user"] or "",
                "database": budget["database"] or "", "enforce": str(budget["enforce"]).lower()})
            limit.add_metric([budget["name"]], budget["max_connections"])
            used.add_metric([budget["name"]], budget["current"])
            refused.add_metric([budget["name"]], budget["refused_total"])
        yield from (info, limit, used, refused)

    def _upstream(self):
        """Every upstream series carries `upstream` (host:port), so one PromQL expression over
        all sidecars can compute each database server's headroom `by (upstream)`."""
        reading = self.sources.limits.snapshot()
        label = [self.sources.server.upstream_display]
        up = GaugeMetricFamily("pgscout_upstream_up", "1 when pgscout's control connection read "
                               "the upstream's limits on its last attempt (retried at once when "
                               "the connection is lost)", labels=["upstream"])
        up.add_metric(label, int(bool(reading.get("ok"))))
        yield up
        for key, name, text in (
                ("max_connections", "pgscout_upstream_max_connections", "Upstream max_connections"),
                ("superuser_reserved_connections", "pgscout_upstream_superuser_reserved_connections",
                 "Upstream superuser_reserved_connections"),
                ("reserved_connections", "pgscout_upstream_reserved_connections",
                 "Upstream reserved_connections (PostgreSQL 16+, else 0)"),
                ("client_backends", "pgscout_upstream_backends", "Client backends on the upstream, "
                 "from every client (pg_stat_activity)")):
            value = reading.get(key)
            if value is not None:
                gauge = GaugeMetricFamily(name, text, labels=["upstream"])
                gauge.add_metric(label, value)
                yield gauge


def build_registry(collector: PgscoutCollector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry
