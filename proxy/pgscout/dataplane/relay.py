"""The hot path: one client connection relayed to its own upstream connection.

Owns: the two asyncio Protocols of a session, the startup phase (SSLRequest, GSSENCRequest,
CancelRequest, StartupMessage) answered the way the postmaster answers it, the startup timeout,
forwarding each received chunk to the other leg *before* decoding it (after startup, the
compiled legs of relaying.py take the chunks and call back here for everything else), the bytes
each leg forwarded, flow control between the legs, a client's half-close passed on to the
server, and closing both legs together.
Must not: parse messages itself (framer/decoder do), let a decoder failure touch the byte stream
(the session is marked desynced and keeps forwarding), or log per message.
Reference: PostgreSQL's postmaster.c (ProcessStartupPacket, processCancelRequest) for what a
client sees before its session starts.
"""

from __future__ import annotations

import asyncio
import socket
import time
from typing import TYPE_CHECKING

from pgscout.dataplane import records, wire
from pgscout.dataplane.decoder import Decoder
from pgscout.dataplane.events import Session
from pgscout.dataplane.framer import StartupPacket, StartupRefused, parse_startup_packet
from pgscout.dataplane.relaying import RelayingClientLeg, RelayingServerLeg
from pgscout.dataplane.upstream import UpstreamError, UpstreamProtocol, connect

if TYPE_CHECKING:
    from pgscout.dataplane.server import Server

monotonic = time.monotonic
_PAUSED_CLIENT_CHECK_SECONDS = 0.5
_TCP_CLOSE, _TCP_CLOSE_WAIT = 7, 8  # tcpi_state values (linux/tcp_states.h)
_TERMINATE = b"X\0\0\0\x04"
# SASLInitialResponse's gs2 header starts "y,": the client could bind but saw no -PLUS offer.
_GS2_BINDING_EXPECTED = ord("y")
CHANNEL_BINDING_REFUSED = (
    "SCRAM channel binding cannot cross pgscout: pgscout ends the client's TLS connection and "
    "opens its own to the server, so the client's binding can never match the server's; set "
    "channel_binding=disable for the connection to pgscout (the pgscout-to-server leg stays "
    "encrypted per the upstream sslmode)")
# The same refusal for a client on a plaintext leg that still sends gs2 flag 'y' (node-postgres
# with enableChannelBinding: true does, on any socket): directly, a server on a plaintext
# connection accepts 'y'; behind pgscout the server is on TLS, offered -PLUS, and takes 'y' for
# a downgrade, answering only "SCRAM channel binding negotiation error".
CHANNEL_BINDING_REFUSED_PLAINTEXT = (
    "SCRAM channel binding cannot cross pgscout: the client announced channel binding support "
    "(SCRAM gs2 flag 'y') on its plaintext connection to pgscout, and the server, which pgscout "
    "reaches over TLS, refuses that as a downgrade; disable channel binding for the connection "
    "to pgscout (node-postgres: enableChannelBinding: false; libpq: channel_binding=disable)")


