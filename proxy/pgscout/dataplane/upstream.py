"""Opening pgscout's connection to the real database, TLS negotiated the way libpq does it.

Owns: TCP/unix-socket connect, the SSLRequest exchange, the TLS context per sslmode
(disable, allow, prefer, require, verify-ca, verify-full) and the connect timeout.
Must not: send anything of the client's (the caller writes the StartupMessage once this returns).
Reference: PostgreSQL docs, "SSL Session Encryption" (protocol) and libpq "SSL Support" (sslmode).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable

from pgscout.dataplane import wire
from pgscout.settings import Upstream


class UpstreamError(Exception):
    """The upstream cannot be reached or refused the connection; the text is client-facing."""


class UpstreamProtocol(asyncio.Protocol):
    """Base of the protocols pgscout opens upstream: while `connect` waits for the answer to
    its SSLRequest, the first byte received goes to it instead of the subclass."""

    __slots__ = ("_tls_answer",)

    def __init__(self) -> None:
        self._tls_answer: asyncio.Future[bytes] | None = None

    def expect_tls_answer(self) -> asyncio.Future[bytes]:
        self._tls_answer = asyncio.get_running_loop().create_future()
        return self._tls_answer

    def take_tls_answer(self, data: bytes) -> bytes:
        """Hand the answer byte to `connect`; return what follows it (nothing, normally)."""
        answer, self._tls_answer = self._tls_answer, None
        if answer is None:
            return data
        if not answer.done():
            answer.set_result(data[:1])
        return data[1:]

    def lose_tls_answer(self) -> None:
        """The connection ended before the server answered the SSLRequest."""
        answer, self._tls_answer = self._tls_answer, None
        if answer is not None and not answer.done():
            answer.set_exception(ConnectionResetError("connection closed by upstream"))


def tls_context(upstream: Upstream) -> ssl.SSLContext:
    mode = upstream.sslmode
    if mode == "require" and upstream.sslrootcert:
        mode = "verify-ca"  # libpq: a root certificate makes require verify the chain
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if mode in ("verify-ca", "verify-full"):
        if upstream.sslrootcert and upstream.sslrootcert != "system":
            context.load_verify_locations(cafile=upstream.sslrootcert)
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if upstream.sslcert:
        context.load_cert_chain(upstream.sslcert, upstream.sslkey or None)
    return context


async def connect(upstream: Upstream, protocol_factory: Callable[[], UpstreamProtocol],
                  timeout: float) -> tuple[asyncio.Transport, UpstreamProtocol]:
    """Connect and negotiate TLS per sslmode, within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await _connect(upstream, protocol_factory)
    except TimeoutError:
        raise UpstreamError(f"could not connect to upstream {upstream.display()}: "
                            f"timed out after {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise UpstreamError(f"could not connect to upstream {upstream.display()}: TLS certificate "
                            f"verification failed (sslmode={upstream.sslmode}): "
                            f"{exc.verify_message or exc}") from None
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror or str(exc) if isinstance(exc, OSError) else str(exc)
        raise UpstreamError(f"could not connect to upstream {upstream.display()}: {reason}") from None


async def _connect(upstream: Upstream, protocol_factory):
    loop = asyncio.get_running_loop()
    if upstream.is_unix_socket:
        transport, protocol = await loop.create_unix_connection(protocol_factory,
                                                                upstream.socket_path)
        return transport, protocol  # libpq never uses TLS over a unix socket
    transport, protocol = await loop.create_connection(protocol_factory, upstream.host, upstream.port)
    if upstream.sslmode in ("disable", "allow"):
        return transport, protocol
    try:
        pending_answer = protocol.expect_tls_answer()
        transport.write(wire.ssl_request())
        answer = await pending_answer
        if answer == wire.ACCEPT_TLS:
            tls_transport = await loop.start_tls(
                transport, protocol, tls_context(upstream), server_hostname=upstream.host)
            return tls_transport, protocol
        if answer == wire.REFUSE_ENCRYPTION and upstream.sslmode == "prefer":
            return transport, protocol
        if answer == wire.REFUSE_ENCRYPTION:
            raise UpstreamError(f"upstream {upstream.display()} does not support TLS, "
                                f"but sslmode={upstream.sslmode} requires it")
        raise UpstreamError(f"upstream {upstream.display()} answered SSLRequest with "
                            f"{answer!r}, not a PostgreSQL server?")
    except BaseException:
        transport.abort()
        raise
