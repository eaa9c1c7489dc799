"""The traffic the build runs the compiled data plane on, so gcc lays its code out for it.

    python -m pgscout.dataplane.training

Owns: synthetic byte streams of the statements clients send most (pgbench -S prepared and with its
literal inline, an unnamed Parse/Bind/Describe/Execute/Sync as asyncpg, psycopg 3 and pgJDBC send
it, a result of many rows), and feeding them to decoders as the relaying legs do. setup.py runs
this once on the instrumented build and compiles again with the profile (gcc's profile-guided
optimization): the per-statement path then sits in few cache lines, and under load, where other
processes evict the data plane's memory between two chunks, a statement costs the cache lines it
touches. benchmarks/perstatement.py times the same streams.
Must not: import anything the isolated build environment lacks (only the data plane and the
standard library), open sockets, or take more than a few seconds.
"""

from __future__ import annotations

import struct
import sys
import time

from pgscout.dataplane.decoder import Decoder
from pgscout.dataplane.events import Session

SESSIONS = 8
STATEMENTS = 40_000
QUERY = "SELECT abalance FROM pgbench_accounts WHERE aid = "


def message(kind: str, body: bytes) -> bytes:
    return kind.encode() + struct.pack("!i", len(body) + 4) + body


def cstring(text: str) -> bytes:
    return text.encode() + b"\0"


def _bind(statement: str, value: bytes) -> bytes:
    return message("B", cstring("") + cstring(statement) + struct.pack("!hhi", 0, 1, len(value))
                   + value + struct.pack("!h", 0))


_EXECUTE_SYNC = message("E", cstring("") + struct.pack("!i", 0)) + message("S", b"")
_ROW = message("D", struct.pack("!hi", 1, 4) + b"1234")
_SELECT_1 = message("C", cstring("SELECT 1")) + message("Z", b"I")
STARTUP_ANSWER = message("R", struct.pack("!i", 0)) + message("K", struct.pack("!ii", 1, 2)) \
    + message("Z", b"I")


def prepared_stream(count: int) -> tuple[bytes, list[bytes], bytes]:
    """(setup, one client chunk per statement, the server's answer to each): pgbench -M prepared."""
    setup = message("P", cstring("P0_1") + cstring(QUERY + "$1;") + struct.pack("!h", 0)) \
        + message("S", b"")
    chunks = [_bind("P0_1", str(1 + i).encode()) + _EXECUTE_SYNC for i in range(count)]
    return setup, chunks, message("2", b"") + _ROW + _SELECT_1


def simple_stream(count: int) -> tuple[bytes, list[bytes], bytes]:
    """pgbench -M simple: every statement is a new text (its literal inline)."""
    chunks = [message("Q", cstring(f"{QUERY}{1 + i};")) for i in range(count)]
    answer = message("T", struct.pack("!h", 1) + cstring("abalance") + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)) \
        + _ROW + _SELECT_1
    return b"", chunks, answer


def unnamed_stream(count: int) -> tuple[bytes, list[bytes], bytes]:
    """Parse, Bind, Describe, Execute, Sync of an unnamed statement each time, 100 rows back."""
    parse = message("P", cstring("") + cstring(QUERY + "$1") + struct.pack("!hi", 1, 23))
    describe = message("D", b"P" + cstring(""))
    chunks = [parse + _bind("", str(1 + i).encode()) + describe + _EXECUTE_SYNC for i in range(count)]
    answer = message("1", b"") + message("2", b"") \
        + message("T", struct.pack("!h", 1) + cstring("abalance") + struct.pack("!ihihih", 0, 0, 23, 4, -1, 0)) \
        + _ROW * 100 + message("C", cstring("SELECT 100")) + message("Z", b"I")
    return b"", chunks, answer


def started_decoders(emit) -> list[Decoder]:
    """SESSIONS decoders past their startup, each with its own session."""
    decoders = []
    for conn_id in range(SESSIONS):
        decoder = Decoder(Session(conn_id=conn_id, client_addr="training"), emit)
        decoder.server_data(STARTUP_ANSWER, 0.0)
        decoders.append(decoder)
    return decoders


def feed(decoders: list[Decoder], stream: tuple[bytes, list[bytes], bytes]) -> None:
    setup, chunks, answer = stream
    if setup:
        for decoder in decoders:
            decoder.client_data(setup, 0.0)
            decoder.server_data(message("1", b"") + message("Z", b"I"), 0.0)
    clock = time.monotonic
    for n, chunk in enumerate(chunks):
        decoder = decoders[n % len(decoders)]
        decoder.client_data(chunk, clock())
        decoder.server_data(answer, clock())


def main() -> None:
    if not (sys.modules[Decoder.__module__].__file__ or "").endswith(".so"):
        raise SystemExit("pgscout.dataplane.decoder is not compiled: nothing to train")
    records: list[tuple] = []
    for stream in (prepared_stream, simple_stream, unnamed_stream):
        decoders = started_decoders(records.append)
        feed(decoders, stream(STATEMENTS))
        for decoder in decoders:
            decoder.close()
        records.clear()


if __name__ == "__main__":
    main()
