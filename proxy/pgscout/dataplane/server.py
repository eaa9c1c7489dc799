"""The listener and the registry of live sessions.

Owns: accepting client connections, the set of open sessions, per-connection open/close log
lines, forwarding CancelRequests to the upstream on connections of their own, admission checks
(budgets plug in here), feeding the sessions' startup outcomes to readiness (for /readyz and
pgscout_upstream_connect_errors_total), and draining on shutdown.
Must not: touch message bytes (relay.py relays them) or know what observes the sessions: it hands
records to `emit` (the analysis hand-off) and session milestones to `session_events` (the
connection tracker).
"""

from __future__ import annotations

import asyncio
import itertools
import ssl
import time
from collections.abc import Callable, Coroutine

import structlog

from pgscout.dataplane import records, wire
from pgscout.dataplane.decoder import TextBudget
from pgscout.dataplane.events import SessionClosed, SessionOpened, SessionReady
from pgscout.dataplane.readiness import Readiness, error_fields, is_server_fault
from pgscout.dataplane.relay import ClientLeg, Relay
from pgscout.settings import Settings
from pgscout.dataplane.upstream import UpstreamError, UpstreamProtocol, connect

log = structlog.get_logger("pgscout.server")

_CANCEL_TIMEOUT = 5.0

Admission = Callable[[object], tuple[str, str] | None]


