"""The analysis process's own catalog connections: what the findings need to know of the server.

Owns: asyncpg connections of pgscout's own (application_name "pgscout-control", the control
credentials of the upstream URL, one per database asked about, at most MAX_DATABASES, opened on
first use and dropped on failure); and three readings, each one statement with a timeout:
`timeout_defaults()` (the server's statement_timeout and every role/database default of it,
from pg_settings and pg_db_role_setting), `tables(database, schema, table, columns)` (the tables
of that name, whether a valid index leads with one of the columns, and the most distinct values
any of them has, from pg_stats: None when the table was never analysed or the role may not read
the columns) and `activity(pids)` (the
state, seconds in it, user and application_name of those backends in pg_stat_activity). `status()` says whether the last reading worked.
Must not: run a statement that takes a lock beyond the catalog's own or writes anything, raise a
connection failure to its caller (a reading that fails returns None and is logged once), or
touch the application's sessions.
"""

from __future__ import annotations

import asyncio

import asyncpg

from pgscout.control.limits import CONNECTION_ERRORS, describe_error
from pgscout.settings import Upstream

MAX_DATABASES = 8
MAX_INDEXES_SHOWN = 10
QUERY_TIMEOUT_SECONDS = 5.0

# The server's own value is only known when the control role's session did not take it from a
# role or database default (then the defaults below say what the control session got).
_SERVER_TIMEOUT = """
SELECT CASE WHEN source IN ('user', 'database', 'database user') THEN NULL ELSE reset_val END
  FROM pg_settings WHERE name = 'statement_timeout'
"""
_ROLE_DEFAULTS = """
SELECT coalesce(r.rolname, '') AS role, coalesce(d.datname, '') AS database, s.setconfig
  FROM pg_db_role_setting s
  LEFT JOIN pg_roles r ON r.oid = s.setrole
  LEFT JOIN pg_database d ON d.oid = s.setdatabase
"""
# indkey is an int2vector, indexed from 0: indkey[0] is an index's leading column.
_TABLES = """
SELECT n.nspname AS schema, c.relname AS table, c.reltuples::bigint AS rows,
       (SELECT count(*) FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attnum > 0
               AND NOT a.attisdropped AND a.attname = ANY($3::text[])) = cardinality($3::text[])
           AS columns_present,
       EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = c.oid
                                                           AND a.attnum = i.indkey[0]
                WHERE i.indrelid = c.oid AND i.indisvalid AND a.attname = ANY($3::text[]))
           AS indexed,
       ARRAY(SELECT pg_get_indexdef(i.indexrelid) FROM pg_index i WHERE i.indrelid = c.oid
              ORDER BY i.indexrelid LIMIT {limit}) AS indexes,
       (SELECT max(CASE WHEN s.n_distinct >= 0 THEN s.n_distinct
                        ELSE -s.n_distinct * greatest(c.reltuples, 0) END)
          FROM pg_stats s WHERE s.schemaname = n.nspname AND s.tablename = c.relname
                            AND s.attname = ANY($3::text[])) AS distinct_values
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relname = $2 AND c.relkind IN ('r', 'p', 'm')
   AND ($1::text IS NULL OR n.nspname = $1)
   AND n.nspname NOT IN ('pg_catalog', 'information_schema') AND n.nspname NOT LIKE 'pg_toast%'
""".format(limit=MAX_INDEXES_SHOWN)
_ACTIVITY = """
SELECT pid, coalesce(state, '') AS state,
       coalesce(extract(epoch FROM clock_timestamp() - state_change), 0)::float8 AS seconds,
       coalesce(usename, '') AS usename, coalesce(application_name, '') AS application_name
  FROM pg_stat_activity WHERE pid = ANY($1::int[])
"""


class Catalog:
    def __init__(self, upstream: Upstream, log, connect_timeout: float) -> None:
        self._upstream = upstream
        self._log = log
        self._connect_timeout = connect_timeout
        self._connections: dict[str, asyncpg.Connection] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._ok: bool | None = None
        self._last_error: str | None = None

    def status(self) -> dict:
        return {"ok": self._ok, "last_error": self._last_error}

    async def timeout_defaults(self) -> dict[tuple[str, str], str] | None:
        async def read(connection: asyncpg.Connection) -> dict[tuple[str, str], str]:
            defaults: dict[tuple[str, str], str] = {}
            server = await connection.fetchval(_SERVER_TIMEOUT)
            if server is not None:
                defaults[("", "")] = server
            for row in await connection.fetch(_ROLE_DEFAULTS):
                for item in row["setconfig"] or ():
                    name, _, value = item.partition("=")
                    if name == "statement_timeout":
                        defaults[(row["role"], row["database"])] = value
            return defaults
        return await self._run(self._upstream.database or "postgres", read)

    async def tables(self, database: str, schema: str | None, table: str,
                     columns: tuple[str, ...]) -> list[dict] | None:
        async def read(connection: asyncpg.Connection) -> list[dict]:
            rows = await connection.fetch(_TABLES, schema, table, list(columns))
            return [dict(row) for row in rows]
        return await self._run(database, read)

    async def activity(self, pids: list[int]) -> dict[int, dict] | None:
        async def read(connection: asyncpg.Connection) -> dict[int, dict]:
            rows = await connection.fetch(_ACTIVITY, pids)
            return {row["pid"]: dict(row) for row in rows}
        return await self._run(self._upstream.database or "postgres", read)

    async def close(self) -> None:
        for connection in self._connections.values():
            connection.terminate()
        self._connections.clear()

    async def _run(self, database: str, read):
        lock = self._locks.setdefault(database, asyncio.Lock())
        async with lock:
            try:
                connection = await self._connection(database)
                if connection is None:
                    return None
                async with asyncio.timeout(QUERY_TIMEOUT_SECONDS):
                    result = await read(connection)
            except (*CONNECTION_ERRORS, asyncpg.InternalClientError) as error:
                self._failed(describe_error(self._upstream, error))
                dropped = self._connections.pop(database, None)
                if dropped is not None and not dropped.is_closed():
                    dropped.terminate()
                return None
        if self._ok is False:
            self._log.info("catalog_connection_recovered", upstream=self._upstream.display())
        self._ok, self._last_error = True, None
        return result

    async def _connection(self, database: str) -> asyncpg.Connection | None:
        connection = self._connections.get(database)
        if connection is not None and not connection.is_closed():
            return connection
        if len(self._connections) >= MAX_DATABASES and database not in self._connections:
            return None  # bounded: the applications' first databases are the ones looked into
        connection = await asyncpg.connect(self._upstream.control_dsn(database),
                                           timeout=self._connect_timeout)
        self._connections[database] = connection
        return connection

    def _failed(self, message: str) -> None:
        if message != self._last_error:
            self._log.warning("catalog_connection_failed", error=message)
        self._ok, self._last_error = False, message
