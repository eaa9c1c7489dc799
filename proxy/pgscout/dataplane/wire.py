"""PostgreSQL frontend/backend protocol constants and the few messages pgscout writes itself.

Owns: request codes, message type bytes (per direction, since one letter means different things
each way) and the builders for ErrorResponse and the single-byte TLS refusals.
Must not: parse streams (framer.py does) or know about sessions (decoder.py does).
Reference: PostgreSQL docs, "Frontend/Backend Protocol", sections Message Formats and Flow.
"""

from __future__ import annotations

import struct
from typing import Final

PROTOCOL_MAJOR: Final = 3
SSL_REQUEST_CODE: Final = 80877103
GSSENC_REQUEST_CODE: Final = 80877104
CANCEL_REQUEST_CODE: Final = 80877102
# PostgreSQL refuses any message longer than 1 GiB (PQ_LARGE_MESSAGE_LIMIT's neighbour MaxAllocSize).
DEFAULT_MAX_MESSAGE_LENGTH: Final = 1 << 30
# First byte of a TLS ClientHello: PostgreSQL 17's sslnegotiation=direct skips SSLRequest.
TLS_HANDSHAKE_RECORD: Final = 0x16

# Frontend (client -> server) message types.
F_BIND: Final = ord("B")
F_CLOSE: Final = ord("C")
F_COPY_DATA: Final = ord("d")
F_COPY_DONE: Final = ord("c")
F_COPY_FAIL: Final = ord("f")
F_DESCRIBE: Final = ord("D")
F_EXECUTE: Final = ord("E")
F_FLUSH: Final = ord("H")
F_FUNCTION_CALL: Final = ord("F")
F_PARSE: Final = ord("P")
F_PASSWORD: Final = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse: never decoded
F_QUERY: Final = ord("Q")
F_SYNC: Final = ord("S")
F_TERMINATE: Final = ord("X")

# Backend (server -> client) message types.
B_AUTHENTICATION: Final = ord("R")
B_BACKEND_KEY_DATA: Final = ord("K")
B_BIND_COMPLETE: Final = ord("2")
B_CLOSE_COMPLETE: Final = ord("3")
B_COMMAND_COMPLETE: Final = ord("C")
B_COPY_BOTH_RESPONSE: Final = ord("W")
B_COPY_DATA: Final = ord("d")
B_COPY_DONE: Final = ord("c")
B_COPY_IN_RESPONSE: Final = ord("G")
B_COPY_OUT_RESPONSE: Final = ord("H")
B_DATA_ROW: Final = ord("D")
B_EMPTY_QUERY_RESPONSE: Final = ord("I")
B_ERROR_RESPONSE: Final = ord("E")
B_FUNCTION_CALL_RESPONSE: Final = ord("V")
B_NEGOTIATE_PROTOCOL_VERSION: Final = ord("v")
B_NO_DATA: Final = ord("n")
B_NOTICE_RESPONSE: Final = ord("N")
B_NOTIFICATION_RESPONSE: Final = ord("A")
B_PARAMETER_DESCRIPTION: Final = ord("t")
B_PARAMETER_STATUS: Final = ord("S")
B_PARSE_COMPLETE: Final = ord("1")
B_PORTAL_SUSPENDED: Final = ord("s")
B_READY_FOR_QUERY: Final = ord("Z")
B_ROW_DESCRIPTION: Final = ord("T")

# Authentication request codes (the Int32 after 'R').
AUTH_OK: Final = 0
AUTH_SASL: Final = 10

# Single-byte answers to SSLRequest / GSSENCRequest.
ACCEPT_TLS: Final = b"S"
REFUSE_ENCRYPTION: Final = b"N"

_INT32 = struct.Struct("!i")

# SQLSTATEs pgscout itself sends.
CONNECTION_FAILURE: Final = "08006"
PROTOCOL_VIOLATION: Final = "08P01"
TOO_MANY_CONNECTIONS: Final = "53300"
CANNOT_CONNECT_NOW: Final = "57P03"
FEATURE_NOT_SUPPORTED: Final = "0A000"
INVALID_AUTHORIZATION: Final = "28000"


def error_response(sqlstate: str, message: str, severity: str = "FATAL", detail: str = "") -> bytes:
    """Build an ErrorResponse ('E', int32 len, then (code byte, cstring) fields, then a zero byte)."""
    fields = [b"S", severity.encode(), b"\0", b"V", severity.encode(), b"\0",
              b"C", sqlstate.encode(), b"\0", b"M", message.encode("utf-8", "replace"), b"\0"]
    if detail:
        fields += [b"D", detail.encode("utf-8", "replace"), b"\0"]
    body = b"".join(fields) + b"\0"
    return b"E" + _INT32.pack(len(body) + 4) + body


def protocol2_error(message: str) -> bytes:
    """A protocol 2.0 error, which is what the postmaster sends a client asking for 2.0 or less:
    'E', then "FATAL:  <message>\\n" as a cstring."""
    return b"E" + f"FATAL:  {message}\n".encode("utf-8", "replace") + b"\0"


def cancel_request(pid: int, key: bytes) -> bytes:
    """CancelRequest: int32 len, int32 80877102, int32 pid, then the key (4 bytes before 3.2)."""
    body = _INT32.pack(CANCEL_REQUEST_CODE) + _INT32.pack(pid) + key
    return _INT32.pack(len(body) + 4) + body


def ssl_request() -> bytes:
    return _INT32.pack(8) + _INT32.pack(SSL_REQUEST_CODE)
