"""The listener and the registry of live sessions.

Owns: the listening sockets and the accept loop (which survives running out of file
descriptors: it logs, counts and backs off), raising the soft RLIMIT_NOFILE at start, refusing an
upstream that is pgscout itself (at start, and when it accepts one of its own upstream
connections), the set of open sessions, per-connection open/close log lines, forwarding
CancelRequests to the upstream on connections of their own, admission checks (budgets plug in
here), feeding the sessions' startup outcomes to readiness (for /readyz and
pgscout_upstream_connect_errors_total), and draining on shutdown.
Must not: touch message bytes (relay.py relays them) or know what observes the sessions: it hands
records to `emit` (the analysis hand-off) and session milestones to `session_events` (the
connection tracker).
"""

from __future__ import annotations

import asyncio
import errno
import itertools
import resource
import socket
import ssl
import time
from collections.abc import Callable, Coroutine

import structlog

from pgscout.dataplane import records, wire
from pgscout.dataplane.decoder import TextBudget
from pgscout.dataplane.events import Session, SessionClosed, SessionOpened, SessionReady
from pgscout.dataplane.readiness import Readiness, error_fields, is_server_fault
from pgscout.dataplane.relay import ClientLeg, Relay
from pgscout.settings import ConfigError, Settings
from pgscout.dataplane.upstream import (UpstreamError, UpstreamProtocol, connect, own_leg, plain_ip,
                                        tls_context)

log = structlog.get_logger("pgscout.server")

_CANCEL_TIMEOUT = 5.0
_BACKLOG = 1024
# Connections accepted per readiness callback, so a burst of connects cannot starve the sessions.
_ACCEPT_BATCH = 64
# accept() failing for want of descriptors: retry after a pause that doubles up to the maximum
# (meanwhile new clients wait in the kernel's backlog instead of being reset).
_ACCEPT_RETRY_FIRST, _ACCEPT_RETRY_MAX = 0.05, 1.0
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Repeated conditions (out of descriptors, a self-loop) are logged at most once per interval.
_REPEAT_LOG_INTERVAL = 10.0

Admission = Callable[[object], tuple[str, str] | None]


