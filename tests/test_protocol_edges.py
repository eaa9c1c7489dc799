"""The startup phase and hostile input, spoken byte by byte to a real pgscout in front of a real
PostgreSQL: what an unusual or broken client sees, and that other sessions never notice."""

from __future__ import annotations

import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time

import psycopg

from pgharness import SUPERUSER


def _connect(proxy) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    return sock


def _startup(user: str, database: str, version: tuple[int, int] = (3, 0), **options: str) -> bytes:
    params = {"user": user, "database": database, **options}
    body = struct.pack("!i", (version[0] << 16) | version[1])
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _read_messages(sock: socket.socket, until: bytes, limit: float = 10.0) -> list[tuple[bytes, bytes]]:
    """Read typed backend messages until one of type `until` (or the connection closes)."""
    buffer = b""
    messages: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        while len(buffer) >= 5:
            length = struct.unpack_from("!i", buffer, 1)[0]
            if len(buffer) < 1 + length:
                break
            messages.append((buffer[:1], buffer[5:1 + length]))
            buffer = buffer[1 + length:]
            if messages[-1][0] == until:
                return messages
        chunk = sock.recv(65536)
        if not chunk:
            return messages
        buffer += chunk
    raise AssertionError(f"no {until!r} within {limit} s; got {messages}")


def _sqlstate(body: bytes) -> str:
    for field in body.split(b"\0"):
        if field[:1] == b"C":
            return field[1:].decode()
    return ""


def _still_serving(proxy) -> None:
    with psycopg.connect(proxy.dsn(SUPERUSER)) as conn:
        assert conn.execute("select 42").fetchone() == (42,)


def test_ssl_and_gssenc_requests_are_refused_with_n_then_startup_proceeds(pgscout):
    with _connect(pgscout) as sock:
        sock.sendall(struct.pack("!ii", 8, 80877104))  # GSSENCRequest
        assert sock.recv(1) == b"N"
        sock.sendall(struct.pack("!ii", 8, 80877103))  # SSLRequest
        assert sock.recv(1) == b"N"
        sock.sendall(_startup(SUPERUSER, "postgres"))
        types = [t for t, _ in _read_messages(sock, b"Z")]
        assert types[0] == b"R" and types[-1] == b"Z"


def test_newer_protocol_and_pq_options_reach_the_server_which_negotiates(pgscout):
    """pgscout forwards 3.2 and `_pq_.*` untouched; PostgreSQL 15 answers NegotiateProtocolVersion."""
    with _connect(pgscout) as sock:
        sock.sendall(_startup(SUPERUSER, "postgres", version=(3, 2), **{"_pq_.pgscout_test": "on"}))
        messages = _read_messages(sock, b"Z")
        negotiate = [body for t, body in messages if t == b"v"]
        assert negotiate, [t for t, _ in messages]
        newest, unknown_count = struct.unpack_from("!ii", negotiate[0])
        assert newest == 3 << 16 and unknown_count == 1  # the server speaks 3.0 and refuses the option
        assert b"_pq_.pgscout_test" in negotiate[0]
        sock.sendall(b"Q" + struct.pack("!i", 14) + b"select 7;\0")
        assert any(t == b"D" for t, _ in _read_messages(sock, b"Z"))


def test_direct_tls_without_sslrequest_is_closed_with_a_log_line(pgscout):
    with _connect(pgscout) as sock:
        sock.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + b"\0" * 32)
        assert sock.recv(1024) == b""
    assert any("sslnegotiation=direct" in str(line.get("reason", "")) for line in pgscout.logs()
               if line.get("event") == "startup_failed")
    _still_serving(pgscout)


def test_cancel_request_with_a_wrong_key_is_forwarded_and_harmless(pgscout):
    with psycopg.connect(pgscout.dsn(SUPERUSER)) as conn:
        pid = conn.info.backend_pid
        with _connect(pgscout) as sock:
            sock.sendall(struct.pack("!iiii", 16, 80877102, pid, 12345))
            assert sock.recv(1) == b""
        assert conn.execute("select 1").fetchone() == (1,)


def test_replication_connection_streams_a_base_backup_through_pgscout(pg, pgscout):
    target = tempfile.mkdtemp(prefix="pgscout-basebackup-")
    try:
        result = subprocess.run(
            [pg.bin("pg_basebackup"), "-d", pgscout.dsn(SUPERUSER), "-D", target, "-X", "none",
             "-c", "fast", "--no-sync"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert os.path.exists(f"{target}/PG_VERSION")
        identify = pg.psql("-c", "IDENTIFY_SYSTEM", dsn=pgscout.dsn(SUPERUSER, replication="database"))
        assert identify.stdout.count("|") >= 3
    finally:
        shutil.rmtree(target, ignore_errors=True)
    opened = [line for line in pgscout.logs() if line.get("event") == "connection_opened"]
    assert any(line.get("replication") for line in opened)
