"""Sans-IO message framing for one direction of a PostgreSQL connection.

Owns: splitting a byte stream into messages (the untyped startup packets, then typed messages:
one type byte, an int32 length that counts itself, the body), carrying partial headers and bodies
across reads, capping how much of one body is handed to the decoder, and telling apart the
startup packets PostgreSQL refuses, with what it answers them.
Must not: interpret message bodies (decoder.py does), copy a body that arrived whole (the sink
gets the chunk and the body's offsets in it) or the bodies of messages nobody decodes (DataRow,
CopyData: their bytes are skipped by count), touch sockets, or let a size limit of pgscout's own
decide anything about the stream: the framer only observes what is forwarded.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final

from mypy_extensions import i64, mypyc_attr

from pgscout.dataplane import wire


# Bodies longer than this are delivered cut to this many bytes (flagged incomplete): the decoder
# needs the names and SQL at the front of a Bind or Query, never 100 MB of bytea behind them.
DECODE_LIMIT: Final = 1 << 20
# A typed message longer than this is one PostgreSQL would never send nor accept.
_POSTGRES_MAX_LENGTH: Final = wire.DEFAULT_MAX_MESSAGE_LENGTH
# PostgreSQL's MAX_STARTUP_PACKET_LENGTH, which it compares with the length minus its own 4 bytes.
MAX_STARTUP_PACKET: Final = 10000 + 4
# PostgreSQL 18 allows cancel keys of up to 256 bytes (4 before protocol 3.2).
MAX_CANCEL_KEY: Final = 256
# What the postmaster says when it refuses a protocol (PostgreSQL 15-17 speak 3.0 only; pgscout
# relays any 3.x minor and lets the server negotiate it down).
_SUPPORTED_PROTOCOLS: Final = "server supports 3.0 to 3.0"

# Runs are looked for among messages this short (Sync is 4 bytes of length, ReadyForQuery 5)...
_MAX_RUN_LENGTH: Final = 8
# ...and of so many distinct messages at most (ReadyForQuery has three statuses).
_MAX_RUN_PATTERNS: Final = 8

# What the framer does with each message type (Framer._actions, one byte per type).
_SKIP: Final = 0
_DELIVER: Final = 1
_DELIVER_RUNS: Final = 2


class FramingError(Exception):
    """The stream cannot be framed: a length PostgreSQL itself rejects (below 4, over 1 GiB).

    The bytes are forwarded all the same (the server answers them as it would directly); only
    decoding of that session stops."""


class StartupRefused(FramingError):
    """A startup-phase packet PostgreSQL refuses. `reply` is what the postmaster sends before it
    closes the connection: nothing for a bad length (it only logs "invalid length of startup
    packet"), an ErrorResponse for an unsupported protocol version."""

    def __init__(self, message: str, reply: bytes = b""):
        super().__init__(message)
        self.reply = reply


def int32(data: bytes, pos: i64) -> i64:
    """The protocol's Int32 (big-endian, signed) at data[pos:pos + 4]. Byte indexing and native
    integers, which mypyc compiles to plain C, where struct.unpack_from is a Python call and a
    tuple."""
    value: i64 = data[pos] << 24 | data[pos + 1] << 16 | data[pos + 2] << 8 | data[pos + 3]
    return value - (1 << 32) if value >= 1 << 31 else value


def int16(data: bytes, pos: i64) -> i64:
    """The protocol's Int16 (big-endian, signed) at data[pos:pos + 2]."""
    value: i64 = data[pos] << 8 | data[pos + 1]
    return value - (1 << 16) if value >= 1 << 15 else value


# Subclassed by the decoder (compiled: its calls are native) and by tests (interpreted).
@mypyc_attr(allow_interpreted_subclasses=True)
class MessageSink:
    """Where a Framer delivers the messages it was told to decode: each body is
    `data[start:end]`, left in the chunk it came in (a slice per message was an allocation and a
    copy for every Bind, Execute and CommandComplete), or in a bytes of its own when it spanned
    reads."""

    def message(self, typ: int, data: bytes, start: i64, end: i64, complete: bool) -> None:
        """One message of type `typ`; `complete` is false when only the front of its body is given."""
        raise NotImplementedError

    def run(self, typ: int, data: bytes, start: i64, end: i64, count: int) -> None:
        """`count` identical copies of one short message in a row (only for the `runs` types)."""
        raise NotImplementedError


class Framer:
    """Walks typed messages and hands those of the `decoded` types to `sink.message`.

    The sink is called as `sink.message(typ, data, start, end, complete)`, the body being
    data[start:end]; `complete` is false when the message was longer than `max_length` (the
    proxy.max_message_bytes setting) or its body longer than DECODE_LIMIT, and only the front of
    the body is given. Messages of other types are skipped without copying; `data_rows` counts
    skipped DataRow messages so the decoder can count rows of suspended portals without ever
    seeing a row.

    For the `runs` types (also decoded), a run of identical copies of one short message (a client
    pipelining thousands of Syncs, the server answering each with the same ReadyForQuery) is
    delivered once as `sink.run(typ, data, start, end, count)`, the run found by one C-level
    regex match. The work per byte must be small for the smallest messages too, or a flood of
    5-byte Syncs keeps the forwarding loop busy for seconds, however bounded in bytes.
    """

    __slots__ = ("_sink", "_actions", "_run_patterns", "_decode_limit", "_skip", "_head",
                 "_type", "_body", "_want", "_after", "data_rows")

    def __init__(self, sink: MessageSink, decoded: Iterable[int],
                 max_length: int = wire.DEFAULT_MAX_MESSAGE_LENGTH, runs: Iterable[int] = ()):
        self._sink = sink
        actions = bytearray(256)
        for typ in decoded:
            actions[typ] = _DELIVER
        for typ in runs:
            actions[typ] = _DELIVER_RUNS
        self._actions = bytes(actions)
        self._run_patterns: dict[bytes, re.Pattern[bytes]] = {}
        self._decode_limit = max(0, min(DECODE_LIMIT, max_length - 4))
        self._skip = 0  # bytes of a skipped message still to come
        self._head = b""  # a header cut by a read boundary (fewer than 5 bytes)
        self._type = 0  # type of the body being collected
        self._body: bytearray | None = None  # body being collected across reads
        self._want = 0  # bytes still to collect into _body
        self._after = 0  # bytes to skip once _body is delivered (over DECODE_LIMIT)
        self.data_rows = 0

    def feed(self, data: bytes) -> None:
        # Positions are i64, native C integers when compiled (int is tagged, checked at each step).
        end: i64 = len(data)
        pos: i64 = 0
        if self._skip:
            if self._skip >= end:
                self._skip -= end
                return
            pos = self._skip
            self._skip = 0
        elif self._body is not None:
            pos = self._collect(data)
            if pos >= end:
                return
        elif self._head:
            need = 5 - len(self._head)
            if end < need:
                self._head += data
                return
            header = self._head + data[:need]
            self._head = b""
            pos = self._begin(header, 0, data, need)
            if pos >= end:
                return

        actions = self._actions
        sink = self._sink
        whole_up_to = self._decode_limit + 4
        rows: i64 = 0
        typ: i64
        length: i64
        msg_end: i64
        while end - pos >= 5:
            typ = data[pos]
            # The Int32 read unsigned, inline (this runs for every message): a negative length
            # is over _POSTGRES_MAX_LENGTH too.
            length = data[pos + 1] << 24 | data[pos + 2] << 16 | data[pos + 3] << 8 | data[pos + 4]
            if length < 4 or length > _POSTGRES_MAX_LENGTH:
                self.data_rows += rows
                raise FramingError(_bad_length(typ, int32(data, pos + 1)))
            msg_end = pos + 1 + length
            action = actions[typ]
            if action == _SKIP:
                # The common case by far in a large result: count a DataRow, skip its body.
                if typ == wire.B_DATA_ROW:
                    rows += 1
                if msg_end > end:
                    self._skip = msg_end - end
                    self.data_rows += rows
                    return
                pos = msg_end
            elif msg_end <= end and length <= whole_up_to:
                if rows:
                    self.data_rows += rows  # the sink may read the count
                    rows = 0
                if (action == _DELIVER_RUNS and msg_end < end and data[msg_end] == typ
                        and length <= _MAX_RUN_LENGTH):
                    count = self._run_count(data, pos, msg_end)
                    if count > 1:
                        sink.run(typ, data, pos + 5, msg_end, count)
                        pos += count * (msg_end - pos)
                        continue
                sink.message(typ, data, pos + 5, msg_end, True)
                pos = msg_end
            else:
                self.data_rows += rows
                rows = 0
                pos = self._begin(data, pos, data, pos + 5)
        self.data_rows += rows
        if pos < end:
            self._head = data[pos:]

    def _run_count(self, data: bytes, pos: int, msg_end: int) -> int:
        """How many copies of the message at data[pos:msg_end] follow one another from pos."""
        message = data[pos:msg_end]
        pattern = self._run_patterns.get(message)
        if pattern is None:
            if len(self._run_patterns) >= _MAX_RUN_PATTERNS:
                self._run_patterns.clear()
            pattern = self._run_patterns[message] = re.compile(b"(?:" + re.escape(message) + b")+")
        found = pattern.match(data, pos)
        assert found is not None  # the message itself matches
        return (found.end() - pos) // (msg_end - pos)

    def _begin(self, header: bytes, hpos: int, data: bytes, pos: int) -> int:
        """Start on the message whose header is at header[hpos:hpos+5]; its body starts at data[pos]."""
        typ = header[hpos]
        length = int32(header, hpos + 1)
        if length < 4 or length > _POSTGRES_MAX_LENGTH:
            raise FramingError(_bad_length(typ, length))
        body_len = length - 4
        if self._actions[typ] == _SKIP:
            if typ == wire.B_DATA_ROW:
                self.data_rows += 1
            available = len(data) - pos
            if body_len > available:
                self._skip = body_len - available
                return len(data)
            return pos + body_len
        self._type = typ
        self._body = bytearray()
        self._want = min(body_len, self._decode_limit)
        self._after = body_len - self._want
        return self._collect(data, pos)

    def _collect(self, data: bytes, pos: int = 0) -> int:
        """Add to the body being collected; deliver it when whole. Returns the next position."""
        take = min(self._want, len(data) - pos)
        body = self._body
        assert body is not None  # _collect runs only while a body is being collected
        body += data[pos:pos + take]
        pos += take
        self._want -= take
        if self._want:
            return pos
        self._body = None
        complete = self._after == 0
        whole = bytes(body)
        self._sink.message(self._type, whole, 0, len(whole), complete)
        if self._after:
            available = len(data) - pos
            if self._after > available:
                self._skip = self._after - available
                self._after = 0
                return len(data)
            pos += self._after
            self._after = 0
        return pos


def _bad_length(typ: int, length: int) -> str:
    kind = chr(typ) if 32 < typ < 127 else f"0x{typ:02x}"
    if length < 4:
        return f"message {kind!r} has an invalid length {length}"
    return f"message {kind!r} declares {length} bytes, more than PostgreSQL accepts"


@dataclass(slots=True)
class StartupPacket:
    """One untyped packet from the start of a client connection (int32 length, int32 code, rest)."""

    kind: str  # "ssl", "gssenc", "cancel" or "startup"
    raw: bytes  # the whole packet, forwarded verbatim where it is forwarded at all
    code: int
    parameters: dict[str, str] = field(default_factory=dict)  # StartupMessage only
    cancel_pid: int = 0  # CancelRequest only
    cancel_key: bytes = b""  # CancelRequest only: 4 bytes before protocol 3.2, up to 256 after

    @property
    def protocol(self) -> tuple[int, int]:
        return self.code >> 16, self.code & 0xFFFF


def parse_startup_packet(buf: bytes | bytearray, *, ssl_done: bool = False,
                         gss_done: bool = False) -> tuple[StartupPacket | None, int]:
    """Frame one startup-phase packet from the front of `buf`, as the postmaster does
    (ProcessStartupPacket in PostgreSQL's postmaster.c).

    Returns (packet, bytes consumed), or (None, 0) when more bytes are needed. The length is
    judged as soon as its 4 bytes are in. Raises StartupRefused, carrying PostgreSQL's answer, for
    a length outside 8..10004, a CancelRequest whose key is not 4 to 256 bytes, or a protocol
    other than 3.x. An SSLRequest after `ssl_done` (or a GSSENCRequest after `gss_done`) is, as
    for the postmaster, just an unknown protocol version.
    """
    if len(buf) < 4:
        return None, 0
    length = int32(bytes(buf[:4]), 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise StartupRefused(f"invalid length of startup packet ({length})")
    if len(buf) < length:
        return None, 0
    raw = bytes(buf[:length])
    code = int32(raw, 4) & 0xFFFFFFFF
    if code == wire.SSL_REQUEST_CODE and not ssl_done:
        return StartupPacket("ssl", raw, code), length
    if code == wire.GSSENC_REQUEST_CODE and not gss_done:
        return StartupPacket("gssenc", raw, code), length
    if code == wire.CANCEL_REQUEST_CODE:
        if not 16 <= length <= 12 + MAX_CANCEL_KEY:
            raise StartupRefused(f"invalid length of startup packet (CancelRequest of {length} bytes)")
        pid = int32(raw, 8)
        return StartupPacket("cancel", raw, code, cancel_pid=pid, cancel_key=raw[12:]), length
    major, minor = code >> 16, code & 0xFFFF
    if major != wire.PROTOCOL_MAJOR:
        message = f"unsupported frontend protocol {major}.{minor}: {_SUPPORTED_PROTOCOLS}"
        # Below 3.0 the postmaster answers in the old protocol's format: 'E', then text.
        reply = (wire.protocol2_error(message) if major < wire.PROTOCOL_MAJOR
                 else wire.error_response(wire.FEATURE_NOT_SUPPORTED, message))
        raise StartupRefused(message, reply)
    return StartupPacket("startup", raw, code, parameters=_startup_parameters(raw[8:])), length


def _startup_parameters(body: bytes) -> dict[str, str]:
    """StartupMessage parameters: (name cstring, value cstring)* then a zero byte."""
    parts = body.split(b"\0")
    params: dict[str, str] = {}
    for i in range(0, len(parts) - 1, 2):
        name = parts[i]
        if not name:
            break
        params[name.decode("utf-8", "replace")] = parts[i + 1].decode("utf-8", "replace")
    return params
