"""Composition root of the data-plane process: the only module that knows every part of it.

Owns: the server, the connection tracker (budgets are enforced here, at admission), the control
connection's limits, the admin server (health answered here, everything else relayed with a
snapshot of this process's state to the analysis process that `AnalysisLink` runs), signal
handling (SIGTERM/SIGINT drain, SIGHUP reload) and what a reload may change live.
Must not: parse arguments (cli.py does), hold protocol or observation logic of its own, or do
work whose cost depends on SQL text (the analysis process does, see worker.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Callable

import structlog

from pgscout import logs
from pgscout.control.limits import UpstreamLimits
from pgscout.dataplane.connections import ConnectionTracker
from pgscout.dataplane.events import SessionClosed, SessionOpened, SessionReady
from pgscout.dataplane.handoff import AnalysisLink, AnalysisUnavailable, Frozen, freeze
from pgscout.dataplane.server import Server
from pgscout.exposition import status
from pgscout.exposition.admin import AdminServer, Request, Response
from pgscout.settings import ConfigError, Settings

log = structlog.get_logger("pgscout")

_ANALYSIS_ANSWER_SECONDS = 10.0


async def serve(settings: Settings, *, observing: bool,
                 reload: Callable[[], Settings] | None = None) -> int:
    link = AnalysisLink(settings, settings.statements.analysis_backlog_bytes)
    tracker = ConnectionTracker(settings.budgets, warn=_warn)
    on_session = {SessionOpened: tracker.on_opened, SessionReady: tracker.on_ready,
                  SessionClosed: tracker.on_closed}
    server = Server(settings, link.put, lambda event: on_session[type(event)](event),
                    observing=observing)
    server.admissions.append(tracker.admission)
    link.session_records = server.session_records
    link.active_sessions = server.active_sessions
    limits = UpstreamLimits(settings.proxy.upstream, settings.control.refresh_seconds, log,
                            connect_timeout=settings.proxy.connect_timeout_seconds)

    async def relay_to_analysis(request: Request) -> Response:
        try:
            return await link.request(request, _snapshot(server, tracker, limits, link),
                                      _ANALYSIS_ANSWER_SECONDS)
        except AnalysisUnavailable as exc:
            return Response(503, f"pgscout analysis unavailable: {exc}\n")

    admin = AdminServer(settings.admin.token, relay=relay_to_analysis)
    _health_routes(admin, server)
    status.register(admin)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(reload, server, tracker, link))
    try:
        await link.start()
        await server.start()
        await admin.start(settings.admin.listen.host, settings.admin.listen.port)
    except (OSError, ConfigError) as exc:  # ConfigError: the upstream is pgscout's own listener
        log.error("cannot_listen" if isinstance(exc, OSError) else "cannot_start", error=str(exc))
        await link.stop()
        return 1
    log.info("admin_listening", listen=str(settings.admin.listen))
    limits.start()
    await stop.wait()
    await server.drain()
    await limits.stop()
    await admin.stop()
    await link.stop()
    log.info("stopped")
    return 0


def _snapshot(server: Server, tracker: ConnectionTracker, limits: UpstreamLimits,
              link: AnalysisLink) -> Frozen:
    """What the analysis process needs of this process to answer one admin request."""
    return Frozen({
        "server": freeze(server, numbers=True, calls=("bytes_relayed",),
                         open_sessions=server.open_sessions,
                         upstream_display=server.upstream_display),
        "connections": freeze(tracker, calls=("live", "lifetimes", "churn", "budgets"),
                              attributes=("opened_total",)),
        "limits": freeze(limits, calls=("snapshot",)),
        "handoff": freeze(link, attributes=("records_sent", "records_shed", "restarts",
                                            "backlog_bytes")),
    })


# Settings that bind sockets or size structures at start; a reload reports them instead.
_RESTART_ONLY = ("proxy.listen", "proxy.upstream", "admin.listen", "admin.token",
                 "statements.fingerprint_cache_size", "statements.max_fingerprints",
                 "statements.max_sql_chars", "statements.display_chars",
                 "statements.analysis_backlog_bytes",
                 "metrics.top_k", "control.refresh_seconds", "slowlog.keep", "nplusone.keep")


def _reload(load: Callable[[], Settings], server: Server, tracker: ConnectionTracker,
            link: AnalysisLink) -> None:
    """SIGHUP: re-read the config; apply what can change live, keep the old config on error."""
    try:
        new = load()
    except ConfigError as exc:
        log.error("config_reload_failed", error=str(exc), kept="previous configuration")
        return
    old = server.settings
    ignored = [key for key in _RESTART_ONLY if _setting(old, key) != _setting(new, key)]
    # Keep what cannot change without a restart, so the running server stays consistent.
    new = dataclasses.replace(
        new, proxy=dataclasses.replace(new.proxy, listen=old.proxy.listen, upstream=old.proxy.upstream),
        admin=old.admin, statements=old.statements, metrics=old.metrics, control=old.control)
    logs.configure(new.log.level, new.log.format)
    tracker.set_budgets(new.budgets)
    server.keep_parameters = new.slowlog.log_parameters
    server.settings = new
    link.reconfigure(new)
    log.info("config_reloaded", needs_restart=ignored or None)


def _setting(settings: Settings, dotted: str):
    value = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _warn(record: dict) -> None:
    fields = dict(record)
    log.warning(fields.pop("event"), **fields)


def _health_routes(admin: AdminServer, server: Server) -> None:
    async def healthz(request: Request) -> Response:
        return Response(200, "ok\n")

    async def readyz(request: Request) -> Response:
        if server.draining:
            return Response(503, "draining\n")
        ok, detail = await server.upstream_reachable()
        return Response(200 if ok else 503, detail + "\n")

    admin.route("/healthz", healthz, protected=False)
    admin.route("/readyz", readyz, protected=False)
