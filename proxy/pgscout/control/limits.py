"""pgscout's own control connection: the upstream's connection limits and how many are in use.

Owns: reading, over one asyncpg connection of pgscout's own (application_name "pgscout-control",
credentials from the upstream URL or PGUSER/PGPASSWORD, never the application's), the server's
max_connections, superuser_reserved_connections, reserved_connections (PostgreSQL 16+, else 0),
the number of client backends (every client of the server, not only pgscout's; the control
connection itself left out) and the server version; refreshing that reading in a background task
every `refresh_seconds`, and at once when the server drops the control connection (a shutdown or
a crash shows in pgscout_upstream_up within moments, not at the next refresh); and turning
connection failures into messages an operator can act on.

Read interface: `UpstreamLimits.snapshot()`. `connect`, `read_limits`, `describe_error` and
CONNECTION_ERRORS are shared with `pgscout budget` (proxy/sizing.py).
Must not: raise out of the background task, log the same error twice in a row, or touch the
application's sessions.
"""

from __future__ import annotations

import asyncio
import getpass
import os
import socket
import time

import asyncpg

from pgscout.settings import Upstream

# One statement, so a reading is consistent and costs one round trip. current_setting(..., true)
# is NULL where the setting does not exist. Without pg_read_all_stats a role sees other roles'
# backends with backend_type NULL; such a row with a user and a database is counted as a client
# (auxiliary processes and launchers lack one or the other, while a parallel or logical replication
# worker would be miscounted) and the reading says it is an estimate.
_LIMITS_QUERY = """
SELECT current_setting('max_connections')::int AS max_connections,
       current_setting('superuser_reserved_connections')::int AS superuser_reserved_connections,
       coalesce(nullif(current_setting('reserved_connections', true), '')::int, 0)
           AS reserved_connections,
       current_setting('server_version') AS server_version,
       current_setting('server_version_num')::int AS server_version_num,
       count(*) FILTER (WHERE backend_type = 'client backend'
                           OR (backend_type IS NULL AND usesysid IS NOT NULL
                                   AND datid IS NOT NULL))::int AS client_backends,
       coalesce(bool_and(backend_type IS NOT NULL), true) AS client_backends_exact
  FROM pg_stat_activity
 WHERE pid <> pg_backend_pid()
"""

_LIMIT_FIELDS = ("max_connections", "superuser_reserved_connections", "reserved_connections",
                 "server_version", "server_version_num", "client_backends", "client_backends_exact")

# Everything a connection attempt or a reading can fail with, short of a bug.
CONNECTION_ERRORS = (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError)
# SQLSTATE class 28: the server refused these credentials.
_CREDENTIAL_ERRORS = (asyncpg.InvalidAuthorizationSpecificationError, asyncpg.InvalidPasswordError)


async def connect(upstream: Upstream, timeout: float) -> asyncpg.Connection:
    return await asyncpg.connect(upstream.control_dsn(), timeout=timeout)


async def read_limits(connection: asyncpg.Connection) -> dict:
    """max_connections, superuser_reserved_connections, reserved_connections, server_version,
    server_version_num, client_backends (not counting `connection` itself), client_backends_exact
    (false when the role could not see every backend's type) and available_connections (what is
    left for ordinary clients once the reservations are taken)."""
    row = await connection.fetchrow(_LIMITS_QUERY)
    limits = {name: row[name] for name in _LIMIT_FIELDS}
    limits["available_connections"] = (limits["max_connections"]
                                       - limits["superuser_reserved_connections"]
                                       - limits["reserved_connections"])
    return limits


