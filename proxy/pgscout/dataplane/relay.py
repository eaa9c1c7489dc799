"""The hot path: one client connection relayed to its own upstream connection.

Owns: the two asyncio Protocols of a session, the startup phase (SSLRequest, GSSENCRequest,
CancelRequest, StartupMessage), forwarding each received chunk to the other leg *before* decoding
it, flow control between the legs, and closing both legs together.
Must not: parse messages itself (framer/decoder do), let a decoder failure touch the byte stream
(the session is marked desynced and keeps forwarding), or log per message.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

from pgscout.dataplane import records, wire
from pgscout.dataplane.decoder import Decoder
from pgscout.dataplane.events import Session
from pgscout.dataplane.framer import FramingError, StartupPacket, parse_startup_packet
from pgscout.dataplane.upstream import UpstreamError, UpstreamProtocol, connect

if TYPE_CHECKING:
    from pgscout.dataplane.server import Server

monotonic = time.monotonic
_PAUSED_CLIENT_CHECK_SECONDS = 0.5
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8  # tcpi_state values (linux/tcp_states.h)


class Relay:
    """State shared by the two legs of one session."""

    def __init__(self, server: Server, conn_id: int, client_addr: str):
        self.server = server
        self.session = Session(conn_id=conn_id, client_addr=client_addr)
        self.client: ClientLeg | None = None
        self.upstream: ServerLeg | None = None
        self.decoder: Decoder | None = None
        self.relaying = False
        self.starting_up = False  # until the first ReadyForQuery: server bytes pass through filter_auth
        self._auth = bytearray()
        self.closed = False
        self.close_reason = ""
        self._startup = bytearray()
        self._tls = False
        self.client_paused = False  # not read because the upstream's write buffer is full
        self.watching_paused_client = False

    # -- startup phase ---------------------------------------------------------------------
    def startup_data(self, data: bytes) -> None:
        buffer = self._startup
        buffer += data
        if not self.session.opened_at and buffer[:1] == bytes([wire.TLS_HANDSHAKE_RECORD]):
            self.fail("client sent a TLS ClientHello without SSLRequest (sslnegotiation=direct), "
                      "which pgscout does not accept", wire.FEATURE_NOT_SUPPORTED, reply=False)
            return
        while buffer and not self.closed:
            try:
                packet, used = parse_startup_packet(buffer)
            except FramingError as exc:
                self.fail(str(exc), wire.PROTOCOL_VIOLATION)
                return
            if packet is None:
                return
            del buffer[:used]
            if packet.kind == "ssl":
                self._answer_ssl_request()
            elif packet.kind == "gssenc":
                self.client.transport.write(wire.REFUSE_ENCRYPTION)
            elif packet.kind == "cancel":
                self.server.forward_cancel(packet.raw)
                self.close("cancel request forwarded")
                return
            else:
                self._startup_message(packet)
                return

    def _answer_ssl_request(self) -> None:
        context = self.server.client_tls
        transport = self.client.transport
        if context is None or self._tls:
            transport.write(wire.REFUSE_ENCRYPTION)
            return
        # Nothing may be read between our 'S' and the handshake: the ClientHello belongs to TLS.
        transport.pause_reading()
        transport.write(wire.ACCEPT_TLS)
        self._tls = True
        self.server.spawn(self._start_client_tls(transport, context))

    async def _start_client_tls(self, transport, context) -> None:
        try:
            tls_transport = await asyncio.get_running_loop().start_tls(
                transport, self.client, context, server_side=True)
        except (OSError, asyncio.CancelledError, ConnectionError, Exception) as exc:
            self.close(f"client TLS handshake failed: {exc}")
            return
        self.client.transport = tls_transport

    def _startup_message(self, packet: StartupPacket) -> None:
        session = self.session
        params = packet.parameters
        session.user = params.get("user", "")
        session.database = params.get("database", session.user)
        session.application_name = params.get("application_name", "")
        session.replication = params.get("replication", "false").lower() not in ("false", "off", "no", "0")
        session.startup = {name: params[name][:records.STARTUP_VALUE_CHARS]
                           for name in records.STARTUP_PARAMETERS if name in params}
        session.opened_at = monotonic()
        session.opened_wall = time.time()
        self.server.session_opened(self)
        refusal = self.server.admit(session)
        if refusal is not None:
            sqlstate, message = refusal
            self.fail(message, sqlstate)
            return
        self.client.transport.pause_reading()
        self.server.spawn(self._connect_upstream(packet.raw))

    async def _connect_upstream(self, startup_packet: bytes) -> None:
        server = self.server
        try:
            transport, _ = await connect(
                server.settings.proxy.upstream, lambda: ServerLeg(self),
                server.settings.proxy.connect_timeout_seconds)
        except UpstreamError as exc:
            server.upstream_session_failed(str(exc))
            self.fail(f"pgscout: {exc}", wire.CONNECTION_FAILURE)
            return
        if self.closed:  # the client went away while we were connecting
            transport.close()
            return
        limits = server.settings.proxy
        transport.set_write_buffer_limits(limits.write_buffer_high_bytes, limits.write_buffer_low_bytes)
        self.upstream.transport = transport
        if server.observing and not self.session.replication:
            self.decoder = Decoder(self.session, server.emit,
                                   ready=lambda at: server.session_ready(self, at),
                                   max_message_length=limits.max_message_bytes,
                                   keep_parameters=server.keep_parameters,
                                   max_sql_chars=server.settings.statements.max_sql_chars,
                                   texts=server.prepared_texts)
        pending = bytes(self._startup)
        self._startup = bytearray()
        transport.write(startup_packet + pending)
        self.starting_up = True
        self.relaying = True
        if pending:
            self.session.bytes_from_client += len(pending)
            self.decode_client(pending)
        self.client.transport.resume_reading()

    # -- authentication --------------------------------------------------------------------
    def filter_auth(self, data: bytes) -> bytes:
        """Pass the server's startup messages on whole, minus SCRAM-SHA-256-PLUS, and tell the
        server how the startup ended (ReadyForQuery, or an ErrorResponse) for readiness.

        Channel binding ties SCRAM to the TLS session it runs over; pgscout ends both TLS legs,
        so the binding the client would compute never matches the server's. The server offers
        -PLUS when *its* leg is TLS; left in, libpq on a plaintext client leg refuses the
        connection ("server offered SCRAM-SHA-256-PLUS authentication over a non-SSL
        connection"). Without it, clients do plain SCRAM-SHA-256, which passes untouched.
        """
        buffer = self._auth
        buffer += data
        out = []
        pos = 0
        while len(buffer) - pos >= 5:
            length = int.from_bytes(buffer[pos + 1:pos + 5], "big")
            end = pos + 1 + length
            if length < 4 or end > len(buffer):
                break
            message = bytes(buffer[pos:end])
            if message[0] == wire.B_AUTHENTICATION and length >= 8:
                code = int.from_bytes(message[5:9], "big")
                if code == wire.AUTH_SASL:
                    message = _without_channel_binding(message)
            elif message[0] == wire.B_READY_FOR_QUERY:
                self.starting_up = False
                self.server.upstream_session_started()
            elif message[0] == wire.B_ERROR_RESPONSE:
                self.starting_up = False
                self.server.upstream_startup_error(message)
            out.append(message)
            pos = end
            if not self.starting_up:
                out.append(bytes(buffer[end:]))
                pos = len(buffer)
                break
        del buffer[:pos]
        return b"".join(out)

    # -- relaying --------------------------------------------------------------------------
    def decode_client(self, data: bytes) -> None:
        try:
            self.decoder.client_data(data, monotonic())
        except FramingError as exc:
            self.fail(f"client {exc}", wire.PROTOCOL_VIOLATION)
        except Exception as exc:
            self.desync(exc)

    def decode_server(self, data: bytes) -> None:
        try:
            self.decoder.server_data(data, monotonic())
        except FramingError as exc:
            self.fail(f"server {exc}", wire.PROTOCOL_VIOLATION)
        except Exception as exc:
            self.desync(exc)

    def desync(self, exc: Exception) -> None:
        """Stop observing this session; its bytes keep flowing untouched."""
        self.decoder.close()  # gives back what it held (its share of the prepared-text budget)
        self.decoder = None
        self.server.desynced(self, f"{type(exc).__name__}: {exc}")

    async def watch_paused_client(self) -> None:
        """While the upstream is full and the client is not being read, a hang-up by the client
        would go unseen until the server drained the backlog (and its statement ran on). Check
        the client's TCP state instead, so that hanging up still cancels at once."""
        try:
            while self.client_paused and not self.closed:
                await asyncio.sleep(_PAUSED_CLIENT_CHECK_SECONDS)
                if self.client_paused and not self.closed and _hung_up(self.client.transport):
                    self.close("client")
        finally:
            self.watching_paused_client = False

    # -- ending ----------------------------------------------------------------------------
    def fail(self, message: str, sqlstate: str, reply: bool = True) -> None:
        """End the session with an ErrorResponse to the client (when it can still read one)."""
        if self.closed:
            return
        if reply and self.client is not None and not self.client.transport.is_closing():
            self.client.transport.write(wire.error_response(sqlstate, message))
        self.close(f"error: {message}")

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self.client is not None:
            self.client.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            if reason == "client" and self.session.active and self.decoder is not None:
                # The app hung up mid-statement: stop the backend's work instead of letting it
                # run on, and drop what the app had sent but the server not yet read.
                self.server.cancel_backend(self.session.backend_pid, self.decoder.cancel_key)
                self.upstream.transport.abort()
            else:
                self.upstream.transport.close()
        if self.decoder is not None:
            self.decoder.close()
        if self.session.opened_at:
            self.server.session_closed(self, monotonic())
        elif reason.startswith("error"):
            self.server.startup_failed(self)


def _hung_up(transport: asyncio.Transport) -> bool:
    """True when the peer of a TCP socket we are not reading from has closed or reset it.

    The kernel's connection state says so even while unread data waits in the socket (a peek
    would return that data and hide the reset behind it)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        state = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return True
    return state in (_TCP_CLOSE, _TCP_CLOSE_WAIT)


def _without_channel_binding(message: bytes) -> bytes:
    """AuthenticationSASL: Byte1 'R', Int32 len, Int32 10, mechanism names (String)*, then a zero byte."""
    names = [n for n in message[9:].split(b"\0") if n and n != b"SCRAM-SHA-256-PLUS"]
    body = (wire.AUTH_SASL).to_bytes(4, "big") + b"".join(n + b"\0" for n in names) + b"\0"
    return b"R" + (len(body) + 4).to_bytes(4, "big") + body


class ClientLeg(asyncio.Protocol):
    """The application's side of a session."""

    __slots__ = ("relay", "transport")

    def __init__(self, relay: Relay):
        self.relay = relay
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.relay.session.client_addr = (f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple)
                                          else str(peer or "unix"))
        limits = self.relay.server.settings.proxy
        transport.set_write_buffer_limits(limits.write_buffer_high_bytes, limits.write_buffer_low_bytes)
        self.relay.client = self

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay.relaying:
            relay.upstream.transport.write(data)
            relay.session.bytes_from_client += len(data)
            if relay.decoder is not None:
                relay.decode_client(data)
        elif not relay.closed:
            relay.startup_data(data)

    def eof_received(self):
        return False  # half-close is not part of the protocol: close both legs

    def connection_lost(self, exc) -> None:
        self.relay.close("client")

    def pause_writing(self) -> None:
        upstream = self.relay.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.pause_reading()

    def resume_writing(self) -> None:
        upstream = self.relay.upstream
        if upstream is not None and upstream.transport is not None:
            upstream.transport.resume_reading()


