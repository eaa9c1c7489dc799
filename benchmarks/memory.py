"""Proxy memory: per idle connection, and while a slow client drains a large result.

Owns: a minimal raw-socket PostgreSQL client (StartupMessage, trust auth, simple Query, walking
message headers without parsing rows), opening many idle sessions (each has run one query), reading a
result at a fixed rate, and sampling the proxy's VmRSS (with its children's) while it happens.
Must not: use a driver for the slow reader (a driver reads as fast as it can and buffers; the
point is a client slower than the server) or keep row bytes (they are counted and dropped).
"""

from __future__ import annotations

import asyncio
import struct
import time

from pgharness import rss_bytes

PROTOCOL_3_0 = 196608
AUTHENTICATION_OK = 0
OPEN_CONCURRENCY = 50
SETTLE_SECONDS = 0.2
RSS_SAMPLE_SECONDS = 0.05
READ_CHUNK_BYTES = 64 * 1024
# One DataRow of `SELECT repeat('x', PAYLOAD) ...`: type, length, column count, column length.
PAYLOAD_BYTES = 1000
DATA_ROW_BYTES = 1 + 4 + 2 + 4 + PAYLOAD_BYTES


class WireError(RuntimeError):
    pass


def rss_kb(pid: int) -> int:
    """The proxy's VmRSS with its children's: pgscout's analysis process counts too."""
    return rss_bytes(pid) // 1024


def _message(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!I", len(body) + 4) + body


async def _connect(host: str, port: int, user: str, database: str):
    reader, writer = await asyncio.open_connection(host, port)
    params = b"".join(key + b"\0" + value.encode() + b"\0"
                      for key, value in ((b"user", user), (b"database", database)))
    body = struct.pack("!I", PROTOCOL_3_0) + params + b"\0"
    writer.write(struct.pack("!I", len(body) + 4) + body)
    try:
        await _read_until_ready(reader)
    except WireError:
        writer.close()
        raise
    return reader, writer


async def _read_until_ready(reader: asyncio.StreamReader) -> None:
    while True:
        header = await reader.readexactly(5)
        type_byte, length = header[:1], struct.unpack("!I", header[1:])[0]
        payload = await reader.readexactly(length - 4)
        if type_byte == b"R" and struct.unpack("!I", payload[:4])[0] != AUTHENTICATION_OK:
            raise WireError("the raw benchmark client only does trust auth; the server asked for a password "
                            f"(authentication request {struct.unpack('!I', payload[:4])[0]})")
        if type_byte == b"E":
            raise WireError(f"the server refused: {payload!r}")
        if type_byte == b"Z":
            return


def _terminate(writer: asyncio.StreamWriter) -> None:
    writer.write(_message(b"X", b""))
    writer.close()


async def idle_connections_kb(pid: int, host: str, port: int, user: str, database: str,
                              count: int) -> dict[str, float]:
    """RSS before and with `count` idle sessions open, and the difference per session."""
    baseline = rss_kb(pid)
    gate = asyncio.Semaphore(OPEN_CONCURRENCY)

    async def open_one():
        async with gate:
            reader, writer = await _connect(host, port, user, database)
            # PgBouncer links a server connection to a session only at its first query; an idle
            # application connection has run queries before, so every session runs one.
            writer.write(_message(b"Q", b"SELECT 1\0"))
            await _read_until_ready(reader)
            return reader, writer

    opened = await asyncio.gather(*(open_one() for _ in range(count)), return_exceptions=True)
    sessions = [item for item in opened if not isinstance(item, BaseException)]
    try:
        failures = [item for item in opened if isinstance(item, BaseException)]
        if failures:
            raise WireError(f"{len(failures)} of {count} idle sessions failed to start; first: {failures[0]!r}")
        await asyncio.sleep(SETTLE_SECONDS)
        loaded = rss_kb(pid)
    finally:
        for _, writer in sessions:
            _terminate(writer)
    return {"baseline_mb": baseline / 1024, "idle_mb": loaded / 1024, "kb_per_idle": (loaded - baseline) / count}


async def slow_reader_peak_mb(pid: int, host: str, port: int, user: str, database: str,
                              result_bytes: int, bytes_per_second: float) -> dict[str, float]:
    """Read a `result_bytes` result at `bytes_per_second`; the proxy's peak RSS growth meanwhile."""
    reader, writer = await _connect(host, port, user, database)
    before = rss_kb(pid)
    peak = before
    done = asyncio.Event()

    async def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, rss_kb(pid))
            await asyncio.sleep(RSS_SAMPLE_SECONDS)

    sampler = asyncio.create_task(sample())
    rows = max(1, result_bytes // DATA_ROW_BYTES)
    sql = f"SELECT repeat('x', {PAYLOAD_BYTES}) FROM generate_series(1, {rows})"
    try:
        writer.write(_message(b"Q", sql.encode() + b"\0"))
        received = await _drain_paced(reader, bytes_per_second)
    finally:
        done.set()
        await sampler
        _terminate(writer)
    peak = max(peak, rss_kb(pid))
    return {"peak_growth_mb": (peak - before) / 1024, "read_mb": received / 1e6}


async def _drain_paced(reader: asyncio.StreamReader, bytes_per_second: float) -> int:
    """Read until ReadyForQuery, never faster than `bytes_per_second`; returns the bytes read."""
    received = 0
    header = b""
    skip = 0
    started = time.monotonic()
    while True:
        chunk = await reader.read(READ_CHUNK_BYTES)
        if not chunk:
            raise WireError("the connection closed before the result ended")
        received += len(chunk)
        position = 0
        while position < len(chunk):
            if skip:
                taken = min(skip, len(chunk) - position)
                position += taken
                skip -= taken
                continue
            needed = 5 - len(header)
            header += chunk[position:position + needed]
            position += needed
            if len(header) < 5:
                break
            type_byte, length = header[:1], struct.unpack("!I", header[1:])[0]
            header = b""
            if type_byte == b"E":
                raise WireError(f"the large query failed: {chunk[position:position + length - 4]!r}")
            if type_byte == b"Z":
                return received
            skip = length - 4
        ahead = received / bytes_per_second - (time.monotonic() - started)
        if ahead > 0:
            await asyncio.sleep(ahead)
