"""Opening pgscout's connection to the real database, TLS negotiated the way libpq does it.

Owns: TCP/unix-socket connect, the SSLRequest exchange, the TLS context per sslmode
(disable, allow, prefer, require, verify-ca, verify-full), whether the upstream URL's client
certificate is presented, the connect timeout, and the registry of pgscout's own open upstream
connections by local address (so the listener can tell when it is talking to itself).
Must not: send anything of the client's (the caller writes the StartupMessage once this returns).
Reference: PostgreSQL docs, "SSL Session Encryption" (protocol) and libpq "SSL Support" (sslmode).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Callable, Iterator

from pgscout.dataplane import wire
from pgscout.settings import Upstream


class UpstreamError(Exception):
    """The upstream cannot be reached or refused the connection; the text is client-facing."""


# Both ends, (local, remote), of each open TCP connection pgscout made upstream -> its protocol.
# Both, because the kernel reuses a local port for connections to different destinations: a
# client's port may well equal that of one of pgscout's own connections to the database.
_own_legs: dict[tuple[tuple[str, int], tuple[str, int]], UpstreamProtocol] = {}


def own_leg(peer: object, local: object) -> UpstreamProtocol | None:
    """The upstream connection of pgscout's own that is the other end of an accepted
    connection from `peer` to `local`, if any."""
    if not isinstance(peer, tuple) or not isinstance(local, tuple):
        return None
    return _own_legs.get((_end(peer), _end(local)))


def plain_ip(ip: str) -> str:
    """An IPv4-mapped IPv6 address (::ffff:a.b.c.d, what an IPv6 socket reports for an IPv4
    peer) as the IPv4 address it is."""
    return ip[7:] if ip.startswith("::ffff:") and "." in ip else ip


def _end(address: tuple) -> tuple[str, int]:
    return plain_ip(address[0]), address[1]


class UpstreamProtocol(asyncio.Protocol):
    """Base of the protocols pgscout opens upstream: while `connect` waits for the answer to
    its SSLRequest, the first byte received goes to it instead of the subclass. Subclasses
    that override connection_lost call this one's first.

    `looped` is set when pgscout's own listener accepted this very connection: the upstream
    is pgscout itself."""

    __slots__ = ("_tls_answer", "_ends", "looped")

    def __init__(self) -> None:
        self._tls_answer: asyncio.Future[bytes] | None = None
        self._ends: tuple[tuple[str, int], tuple[str, int]] | None = None
        self.looped = False

    def connection_made(self, transport) -> None:
        # Registered before a byte is sent, so the listener knows it the moment it reads one.
        local, remote = transport.get_extra_info("sockname"), transport.get_extra_info("peername")
        if isinstance(local, tuple) and isinstance(remote, tuple):
            self._ends = (_end(local), _end(remote))
            _own_legs[self._ends] = self

    def connection_lost(self, exc) -> None:
        if self._ends is not None:
            _own_legs.pop(self._ends, None)
            self._ends = None

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


def tls_context(upstream: Upstream, client_cert: bool) -> ssl.SSLContext:
    """The context for one upstream TLS connection. `client_cert`: present the URL's
    sslcert/sslkey. With `cert` authentication that certificate logs its user in, so only the
    connections meant to act as that user (the control connection, or every session when
    proxy.upstream_cert_for_sessions says so) may carry it.

    Built once and reused while the files it read are unchanged: building one costs tens of
    milliseconds (the system CA store alone is ~50 ms for 300 certificates), spent on the event
    loop, so per connection it made each session's connect that much slower than a direct one
    and stalled every other session meanwhile. A changed (rotated) file is read again at the
    next connection, as libpq reads its files per connection."""
    key = (upstream, client_cert, _files_signature(upstream, client_cert))
    context = _contexts.get(key)
    if context is None:
        if len(_contexts) >= _CONTEXTS_KEPT:
            _contexts.clear()
        context = _contexts[key] = _new_tls_context(upstream, client_cert)
    return context


# (upstream, client_cert, the files' signature) -> context; a reload or a rotation adds one.
_contexts: dict[tuple, ssl.SSLContext] = {}
_CONTEXTS_KEPT = 16


def _files_signature(upstream: Upstream, client_cert: bool) -> tuple:
    paths = [upstream.sslrootcert]
    if client_cert:
        paths += [upstream.sslcert, upstream.sslkey]
    signature: list[tuple[int, int, int] | None] = []
    for path in paths:
        if not path or path == "system":
            signature.append(None)
            continue
        try:
            stat = os.stat(path)
        except OSError:
            signature.append(None)  # loading it fails below, with the error the client sees
            continue
        signature.append((stat.st_mtime_ns, stat.st_size, stat.st_ino))
    return tuple(signature)


def _new_tls_context(upstream: Upstream, client_cert: bool) -> ssl.SSLContext:
    mode = upstream.sslmode
    if mode == "require" and upstream.sslrootcert:
        mode = "verify-ca"  # libpq: a root certificate makes require verify the chain
    # Not create_default_context(): it trusts the system store as well as sslrootcert, where
    # libpq trusts only the file (the system store only for sslrootcert=system, or none given).
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if mode in ("verify-ca", "verify-full"):
        if upstream.sslrootcert and upstream.sslrootcert != "system":
            with _reading(upstream, "root certificate file", upstream.sslrootcert):
                context.load_verify_locations(cafile=upstream.sslrootcert)
        else:
            context.load_default_certs(ssl.Purpose.SERVER_AUTH)
        context.check_hostname = mode == "verify-full"
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if client_cert and upstream.sslcert:
        with _reading(upstream, "certificate or key file", upstream.sslcert):
            context.load_cert_chain(upstream.sslcert, upstream.sslkey or None)
    return context


@contextlib.contextmanager
def _reading(upstream: Upstream, what: str, path: str) -> Iterator[None]:
    """A file the context cannot load, named as libpq names it ("could not read root
    certificate file ..."): OpenSSL's own error leaves the file out."""
    try:
        yield
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise UpstreamError(f"could not connect to upstream {upstream.display()}: could not "
                            f"read {what} \"{path}\": {reason}") from None


async def connect(upstream: Upstream, protocol_factory: Callable[[], UpstreamProtocol],
                  timeout: float, *, client_cert: bool) -> tuple[asyncio.Transport, UpstreamProtocol]:
    """Connect and negotiate TLS per sslmode, within `timeout` seconds."""
    try:
        async with asyncio.timeout(timeout):
            return await _connect(upstream, protocol_factory, client_cert)
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


async def _connect(upstream: Upstream, protocol_factory, client_cert: bool):
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
                transport, protocol, tls_context(upstream, client_cert), server_hostname=upstream.host)
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