class ServerLeg(UpstreamProtocol):
    """pgscout's connection to the real database for one session."""

    __slots__ = ("relay", "transport")

    def __init__(self, relay: Relay):
        super().__init__()
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        relay.upstream = self

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if self._tls_answer is not None:
            data = self.take_tls_answer(data)
            if not data:
                return
        if relay.starting_up:
            data = relay.filter_auth(data)
            if not data:
                return
        relay.client.transport.write(data)
        relay.session.bytes_from_server += len(data)
        if relay.decoder is not None:
            relay.decode_server(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        if self._tls_answer is not None:
            self.lose_tls_answer()  # connect() raises; nothing was relayed yet
        elif self.transport is not None:  # connected (maybe still writing the startup packet)
            relay = self.relay
            if relay.starting_up and not relay.closed:
                relay.server.upstream_session_failed(
                    f"upstream {relay.server.settings.proxy.upstream.display()} closed the "
                    f"connection during startup")
            relay.close("server")

    def pause_writing(self) -> None:
        relay = self.relay
        relay.client.transport.pause_reading()
        relay.client_paused = True
        if not relay.watching_paused_client:
            relay.watching_paused_client = True
            relay.server.spawn(relay.watch_paused_client())

    def resume_writing(self) -> None:
        self.relay.client_paused = False
        self.relay.client.transport.resume_reading()