class Server:
    def __init__(self, settings: Settings, emit: Callable[[tuple], None],
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
        self.accept_fd_exhausted_total = 0
        self.self_loops_total = 0
        self.prepared_texts = TextBudget()  # shared by every session's decoder
        self._closed_bytes = [0, 0]  # from client, from server, of sessions already closed
        self._ids = itertools.count(1)
        self._tasks: set[asyncio.Task] = set()
        self._sockets: list[socket.socket] = []
        self._accept_retry = _ACCEPT_RETRY_FIRST
        self._fd_exhausted_logged = (-_REPEAT_LOG_INTERVAL, 0)  # (when, count at that time)
        self._loop_logged = -_REPEAT_LOG_INTERVAL
        self.readiness = (Readiness(settings.proxy.upstream, settings.proxy.connect_timeout_seconds,
                                    client_cert=settings.proxy.upstream_cert_for_sessions)
                          if settings.proxy.upstream is not None else None)

    # -- lifecycle -------------------------------------------------------------------------
    async def start(self) -> None:
        """Raise the descriptor limit, refuse an upstream that is this very listener, listen."""
        _raise_descriptor_limit()
        listen = self.settings.proxy.listen
        loop = asyncio.get_running_loop()
        await self._refuse_self_as_upstream(loop)
        self._prepare_upstream_tls()
        self._sockets = _listening_sockets(listen.host, listen.port)
        for sock in self._sockets:
            loop.add_reader(sock.fileno(), self._accept, sock)
        log.info("listening", listen=str(listen), upstream=self.settings.proxy.upstream.display())

    def _prepare_upstream_tls(self) -> None:
        """Build the sessions' upstream TLS context now (tens of ms: the CA store), not on the
        first client's connect. A file that cannot be read is logged now and fails each
        connect until it can (a certificate may be mounted after pgscout starts)."""
        upstream = self.settings.proxy.upstream
        if upstream is None or upstream.is_unix_socket or upstream.sslmode in ("disable", "allow"):
            return
        try:
            tls_context(upstream, self.settings.proxy.upstream_cert_for_sessions)
        except (UpstreamError, OSError) as exc:  # a file named by the URL, or OpenSSL's own store
            log.error("upstream_tls_unusable", error=str(exc))

    async def drain(self) -> None:
        """Stop accepting; let open sessions finish up to the drain timeout; then close them."""
        self.draining = True
        self._stop_listening()
        timeout = self.settings.proxy.drain_timeout_seconds
        log.info("draining", open_sessions=len(self.relays), timeout_seconds=timeout)
        deadline = time.monotonic() + timeout
        while self.relays and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for relay in list(self.relays.values()):
            relay.close("drain")
        await asyncio.sleep(0)  # let transports flush their close

    def _stop_listening(self) -> None:
        loop = asyncio.get_running_loop()
        for sock in self._sockets:
            loop.remove_reader(sock.fileno())
            sock.close()
        self._sockets = []

    # -- accepting -------------------------------------------------------------------------
    def _accept(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                break
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._out_of_descriptors(loop, listener, exc)
                    return
                # ECONNABORTED (the client gave up while queued) and the network errors Linux
                # passes on from the new connection (accept(2)): that one is lost, try the next.
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.spawn(loop.connect_accepted_socket(
                lambda: ClientLeg(Relay(self, next(self._ids), "")), sock))
        self._accept_retry = _ACCEPT_RETRY_FIRST

    def _out_of_descriptors(self, loop, listener: socket.socket, exc: OSError) -> None:
        """Stop reading the listener for a while: clients wait in the backlog, sessions go on."""
        self.accept_fd_exhausted_total += 1
        loop.remove_reader(listener.fileno())
        loop.call_later(self._accept_retry, self._resume_accepting, listener)
        self._accept_retry = min(self._accept_retry * 2, _ACCEPT_RETRY_MAX)
        now = time.monotonic()
        logged_at, logged_count = self._fd_exhausted_logged
        if now - logged_at >= _REPEAT_LOG_INTERVAL:
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            log.error("accept_failed", error=exc.strerror or str(exc), open_sessions=len(self.relays),
                      fd_soft_limit=soft, fd_hard_limit=hard,
                      failures_since_last_line=self.accept_fd_exhausted_total - logged_count,
                      retry_seconds=self._accept_retry)
            self._fd_exhausted_logged = (now, self.accept_fd_exhausted_total)

    def _resume_accepting(self, listener: socket.socket) -> None:
        if listener in self._sockets:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener)

    # -- pgscout as its own upstream ---------------------------------------------------------
    async def _refuse_self_as_upstream(self, loop) -> None:
        """The README says both "point DATABASE_URL at pgscout" and "pgscout falls back to
        DATABASE_URL": sharing one environment, pgscout would connect to itself, each connection
        opening another until the descriptors run out."""
        upstream, listen = self.settings.proxy.upstream, self.settings.proxy.listen
        if upstream.is_unix_socket or upstream.port != listen.port:
            return
        try:
            async with asyncio.timeout(self.settings.proxy.connect_timeout_seconds):
                infos = await loop.getaddrinfo(upstream.host, upstream.port, type=socket.SOCK_STREAM)
        except (OSError, TimeoutError):
            return  # unresolvable now; the check on accepted connections still applies
        listen_ips = {plain_ip(info[4][0]) for info in socket.getaddrinfo(
            listen.host, listen.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)}
        for *_, address in infos:
            ip = plain_ip(address[0])
            if ip in listen_ips or (listen_ips & {"0.0.0.0", "::"} and _is_local_address(ip)):
                raise ConfigError(f"proxy.upstream: {self.loop_message(str(listen))}")

    def loop_message(self, listen: str | None = None) -> str:
        upstream = self.settings.proxy.upstream.display()
        return (f"pgscout: the upstream {upstream} is pgscout's own listener "
                f"{listen or self.settings.proxy.listen}, so pgscout would connect to itself; "
                f"point proxy.upstream (or DATABASE_URL, which pgscout falls back to) at the real "
                f"database")

    def looped_back(self, relay: Relay) -> bool:
        """True (and the connection closed) when an accepted client is one of pgscout's own
        upstream connections. That session's own leg then reports the loop to its client;
        nothing here opens another connection, and the log says it once per interval."""
        transport = relay.client.transport
        leg = own_leg(transport.get_extra_info("peername"), transport.get_extra_info("sockname"))
        if leg is None:
            return False
        leg.looped = True
        self.self_loops_total += 1
        now = time.monotonic()
        if now - self._loop_logged >= _REPEAT_LOG_INTERVAL:
            self._loop_logged = now
            log.error("upstream_is_pgscout", reason=self.loop_message(), loops=self.self_loops_total)
        relay.close("self-loop")
        return True

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
        self.emit(_opened_record(s))
        self.session_events(SessionOpened(s))

    def active_sessions(self) -> tuple[int, ...]:
        """The observed sessions waiting on the server now: a request of theirs is outstanding
        (a desynced session's flag is stale: its decoder is gone)."""
        return tuple(conn_id for conn_id, relay in self.relays.items()
                     if relay.decoder is not None and relay.session.active)

    def session_records(self) -> list[tuple]:
        """Every open session as records, for an analysis process that started after them (it
        would know them only by conn_id): OPENED with the session's current application_name,
        then what its decoder says of its state."""
        state = []
        for relay in self.relays.values():
            state.append(_opened_record(relay.session))
            if relay.decoder is not None:
                state.extend(relay.decoder.session_state())
        return state

    def session_ready(self, relay: Relay, at: float) -> None:
        self.session_events(SessionReady(relay.session, at))

    def desynced(self, relay: Relay, reason: str) -> None:
        s = relay.session
        self.desyncs_total += 1
        log.warning("decoder_desynced", conn_id=s.conn_id, application_name=s.application_name,
                    reason=reason)

    @property
    def open_sessions(self) -> int:
        return len(self.relays)

    @property
    def upstream_display(self) -> str:
        return self.settings.proxy.upstream.display()

    def session_closed(self, relay: Relay, at: float) -> None:
        s = relay.session
        self.emit((records.CLOSED, s.conn_id, at, relay.close_reason))
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
            client, server = relay.bytes_relayed()
            from_client += client
            from_server += server
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
    async def send_cancel(self, packet: bytes) -> None:
        """Send a CancelRequest verbatim to the upstream (no pooling, so the backend pid and key
        in it are the server's own) and return once the server has closed that connection,
        which it does after signalling the backend."""
        self.cancels_forwarded_total += 1
        closed = asyncio.get_running_loop().create_future()
        proxy = self.settings.proxy
        try:
            transport, _ = await connect(proxy.upstream, lambda: _CancelLeg(closed),
                                         proxy.connect_timeout_seconds,
                                         client_cert=proxy.upstream_cert_for_sessions)
        except UpstreamError as exc:
            log.warning("cancel_not_forwarded", reason=str(exc))
            return
        transport.write(packet)
        try:
            await asyncio.wait_for(closed, _CANCEL_TIMEOUT)
        except TimeoutError:
            transport.close()

    def cancel_backend(self, pid: int | None, key: bytes | None) -> None:
        if pid is not None and key:
            self.spawn(self.send_cancel(wire.cancel_request(pid, key)))

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
        super().connection_lost(exc)
        self.lose_tls_answer()
        if not self.closed.done():
            self.closed.set_result(None)


def _opened_record(s: Session) -> tuple:
    return (records.OPENED, s.conn_id, s.client_addr, s.user, s.database, s.application_name,
            s.replication, s.opened_at, s.opened_wall, s.startup)


def _client_tls_context(settings: Settings) -> ssl.SSLContext | None:
    proxy = settings.proxy
    if not proxy.client_tls_cert:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(proxy.client_tls_cert, proxy.client_tls_key)
    return context



def _raise_descriptor_limit() -> None:
    """Each session holds two descriptors; the usual soft limit of 1024 would cap pgscout at
    about 500 sessions while the hard limit allows far more."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    raised = soft
    if hard == resource.RLIM_INFINITY or soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            raised = hard
        except (ValueError, OSError):  # an infinite hard limit may exceed the kernel's nr_open
            pass
    log.info("file_descriptor_limit", soft_limit_at_start=soft, soft_limit=raised, hard_limit=hard)


def _listening_sockets(host: str, port: int) -> list[socket.socket]:
    """One non-blocking listening socket per address `host` resolves to (as create_server)."""
    sockets: list[socket.socket] = []
    try:
        seen = set()
        for family, kind, proto, _, address in socket.getaddrinfo(
                host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE):
            if address in seen:
                continue
            seen.add(address)
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            sock.bind(address)
            sock.listen(_BACKLOG)
            sock.setblocking(False)
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


def _is_local_address(ip: str) -> bool:
    """True when `ip` belongs to this host (binding to it works)."""
    with socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.bind((ip, 0))
        except OSError:
            return False
    return True
