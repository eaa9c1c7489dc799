"""Exact bytes of PostgreSQL protocol messages, for tests that feed the sans-IO core.

Owns: one small builder per frontend (client -> server) and backend (server -> client) message,
written from the "Message Formats" section of the PostgreSQL protocol documentation; and reading
a raw socket to its close, for the tests that compare what a client sees.
Must not: import the code under test (the bytes must come from the protocol, not from pgscout's
own idea of it) or parse anything.
"""

from __future__ import annotations

import socket
import struct

SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def _int16(value: int) -> bytes:
    return struct.pack("!h", value)


def _int32(value: int) -> bytes:
    return struct.pack("!i", value)


def _cstring(text: str | bytes) -> bytes:
    return (text.encode() if isinstance(text, str) else text) + b"\0"


def typed(type_byte: bytes, body: bytes = b"") -> bytes:
    """A typed message: the type byte, an int32 length that counts itself, then the body."""
    return type_byte + _int32(len(body) + 4) + body


def _untyped(body: bytes) -> bytes:
    return _int32(len(body) + 4) + body


# -- frontend: startup phase (untyped packets) ----------------------------------------------------
def startup(params: dict[str, str], version: tuple[int, int] = (3, 0)) -> bytes:
    code = (version[0] << 16) | version[1]
    pairs = b"".join(_cstring(name) + _cstring(value) for name, value in params.items())
    return _untyped(_int32(code) + pairs + b"\0")


def ssl_request() -> bytes:
    return _untyped(_int32(SSL_REQUEST_CODE))


def gssenc_request() -> bytes:
    return _untyped(_int32(GSSENC_REQUEST_CODE))


def cancel_request(pid: int, key: bytes) -> bytes:
    """The key is 4 bytes before protocol 3.2 and up to 256 bytes from 3.2 on."""
    return _untyped(_int32(CANCEL_REQUEST_CODE) + _int32(pid) + key)


# -- frontend: typed messages ---------------------------------------------------------------------
def query(sql: str) -> bytes:
    return typed(b"Q", _cstring(sql))


def parse(name: str, sql: str, oids: tuple[int, ...] = ()) -> bytes:
    return typed(b"P", _cstring(name) + _cstring(sql) + _int16(len(oids))
                   + b"".join(_int32(oid) for oid in oids))


def bind(portal: str, stmt: str, params: list[bytes | None], formats: tuple[int, ...] = (),
         result_formats: tuple[int, ...] = ()) -> bytes:
    values = b"".join(_int32(-1) if value is None else _int32(len(value)) + value
                      for value in params)
    return typed(b"B", _cstring(portal) + _cstring(stmt)
                   + _int16(len(formats)) + b"".join(_int16(f) for f in formats)
                   + _int16(len(params)) + values
                   + _int16(len(result_formats)) + b"".join(_int16(f) for f in result_formats))


def describe(kind: str, name: str) -> bytes:
    """kind is "S" (prepared statement) or "P" (portal)."""
    return typed(b"D", kind.encode() + _cstring(name))


def execute(portal: str, max_rows: int = 0) -> bytes:
    return typed(b"E", _cstring(portal) + _int32(max_rows))


def close(kind: str, name: str) -> bytes:
    """kind is "S" (prepared statement) or "P" (portal)."""
    return typed(b"C", kind.encode() + _cstring(name))


def sync() -> bytes:
    return typed(b"S")


def flush() -> bytes:
    return typed(b"H")


def terminate() -> bytes:
    return typed(b"X")


def copy_data(data: bytes) -> bytes:
    return typed(b"d", data)


def copy_done() -> bytes:
    return typed(b"c")


def copy_fail(reason: str) -> bytes:
    return typed(b"f", _cstring(reason))


def password(data: bytes) -> bytes:
    """PasswordMessage (also the SASL and GSS responses): the body is opaque."""
    return typed(b"p", data)


# -- backend ----------------------------------------------------------------------------------------
def auth_ok() -> bytes:
    return typed(b"R", _int32(0))


def auth_cleartext_password() -> bytes:
    return typed(b"R", _int32(3))


def parameter_status(name: str, value: str) -> bytes:
    return typed(b"S", _cstring(name) + _cstring(value))


def backend_key_data(pid: int, key: bytes) -> bytes:
    return typed(b"K", _int32(pid) + key)


def ready_for_query(status: str) -> bytes:
    """status is "I" (idle), "T" (in a transaction block) or "E" (in a failed block)."""
    return typed(b"Z", status.encode())


def parse_complete() -> bytes:
    return typed(b"1")


def bind_complete() -> bytes:
    return typed(b"2")


def close_complete() -> bytes:
    return typed(b"3")


def no_data() -> bytes:
    return typed(b"n")


def row_description(ncols: int) -> bytes:
    """ncols int4 text-format columns named c1, c2..."""
    fields = b"".join(_cstring(f"c{i + 1}") + _int32(0) + _int16(0) + _int32(23) + _int16(4)
                      + _int32(-1) + _int16(0) for i in range(ncols))
    return typed(b"T", _int16(ncols) + fields)


def data_row(values: list[bytes | None]) -> bytes:
    columns = b"".join(_int32(-1) if value is None else _int32(len(value)) + value
                       for value in values)
    return typed(b"D", _int16(len(values)) + columns)


def command_complete(tag: str) -> bytes:
    return typed(b"C", _cstring(tag))


def empty_query_response() -> bytes:
    return typed(b"I")


def portal_suspended() -> bytes:
    return typed(b"s")


def _fields(fields: list[tuple[bytes, str]]) -> bytes:
    return b"".join(code + _cstring(value) for code, value in fields) + b"\0"


def error_response(sqlstate: str, message: str, severity: str = "ERROR") -> bytes:
    return typed(b"E", _fields([(b"S", severity), (b"V", severity), (b"C", sqlstate),
                                  (b"M", message)]))


def notice_response(message: str = "note", sqlstate: str = "00000",
                    severity: str = "NOTICE") -> bytes:
    return typed(b"N", _fields([(b"S", severity), (b"V", severity), (b"C", sqlstate),
                                  (b"M", message)]))


def notification(pid: int, channel: str, payload: str = "") -> bytes:
    return typed(b"A", _int32(pid) + _cstring(channel) + _cstring(payload))


def _copy_response(type_byte: bytes, ncols: int) -> bytes:
    return typed(type_byte, b"\0" + _int16(ncols) + b"".join(_int16(0) for _ in range(ncols)))


def copy_in_response(ncols: int = 1) -> bytes:
    """Text-format CopyInResponse."""
    return _copy_response(b"G", ncols)


def copy_out_response(ncols: int = 1) -> bytes:
    """Text-format CopyOutResponse."""
    return _copy_response(b"H", ncols)


def parameter_description(n: int) -> bytes:
    """n parameters, all int4."""
    return typed(b"t", _int16(n) + b"".join(_int32(23) for _ in range(n)))


def read_until_closed_or_quiet(sock: socket.socket, quiet: float) -> tuple[bytes, bool]:
    """Everything the peer sends until it closes, EOF or reset alike (True), or is quiet for
    `quiet` s (False)."""
    sock.settimeout(quiet)
    received = b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except TimeoutError:
        return received, False
    except ConnectionResetError:
        pass
    return received, True
