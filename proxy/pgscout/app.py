"""Composition root: wires settings into a running pgscout, the only module that knows every part.

Owns: building the bus and subscribing every observer in order (fingerprints first), the server,
the admin routes, the per-second tick, signal handling (SIGTERM/SIGINT drain, SIGHUP reload) and
what a reload may change live.
Must not: parse arguments (cli.py does) or hold protocol or observation logic of its own.
"""

from __future__ import annotations

import asyncio
import dataclasses
import signal
from collections.abc import Callable

import structlog

from pgscout import logs
from pgscout.exposition import api, status
from pgscout.exposition.admin import AdminServer, Response
from pgscout.analysis.bus import Bus
from pgscout.control.limits import UpstreamLimits
from pgscout.dataplane.events import (Desynced, SessionClosed, SessionOpened, SessionReady, StatementDone, TransactionEnded)
from pgscout.exposition.metrics import PgscoutCollector, Sources, build_registry
from pgscout.dataplane.connections import ConnectionTracker
from pgscout.analysis.fingerprint import Fingerprinter
from pgscout.analysis.nplusone import NPlusOneDetector
from pgscout.analysis.slowlog import SlowLog
from pgscout.analysis.statements import StatementStats
from pgscout.analysis.transactions import TransactionStats
from pgscout.dataplane.server import Server
from pgscout.settings import ConfigError, Settings

log = structlog.get_logger("pgscout")


async def serve(settings: Settings, *, observing: bool,
                 reload: Callable[[], Settings] | None = None) -> int:
    bus = Bus(on_error=lambda handler, exc: log.error(
        "observer_failed", observer=getattr(handler, "__qualname__", repr(handler)),
        error=f"{type(exc).__name__}: {exc}"))
    server = Server(settings, bus.publish, observing=observing)
    sources = _wire_observers(settings, bus, server)
    admin = AdminServer(settings.admin.token)
    _health_routes(admin, server)
    collector = PgscoutCollector(sources, settings.metrics.top_k, settings.metrics.sql_text_max_chars)
    api.register(admin, sources, build_registry(collector))
    status.register(admin)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    if reload is not None:
        loop.add_signal_handler(signal.SIGHUP, lambda: _reload(reload, server, sources))
    try:
        await server.start()
        await admin.start(settings.admin.listen.host, settings.admin.listen.port)
    except OSError as exc:
        log.error("cannot_listen", error=str(exc))
        return 1
    except ConfigError as exc:  # the upstream is pgscout's own listener
        log.error("cannot_start", error=str(exc))
        return 1
    log.info("admin_listening", listen=str(settings.admin.listen))
    sources.limits.start()
    ticker = loop.create_task(_tick(sources))
    await stop.wait()
    await server.drain()
    ticker.cancel()
    await sources.limits.stop()
    await admin.stop()
    log.info("stopped")
    return 0


async def _tick(sources: Sources) -> None:
    """Once a second: end idle N+1 segments and emit the per-minute roll-ups that are due."""
    while True:
        await asyncio.sleep(1.0)
        sources.nplusone.flush()


# Settings that bind sockets or size structures at start; a reload reports them instead.
_RESTART_ONLY = ("proxy.listen", "proxy.upstream", "admin.listen", "admin.token",
                 "statements.fingerprint_cache_size", "statements.max_fingerprints",
                 "metrics.top_k", "control.refresh_seconds", "slowlog.keep", "nplusone.keep")


def _reload(load: Callable[[], Settings], server: Server, sources: Sources) -> None:
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
    slow = new.slowlog
    sources.slowlog.reconfigure(slow.threshold_ms, slow.per_application, slow.log_parameters,
                                slow.max_per_second)
    sources.connections.set_budgets(new.budgets)
    sources.nplusone.reconfigure(new.nplusone)
    server.keep_parameters = slow.log_parameters
    server.settings = new
    log.info("config_reloaded", needs_restart=ignored or None)


def _setting(settings: Settings, dotted: str):
    value = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


def _warn(record: dict) -> None:
    fields = dict(record)
    log.warning(fields.pop("event"), **fields)


def _wire_observers(settings: Settings, bus: Bus, server: Server) -> Sources:
    """Subscribe every observer; the fingerprinter first, since the others read what it adds."""
    slow = settings.slowlog
    fingerprinter = Fingerprinter(cache_size=settings.statements.fingerprint_cache_size)
    statements = StatementStats(settings.statements.max_fingerprints)
    slowlog = SlowLog(slow.threshold_ms, slow.per_application, slow.log_parameters,
                      slow.max_per_second, slow.keep,
                      emit=lambda record: log.warning("slow_query", **record))
    nplusone = NPlusOneDetector(settings.nplusone,
                                emit=lambda finding: log.warning("n_plus_one", **finding.to_dict()))
    transactions = TransactionStats()
    connections = ConnectionTracker(settings.budgets, warn=_warn)
    limits = UpstreamLimits(settings.proxy.upstream, settings.control.refresh_seconds, log,
                            connect_timeout=settings.proxy.connect_timeout_seconds)
    desyncs = [0]

    def on_desync(event: Desynced) -> None:
        desyncs[0] += 1
        log.warning("decoder_desynced", conn_id=event.session.conn_id,
                    application_name=event.session.application_name, reason=event.reason)

    for event_type, handler in (
            (StatementDone, fingerprinter.on_statement),
            (StatementDone, statements.on_statement),
            (StatementDone, slowlog.on_statement),
            (StatementDone, nplusone.on_statement),
            (TransactionEnded, transactions.on_transaction),
            (SessionOpened, connections.on_opened),
            (SessionReady, connections.on_ready),
            (SessionClosed, connections.on_closed),
            (SessionClosed, nplusone.on_session_closed),
            (Desynced, on_desync)):
        bus.subscribe(event_type, handler)
    server.admissions.append(connections.admission)
    return Sources(server=server, statements=statements, fingerprinter=fingerprinter,
                   slowlog=slowlog, transactions=transactions, nplusone=nplusone,
                   connections=connections, limits=limits, bus=bus, desyncs=lambda: desyncs[0])


def _health_routes(admin: AdminServer, server: Server) -> None:
    async def healthz(query) -> Response:
        return Response(200, "ok\n")

    async def readyz(query) -> Response:
        if server.draining:
            return Response(503, "draining\n")
        ok, detail = await server.upstream_reachable()
        return Response(200 if ok else 503, detail + "\n")

    admin.route("/healthz", healthz, protected=False)
    admin.route("/readyz", readyz, protected=False)
