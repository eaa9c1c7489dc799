"""The compact records the data plane hands to analysis, and the frames that carry them.

Owns: the layout of each record (a tuple whose first item is its kind; the field positions below),
and the frame format of the channel between the data-plane process and the analysis process:
Int32 length (of what follows), Byte1 frame kind, payload. Records travel in batches as one
`marshal` payload (plain tuples of str, int, float, bytes and None: the cheapest form CPython can
serialize, and a tuple is one allocation where a list is two); requests, replies and settings
are pickled.
Must not: import asyncio or sockets (the hand-off in dataplane/handoff.py does the IO), or hold
anything but data layouts: the data plane's cost per statement is building one tuple.
"""

from __future__ import annotations

import marshal
import pickle
import struct
from typing import Final

# Record kinds (item 0 of every record).
OPENED: Final = 0  # conn_id, client_addr, user, database, application_name, replication, opened_at, opened_wall, startup
READY: Final = 1  # conn_id, at, backend_pid
PARAMETER: Final = 2  # conn_id, name, value (a ParameterStatus the analysis needs)
STATEMENT: Final = 3  # see the S_* positions
TRANSACTION: Final = 4  # conn_id, started_at, ended_at, outcome, idle_seconds
CLOSED: Final = 5  # conn_id, at, reason
# conn_id, txn_status: the ReadyForQuery status the session's next statement records stand under
# ("" for those reported before one came). Sent when it changes, ahead of those records: most
# statements follow the status of the one before, so it is not an item of every record.
STATUS: Final = 6
# at, conn_ids: the sessions waiting on the server then (a request outstanding), sent every
# ACTIVE_SECONDS while there are any. A statement is recorded when it completes; this says one
# is running, so a slow one is not taken for the client going idle.
ACTIVE: Final = 7
ACTIVE_SECONDS: Final = 1.0

# The StartupMessage parameters OPENED carries (as `startup`, a dict): the session's settings
# the findings judge (statement_timeout given directly, as asyncpg does, or in `options`, as libpq
# does), each cut to STARTUP_VALUE_CHARS.
STARTUP_PARAMETERS: Final = ("options", "statement_timeout")
STARTUP_VALUE_CHARS: Final = 1024

# STATEMENT record positions.
S_CONN: Final = 1
S_SQL: Final = 2  # the client's text, cut to the configured length (S_TRUNCATED says so)
S_COUNT: Final = 3  # statements the server completed for it: >1 for a multi-statement Query
S_EXTENDED: Final = 4
S_SENT_AT: Final = 5
S_DONE_AT: Final = 6
S_TAG: Final = 7  # CommandComplete tag of the last statement, "EMPTY", or "" on error
S_ROWS: Final = 8
S_SQLSTATE: Final = 9
S_PARAM_SIG: Final = 10  # Bind parameters' keyed hash; for a cut simple Query, the whole text's
S_N_PARAMS: Final = 11
S_PARAMS: Final = 12  # Bind values, only when the slow log is asked to keep them
S_PIPELINED: Final = 13
S_TRUNCATED: Final = 14

# Frame kinds.
RECORDS: Final = 1  # data plane -> analysis: marshal(list of records)
REQUEST: Final = 2  # data plane -> analysis: pickle((request_id, request, snapshot, records before it))
REPLY: Final = 3  # analysis -> data plane: pickle((request_id, status, headers, body))
SETTINGS: Final = 4  # data plane -> analysis: pickle(Settings): at start on the control channel,
# on reload on the records channel (so it applies to the records made after it)
LOG: Final = 5  # analysis -> data plane: pickle((level, event dict)), logged by the data plane
STARTED: Final = 6  # analysis -> data plane: pickle(None), once its observers are in place

# A request waits at most this long for the records sent before it to be analysed.
REQUEST_CATCH_UP_SECONDS: Final = 1.0

_HEADER: Final = struct.Struct("!iB")
HEADER_SIZE: Final = _HEADER.size


def records_frame(batch: list[tuple]) -> bytes:
    payload = marshal.dumps(batch)
    return _HEADER.pack(len(payload) + 1, RECORDS) + payload


def pickled_frame(kind: int, value: object) -> bytes:
    payload = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(payload) + 1, kind) + payload


def decode_payload(kind: int, payload: bytes) -> object:
    return marshal.loads(payload) if kind == RECORDS else pickle.loads(payload)


class FrameReader:
    """Splits the channel's byte stream into (kind, payload) frames, across reads."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        buffer = self._buffer
        buffer += data
        frames = []
        pos = 0
        while len(buffer) - pos >= HEADER_SIZE:
            length, kind = _HEADER.unpack_from(buffer, pos)
            end = pos + 4 + length
            if end > len(buffer):
                break
            frames.append((kind, bytes(buffer[pos + HEADER_SIZE:end])))
            pos = end
        del buffer[:pos]
        return frames

    @property
    def buffered(self) -> int:
        return len(self._buffer)
