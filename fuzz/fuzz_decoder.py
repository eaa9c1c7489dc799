"""Coverage-guided fuzzing (atheris/libFuzzer) of the sans-IO decoder: both directions, any
bytes, any chunking.

Owns: the input format below, the seed conversations, and two properties checked on every input:
feeding the decoder never hangs or raises anything but an Exception (pipe.py turns those into a
desynced session, so they are not crashes), and splitting the same bytes differently yields the
same events, the same session state and the same failure (the framer's carry-over is exact).
Must not: open sockets or import anything from the proxy beyond the sans-IO core.

Input: records until the input ends, each
    header (1 byte: bit 7 set = from the server, low 7 bits = number of cut points n)
    length (2 bytes, big-endian), data (length bytes), cuts (n bytes, positions modulo length).

Run (from the repository root):
    python fuzz/fuzz_decoder.py --seed fuzz/corpus          # (re)write the seed conversations
    mkdir -p /tmp/fuzz-work                                 # libFuzzer adds new inputs to the first dir
    python fuzz/fuzz_decoder.py /tmp/fuzz-work fuzz/corpus -max_total_time=300 -timeout=5 -rss_limit_mb=1024
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import atheris

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO_ROOT), str(REPO_ROOT / "tests")]

with atheris.instrument_imports():
    from pgscout.dataplane.decoder import Decoder
    from pgscout.dataplane.events import Session

import wirebuild as wb  # noqa: E402 - needs the path set above

FROM_SERVER = 0x80
# Messages far over what a record holds are not needed: the framer's limit is tested elsewhere.
MAX_MESSAGE_LENGTH = 1 << 16


def records(data: bytes) -> list[tuple[bool, bytes, list[int]]]:
    """(from_server, bytes, sorted cut points) for each whole record of the input."""
    out = []
    pos = 0
    while len(data) - pos >= 3:
        header = data[pos]
        length = int.from_bytes(data[pos + 1:pos + 3], "big")
        body = data[pos + 3:pos + 3 + length]
        n_cuts = header & 0x7F
        cut_bytes = data[pos + 3 + length:pos + 3 + length + n_cuts]
        pos += 3 + length + n_cuts
        cuts = sorted({c % len(body) for c in cut_bytes if body and c % len(body)})
        out.append((bool(header & FROM_SERVER), body, cuts))
    return out


def replay(recs: list[tuple[bool, bytes, list[int]]], split: bool) -> tuple[list, tuple, str]:
    """Feed the records whole or cut; returns (events, final session state, failure)."""
    events: list = []
    session = Session(conn_id=1, client_addr="fuzz")
    decoder = Decoder(session, events.append, max_message_length=MAX_MESSAGE_LENGTH,
                      keep_parameters=True)
    failure = ""
    try:
        for index, (from_server, body, cuts) in enumerate(recs):
            feed = decoder.server_data if from_server else decoder.client_data
            pieces = ([body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)])] if split else [body])
            for piece in pieces:
                feed(piece, float(index))
        decoder.close()
    except Exception as exc:  # noqa: BLE001 - any Exception is a desync, the property is sameness
        failure = type(exc).__name__
    return [_plain(event) for event in events], _plain(session), failure


def _plain(obj) -> tuple:
    """An event or the session as comparable values, the Session back-reference left out."""
    return (type(obj).__name__,) + tuple(
        (f.name, getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.name != "session")


def test_one_input(data: bytes) -> None:
    recs = records(data)
    whole = replay(recs, split=False)
    cut = replay(recs, split=True)
    if whole != cut:
        raise AssertionError(f"chunking changed the outcome:\nwhole: {whole}\ncut:   {cut}")


def seed_conversations() -> dict[str, list[tuple[bool, bytes]]]:
    """Valid conversations from the protocol docs' message flows, one record per message."""
    ready = [(True, wb.auth_ok()), (True, wb.backend_key_data(4242, b"\x01\x02\x03\x04")),
             (True, wb.parameter_status("application_name", "fuzz")), (True, wb.ready_for_query("I"))]
    return {
        "simple_query": ready + [
            (False, wb.query("select 1; select 2")),
            (True, wb.row_description(1) + wb.data_row([b"1"]) + wb.command_complete("SELECT 1")),
            (True, wb.row_description(1) + wb.data_row([b"2"]) + wb.command_complete("SELECT 1")),
            (True, wb.ready_for_query("I"))],
        "extended": ready + [
            (False, wb.parse("s1", "select $1::int", (23,)) + wb.bind("", "s1", [b"7"])
             + wb.describe("P", "") + wb.execute("", 0) + wb.sync()),
            (True, wb.parse_complete() + wb.bind_complete() + wb.row_description(1)
             + wb.data_row([b"7"]) + wb.command_complete("SELECT 1") + wb.ready_for_query("I"))],
        "error_in_transaction": ready + [
            (False, wb.query("begin")), (True, wb.command_complete("BEGIN") + wb.ready_for_query("T")),
            (False, wb.parse("", "select 1/0") + wb.bind("", "", []) + wb.execute("", 0) + wb.sync()),
            (True, wb.parse_complete() + wb.bind_complete() + wb.error_response("22012", "division by zero")
             + wb.ready_for_query("E")),
            (False, wb.query("rollback")), (True, wb.command_complete("ROLLBACK") + wb.ready_for_query("I"))],
        "copy_in": ready + [
            (False, wb.query("copy t from stdin")), (True, wb.copy_in_response()),
            (False, wb.copy_data(b"1\n2\n") + wb.copy_done()),
            (True, wb.command_complete("COPY 2") + wb.ready_for_query("I"))],
        "portal_suspended": ready + [
            (False, wb.query("begin")), (True, wb.command_complete("BEGIN") + wb.ready_for_query("T")),
            (False, wb.parse("", "select g from generate_series(1, 3) g") + wb.bind("c", "", [])
             + wb.execute("c", 2) + wb.execute("c", 2) + wb.sync()),
            (True, wb.parse_complete() + wb.bind_complete() + wb.data_row([b"1"]) + wb.data_row([b"2"])
             + wb.portal_suspended() + wb.data_row([b"3"]) + wb.command_complete("SELECT 1")
             + wb.ready_for_query("T"))],
    }


def encode(conversation: list[tuple[bool, bytes]]) -> bytes:
    out = bytearray()
    for from_server, body in conversation:
        cuts = bytes(range(1, min(len(body), 8)))  # a few one-byte pieces at the front
        out.append((FROM_SERVER if from_server else 0) | len(cuts))
        out += len(body).to_bytes(2, "big") + body + cuts
    return bytes(out)


def write_seeds(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, conversation in seed_conversations().items():
        data = encode(conversation)
        test_one_input(data)  # a seed must pass, or the harness itself is wrong
        (directory / name).write_bytes(data)


if __name__ == "__main__":
    if sys.argv[1:2] == ["--seed"]:
        write_seeds(Path(sys.argv[2]))
    else:
        atheris.Setup(sys.argv, test_one_input)
        atheris.Fuzz()