class Server:
    def __init__(self, settings: Settings, emit: Callable[[list], None],
                 session_events: Callable[[object], None], *, observing: bool = True):
        self.settings = settings
        self.emit = emit
        self.session_events = session_events
        self.observing = observing
        self.keep_parameters = settings.slowlog.log_parameters
        self.client_tls = _client_tls_context(settings)
        self.admissions: list[Admission] = []
        self.relays: dict[int, Relay] = {}
        self.draining = False
        self.started_at = time.time()
        self.connections_total = 0
        self.upstream_errors_total = 0
        self.cancels_forwarded_total = 0
        self.startup_errors_total = 0
        self.desyncs_total = 0
        self.prepared_texts = TextBudget()  # shared by every session's decoder
        self._closed_bytes = [0, 0]  # from client, from server, of sessions already closed
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._listener: asyncio.base_events.Server | None = None
        self.readiness = (Readiness(settings.proxy.upstream, settings.proxy.connect_timeout_seconds)
                          if settings.proxy.upstream is not None else None)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        listen = self.settings.proxy.listen
        loop = asyncio.get_running_loop()
        self._listener = await loop.create_server(
            lambda: ClientLeg(Relay(self, next(self._ids), "")), listen.host, listen.port,
            reuse_address=True, backlog=1024)
        log.info("listening", listen=str(listen), upstream=self.settings.proxy.upstream.display())

    async def drain(self) -> None:
        """Stop accepting; let open sessions finish up to the drain timeout; then close them."""
        self.draining = True
        if self._listener is not None:
            self._listener.close()
        timeout = self.settings.proxy.drain_timeout_seconds
        log.info("draining", open_sessions=len(self.relays), timeout_seconds=timeout)
        deadline = time.monotonic() + timeout
        while self.relays and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.relays.values()):
            relay.close("drain")
        await asyncio.sleep(0)  # let transports flush their close

    def spawn(self, coroutine: Coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- sessions --------------------------------------------------------------------------
    def session_opened(self, relay: Relay) -> None:
        self.relays[relay.session.conn_id] = relay
        self.connections_total += 1
        s = relay.session
        log.info("connection_opened", conn_id=s.conn_id, client_addr=s.client_addr, user=s.user,
                 database=s.database, application_name=s.application_name,
                 replication=s.replication or None)
        self.emit([records.OPENED, s.conn_id, s.client_addr, s.user, s.database,
                   s.application_name, s.replication, s.opened_at, s.opened_wall, s.startup])
        self.session_events(SessionOpened(s))

    def session_ready(self, relay: Relay, at: float) -> None:
        self.session_events(SessionReady(relay.session, at))

    def desynced(self, relay: Relay, reason: str) -> None:
        s = relay.session
        self.desyncs_total += 1
        log.warning("decoder_desynced", conn_id=s.conn_id, application_name=s.application_name,
                    reason=reason)
        self.emit([records.DESYNCED, s.conn_id, reason])

    @property
    def open_sessions(self) -> int:
        return len(self.relays)

    @property
    def upstream_display(self) -> str:
        return self.settings.proxy.upstream.display()

    def session_closed(self, relay: Relay, at: float) -> None:
        s = relay.session
        self.emit([records.CLOSED, s.conn_id, at, relay.close_reason])
        self.session_events(SessionClosed(s, at, relay.close_reason))
        if self.relays.pop(s.conn_id, None) is None:
            return
        self._closed_bytes[0] += s.bytes_from_client
        self._closed_bytes[1] += s.bytes_from_server
        level = log.warning if relay.close_reason.startswith("error") else log.info
        level("connection_closed", conn_id=s.conn_id, client_addr=s.client_addr, user=s.user,
              database=s.database, application_name=s.application_name, backend_pid=s.backend_pid,
              duration_seconds=round(time.monotonic() - s.opened_at, 6),
              bytes_from_client=s.bytes_from_client, bytes_from_server=s.bytes_from_server,
              reason=relay.close_reason)

    def startup_failed(self, relay: Relay) -> None:
        """A connection that never sent a valid StartupMessage (garbage, direct TLS, bad length)."""
        self.startup_errors_total += 1
        log.warning("startup_failed", conn_id=relay.session.conn_id,
                    client_addr=relay.session.client_addr, reason=relay.close_reason)

    def bytes_relayed(self) -> tuple[int, int]:
        from_client, from_server = self._closed_bytes
        for relay in self.relays.values():
            from_client += relay.session.bytes_from_client
            from_server += relay.session.bytes_from_server
        return from_client, from_server

    def admit(self, session) -> tuple[str, str] | None:
        """Refuse a new session (SQLSTATE, message) or let it through (None)."""
        if self.draining:
            return wire.CANNOT_CONNECT_NOW, "pgscout is shutting down"
        if self.settings.proxy.upstream is None:
            return wire.CONNECTION_FAILURE, "pgscout has no upstream configured"
        for admission in self.admissions:
            refusal = admission(session)
            if refusal is not None:
                return refusal
        return None

    # -- cancellation ----------------------------------------------------------------------
    def forward_cancel(self, packet: bytes) -> None:
        """Send a client's CancelRequest verbatim to the upstream: no pooling, so the backend
        pid and key in it are the server's own."""
        self.cancels_forwarded_total += 1
        self.spawn(self._send_cancel(packet))

    def cancel_backend(self, pid: int | None, key: bytes | None) -> None:
        if pid is not None and key:
            self.forward_cancel(wire.cancel_request(pid, key))

    async def _send_cancel(self, packet: bytes) -> None:
        closed = asyncio.get_running_loop().create_future()
        try:
            transport, _ = await connect(self.settings.proxy.upstream, lambda: _CancelLeg(closed),
                                         self.settings.proxy.connect_timeout_seconds)
        except UpstreamError as exc:
            log.warning("cancel_not_forwarded", reason=str(exc))
            return
        transport.write(packet)
        try:
            # The server closes the connection once it has processed the request.
            await asyncio.wait_for(closed, _CANCEL_TIMEOUT)
        except TimeoutError:
            transport.close()

    # -- readiness -------------------------------------------------------------------------
    def upstream_session_started(self) -> None:
        """A session got its first ReadyForQuery: the upstream establishes sessions."""
        self.readiness.record(True, f"upstream {self.settings.proxy.upstream.display()} accepts sessions")

    def upstream_session_failed(self, reason: str) -> None:
        """A session could not be established upstream: TCP, TLS, or the server closed it."""
        self.upstream_errors_total += 1
        self.readiness.record(False, reason)

    def upstream_startup_error(self, message: bytes) -> None:
        """The server answered a session's startup with this ErrorResponse."""
        fields = error_fields(message)
        sqlstate = fields.get("C", "")
        if is_server_fault(sqlstate):  # not a wrong password or database name: the client's own
            self.upstream_session_failed(f"upstream {self.settings.proxy.upstream.display()} refused "
                                         f"a session: {fields.get('M', '')} (SQLSTATE {sqlstate})")

    async def upstream_reachable(self) -> tuple[bool, str]:
        """Whether a session can be established now, and why (see dataplane/readiness.py)."""
        if self.readiness is None:
            return False, "pgscout has no upstream configured"
        return await self.readiness.check()


class _CancelLeg(UpstreamProtocol):
    """A connection that carries one CancelRequest; the server closes it when done."""

    def __init__(self, closed: asyncio.Future):
        super().__init__()
        self.closed = closed

    def data_received(self, data: bytes) -> None:
        self.take_tls_answer(data)

    def connection_lost(self, exc) -> None:
        self.lose_tls_answer()
        if not self.closed.done():
            self.closed.set_result(None)


def _client_tls_context(settings: Settings) -> ssl.SSLContext | None:
    proxy = settings.proxy
    if not proxy.client_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(proxy.client_tls_cert, proxy.client_tls_key)
    return context

