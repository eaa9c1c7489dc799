"""Framer and startup-packet parsing, fed bytes directly (no network, no decoder).

Owns: checking that every message reaches its handler with the exact body whatever the read
boundaries, that skipped messages are skipped (and DataRows counted), that oversized bodies are cut
without losing the stream, and that bad lengths end the stream with FramingError and nothing else.
Must not: test the meaning of messages (test_decoder.py does).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import wirebuild as w
from pgscout.dataplane.framer import (DECODE_LIMIT, MAX_STARTUP_PACKET, Framer, FramingError, MessageSink,
                                      StartupRefused, parse_startup_packet)

# The types the decoder handles in each direction; everything else must be skipped unread.
CLIENT_DECODED = b"QPBDECSF"
SERVER_DECODED = b"123tTnCIsEZKS"


class Recorder(MessageSink):
    """A sink that records (type, body, complete) in arrival order, and the Framer feeding it."""

    def __init__(self, decoded: bytes, max_length: int | None = None):
        self.calls: list[tuple[str, bytes, bool]] = []
        self.framer = (Framer(self, decoded) if max_length is None else Framer(self, decoded, max_length))

    def message(self, typ: int, data: bytes, start: int, end: int, complete: bool) -> None:
        assert isinstance(data, bytes) and 0 <= start <= end <= len(data)
        self.calls.append((chr(typ), data[start:end], complete))

    def feed_chunks(self, chunks) -> Recorder:
        for chunk in chunks:
            self.framer.feed(chunk)
        return self


def one_byte_at_a_time(data: bytes) -> list[bytes]:
    return [data[i:i + 1] for i in range(len(data))]


def cut(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    return [data[a:b] for a, b in zip(points, points[1:])]


CLIENT_STREAM = b"".join([
    w.password(b"md5secret"),
    w.query("select 1"),
    w.parse("s1", "select $1::int", (23,)),
    w.bind("p1", "s1", [b"42", None], (0,), (1,)),
    w.describe("P", "p1"),
    w.execute("p1", 10),
    w.flush(),
    w.close("S", "s1"),
    w.sync(),
    w.query("copy t from stdin"),
    w.copy_data(b"1\tone\n"),
    w.copy_data(b""),
    w.copy_done(),
    w.copy_fail("stop"),
    w.terminate(),
])

CLIENT_CALLS = [
    ("Q", b"select 1\0", True),
    ("P", b"s1\0select $1::int\0\0\x01\0\0\0\x17", True),
    ("B", b"p1\0s1\0\0\x01\0\0\0\x02\0\0\0\x0242\xff\xff\xff\xff\0\x01\0\x01", True),
    ("D", b"Pp1\0", True),
    ("E", b"p1\0\0\0\0\x0a", True),
    ("C", b"Ss1\0", True),
    ("S", b"", True),
    ("Q", b"copy t from stdin\0", True),
]

SERVER_STREAM = b"".join([
    w.auth_cleartext_password(),
    w.auth_ok(),
    w.parameter_status("application_name", "app"),
    w.backend_key_data(1234, b"\x01\x02\x03\x04"),
    w.ready_for_query("I"),
    w.row_description(2),
    w.data_row([b"1", None]),
    w.data_row([b"2", b"two"]),
    w.data_row([]),
    w.command_complete("SELECT 3"),
    w.notice_response("hello"),
    w.notification(99, "chan", "payload"),
    w.parse_complete(),
    w.parameter_description(1),
    w.no_data(),
    w.bind_complete(),
    w.portal_suspended(),
    w.close_complete(),
    w.empty_query_response(),
    w.copy_out_response(2),
    w.copy_data(b"1\tone\n"),
    w.copy_data(b"2\ttwo\n"),
    w.copy_done(),
    w.copy_in_response(),
    w.error_response("42P01", "no such table"),
    w.ready_for_query("E"),
])

SERVER_CALLS = [
    ("S", b"application_name\0app\0", True),
    ("K", b"\0\0\x04\xd2\x01\x02\x03\x04", True),
    ("Z", b"I", True),
    ("T", w.row_description(2)[5:], True),
    ("C", b"SELECT 3\0", True),
    ("1", b"", True),
    ("t", b"\0\x01\0\0\0\x17", True),
    ("n", b"", True),
    ("2", b"", True),
    ("s", b"", True),
    ("3", b"", True),
    ("I", b"", True),
    ("E", b"SERROR\0VERROR\0C42P01\0Mno such table\0\0", True),
    ("Z", b"E", True),
]


# -- delivery ------------------------------------------------------------------------------------
def test_client_messages_reach_their_handlers_and_the_rest_is_skipped():
    recorder = Recorder(CLIENT_DECODED).feed_chunks([CLIENT_STREAM])
    assert recorder.calls == CLIENT_CALLS
    assert recorder.framer.data_rows == 0


def test_server_messages_reach_their_handlers_and_data_rows_are_counted():
    recorder = Recorder(SERVER_DECODED).feed_chunks([SERVER_STREAM])
    assert recorder.calls == SERVER_CALLS
    assert recorder.framer.data_rows == 3


def test_data_row_with_a_handler_is_delivered_not_counted():
    recorder = Recorder(b"D").feed_chunks([w.data_row([b"x"]) * 2])
    assert recorder.calls == [("D", b"\0\x01\0\0\0\x01x", True)] * 2
    assert recorder.framer.data_rows == 0


def test_data_row_count_accumulates_until_the_owner_resets_it():
    recorder = Recorder(SERVER_DECODED)
    recorder.feed_chunks([w.data_row([b"1"]) * 4])
    recorder.framer.data_rows = 0
    recorder.feed_chunks([w.data_row([b"1"]) * 2 + w.command_complete("SELECT 6")])
    assert recorder.framer.data_rows == 2


@pytest.mark.parametrize("stream, decoded", [(CLIENT_STREAM, CLIENT_DECODED),
                                             (SERVER_STREAM, SERVER_DECODED)], ids=["client", "server"])
def test_one_byte_at_a_time_frames_like_whole(stream, decoded):
    whole = Recorder(decoded).feed_chunks([stream])
    split = Recorder(decoded).feed_chunks(one_byte_at_a_time(stream))
    assert split.calls == whole.calls
    assert split.framer.data_rows == whole.framer.data_rows


def test_empty_reads_change_nothing():
    recorder = Recorder(SERVER_DECODED)
    chunks = []
    for piece in cut(SERVER_STREAM, [3, 7, 40, 41, 200]):
        chunks += [b"", piece, b""]
    recorder.feed_chunks(chunks)
    assert recorder.calls == SERVER_CALLS
    assert recorder.framer.data_rows == 3


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(["client", "server"]),
       st.lists(st.integers(min_value=0, max_value=10_000), max_size=40))
def test_any_chunking_frames_like_whole(direction, cuts):
    stream, decoded, expected = ((CLIENT_STREAM, CLIENT_DECODED, CLIENT_CALLS) if direction == "client"
                                 else (SERVER_STREAM, SERVER_DECODED, SERVER_CALLS))
    recorder = Recorder(decoded).feed_chunks(cut(stream, cuts))
    assert recorder.calls == expected
    assert recorder.framer.data_rows == (0 if direction == "client" else 3)


# -- bodies over DECODE_LIMIT --------------------------------------------------------------------
BIG_SQL = "select '" + "x" * (DECODE_LIMIT + 100) + "'"
BIG_STREAM = w.query(BIG_SQL) + w.sync() + w.copy_data(b"y" * (DECODE_LIMIT * 2)) + w.query("select 2")
BIG_CALLS = [
    ("Q", BIG_SQL.encode()[:DECODE_LIMIT], False),
    ("S", b"", True),
    ("Q", b"select 2\0", True),
]


def test_oversized_body_is_cut_and_the_stream_after_it_still_frames():
    recorder = Recorder(CLIENT_DECODED).feed_chunks([BIG_STREAM])
    assert recorder.calls == BIG_CALLS


def test_oversized_body_one_byte_at_a_time():
    recorder = Recorder(CLIENT_DECODED).feed_chunks(one_byte_at_a_time(BIG_STREAM))
    assert recorder.calls == BIG_CALLS


def test_oversized_data_row_is_skipped_and_counted():
    stream = (w.data_row([b"y" * (DECODE_LIMIT * 2)]) + w.data_row([b"1"])
              + w.command_complete("SELECT 2"))
    for chunks in ([stream], cut(stream, [3, 9, DECODE_LIMIT, DECODE_LIMIT * 2 + 11])):
        recorder = Recorder(SERVER_DECODED).feed_chunks(chunks)
        assert recorder.calls == [("C", b"SELECT 2\0", True)]
        assert recorder.framer.data_rows == 2


@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(BIG_STREAM)), max_size=8))
def test_oversized_body_any_chunking(cuts):
    recorder = Recorder(CLIENT_DECODED).feed_chunks(cut(BIG_STREAM, cuts))
    assert recorder.calls == BIG_CALLS


def test_body_of_exactly_decode_limit_is_complete():
    body = b"q" * (DECODE_LIMIT - 1) + b"\0"
    stream = w.typed(b"Q", body) + w.sync()
    for chunks in ([stream], cut(stream, [1, 5, 6, DECODE_LIMIT, DECODE_LIMIT + 5])):
        recorder = Recorder(CLIENT_DECODED).feed_chunks(chunks)
        assert recorder.calls == [("Q", body, True), ("S", b"", True)]


# -- bad lengths -------------------------------------------------------------------------------
@pytest.mark.parametrize("length", [-1, 0, 3, -(2 ** 31)])
def test_length_below_four_raises(length):
    bad = b"Q" + struct.pack("!i", length)
    with pytest.raises(FramingError):
        Recorder(CLIENT_DECODED).feed_chunks([w.sync() + bad])
    with pytest.raises(FramingError):  # header split across reads
        Recorder(CLIENT_DECODED).feed_chunks([w.sync() + bad[:2], bad[2:]])
    with pytest.raises(FramingError):  # a skipped type is checked too
        Recorder(CLIENT_DECODED).feed_chunks([b"d" + bad[1:]])


def test_a_message_over_max_length_is_delivered_cut_and_framing_goes_on():
    """proxy.max_message_bytes limits what is decoded, never the stream: the message after an
    oversized one frames as usual, whatever the chunking."""
    at_limit = w.typed(b"Q", b"x" * 95 + b"\0")  # length field 100
    over = w.typed(b"Q", b"y" * 96 + b"\0")  # length field 101
    skipped = w.typed(b"d", b"z" * 500)  # no handler: skipped whole, whatever its length
    stream = at_limit + over + skipped + w.sync()
    expected = [("Q", b"x" * 95 + b"\0", True), ("Q", b"y" * 96, False), ("S", b"", True)]
    for chunks in ([stream], one_byte_at_a_time(stream), cut(stream, [3, 101, 150, 190])):
        assert Recorder(CLIENT_DECODED, max_length=100).feed_chunks(chunks).calls == expected


def test_a_length_over_what_postgresql_accepts_raises_whatever_max_length():
    header = b"d" + struct.pack("!i", (1 << 30) + 1)
    for max_length in (None, 100):
        with pytest.raises(FramingError):
            Recorder(CLIENT_DECODED, max_length).feed_chunks([header])
        Recorder(CLIENT_DECODED, max_length).feed_chunks([b"d" + struct.pack("!i", 1 << 30)])


def _feed_until_error(decoded: bytes, chunks: list[bytes]) -> tuple[list, bool]:
    recorder = Recorder(decoded, max_length=1 << 16)
    try:
        recorder.feed_chunks(chunks)
    except FramingError:
        return recorder.calls, True
    return recorder.calls, False


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([CLIENT_DECODED, SERVER_DECODED]), st.binary(max_size=300),
       st.lists(st.integers(min_value=0, max_value=300), max_size=20))
def test_arbitrary_bytes_frame_or_raise_framing_error_whatever_the_chunking(decoded, data, cuts):
    # Anything other than FramingError propagates and fails the test.
    whole = _feed_until_error(decoded, [data])
    assert _feed_until_error(decoded, cut(data, cuts)) == whole
    assert _feed_until_error(decoded, one_byte_at_a_time(data)) == whole


# -- startup packets -----------------------------------------------------------------------------
def test_ssl_request():
    packet, used = parse_startup_packet(w.ssl_request() + w.startup({"user": "u"}))
    assert (packet.kind, packet.raw, used) == ("ssl", w.ssl_request(), 8)


def test_gssenc_request():
    packet, used = parse_startup_packet(w.gssenc_request())
    assert (packet.kind, packet.raw, used) == ("gssenc", w.gssenc_request(), 8)


def test_cancel_request_with_four_byte_key():
    raw = w.cancel_request(4242, b"\xde\xad\xbe\xef")
    packet, used = parse_startup_packet(raw)
    assert (packet.kind, packet.cancel_pid, packet.cancel_key, packet.raw, used) == (
        "cancel", 4242, b"\xde\xad\xbe\xef", raw, 16)


def test_cancel_request_with_protocol_3_2_long_key():
    key = bytes(range(32))
    raw = w.cancel_request(77, key)
    packet, used = parse_startup_packet(raw + b"trailing")
    assert (packet.kind, packet.cancel_pid, packet.cancel_key, packet.raw, used) == (
        "cancel", 77, key, raw, 44)


def test_cancel_request_too_short_raises():
    with pytest.raises(FramingError):
        parse_startup_packet(w.cancel_request(1, b""))


@pytest.mark.parametrize("version", [(3, 0), (3, 2)])
def test_startup_message_keeps_parameters_and_protocol_options(version):
    params = {"user": "alice", "database": "shop", "application_name": "web",
              "_pq_.some_option": "on", "options": "-c search_path=x"}
    raw = w.startup(params, version)
    packet, used = parse_startup_packet(bytearray(raw + w.query("select 1")))
    assert packet.kind == "startup"
    assert packet.protocol == version
    assert packet.parameters == params
    assert packet.raw == raw
    assert used == len(raw)


def test_startup_message_with_non_ascii_values():
    params = {"user": "jos\u00e9", "application_name": "\u30a2\u30d7\u30ea"}
    packet, _ = parse_startup_packet(w.startup(params))
    assert packet.parameters == params


def test_partial_startup_packets_need_more_bytes():
    raw = w.startup({"user": "alice", "database": "shop"})
    for end in range(len(raw)):
        assert parse_startup_packet(raw[:end]) == (None, 0)
    packet, used = parse_startup_packet(raw)
    assert used == len(raw)


@pytest.mark.parametrize("length", [0, 4, 7, MAX_STARTUP_PACKET + 1, -8])
def test_startup_packet_with_bad_length_raises(length):
    with pytest.raises(FramingError):
        parse_startup_packet(struct.pack("!ii", length, 196608))


def test_startup_packet_of_the_maximum_length_is_accepted():
    raw = w.startup({"user": "u", "options": "x" * (MAX_STARTUP_PACKET - 30)})
    raw = raw[:-2] + b"x" * (MAX_STARTUP_PACKET - len(raw)) + raw[-2:]
    raw = struct.pack("!i", len(raw)) + raw[4:]
    assert len(raw) == MAX_STARTUP_PACKET
    packet, used = parse_startup_packet(raw)
    assert (packet.kind, used) == ("startup", MAX_STARTUP_PACKET)


@pytest.mark.parametrize("garbage", [b"X\0\0\0\x04", b"hello", b"GET / HTTP/1.1\r\n"])
def test_a_bad_length_is_refused_silently_once_four_bytes_are_in(garbage):
    """The postmaster judges the length word alone: Terminate before a StartupMessage (what
    node-postgres sends on connect() then end()) or 5 bytes of text need no more bytes."""
    assert parse_startup_packet(garbage[:3]) == (None, 0)
    with pytest.raises(StartupRefused) as refused:
        parse_startup_packet(garbage[:4])
    assert refused.value.reply == b""


@pytest.mark.parametrize("length", [12, 15, 12 + 256 + 1])
def test_a_cancel_request_of_a_bad_length_is_refused_silently(length):
    packet = struct.pack("!ii", length, 80877102) + b"\0" * (length - 8)
    with pytest.raises(StartupRefused) as refused:
        parse_startup_packet(packet)
    assert refused.value.reply == b""


def test_a_second_ssl_or_gssenc_request_is_an_unknown_protocol_as_for_the_postmaster():
    with pytest.raises(StartupRefused, match="1234.5679") as refused:
        parse_startup_packet(w.ssl_request(), ssl_done=True)
    assert b"C0A000\0" in refused.value.reply
    with pytest.raises(StartupRefused, match="1234.5680"):
        parse_startup_packet(w.gssenc_request(), gss_done=True)
    assert parse_startup_packet(w.gssenc_request(), ssl_done=True)[0].kind == "gssenc"


def test_protocol_2_startup_raises():
    with pytest.raises(FramingError, match="2.0"):
        parse_startup_packet(w.startup({"user": "u"}, (2, 0)))