def describe_error(upstream: Upstream, error: BaseException) -> str:
    """What went wrong with the control connection, saying which credentials it used."""
    user = upstream.user or f"{getpass.getuser()} (the OS user: no user in the upstream URL or PGUSER)"
    where = f"pgscout control connection to {upstream.display()}"
    if isinstance(error, _CREDENTIAL_ERRORS):
        return (f"{where} as user {user} was rejected: {error}. The application's credentials pass "
                f"through pgscout untouched and cannot be reused: give the control connection its own "
                f"with a user and password in the upstream URL, or PGUSER/PGPASSWORD")
    if isinstance(error, TimeoutError):
        return f"{where} timed out"
    if isinstance(error, socket.gaierror):
        # Its errno is a resolver code (EAI_*), which os.strerror calls "Unknown error -2".
        return f"{where} failed: cannot resolve host {upstream.host!r}: {error.strerror}"
    if isinstance(error, OSError) and error.errno is not None:
        # asyncio says "Connect call failed"; the reason is what the operator needs.
        return f"{where} failed: {os.strerror(error.errno)}"
    detail = str(error) or type(error).__name__
    return f"{where} failed: {detail}"


class UpstreamLimits:
    """A background reading of the upstream's connection limits; see `snapshot()`."""

    def __init__(self, upstream: Upstream, refresh_seconds: float, log, *,
                 connect_timeout: float = 5.0) -> None:
        self._upstream = upstream
        self._refresh_seconds = refresh_seconds
        self._connect_timeout = connect_timeout
        self._log = log
        self._connection: asyncpg.Connection | None = None
        self._task: asyncio.Task | None = None
        self._limits: dict | None = None
        self._ok = False
        self._last_error: str | None = None
        self._checked_at: float | None = None
        self._refresh_now = asyncio.Event()

    def start(self) -> None:
        """Start refreshing (the first reading is taken at once, in the background)."""
        self._task = asyncio.get_running_loop().create_task(self._refresh_forever())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        await self._disconnect()

    def snapshot(self) -> dict:
        """The last successful reading (values None until there is one), `ok` (whether the last
        attempt succeeded), `last_error` (None when ok) and `checked_at` (wall clock of the last
        attempt, None before the first)."""
        values = self._limits or dict.fromkeys((*_LIMIT_FIELDS, "available_connections"))
        return {**values, "ok": self._ok, "last_error": self._last_error, "checked_at": self._checked_at}

    async def refresh(self) -> None:
        """Take one reading now; failures are recorded, never raised."""
        try:
            limits = await self._read()
        except CONNECTION_ERRORS as error:
            self._failed(describe_error(self._upstream, error))
            await self._disconnect()
        else:
            if not self._ok and self._last_error is not None:
                self._log.info("control_connection_recovered", upstream=self._upstream.display())
            self._limits, self._ok, self._last_error = limits, True, None
        finally:
            self._checked_at = time.time()

    async def _read(self) -> dict:
        if self._connection is not None and not self._connection.is_closed():
            try:
                return await self._query()
            except Exception:
                # The connection may have died since the last reading (server restart, idle
                # timeout, pg_terminate_backend), which asyncpg reports in more ways than one
                # (InternalClientError among them): a fresh attempt tells that apart from an outage.
                await self._disconnect()
        self._connection = await connect(self._upstream, self._connect_timeout)
        self._connection.add_termination_listener(self._connection_lost)
        return await self._query()

    def _connection_lost(self, connection: asyncpg.Connection) -> None:
        if connection is self._connection:  # dropped by the server, not closed by _disconnect
            self._refresh_now.set()

    async def _query(self) -> dict:
        async with asyncio.timeout(self._connect_timeout):
            return await read_limits(self._connection)

    async def _refresh_forever(self) -> None:
        while True:
            try:
                await self.refresh()
            except Exception as error:  # a bug here must not kill the refresh loop
                self._failed(f"pgscout control connection: unexpected {type(error).__name__}: {error}")
                await self._disconnect()
            try:
                async with asyncio.timeout(self._refresh_seconds):
                    await self._refresh_now.wait()
            except TimeoutError:
                pass
            self._refresh_now.clear()

    def _failed(self, message: str) -> None:
        if message != self._last_error:
            self._log.warning("control_connection_failed", error=message)
        self._ok, self._last_error = False, message

    async def _disconnect(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None and not connection.is_closed():
            connection.terminate()

