"""Where the CPU of observing one statement goes: each stage timed in process, no sockets.

    python benchmarks/perstatement.py [--statements N] [--out FILE]

Feeds the byte streams of 8 sessions running pgbench -S (pgscout.dataplane.training's: one
prepared SELECT per transaction, and the same with its literal inline on the simple protocol) to
the data plane's decoder, hands its records on as the data plane does (marshal), and replays them
through the analysis process's observers (pgscout.worker.Analysis), timing each stage, and each
observer on the same events.
Every N+1 segment is ended and judged inside the timed region, as each one is in a long run:
a segment left open would leave out its judgement and the freeing of what it held.
A profile, not a target: benchmarks/run.py measures the processes' CPU under load (with its
cache misses and system calls); this shows which stage its microseconds come from.
Each figure is the minimum of several repetitions (the machines are shared and noisy).

Owns: the synthetic streams and the per-stage timing.
Must not: start servers or sockets, or time anything but pgscout's own code.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
from pathlib import Path

from pgscout import worker
from pgscout.analysis.bus import Bus
from pgscout.analysis.nplusone import NPlusOneDetector
from pgscout.analysis.replay import Replay
from pgscout.dataplane import records, training
from pgscout.dataplane.decoder import Decoder
from pgscout.dataplane.events import StatementDone
from pgscout.settings import load_settings

REPETITIONS = 5
BATCH = 300  # records per hand-off batch: about what 10 ms of a saturated run makes
# Under load the kernel, the database and the clients run between two chunks of one session and
# take the data plane's memory out of the caches: the decoder then pays for every cache line it
# touches. Sweeping this much memory before each chunk reproduces that, statement by statement.
COLD_SWEEP_BYTES = 4 * 1024 * 1024
COLD_STATEMENTS = 4000


def handed_off(batches: list[list[tuple]]) -> list[list[tuple]]:
    """The batches as the analysis process gets them: each framed as the data plane sends it
    (records.records_frame) and its payload decoded as the worker does (records.decode_payload)."""
    return [records.decode_payload(records.RECORDS, records.records_frame(batch)[records.HEADER_SIZE:])
            for batch in batches]


def best_of(run, prepare=lambda: None) -> float:
    """The shortest of REPETITIONS runs of `run(prepare())`, only `run` timed."""
    best = float("inf")
    for _ in range(REPETITIONS):
        prepared = prepare()
        started = time.perf_counter()
        run(prepared)
        best = min(best, time.perf_counter() - started)
    return best


def profile(stream, count: int) -> list[tuple[str, float]]:
    setup, chunks, answer = stream(count)
    made: list[list] = []

    def started_decoders() -> list[Decoder]:
        decoders = training.started_decoders(made.append)
        training.feed(decoders, (setup, [], answer))
        return decoders

    def decode() -> None:
        made.clear()
        decoders = started_decoders()
        training.feed(decoders, (b"", chunks, answer))
        for decoder in decoders:
            decoder.close()

    def decode_cold() -> float:
        """The median statement's decoder time with the caches swept before each chunk."""
        made.clear()
        decoders = started_decoders()
        sweep = bytearray(COLD_SWEEP_BYTES)
        clock = time.perf_counter
        times = []
        for n, chunk in enumerate(chunks[:COLD_STATEMENTS]):
            decoder = decoders[n % training.SESSIONS]
            sweep.find(b"x")
            started = clock()
            decoder.client_data(chunk, 1.0)
            client = clock() - started
            sweep.find(b"x")
            started = clock()
            decoder.server_data(answer, 2.0)
            server = clock() - started
            started = clock()
            timer = clock() - started
            times.append(client + server - 2 * timer)
            if len(made) >= BATCH:  # the data plane hands its records off every few hundred
                made.clear()
        for decoder in decoders:
            decoder.close()
        return statistics.median(times)

    rows = [("data plane: decoder (framing, request tracking, the record)", best_of(lambda _: decode()))]
    statements = [record for record in made if record[0] == records.STATEMENT]
    batches = [statements[i:i + BATCH] for i in range(0, len(statements), BATCH)]
    rows.append(("hand-off: marshal dumps (data plane) + loads (analysis)",
                 best_of(lambda _: handed_off(batches))))
    with analysis_process_collector():
        # Made after the collector froze the heap, as the analysis process receives its records:
        # frozen, the collections would never scan them.
        rows.extend(analysis_stages(handed_off(batches)))
    per_statement = [(name, seconds / len(statements) * 1e6) for name, seconds in rows]
    per_statement.insert(1, ("data plane: decoder, caches swept before each chunk (median statement)",
                             min(decode_cold() for _ in range(REPETITIONS)) * 1e6))
    return per_statement


