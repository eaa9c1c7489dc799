"""Readiness: can a session be established through pgscout right now (TLS and startup included)?

Owns: the latest evidence about the upstream, fed by the sessions themselves (a session reaching
its first ReadyForQuery is a success; a connect, TLS or startup failure the server is to blame
for is a failure) and, when no session gave evidence within EVIDENCE_SECONDS, a probe of its own:
a real StartupMessage with the control connection's user and database, judged by the server's
first answers. One probe runs at a time; concurrent readiness checks share it.
Which startup ErrorResponses are the server's fault: SQLSTATE classes 08 (connection exception),
53 (insufficient resources: too many clients), 57 (operator intervention: starting up, shutting
down) and 58/XX (system and internal errors). Anything else (28: the credentials, 3D000: the
database name) is the asker's problem: the server did establish sessions, so that is a success
for the probe and no evidence at all for an application session.
Must not: touch a session's bytes, or log (the server logs session failures; the probe's result
is what /readyz says).
Reference: PostgreSQL docs, Frontend/Backend Protocol: "Start-up" and "Error and Notice Message
Fields" (the SQLSTATE is field C, the message field M).
"""

from __future__ import annotations

import asyncio
import getpass
import struct
import time

from pgscout.dataplane import wire
from pgscout.dataplane.upstream import UpstreamError, UpstreamProtocol, connect
from pgscout.settings import Upstream

EVIDENCE_SECONDS = 3.0
PROBE_APPLICATION_NAME = "pgscout-readiness"
_SERVER_FAULT_CLASSES = ("08", "53", "57", "58", "XX")
_PROTOCOL_3_0 = 196608
_TERMINATE = b"X\0\0\0\x04"


def error_fields(message: bytes) -> dict[str, str]:
    """The fields of an ErrorResponse: Byte1 'E', Int32 len, then (Byte1 code, String value)*, 0."""
    fields = {}
    for field in message[5:].split(b"\0"):
        if field:
            fields[field[:1].decode("latin-1")] = field[1:].decode("utf-8", "replace")
    return fields


def is_server_fault(sqlstate: str) -> bool:
    return sqlstate[:2] in _SERVER_FAULT_CLASSES


class Readiness:
    """Evidence about the upstream: `record(ok, detail)` from sessions, `check()` for /readyz."""

    def __init__(self, upstream: Upstream, timeout: float, *, client_cert: bool,
                 clock=time.monotonic):
        self._upstream = upstream
        self._timeout = timeout
        self._client_cert = client_cert  # probe as a session would (proxy.upstream_cert_for_sessions)
        self._clock = clock
        self._evidence: tuple[float, bool, str] | None = None  # (at, ok, detail)
        self._probe: asyncio.Task | None = None

    def record(self, ok: bool, detail: str) -> None:
        self._evidence = (self._clock(), ok, detail)

    async def check(self) -> tuple[bool, str]:
        """(ready, why): the latest evidence when recent, else the answer of a fresh probe."""
        if self._evidence is not None:
            at, ok, detail = self._evidence
            if self._clock() - at < EVIDENCE_SECONDS:
                return ok, detail
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._run_probe())
        return await asyncio.shield(self._probe)

    async def _run_probe(self) -> tuple[bool, str]:
        try:
            ok, detail = await probe(self._upstream, self._timeout, self._client_cert)
            self.record(ok, detail)
            return ok, detail
        finally:
            self._probe = None


class _ProbeLeg(UpstreamProtocol):
    """Collects the server's messages for `probe`."""

    def __init__(self) -> None:
        super().__init__()
        self.buffer = bytearray()
        self.changed = asyncio.Event()
        self.lost = False

    def data_received(self, data: bytes) -> None:
        if self._tls_answer is not None:
            data = self.take_tls_answer(data)
        self.buffer += data
        self.changed.set()

    def connection_lost(self, exc) -> None:
        self.lose_tls_answer()
        self.lost = True
        self.changed.set()

    async def next_message(self) -> bytes | None:
        """The next whole message, or None when the server closed the connection first."""
        while True:
            if len(self.buffer) >= 5:
                end = 1 + int.from_bytes(self.buffer[1:5], "big")
                if len(self.buffer) >= end:
                    message = bytes(self.buffer[:end])
                    del self.buffer[:end]
                    return message
            if self.lost:
                return None
            self.changed.clear()
            await self.changed.wait()


def startup_message(user: str, database: str) -> bytes:
    """StartupMessage: Int32 len, Int32 196608 (3.0), (String name, String value)*, then a zero."""
    parameters = {"user": user, "database": database, "application_name": PROBE_APPLICATION_NAME}
    body = b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in parameters.items()) + b"\0"
    return struct.pack("!ii", len(body) + 8, _PROTOCOL_3_0) + body


async def probe(upstream: Upstream, timeout: float, client_cert: bool) -> tuple[bool, str]:
    """Start a session as the control connection would and judge the server's answers."""
    where = f"upstream {upstream.display()}"
    try:
        async with asyncio.timeout(timeout):
            transport, leg = await connect(upstream, _ProbeLeg, timeout, client_cert=client_cert)
            try:
                transport.write(startup_message(upstream.user or getpass.getuser(),
                                                upstream.database or "postgres"))
                return await _judge(leg, where)
            finally:
                if not transport.is_closing():
                    transport.write(_TERMINATE)
                transport.close()
    except UpstreamError as exc:
        return False, str(exc)
    except TimeoutError:
        return False, f"{where} did not answer a session startup within {timeout:g} s"
    except OSError as exc:
        return False, f"{where} failed during startup: {exc.strerror or exc}"


async def _judge(leg: _ProbeLeg, where: str) -> tuple[bool, str]:
    while True:
        message = await leg.next_message()
        if message is None:
            return False, f"{where} closed the connection during startup"
        kind = message[0]
        if kind == wire.B_AUTHENTICATION and message[5:9] != b"\0\0\0\0":
            # It asks for a password: TLS and startup passed, the rest is the client's credentials.
            return True, f"{where} accepts sessions"
        if kind == wire.B_READY_FOR_QUERY:
            return True, f"{where} accepts sessions"
        if kind == wire.B_ERROR_RESPONSE:
            fields = error_fields(message)
            sqlstate, text = fields.get("C", ""), fields.get("M", "")
            if is_server_fault(sqlstate):
                return False, f"{where} refused a session: {text} (SQLSTATE {sqlstate})"
            return True, f"{where} accepts sessions (the probe's own login failed: {text})"
        # AuthenticationOk, ParameterStatus, BackendKeyData, NegotiateProtocolVersion: read on.
