"""`pgscout demo`: a throwaway PostgreSQL, pgscout in front of it and an app with problems to find.

Owns: the `demo` subcommand; the demo's settings (ports, a 200 ms slow-query threshold, a `demo`
budget the app's pool outgrows, missing indexes reported from 100 rows since the demo's tables
are small); the progress shown while the database starts; telling the user, in plain words and
as they happen, the findings pgscout logs (N+1 loops, blocking migrations, missing indexes and
the other findings, slow statements, budget warnings), while the JSON log lines go to a file; and the order of shutdown: when pgscout starts
draining (Ctrl-C, SIGTERM or --duration) the app stops, pgscout stops, then the database goes.
Must not: observe traffic itself (pgscout's observers do, and it reads their log events), or
leave a cluster, its dir or a server process behind.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from typing import TextIO


from pgscout import app, logs
from pgscout.demo.localpg import LocalPgError, LocalPostgres
from pgscout.settings import AdminSettings, ConfigError, ProxySettings, Settings, load_settings

LOOPBACK = "127.0.0.1"
# pgscout run's defaults, so the demo's addresses are the ones the README shows.
DEFAULT_LISTEN_PORT = ProxySettings().listen.port
DEFAULT_ADMIN_PORT = AdminSettings().listen.port
BUDGET = {"name": "demo", "application_name": "demo-pool", "max_connections": 4}
SLOW_THRESHOLD_MS = 200
MISSING_INDEX_MIN_TABLE_ROWS = 100
# The demo app is the only client and stops as soon as draining starts.
DRAIN_TIMEOUT_SECONDS = 5
SQL_SHOWN_CHARS = 160
SLOW_REPEAT_SECONDS = 60.0
_SELECT_LIST = re.compile(r"^(SELECT(?: DISTINCT)?) (?!\*).{40,}? (FROM) ", re.IGNORECASE)
SHOP_STOP_TIMEOUT_SECONDS = 15


def add_demo_command(commands) -> None:
    demo = commands.add_parser(
        "demo", help="see pgscout find problems in a sample app, with a throwaway database",
        description="Start a throwaway PostgreSQL (or use --upstream), pgscout in front of it and a "
                    "small SQLAlchemy app with an N+1 loop over an unindexed foreign key, a slow "
                    "report, a pool that outgrows its connection budget and a migration that "
                    "blocks it; print what pgscout finds, with the fixes. Ctrl-C stops it and removes "
                    "the database.")
    demo.add_argument("--upstream", metavar="URL",
                      help="use this PostgreSQL instead of a throwaway one (the demo only creates "
                           "and drops the schema pgscout_demo)")
    demo.add_argument("--duration", metavar="S", type=float,
                      help="stop by itself after S seconds of running the app (default: until Ctrl-C)")
    demo.set_defaults(handler=run_demo)


def run_demo(args) -> int:
    try:
        from pgscout.demo import workload as demo_workload
    except ImportError as error:
        print(f"pgscout demo: the demo app needs psycopg 3 and SQLAlchemy 2 ({error}): "
              "pip install 'psycopg[binary]' sqlalchemy", file=sys.stderr)
        return 1
    database: LocalPostgres | None = None
    try:
        with Progress(sys.stderr) as progress:
            upstream_url = args.upstream
            if upstream_url is None:
                database = LocalPostgres(on_step=progress.step).start()
                upstream_url = database.url
            settings = _settings(upstream_url)
            upstream = settings.proxy.upstream
            shop = _bookshop(demo_workload, settings)
            progress.step(f"creating the demo's tables on {upstream.display()}")
            try:
                shop.setup()
            except Exception as error:  # whatever the database answered, the user must read it
                print(f"pgscout demo: could not create the demo's tables on {upstream.display()}: "
                      f"{error}", file=sys.stderr)
                return 1
        log_path = os.path.join(tempfile.mkdtemp(prefix="pgscout-demo-"), "pgscout.log")
        with open(log_path, "a", buffering=1) as log_file:
            stopping = threading.Event()
            narrator = Narrator(sys.stdout, on_draining=stopping.set)
            # pgscout's JSON log lines go to the file; the narrator sees every event on the way.
            logs.configure(settings.log.level, "json", file=log_file, processors=(narrator,))
            _print_where_to_look(settings, log_path, throwaway=database is not None)
            import uvloop
            code = uvloop.run(_run(settings, shop, stopping, args.duration))
        print(f"pgscout demo: stopped; pgscout's JSON log is kept at {log_path}", file=sys.stderr)
        return code
    except (LocalPgError, ConfigError) as error:
        print(f"pgscout demo: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("pgscout demo: interrupted", file=sys.stderr)
        return 130
    finally:
        # A second Ctrl-C must not cut the cleanup short and leave the server behind.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if database is not None:
            database.stop()
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _settings(upstream_url: str) -> Settings:
    overrides = {
        "proxy.upstream": upstream_url,
        "proxy.listen": f"{LOOPBACK}:{_port_or_free(DEFAULT_LISTEN_PORT)}",
        "admin.listen": f"{LOOPBACK}:{_port_or_free(DEFAULT_ADMIN_PORT)}",
        "proxy.drain_timeout_seconds": str(DRAIN_TIMEOUT_SECONDS),
        "slowlog.threshold_ms": str(SLOW_THRESHOLD_MS),
        "findings.missing_index_min_table_rows": str(MISSING_INDEX_MIN_TABLE_ROWS),
        "budgets": json.dumps([BUDGET]),
    }
    return load_settings(None, os.environ, overrides)


def _bookshop(demo_workload, settings: Settings):
    """The demo app: set up straight on the database, served through pgscout with the same
    credentials (pgscout passes authentication through)."""
    upstream = settings.proxy.upstream
    listen = settings.proxy.listen
    return demo_workload.Bookshop(
        direct_dsn=demo_workload.conninfo(
            upstream.host, upstream.port, upstream.database, upstream.user, upstream.password,
            sslmode=upstream.sslmode, sslrootcert=upstream.sslrootcert, sslcert=upstream.sslcert,
            sslkey=upstream.sslkey),
        proxy_dsn=demo_workload.conninfo(listen.host, listen.port, upstream.database,
                                         upstream.user, upstream.password, sslmode="disable"))


def _port_or_free(preferred: int) -> int:
    """The default port when nothing listens there, else any free one: the demo must start."""
    for port in (preferred, 0):
        with socket.socket() as probe:
            try:
                probe.bind((LOOPBACK, port))
            except OSError:
                continue
            return probe.getsockname()[1]
    raise OSError("no free TCP port on 127.0.0.1")


async def _run(settings: Settings, shop, stopping: threading.Event, duration: float | None) -> int:
    serve = asyncio.create_task(app.serve(settings, observing=True))
    # The admin server starts after the proxy's listener: once it answers, both are up.
    if not await _listening(settings.admin.listen.host, settings.admin.listen.port, serve):
        return await serve
    shop_failed: list[BaseException] = []
    shop_task = asyncio.create_task(asyncio.to_thread(shop.serve, stopping))

    def on_app_done(task: asyncio.Task) -> None:
        error = task.exception()
        if error is not None and not stopping.is_set():
            shop_failed.append(error)
            print(f"pgscout demo: the demo app failed: {type(error).__name__}: {error}",
                  file=sys.stderr, flush=True)
            signal.raise_signal(signal.SIGTERM)

    shop_task.add_done_callback(on_app_done)
    if duration is not None:
        asyncio.get_running_loop().call_later(duration, signal.raise_signal, signal.SIGTERM)
    code = await serve
    stopping.set()
    try:
        await asyncio.wait_for(asyncio.shield(shop_task), SHOP_STOP_TIMEOUT_SECONDS)
    except Exception:
        pass  # after the proxy closed, the app's errors are the expected end of its connections
    try:
        await asyncio.to_thread(shop.teardown)
    except Exception as error:
        print(f"pgscout demo: could not drop the demo schema: {error}", file=sys.stderr)
    return 1 if shop_failed else code


async def _listening(host: str, port: int, serve: asyncio.Task) -> bool:
    """Wait until something accepts connections on host:port; False when `serve` ended first."""
    while not serve.done():
        try:
            _, writer = await asyncio.open_connection(host, port)
        except OSError:
            await asyncio.sleep(0.05)
            continue
        writer.close()
        return True
    return False


def _print_where_to_look(settings: Settings, log_path: str, *, throwaway: bool) -> None:
    admin = f"http://{settings.admin.listen}"
    upstream = settings.proxy.upstream
    proxy_url = (f"postgresql://{upstream.user or ''}{'@' if upstream.user else ''}"
                 f"{settings.proxy.listen}/{upstream.database or ''}")
    lines = [
        "",
        "pgscout demo is running: a small bookshop app (SQLAlchemy + psycopg) talks to PostgreSQL "
        "through pgscout.",
        f"  status page  {admin}/",
        f"  metrics      {admin}/metrics",
        f"  JSON API     {admin}/api/findings  (also /api/overview, /api/fingerprints, /api/slow, "
        "/api/connections)",
        f"  the proxy    {proxy_url}  (try psql on it)",
        f"  pgscout log  {log_path}  (JSON lines)",
        "What pgscout finds is printed below as it happens. Ctrl-C stops the demo"
        + (" and removes the throwaway database." if throwaway else "."),
        "",
    ]
    print("\n".join(lines), flush=True)


class Narrator:
    """A structlog processor that tells the user, in plain words, the events worth their attention.

    It passes every event on unchanged (to the JSON log file), and calls `on_draining` when
    pgscout starts draining, so the demo app can stop as a real application would.
    """

    def __init__(self, out: TextIO, on_draining: Callable[[], None]) -> None:
        self._out = out
        self._on_draining = on_draining
        self._slow_said: dict[str, list] = {}  # fingerprint -> [said at, repeats since, max ms]
        self._describers = {
            "n_plus_one": _describe_finding,
            "slow_query": self._describe_slow_query,
            "budget_warning": _describe_budget_warning,
            "budget_exceeded": _describe_budget_exceeded,
            "connection_churn": _describe_churn,
            "finding": _describe_model_finding,
        }

    def __call__(self, logger, method_name: str, event: dict) -> dict:
        name = event.get("event")
        if name == "draining":
            self._on_draining()
        describe = self._describers.get(name)
        if describe is not None:
            text = describe(event)
            if text is not None:
                self._say(text)
        elif method_name in ("error", "critical", "exception"):
            self._say(f"pgscout error: {name} {event.get('error', '')}".rstrip())
        return event

    def _describe_slow_query(self, record: dict) -> str | None:
        """The first time a statement is slow, then at most once a minute with a count, so a
        report that is always slow does not bury everything else."""
        now = time.monotonic()
        said = self._slow_said.get(record["fingerprint"])
        if said is not None and now - said[0] < SLOW_REPEAT_SECONDS:
            said[1] += 1
            said[2] = max(said[2], record["duration_ms"])
            return None
        again = ""
        if said is not None and said[1]:
            again = f" (and {said[1]} more times since, up to {said[2]:.0f} ms)"
        self._slow_said[record["fingerprint"]] = [now, 0, 0.0]
        return (f"slow statement: {record['duration_ms']:.0f} ms{again} (threshold "
                f"{SLOW_THRESHOLD_MS} ms) in application {record['application_name'] or '?'}\n"
                f"    {_sql(record['normalized'])}")

    def _say(self, text: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {text}", file=self._out, flush=True)


def _sql(text: str | None) -> str:
    """One line, the select list elided: what a query reads and how it filters fits on a line."""
    one_line = _SELECT_LIST.sub(r"\1 … \2 ", " ".join((text or "?").split()), count=1)
    return one_line if len(one_line) <= SQL_SHOWN_CHARS else one_line[:SQL_SHOWN_CHARS - 1] + "…"


def _describe_finding(finding: dict) -> str:
    loop = finding["kind"] == "n_plus_one"
    what = "N+1 query loop" if loop else "duplicate query"
    # A roll-up: N and the times are per loop, the loops are counted apart.
    again = (f", {finding['iterations']} loops in the last minute" if finding["iterations"] > 1
             else "")
    per = " per loop" if finding["iterations"] > 1 else ""
    cost = (f"{finding['loop_time_ms']:.0f} ms of loop, {finding['waste_ms']:.0f} ms beyond one "
            f"query" if loop else f"{finding['waste_ms']:.0f} ms spent on repeats")
    lines = [
        f"{what} ({finding['severity']}, {finding['confidence']} confidence{again}) "
        f"in application {finding['application_name'] or '?'}: N={finding['n']} child "
        f"queries{per}, {cost}{per}",
        f"    owner: {_sql(finding['owner_sql']) if finding['owner_sql'] else '(none seen)'}",
        f"    child: {_sql(finding['child_sql'])}",
        f"    fix:   {finding['suggestion']}",
    ]
    return "\n".join(lines)


_FINDING_NAMES = {
    "blocking_migration": "blocking migration", "no_statement_timeout": "no statement timeout",
    "long_transaction": "long transaction", "idle_in_transaction": "idle in transaction",
    "missing_index": "missing index",
}


def _describe_model_finding(finding: dict) -> str | None:
    """A finding of the findings model; N+1 loops, duplicates and churn have their own lines."""
    name = _FINDING_NAMES.get(finding["kind"])
    if name is None:
        return None
    e = finding["evidence"]
    head = f"{name} ({finding['severity']}) in application " \
           f"{finding['application'].get('application_name') or '?'}"
    if finding["kind"] == "blocking_migration":
        lines = [f"{head}: held its lock on {e['table']} for {e['lock_held_ms']:.0f} ms while "
                 f"{e['waiting_sessions']} other session(s) waited {e['waited_total_ms']:.0f} ms",
                 f"    DDL:    {_sql(e['statement'])}"]
        lines += [f"    waited: {w['delay_ms']:.0f} ms  {_sql(w['statement'])} "
                  f"({w['application_name'] or '?'})" for w in e["waiters"][:3]]
    elif finding["kind"] == "missing_index":
        behind = "an N+1 child query" if e["source"] == "n_plus_one" else "a slow statement"
        lines = [f"{head}: {e['table']} has no index leading with {e['column']} "
                 f"(about {e['rows_estimate']} rows), behind {behind}",
                 f"    query:   {_sql(e['statement'])}",
                 f"    indexes: {'; '.join(e['existing_indexes']) or '(none)'}"]
    else:
        lines = [head]
    lines.append(f"    fix:    {finding['suggestion']}")
    return "\n".join(lines)


def _describe_budget_warning(record: dict) -> str:
    return (f"connection budget \"{record['budget']}\" ({record['match']}): {record['current']} of "
            f"{record['max_connections']} connections in use ({record['usage']:.0%}): the pool is "
            f"outgrowing its budget")


def _describe_budget_exceeded(record: dict) -> str:
    if "refused" not in record:  # a budget that is not enforced, gone over its limit
        return (f"connection budget \"{record['budget']}\" ({record['match']}) is over budget: "
                f"{record['current']} of {record['max_connections']} connections in use")
    return (f"connection budget \"{record['budget']}\" ({record['match']}) is full: refused "
            f"{record['refused']} connection(s) from {record['refused_application_name']}")


def _describe_churn(record: dict) -> str:
    return (f"connection churn in {record['application_name']}: "
            f"{record['opens_per_second']:.1f} connections opened per second: {record['hint']}")


class Progress:
    """What the demo is doing while it starts, on stderr: a spinner on a terminal, lines elsewhere."""

    FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._animated = out.isatty()
        self._text = ""
        self._done = threading.Event()
        self._spinner = threading.Thread(target=self._spin, daemon=True)

    def __enter__(self) -> Progress:
        if self._animated:
            self._spinner.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        if self._animated:
            self._spinner.join()
            self._out.write("\r\x1b[K")
            self._out.flush()

    def step(self, text: str) -> None:
        self._text = text
        if not self._animated:
            print(f"pgscout demo: {text}...", file=self._out, flush=True)

    def _spin(self) -> None:
        for frame in itertools.cycle(self.FRAMES):
            if self._done.wait(0.1):
                return
            self._out.write(f"\r\x1b[K{frame} {self._text}...")
            self._out.flush()
