"""PostgreSQL frontend/backend protocol constants and the few messages pgscout writes itself.

Owns: request codes, message type bytes (per direction, since one letter means different things
each way) and the builders for ErrorResponse and the single-byte TLS refusals.
Must not: parse streams (framer.py does) or know about sessions (decoder.py does).
Reference: PostgreSQL docs, "Frontend/Backend Protocol", sections Message Formats and Flow.
"""

from __future__ import annotations

import struct

PROTOCOL_MAJOR = 3
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102
# PostgreSQL refuses any message longer than 1 GiB (PQ_LARGE_MESSAGE_LIMIT's neighbour MaxAllocSize).
DEFAULT_MAX_MESSAGE_LENGTH = 1 << 30
# First byte of a TLS ClientHello: PostgreSQL 17's sslnegotiation=direct skips SSLRequest.
TLS_HANDSHAKE_RECORD = 0x16

# Frontend (client -> server) message types.
F_BIND = ord("B")
F_CLOSE = ord("C")
F_COPY_DATA = ord("d")
F_COPY_DONE = ord("c")
F_COPY_FAIL = ord("f")
F_DESCRIBE = ord("D")
F_EXECUTE = ord("E")
F_FLUSH = ord("H")
F_FUNCTION_CALL = ord("F")
F_PARSE = ord("P")
F_PASSWORD = ord("p")  # also SASLInitialResponse, SASLResponse, GSSResponse: never decoded
F_QUERY = ord("Q")
F_SYNC = ord("S")
F_TERMINATE = ord("X")

# Backend (server -> client) message types.
B_AUTHENTICATION = ord("R")
B_BACKEND_KEY_DATA = ord("K")
B_BIND_COMPLETE = ord("2")
B_CLOSE_COMPLETE = ord("3")
B_COMMAND_COMPLETE = ord("C")
B_COPY_BOTH_RESPONSE = ord("W")
B_COPY_DATA = ord("d")
B_COPY_DONE = ord("c")
B_COPY_IN_RESPONSE = ord("G")
B_COPY_OUT_RESPONSE = ord("H")
B_DATA_ROW = ord("D")
B_EMPTY_QUERY_RESPONSE = ord("I")
B_ERROR_RESPONSE = ord("E")
B_FUNCTION_CALL_RESPONSE = ord("V")
B_NEGOTIATE_PROTOCOL_VERSION = ord("v")
B_NO_DATA = ord("n")
B_NOTICE_RESPONSE = ord("N")
B_NOTIFICATION_RESPONSE = ord("A")
B_PARAMETER_DESCRIPTION = ord("t")
B_PARAMETER_STATUS = ord("S")
B_PARSE_COMPLETE = ord("1")
B_PORTAL_SUSPENDED = ord("s")
B_READY_FOR_QUERY = ord("Z")
B_ROW_DESCRIPTION = ord("T")

# Authentication request codes (the Int32 after 'R').
AUTH_OK = 0
AUTH_SASL = 10

# Single-byte answers to SSLRequest / GSSENCRequest.
ACCEPT_TLS = b"S"
REFUSE_ENCRYPTION = b"N"

_INT32 = struct.Struct("!i")

# SQLSTATEs pgscout itself sends.
CONNECTION_FAILURE = "08006"
PROTOCOL_VIOLATION = "08P01"
TOO_MANY_CONNECTIONS = "53300"
CANNOT_CONNECT_NOW = "57P03"
FEATURE_NOT_SUPPORTED = "0A000"
INVALID_AUTHORIZATION = "28000"


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