class Relay:
    """State shared by the two legs of one session."""

    def __init__(self, server: Server, conn_id: int, client_addr: str):
        self.server = server
        self.session = Session(conn_id=conn_id, client_addr=client_addr)
        self.client: ClientLeg | None = None
        self.upstream: ServerLeg | None = None
        self.decoder: Decoder | None = None
        self.relaying = False
        # The transports' protocols once startup is over (the legs below stay for the rest).
        self.relaying_legs: tuple[RelayingClientLeg, RelayingServerLeg] | None = None
        self.starting_up = False  # until the first ReadyForQuery: server bytes pass through filter_auth
        self._auth = bytearray()
        self.closed = False
        self.close_reason = ""
        self._startup = bytearray()
        self._tls = False
        self._ssl_done = False  # an SSLRequest was answered: a second one is a protocol error
        self._gss_done = False
        self.startup_timer: asyncio.TimerHandle | None = None  # until authentication is done
        # Upstream leg TLS: a SASLInitialResponse must not expect binding the server would demand.
        self.checking_binding = False
        self._sasl_offered = False
        self._binding_offered = False  # the server offered SCRAM-SHA-256-PLUS (filter_auth hid it)
        self._client_auth = bytearray()
        self.said_goodbye = False  # the client's last message was Terminate
        self.client_reset = False  # the client's connection ended in a reset or an error
        # Fixed per session: a reload applies to sessions that start after it.
        self.cancels_on_hangup = server.settings.proxy.cancel_on_client_hangup
        self.client_paused = False  # not read because the upstream's write buffer is full
        self.watching_paused_client = False

    # -- startup phase ---------------------------------------------------------------------
    def start_startup_timer(self) -> None:
        """Like PostgreSQL's authentication_timeout: a client that has not finished startup and
        authentication in time is closed without a word (the postmaster exits silently then)."""
        timeout = self.server.settings.proxy.startup_timeout_seconds
        self.startup_timer = asyncio.get_running_loop().call_later(
            timeout, self.refuse, f"startup not finished within {timeout:g} s "
                                  f"(proxy.startup_timeout_seconds)")

    def startup_data(self, data: bytes) -> None:
        buffer = self._startup
        if not buffer and not self._ssl_done and not self._gss_done and self.server.looped_back(self):
            return
        buffer += data
        if not self._ssl_done and buffer[:1] == bytes([wire.TLS_HANDSHAKE_RECORD]):
            # What PostgreSQL 15/16 do too: 0x16... is no valid length, so they close silently.
            self.refuse("client sent a TLS ClientHello without SSLRequest (sslnegotiation=direct), "
                        "which pgscout does not accept")
            return
        while buffer and not self.closed:
            try:
                packet, used = parse_startup_packet(buffer, ssl_done=self._ssl_done,
                                                    gss_done=self._gss_done)
            except StartupRefused as exc:
                self.refuse(str(exc), exc.reply)
                return
            if packet is None:
                return
            del buffer[:used]
            if packet.kind in ("ssl", "gssenc"):
                if packet.kind == "ssl":
                    self._ssl_done = True
                    accepted = self._answer_ssl_request()
                    self._gss_done = self._gss_done or accepted
                else:
                    self._gss_done = True
                    accepted = False
                    self.client.transport.write(wire.REFUSE_ENCRYPTION)
                if buffer:
                    # As the postmaster: bytes that came with the request, before the answer,
                    # were not encrypted and may have been injected by a man-in-the-middle.
                    what = "SSL request" if packet.kind == "ssl" else "GSSAPI encryption request"
                    message = f"received unencrypted data after {what}"
                    self.refuse(message, wire.error_response(
                        wire.PROTOCOL_VIOLATION, message, detail="This could be either a "
                        "client-software bug or evidence of an attempted man-in-the-middle attack."))
                    return
                if accepted:
                    return
            elif packet.kind == "cancel":
                # The postmaster closes a cancel connection only once it has signalled the
                # backend; clients wait for that close so a late cancel cannot hit their next
                # statement. So the client's close waits for the server's.
                self.client.transport.pause_reading()
                self.server.spawn(self._forward_cancel(packet.raw))
                return
            else:
                self._startup_message(packet)
                return

    async def _forward_cancel(self, packet: bytes) -> None:
        await self.server.send_cancel(packet)
        self.close("cancel request forwarded")

    def _answer_ssl_request(self) -> bool:
        """Answer 'S' and start TLS when client TLS is configured, else 'N'; True for 'S'."""
        context = self.server.client_tls
        transport = self.client.transport
        if context is None:
            transport.write(wire.REFUSE_ENCRYPTION)
            return False
        # Nothing may be read between our 'S' and the handshake: the ClientHello belongs to TLS.
        transport.pause_reading()
        transport.write(wire.ACCEPT_TLS)
        self._tls = True
        self.server.spawn(self._start_client_tls(transport, context))
        return True

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
                server.settings.proxy.connect_timeout_seconds,
                client_cert=server.settings.proxy.upstream_cert_for_sessions)
        except UpstreamError as exc:
            server.upstream_session_failed(str(exc))
            if self.upstream is not None and self.upstream.looped:
                self.fail(server.loop_message(), wire.CONNECTION_FAILURE)
            else:
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
        self.starting_up = True
        self.relaying = True
        # Only a server on TLS offers -PLUS and then refuses gs2 flag 'y', whatever the client's leg.
        self.checking_binding = transport.get_extra_info("sslcontext") is not None
        if self.checking_binding:
            pending = self.filter_client_auth(pending)
            if self.closed:
                return
        transport.write(startup_packet + pending)
        if pending:
            self.client.relayed += len(pending)
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
                    filtered = _without_channel_binding(message)
                    # Shorter: it had SCRAM-SHA-256-PLUS to take out.
                    self._binding_offered = len(filtered) < len(message)
                    message = filtered
                    self._sasl_offered = True
                elif code == wire.AUTH_OK:
                    self._authenticated()
            elif message[0] == wire.B_READY_FOR_QUERY:
                self.starting_up = False
                self._authenticated()  # a server that skipped authentication
                self.server.upstream_session_started()
            elif message[0] == wire.B_ERROR_RESPONSE:
                self.starting_up = False
                self._authenticated()
                self.server.upstream_startup_error(message)
            out.append(message)
            pos = end
            if not self.starting_up:
                out.append(bytes(buffer[end:]))
                pos = len(buffer)
                break
        del buffer[:pos]
        if not self.starting_up and not self.closed:
            self._relay_from_now_on()
        return b"".join(out)

    def _relay_from_now_on(self) -> None:
        """Startup is over (authentication too, so no binding check is pending): the compiled
        relaying legs take both transports' chunks from the next one on (the transports are
        final by now: any TLS was started during startup)."""
        client, upstream = self.client.transport, self.upstream.transport
        legs = (RelayingClientLeg(self.client, upstream, self.decoder, self),
                RelayingServerLeg(self.upstream, client, self.decoder, self))
        self.relaying_legs = legs
        client.set_protocol(legs[0])
        upstream.set_protocol(legs[1])

    def _authenticated(self) -> None:
        """Authentication is over (the startup goes on until ReadyForQuery)."""
        self.checking_binding = False
        if self.startup_timer is not None:
            self.startup_timer.cancel()
            self.startup_timer = None

    def filter_client_auth(self, data: bytes) -> bytes:
        """With TLS on the upstream leg, refuse a SASLInitialResponse that expects channel binding
        when the server offered it.

        A client that sees no SCRAM-SHA-256-PLUS offer (filter_auth removes it) may send gs2 flag
        'y': libpq on TLS, node-postgres with enableChannelBinding even on plaintext. The server,
        itself on TLS and having offered -PLUS, would call that a downgrade attack and answer a
        bare "SCRAM channel binding negotiation error". pgscout answers instead, saying what to
        set. Messages are held only until that one message (or the end of authentication).
        SASLInitialResponse: Byte1 'p', Int32 len, String mechanism, Int32 length, gs2 header...
        """
        buffer = self._client_auth
        buffer += data
        out = bytearray()
        while len(buffer) >= 5:
            length = int.from_bytes(buffer[1:5], "big")
            if length < 4:  # not ours to judge: the server answers it
                break
            end = 1 + length
            if end > len(buffer):
                return bytes(out)
            if buffer[0] == wire.F_PASSWORD and self._sasl_offered:
                mechanism_end = buffer.find(b"\0", 5, end)
                # A server that offered no -PLUS (say, a pooler on TLS) accepts 'y' as it would directly.
                if self._binding_offered and 0 < mechanism_end and end >= mechanism_end + 6 \
                        and buffer[mechanism_end + 5] == _GS2_BINDING_EXPECTED:
                    self.fail(CHANNEL_BINDING_REFUSED if self._tls else CHANNEL_BINDING_REFUSED_PLAINTEXT,
                              wire.INVALID_AUTHORIZATION)
                    return b""
                break  # checked: everything after it passes untouched
            out += buffer[:end]
            del buffer[:end]
        else:
            return bytes(out)
        self.checking_binding = False
        out += buffer
        self._client_auth = bytearray()
        return bytes(out)

    # -- relaying --------------------------------------------------------------------------
    # A FramingError (a length PostgreSQL itself rejects) desyncs like any other decoder
    # failure: the bytes went through unchanged and the server answers them as it would directly.
    def decode_client(self, data: bytes) -> None:
        try:
            self.decoder.client_data(data, monotonic())
        except Exception as exc:
            self.desync(exc)

    def decode_server(self, data: bytes) -> None:
        try:
            self.decoder.server_data(data, monotonic())
        except Exception as exc:
            self.desync(exc)

    def desync(self, exc: Exception) -> None:
        """Stop observing this session; its bytes keep flowing untouched."""
        self.decoder.close()  # gives back what it held (its share of the prepared-text budget)
        self.decoder = None
        if self.relaying_legs is not None:
            for leg in self.relaying_legs:
                leg.decoder = None
        self.server.desynced(self, f"{type(exc).__name__}: {exc}")

    def client_ended(self) -> bool:
        """The client sent EOF; True keeps its leg open for the results still to come.

        PostgreSQL runs what a client sent before it closed (a script that ends in Terminate and
        a close, or a half-close with shutdown(SHUT_WR)) and writes the results to the socket
        until it reads the EOF itself. So the EOF is passed on to the server behind the bytes
        already written, and the client's leg stays open until the server closes."""
        if not self.relaying or self.closed:
            return False  # mid-startup: like the postmaster, give up on an incomplete packet
        if self._cancels_on_hangup():
            self.close("client")
            return False
        upstream = self.upstream.transport
        if upstream.can_write_eof():
            upstream.write_eof()
        elif not self.said_goodbye:
            # A TLS upstream leg cannot be half-closed. After a Terminate the server closes by
            # itself; otherwise close the leg behind the bytes written (the server still reads
            # and runs them, but a half-closed client gets EOF instead of those results).
            self.close("client")
            return False
        # asyncio's TLS transport cannot stay half-open: a TLS client's EOF closes its leg, and
        # the server still reads what was written before it.
        return not self._tls

    def _cancels_on_hangup(self) -> bool:
        return (self.cancels_on_hangup and not self.said_goodbye and self.session.active
                and self.decoder is not None)

    async def watch_paused_client(self) -> None:
        """While the upstream is full and the client is not being read, a reset by the client
        would go unseen until the server drained the backlog. Check the client's TCP state
        instead: a reset is passed on at once (see close), and with proxy.cancel_on_client_hangup
        a FIN (a hang-up mid-statement) ends the session too. Without the option a FIN waits
        for its turn behind the data before it, as it would directly."""
        try:
            while self.client_paused and not self.closed:
                await asyncio.sleep(_PAUSED_CLIENT_CHECK_SECONDS)
                if not self.client_paused or self.closed:
                    break
                state = _tcp_state(self.client.transport)
                if state == _TCP_CLOSE:
                    self.client_reset = True
                    self.close("client")
                elif state == _TCP_CLOSE_WAIT and self.cancels_on_hangup:
                    self.close("client")
        finally:
            self.watching_paused_client = False

    # -- ending ----------------------------------------------------------------------------
    def fail(self, message: str, sqlstate: str) -> None:
        """End the session with a FATAL ErrorResponse to the client."""
        self.refuse(message, wire.error_response(sqlstate, message))

    def refuse(self, message: str, reply: bytes = b"") -> None:
        """End the session with `reply` (nothing: silence, as PostgreSQL for a bad length)."""
        if self.closed:
            return
        if reply and self.client is not None and not self.client.transport.is_closing():
            self.client.transport.write(reply)
        self.close(f"error: {message}")

    def bytes_relayed(self) -> tuple[int, int]:
        """Bytes forwarded so far (from the client, from the server): the legs count them,
        during startup and then the relaying legs, not the Session (the per-chunk path touches
        no object but its own). The Session's counts are set from these when it closes."""
        client = 0 if self.client is None else self.client.relayed
        server = 0 if self.upstream is None else self.upstream.relayed
        if self.relaying_legs is not None:
            client += self.relaying_legs[0].relayed
            server += self.relaying_legs[1].relayed
        return client, server

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        if self.startup_timer is not None:
            self.startup_timer.cancel()
            self.startup_timer = None
        if self.client is not None:
            self.client.transport.close()
        if self.upstream is not None and self.upstream.transport is not None:
            if reason == "client" and self._cancels_on_hangup():
                # proxy.cancel_on_client_hangup: the app hung up mid-statement, so stop the
                # backend's work instead of letting it run on (PostgreSQL's own equivalent is
                # client_connection_check_interval), and drop what it had not read yet.
                self.server.cancel_backend(self.session.backend_pid, self.decoder.cancel_key)
                self.upstream.transport.abort()
            elif reason == "client" and self.client_reset:
                # Directly, the server would read what is already in its socket, then get the
                # reset; what the client had not yet delivered is lost. Pass the reset on.
                self.upstream.transport.abort()
            else:
                self.upstream.transport.close()
        if self.decoder is not None:
            self.decoder.close()
        if self.session.opened_at:
            self.session.bytes_from_client, self.session.bytes_from_server = self.bytes_relayed()
            self.server.session_closed(self, monotonic())
        elif reason.startswith("error"):
            self.server.startup_failed(self)