@contextlib.contextmanager
def analysis_process_collector():
    """The cyclic collector configured as the analysis process runs it (the data plane keeps
    Python's defaults): with the defaults, collections scanning the N+1 detector's groups took a
    third of its time here, and the figures overstated what the process spends."""
    thresholds = gc.get_threshold()
    worker.tune_collector()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def analysis_stages(batches: list[list[tuple]]) -> list[tuple[str, float]]:
    """Seconds of the analysis process's work on `batches`: all of it, then stage by stage."""

    settings = load_settings(None, {})
    opened = [(records.OPENED, conn_id, "bench", "bench", "bench", "pgbench", False, 0.0, 0.0, {})
              for conn_id in range(training.SESSIONS)]

    def fresh_analysis() -> worker.Analysis:
        analysis = worker.Analysis(settings, _NoControl())
        analysis.replay.feed(opened)
        return analysis

    def analyse(analysis: worker.Analysis) -> None:
        for batch in batches:
            analysis.replay.feed(batch)
        end_segments(analysis.sources.nplusone)

    rows = [("analysis: replay + every observer", best_of(analyse, fresh_analysis))]

    def replayed() -> list[StatementDone]:
        events: list = []
        replay = Replay(_EventLog(events))
        replay.feed(opened)
        for batch in batches:
            replay.feed(batch)
        return [event for event in events if type(event) is StatementDone]

    rows.append(("  replay: records to events", best_of(lambda _: replayed())))
    # Each observer alone, in bus order on the same events, so each sees them as enriched by the
    # fingerprinter; the fingerprinter itself gets fresh events each time (it would find its
    # own results on old ones).
    analysis = worker.Analysis(settings, _NoControl())
    first, *others = analysis.bus.handlers(StatementDone)
    events = replayed()
    for event in events:
        first(event)

    def observe(handler, done: list[StatementDone]) -> None:
        for event in done:
            handler(event)
        if isinstance(handler.__self__, NPlusOneDetector):
            end_segments(handler.__self__)

    for handler in (first, *others):
        fresh = replayed if handler is first else lambda: events
        rows.append((f"  observer {handler.__qualname__}",
                     best_of(lambda done, handler=handler: observe(handler, done), fresh)))
    return rows


def end_segments(detector: NPlusOneDetector) -> None:
    """Judge every open segment, as their idle gap would once the sessions went quiet."""
    detector.flush(time.monotonic() + 3600.0)


class _EventLog(Bus):
    """A bus that keeps the replayed events, to feed each observer alone."""

    def __init__(self, events: list) -> None:
        super().__init__(on_error=None)
        self.events = events

    def publish(self, event: object) -> None:
        self.events.append(event)

    def publish_statement(self, event: StatementDone) -> None:
        self.events.append(event)


class _NoControl:
    def send(self, kind: int, value: object) -> None:
        pass


def stage_table(statements: int) -> str:
    """The Markdown table of both workloads' stages."""
    compiled = (sys.modules[Decoder.__module__].__file__ or "").endswith(".so")
    lines = [f"{statements:,} statements over {training.SESSIONS} sessions, "
             f"{'compiled (mypyc)' if compiled else 'pure Python'}, minimum of {REPETITIONS} repetitions.",
             "", "| stage | pgbench -S -M prepared, µs per statement | pgbench -S -M simple, µs per statement |",
             "|---|---|---|"]
    prepared = profile(training.prepared_stream, statements)
    simple = dict(profile(training.simple_stream, statements))
    for name, micros in prepared:
        lines.append(f"| {name} | {micros:.2f} | {simple[name]:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=40_000)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    text = stage_table(args.statements)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
