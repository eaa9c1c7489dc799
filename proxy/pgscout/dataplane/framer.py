"""Sans-IO message framing for one direction of a PostgreSQL connection.

Owns: splitting a byte stream into messages (the untyped startup packets, then typed messages:
one type byte, an int32 length that counts itself, the body), carrying partial headers and bodies
across reads, and enforcing the maximum message length.
Must not: interpret message bodies (decoder.py does), copy the bodies of messages nobody decodes
(DataRow, CopyData: their bytes are skipped by count), or touch sockets.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from pgscout.dataplane import wire

_HEADER: Final = struct.Struct("!Bi")
_INT32: Final = struct.Struct("!i")
_DATA_ROW: Final = wire.B_DATA_ROW

# Bodies longer than this are delivered cut to this many bytes (flagged incomplete): the decoder
# needs the names and SQL at the front of a Bind or Query, never 100 MB of bytea behind them.
DECODE_LIMIT: Final = 1 << 20
# PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
MAX_STARTUP_PACKET: Final = 10000

Handler = Callable[[bytes, bool], None]


class FramingError(Exception):
    """The stream cannot be framed (bad or oversized length field): the session must end."""


class Framer:
    """Walks typed messages and hands the ones in `handlers` to their handler.

    A handler is called as `handler(body, complete)`; `complete` is false when the body was longer
    than DECODE_LIMIT and only its first DECODE_LIMIT bytes are given. Messages whose type has no
    handler are skipped without copying; `data_rows` counts skipped DataRow messages so the
    decoder can count rows of suspended portals without ever seeing a row.
    """

    __slots__ = ("_handlers", "_table", "_max_length", "_skip", "_head", "_type", "_body", "_want",
                 "_after", "data_rows")

    def __init__(self, handlers: Mapping[int, Handler], max_length: int = wire.DEFAULT_MAX_MESSAGE_LENGTH):
        self._handlers = dict(handlers)
        self._table: list[Handler | None] = [self._handlers.get(typ) for typ in range(256)]
        self._max_length = max_length
        self._skip = 0  # bytes of a skipped message still to come
        self._head = b""  # a header cut by a read boundary (fewer than 5 bytes)
        self._type = 0  # type of the body being collected
        self._body: bytearray | None = None  # body being collected across reads
        self._want = 0  # bytes still to collect into _body
        self._after = 0  # bytes to skip once _body is delivered (over DECODE_LIMIT)
        self.data_rows = 0

    def feed(self, data: bytes) -> None:
        end = len(data)
        pos = 0
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

        table = self._table
        unpack = _HEADER.unpack_from
        max_length = self._max_length
        rows = 0
        # Declared because struct returns Any: compiled, int arithmetic on them is then native.
        typ: int
        length: int
        while end - pos >= 5:
            typ, length = unpack(data, pos)
            if length < 4 or length > max_length:
                self.data_rows += rows
                raise FramingError(_bad_length(typ, length, max_length))
            msg_end = pos + 1 + length
            handler = table[typ]
            if handler is None:
                # The common case by far in a large result: count a DataRow, skip its body.
                if typ == _DATA_ROW:
                    rows += 1
                if msg_end > end:
                    self._skip = msg_end - end
                    self.data_rows += rows
                    return
                pos = msg_end
            elif msg_end <= end and length <= DECODE_LIMIT + 4:
                if rows:
                    self.data_rows += rows  # the handler may read the count
                    rows = 0
                handler(data[pos + 5:msg_end], True)
                pos = msg_end
            else:
                self.data_rows += rows
                rows = 0
                pos = self._begin(data, pos, data, pos + 5)
        self.data_rows += rows
        if pos < end:
            self._head = data[pos:]

    def _begin(self, header: bytes, hpos: int, data: bytes, pos: int) -> int:
        """Start on the message whose header is at header[hpos:hpos+5]; its body starts at data[pos]."""
        typ: int
        length: int
        typ, length = _HEADER.unpack_from(header, hpos)
        if length < 4 or length > self._max_length:
            raise FramingError(_bad_length(typ, length, self._max_length))
        body_len = length - 4
        handler = self._handlers.get(typ)
        if handler is None:
            if typ == _DATA_ROW:
                self.data_rows += 1
            available = len(data) - pos
            if body_len > available:
                self._skip = body_len - available
                return len(data)
            return pos + body_len
        self._type = typ
        self._body = bytearray()
        self._want = min(body_len, DECODE_LIMIT)
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
        self._handlers[self._type](bytes(body), complete)
        if self._after:
            available = len(data) - pos
            if self._after > available:
                self._skip = self._after - available
                self._after = 0
                return len(data)
            pos += self._after
            self._after = 0
        return pos


def _bad_length(typ: int, length: int, limit: int) -> str:
    kind = chr(typ) if 32 < typ < 127 else f"0x{typ:02x}"
    if length < 4:
        return f"message {kind!r} has an invalid length {length}"
    return f"message {kind!r} declares {length} bytes, over the {limit}-byte limit"


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


def parse_startup_packet(buf: bytes | bytearray) -> tuple[StartupPacket | None, int]:
    """Frame one startup-phase packet from the front of `buf`.

    Returns (packet, bytes consumed), or (None, 0) when more bytes are needed.
    Raises FramingError for a length outside 8..10000 or a StartupMessage that is not protocol 3.
    """
    if len(buf) < 8:
        return None, 0
    length, code = struct.unpack_from("!ii", buf, 0)
    if length < 8 or length > MAX_STARTUP_PACKET:
        raise FramingError(f"startup packet has an invalid length {length}")
    if len(buf) < length:
        return None, 0
    raw = bytes(buf[:length])
    if code == wire.SSL_REQUEST_CODE:
        return StartupPacket("ssl", raw, code), length
    if code == wire.GSSENC_REQUEST_CODE:
        return StartupPacket("gssenc", raw, code), length
    if code == wire.CANCEL_REQUEST_CODE:
        if length < 16:
            raise FramingError(f"CancelRequest has an invalid length {length}")
        pid = _INT32.unpack_from(raw, 8)[0]
        return StartupPacket("cancel", raw, code, cancel_pid=pid, cancel_key=raw[12:]), length
    if code >> 16 != wire.PROTOCOL_MAJOR:
        raise FramingError(f"unsupported frontend protocol {code >> 16}.{code & 0xFFFF}: "
                           f"pgscout and PostgreSQL speak 3.x")
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
