"""Property tests through a real pgscout in front of a real PostgreSQL: garbage after a valid
startup, conversations cut short, and any chunking of a valid conversation, over raw sockets.

Owns: what a broken or unusual client can do to the proxy process and to the other sessions
(nothing: the proxy answers or closes, never crashes, never leaks a session), and how the
`pgscout_decoder_desyncs` and `pgscout_startup_errors` counters move.
Must not: restate the sans-IO chunking properties (test_decoder/test_framer feed bytes without a
network) or the fixed hostile startup packets of test_protocol_edges.
"""

from __future__ import annotations

import re
import socket
import struct
import time

import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wirebuild as w
from pgharness import APP_DATABASE, wait_until

PROPERTY_SETTINGS = settings(max_examples=75, deadline=None, derandomize=True,
                             suppress_health_check=[HealthCheck.too_slow,
                                                    HealthCheck.function_scoped_fixture])
# A garbage example ends when the peer closes or says nothing for this long.
QUIET_SECONDS = 0.3


def _message(type_byte: bytes, body: bytes) -> bytes:
    return type_byte + struct.pack("!i", len(body) + 4) + body


def _startup(**params: str) -> bytes:
    body = struct.pack("!i", 3 << 16) + b"".join(
        key.encode() + b"\0" + value.encode() + b"\0" for key, value in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def _split_messages(data: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Typed backend messages in `data`, and whatever trails the last whole one."""
    messages = []
    pos = 0
    while len(data) - pos >= 5:
        length = struct.unpack_from("!i", data, pos + 1)[0]
        if length < 4 or len(data) - pos < 1 + length:
            break
        messages.append((data[pos:pos + 1], data[pos + 5:pos + 1 + length]))
        pos += 1 + length
    return messages, data[pos:]


def _metric(proxy, name: str, **labels: str) -> float:
    status, body = proxy.admin_get("/metrics")
    assert status == 200, body
    total = 0.0
    for match in re.finditer(rf"^{re.escape(name)}(?:\{{([^}}]*)\}})? (\S+)$", body, re.MULTILINE):
        if all(f'{key}="{value}"' in (match.group(1) or "") for key, value in labels.items()):
            total += float(match.group(2))
    return total


def _sessions(proxy) -> float:
    return _metric(proxy, "pgscout_client_connections")


@pytest.fixture(scope="module")
def bystander(pgscout):
    with psycopg.connect(pgscout.dsn("trust_user", APP_DATABASE), autocommit=True) as conn:
        yield conn


def _unharmed(proxy, bystander) -> None:
    """The proxy process lives, the session under test is gone, and another session works."""
    assert proxy.process.poll() is None, proxy.output()
    assert bystander.execute("select 41 + 1").fetchone() == (42,)
    assert wait_until(lambda: _sessions(proxy) == 1, timeout=5), "a closed session is still counted"


def _logged_in(proxy, application_name: str) -> socket.socket:
    sock = socket.create_connection((proxy.host, proxy.port), timeout=10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(_startup(user="trust_user", database=APP_DATABASE, application_name=application_name))
    received = b""
    while not _split_messages(received)[0] or _split_messages(received)[0][-1][0] != b"Z":
        chunk = sock.recv(65536)
        assert chunk, received
        received += chunk
    return sock


# -- garbage and cut-short conversations ---------------------------------------------------------

@PROPERTY_SETTINGS
@given(garbage=st.one_of(
    st.binary(min_size=1, max_size=600),
    # A plausible type byte in front makes the bytes reach the decoder instead of only the server.
    st.builds(lambda type_byte, rest: type_byte + rest,
              st.sampled_from([b"Q", b"P", b"B", b"E", b"C", b"S", b"D", b"H", b"F", b"d", b"c"]),
              st.binary(max_size=600)),
))
def test_garbage_after_startup_gets_an_answer_or_a_close_and_harms_no_one(pgscout, bystander, garbage):
    desyncs_before = _metric(pgscout, "pgscout_decoder_desyncs_total")
    with _logged_in(pgscout, "fuzz-garbage") as sock:
        sock.sendall(garbage)
        received, _closed = w.read_until_closed_or_quiet(sock, QUIET_SECONDS)
        # Whatever came back is whole backend messages: pgscout never cuts or interleaves them.
        _messages, trailing = _split_messages(received)
        assert trailing == b"", received
    _unharmed(pgscout, bystander)
    assert _metric(pgscout, "pgscout_decoder_desyncs_total") - desyncs_before in (0, 1), (
        "a session desyncs at most once")


CONVERSATION = b"".join([
    _message(b"Q", b"select 1 as a; select 'two' as b\0"),
    _message(b"P", b"s1\0select $1::int * 2\0\0\0"),
    _message(b"B", b"\0s1\0\0\0\0\x01\0\0\0\x0221\0\0"),
    _message(b"D", b"P\0"),
    _message(b"E", b"\0\0\0\0\0"),
    _message(b"S", b""),
    _message(b"Q", b"select generate_series(1, 3)\0"),
])
CONVERSATION_STATEMENTS = 3  # the two-statement Query counts once: it is reported whole
TERMINATE = _message(b"X", b"")


@PROPERTY_SETTINGS
@given(cut=st.integers(min_value=1, max_value=len(CONVERSATION) - 1), abrupt=st.booleans())
def test_a_conversation_cut_short_closes_its_session_cleanly(pgscout, bystander, cut, abrupt):
    with _logged_in(pgscout, "fuzz-cut") as sock:
        sock.sendall(CONVERSATION[:cut])
        if abrupt:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            sock.shutdown(socket.SHUT_WR)  # half-close: pgscout ends the whole session
            w.read_until_closed_or_quiet(sock, 5)
    _unharmed(pgscout, bystander)


# -- any chunking --------------------------------------------------------------------------------

def _pieces(stream: bytes, cuts: set[int]) -> list[bytes]:
    bounds = sorted(cut for cut in cuts if 0 < cut < len(stream))
    return [stream[start:end] for start, end in zip([0, *bounds], [*bounds, len(stream)])]


def _send(sock: socket.socket, pieces: list[bytes], pause: bool) -> None:
    for piece in pieces:
        sock.sendall(piece)
        if pause:
            time.sleep(0.002)  # let each piece arrive as a read of its own


def _converse(proxy, application_name: str, startup_cuts: set[int], conversation_cuts: set[int],
              pause: bool, wait_for_ready: bool = True) -> list[tuple[bytes, bytes]]:
    """Start up and hold CONVERSATION, each cut into pieces sent one by one; the replies after
    startup. Like every driver, wait for the startup's ReadyForQuery unless told otherwise."""
    startup = _startup(user="trust_user", database=APP_DATABASE, application_name=application_name)
    with socket.create_connection((proxy.host, proxy.port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _send(sock, _pieces(startup, startup_cuts), pause)
        if wait_for_ready:
            received = b""
            while not received.endswith(_message(b"Z", b"I")):
                received += sock.recv(65536)
        _send(sock, _pieces(CONVERSATION + TERMINATE, conversation_cuts), pause)
        received, closed = w.read_until_closed_or_quiet(sock, 10)
    assert closed, "the session did not end after Terminate"
    messages, trailing = _split_messages(received)
    assert trailing == b""
    if not wait_for_ready:
        messages = messages[next(i for i, (t, _) in enumerate(messages) if t == b"Z") + 1:]
    return messages


@pytest.fixture(scope="module")
def reference_replies(pgscout):
    replies = _converse(pgscout, "fuzz-reference", set(), set(), pause=False)
    assert [t for t, _ in replies].count(b"Z") == 3 and b"E" not in [t for t, _ in replies], replies
    return replies


cut_positions = st.sets(st.integers(min_value=1, max_value=len(CONVERSATION) + 4), max_size=40)


@PROPERTY_SETTINGS
@given(startup_cuts=st.sets(st.integers(min_value=1, max_value=60), max_size=8),
       conversation_cuts=cut_positions, pause=st.booleans())
def test_any_chunking_of_a_conversation_gets_the_same_replies_and_the_same_statements(
        pgscout, bystander, reference_replies, startup_cuts, conversation_cuts, pause):
    statements_before = _metric(pgscout, "pgscout_statements_total", application="fuzz-chunks")
    desyncs_before = _metric(pgscout, "pgscout_decoder_desyncs_total")

    assert _converse(pgscout, "fuzz-chunks", startup_cuts, conversation_cuts, pause) == reference_replies

    _unharmed(pgscout, bystander)
    assert _metric(pgscout, "pgscout_statements_total", application="fuzz-chunks") \
        == statements_before + CONVERSATION_STATEMENTS
    assert _metric(pgscout, "pgscout_decoder_desyncs_total") == desyncs_before


def test_statements_sent_before_the_startup_ready_for_query_are_counted(pgscout, bystander, reference_replies):
    statements_before = _metric(pgscout, "pgscout_statements_total", application="fuzz-eager")
    desyncs_before = _metric(pgscout, "pgscout_decoder_desyncs_total")

    # The server reads them once startup is done: the bytes on the wire are right either way.
    assert _converse(pgscout, "fuzz-eager", set(), set(), pause=False, wait_for_ready=False) == reference_replies

    _unharmed(pgscout, bystander)
    assert _metric(pgscout, "pgscout_decoder_desyncs_total") == desyncs_before
    assert _metric(pgscout, "pgscout_statements_total", application="fuzz-eager") \
        == statements_before + CONVERSATION_STATEMENTS


# -- the counters --------------------------------------------------------------------------------

def test_an_undecodable_message_desyncs_the_session_once_and_traffic_still_flows(pgscout, bystander):
    """A Parse without its terminators frames fine but cannot be decoded: the session is
    marked desynced, and the server, which received the bytes unchanged, judges them."""
    desyncs_before = _metric(pgscout, "pgscout_decoder_desyncs_total")
    with _logged_in(pgscout, "fuzz-desync") as sock:
        sock.sendall(_message(b"P", b"no terminators here") + _message(b"S", b""))
        sock.sendall(_message(b"Q", b"select 'still flowing'\0") + TERMINATE)
        received, closed = w.read_until_closed_or_quiet(sock, 5)
    messages, _ = _split_messages(received)
    assert closed and [t for t, _ in messages] == [b"E", b"Z", b"T", b"D", b"C", b"Z"], messages
    assert b"C08P01" in messages[0][1], messages  # the server's own protocol_violation
    assert messages[3][1].endswith(b"still flowing")
    _unharmed(pgscout, bystander)
    assert _metric(pgscout, "pgscout_decoder_desyncs_total") == desyncs_before + 1


@PROPERTY_SETTINGS
@given(length=st.one_of(st.integers(min_value=-2**31, max_value=7),
                        st.integers(min_value=10005, max_value=2**31 - 1))
       # 0x16 first is a TLS ClientHello, closed without a reply (test_protocol_edges covers it).
       .filter(lambda length: length >> 24 != 0x16),
       rest=st.binary(min_size=4, max_size=64))
def test_a_startup_packet_with_an_impossible_length_counts_one_startup_error(pgscout, bystander, length, rest):
    errors_before = _metric(pgscout, "pgscout_startup_errors_total")
    with socket.create_connection((pgscout.host, pgscout.port), timeout=10) as sock:
        sock.sendall(struct.pack("!i", length) + rest)
        received, closed = w.read_until_closed_or_quiet(sock, 5)
    # As the postmaster ("invalid length of startup packet", logged only): closed, no reply.
    assert closed and received == b"", received
    _unharmed(pgscout, bystander)
    assert _metric(pgscout, "pgscout_startup_errors_total") == errors_before + 1
