"""The admin server's endpoints: /metrics and the JSON API under /api/.

Owns: turning observer state into JSON documents (top fingerprints, every finding, N+1 findings,
slow queries, connections and budgets, an overview for the status page, the last 15 minutes of the overview's
counters for the page's charts) and the /metrics exposition; and the one endpoint that changes
anything, POST /api/reset, which resets the per-fingerprint statistics like
pg_stat_statements_reset() (see StatementStats.reset).
Must not: change observer state otherwise, or put SQL literals or parameter values anywhere the
observers did not already redact them.
"""

from __future__ import annotations

import math
import time

import gzip

from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import CollectorRegistry

from pgscout.exposition.admin import Request, Router, Response, json_response
from pgscout.exposition.history import HISTORY_SECONDS, SAMPLE_SECONDS, History
from pgscout.exposition.metrics import Sources
from pgscout.analysis.statements import SORT_KEYS

_DEFAULT_LIMIT = 50
_MAX_LIMIT = 1000


def _counters(sources: Sources) -> dict:
    """What the page's charts are computed from: cumulative, so any two readings give a rate."""
    totals = sources.statements.totals()
    return {
        "now": time.time(),
        "statements": totals.calls,
        "statement_seconds": totals.seconds,
        "latency_buckets": [[bound if math.isfinite(bound) else "+Inf", count]
                            for bound, count in totals.histogram().cumulative()],
    }


def register(admin: Router, sources: Sources, registry: CollectorRegistry) -> None:
    history = History(lambda: _counters(sources))
    admin.every(SAMPLE_SECONDS, history.sample)

    async def metrics(request: Request) -> Response:
        # prometheus_client's own negotiation: OpenMetrics when the scraper's Accept asks for it
        # (Prometheus does), else the text format; gzip when Accept-Encoding allows it.
        encoder, content_type = choose_encoder(request.header("accept"))
        body = encoder(registry)
        headers = [("Vary", "Accept, Accept-Encoding")]
        if gzip_accepted(request.header("accept-encoding")):
            body = gzip.compress(body)
            headers.append(("Content-Encoding", "gzip"))
        return Response(200, body, content_type, headers=tuple(headers))

    async def fingerprints(request: Request) -> Response:
        query = request.query
        sort = query.get("sort", ["total_time"])[0]
        if sort not in SORT_KEYS:
            return json_response({"error": f"sort must be one of {sorted(SORT_KEYS)}"}, 400)
        try:
            limit = min(max(int(query.get("limit", [_DEFAULT_LIMIT])[0]), 1), _MAX_LIMIT)
        except ValueError:
            return json_response({"error": "limit must be an integer"}, 400)
        stats = sources.statements
        return json_response({
            "sort": sort,
            "fingerprints": [entry.as_dict() for entry in stats.top(limit, sort)],
            "other": stats.other().as_dict(),
            "tracked": len(stats.entries()),
            "stats_reset": stats.stats_reset,
        })

    async def nplusone(request: Request) -> Response:
        return json_response({"findings": sources.nplusone.recent()})

    async def findings(request: Request) -> Response:
        kind = request.query.get("kind", [None])[0]
        listed = sources.findings.listing()
        catalog = sources.catalog
        return json_response({
            "findings": [f for f in listed if kind is None or f["kind"] == kind],
            "catalog": catalog.status() if catalog is not None else {"ok": None, "last_error": None},
        })

    async def slow(request: Request) -> Response:
        return json_response({"slow_queries": list(reversed(sources.slowlog.recent())),
                              "slow_total": sources.slowlog.slow_total,
                              "suppressed_total": sources.slowlog.suppressed_total})

    async def connections(request: Request) -> Response:
        tracker = sources.connections
        return json_response({
            "live": [{"application": a, "user": u, "database": d, "state": s, "count": n}
                     for (a, u, d, s), n in sorted(tracker.live().items())],
            "budgets": tracker.budgets(),
            "churn": tracker.churn(),
            "upstream": sources.limits.snapshot(),
        })

    async def overview(request: Request) -> Response:
        server = sources.server
        return json_response({
            **_counters(sources),
            "started_at": server.started_at,
            "stats_reset": sources.statements.stats_reset,
            "errors": sum(sources.statements.totals().errors.values()),
            "open_sessions": server.open_sessions,
            "slow_total": sources.slowlog.slow_total,
            "findings": sum(sources.nplusone.counts().values()),
            "findings_total": sum(sources.findings.counts().values()),
            "desyncs": server.desyncs_total,
            "analysis_records_shed": sources.dataplane.handoff.records_shed,
            "draining": server.draining,
        })

    async def history_samples(request: Request) -> Response:
        return json_response({"sample_seconds": SAMPLE_SECONDS, "history_seconds": HISTORY_SECONDS,
                              "samples": history.samples()})

    async def reset(request: Request) -> Response:
        sources.statements.reset()
        return json_response({"stats_reset": sources.statements.stats_reset})

    admin.route("/metrics", metrics, protected=True)
    admin.route("/api/fingerprints", fingerprints, protected=True)
    admin.route("/api/nplusone", nplusone, protected=True)
    admin.route("/api/findings", findings, protected=True)
    admin.route("/api/slow", slow, protected=True)
    admin.route("/api/connections", connections, protected=True)
    admin.route("/api/overview", overview, protected=True)
    admin.route("/api/history", history_samples, protected=True)
    admin.route("/api/reset", reset, protected=True, method="POST")