def _tcp_state(transport: asyncio.Transport) -> int | None:
    """The kernel's state of a TCP connection we are not reading from (None if not TCP).

    It shows a FIN or a reset even while unread data waits in the socket (a peek would return
    that data and hide the reset behind it)."""
    sock = transport.get_extra_info("socket")
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0]
    except OSError:
        return _TCP_CLOSE


def _without_channel_binding(message: bytes) -> bytes:
    """AuthenticationSASL: Byte1 'R', Int32 len, Int32 10, mechanism names (String)*, then a zero byte."""
    names = [n for n in message[9:].split(b"\0") if n and n != b"SCRAM-SHA-256-PLUS"]
    body = (wire.AUTH_SASL).to_bytes(4, "big") + b"".join(n + b"\0" for n in names) + b"\0"
    return b"R" + (len(body) + 4).to_bytes(4, "big") + body


class ClientLeg(asyncio.Protocol):
    """The application's side of a session."""

    __slots__ = ("relay", "transport", "relayed")

    def __init__(self, relay: Relay):
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.relayed = 0  # bytes forwarded to the server (see Relay.bytes_relayed)

    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.relay.session.client_addr = (f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple)
                                          else str(peer or "unix"))
        limits = self.relay.server.settings.proxy
        transport.set_write_buffer_limits(limits.write_buffer_high_bytes, limits.write_buffer_low_bytes)
        self.relay.client = self
        self.relay.start_startup_timer()

    def data_received(self, data: bytes) -> None:
        relay = self.relay
        if relay.relaying:
            if relay.checking_binding:
                data = relay.filter_client_auth(data)
                if not data:
                    return
            relay.upstream.transport.write(data)
            self.relayed += len(data)
            relay.said_goodbye = data[-5:] == _TERMINATE
            if relay.decoder is not None:
                relay.decode_client(data)
        elif not relay.closed:
            relay.startup_data(data)

    def eof_received(self):
        return self.relay.client_ended()

    def connection_lost(self, exc) -> None:
        self.relay.client_reset = exc is not None
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

    __slots__ = ("relay", "transport", "relayed")

    def __init__(self, relay: Relay):
        super().__init__()
        self.relay = relay
        self.transport: asyncio.Transport | None = None
        self.relayed = 0  # bytes forwarded to the client
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
        self.relayed += len(data)
        if relay.decoder is not None:
            relay.decode_server(data)

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        super().connection_lost(exc)
        if self._tls_answer is not None:
            self.lose_tls_answer()  # connect() raises; nothing was relayed yet
        elif self.looped:
            self.relay.fail(self.relay.server.loop_message(), wire.CONNECTION_FAILURE)
        elif self.transport is not None:  # connected (maybe still writing the startup packet)
            relay = self.relay
            if relay.starting_up and not relay.closed:
                relay.server.upstream_session_failed(
                    f"upstream {relay.server.settings.proxy.upstream.display()} closed the "
                    f"connection during startup")
            # A client that said Terminate ended the session, though the server closes first.
            relay.close("client" if relay.said_goodbye else "server")

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
