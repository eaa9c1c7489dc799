"""`pgscout demo` as a newcomer runs it: a subprocess that starts its own PostgreSQL, shows what
pgscout finds in plain words, and leaves no cluster dir or server process behind, whether it ends
by itself (--duration) or by Ctrl-C.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pgharness import REPO_ROOT, wait_until

pytestmark = pytest.mark.slow

CLUSTER_DIR = re.compile(r"throwaway cluster in (\S+)")
LOG_PATH = re.compile(r"pgscout log\s+(\S+)")


class Demo:
    """One `python -m proxy demo` subprocess with its output in files."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.stdout_file = tmp_path / "stdout.txt"
        self.stderr_file = tmp_path / "stderr.txt"
        with open(self.stdout_file, "wb") as stdout, open(self.stderr_file, "wb") as stderr:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "pgscout", "demo", *args], stdout=stdout, stderr=stderr,
                stdin=subprocess.DEVNULL, cwd=REPO_ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def stdout(self) -> str:
        return self.stdout_file.read_text(errors="replace")

    def stderr(self) -> str:
        return self.stderr_file.read_text(errors="replace")

    def output(self) -> str:
        return f"--- stdout ---\n{self.stdout()}\n--- stderr ---\n{self.stderr()}"

    def cluster_dir(self) -> Path:
        match = CLUSTER_DIR.search(self.stderr())
        assert match, f"the demo did not say where its cluster is\n{self.output()}"
        return Path(match.group(1))

    def wait(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError(f"the demo did not exit within {timeout} s\n{self.output()}")

    def remove_log(self) -> None:
        match = LOG_PATH.search(self.stdout())
        if match:
            shutil.rmtree(Path(match.group(1)).parent, ignore_errors=True)


@pytest.fixture
def run_demo(tmp_path):
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        demo = Demo(tmp_path, *args)
        started.append(demo)
        return demo

    yield start
    for demo in started:
        if demo.process.poll() is None:
            demo.process.kill()
            demo.process.wait()
        demo.remove_log()


def processes_using(path: Path) -> list[str]:
    """Command lines of running processes that mention `path` (a server started in that dir)."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            text = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if str(path) in text:
            found.append(text)
    return found


def assert_cleaned_up(demo: Demo) -> None:
    cluster = demo.cluster_dir()
    assert not cluster.exists(), f"{cluster} was left behind\n{demo.output()}"
    assert processes_using(cluster) == [], f"server processes left behind\n{demo.output()}"


def test_demo_shows_n_plus_one_slow_statement_budget_warning_and_findings_then_cleans_up(run_demo):
    started = time.monotonic()
    demo = run_demo("--duration", "25")
    assert demo.wait(timeout=120) == 0, demo.output()
    out = demo.stdout()

    assert "N+1 query loop" in out, out
    finding = out[out.index("N+1 query loop"):]
    assert re.search(r"N=\d+ child queries", finding), out
    assert "owner: SELECT … FROM authors" in finding, out
    assert "child: SELECT … FROM books WHERE" in finding, out
    assert re.search(r"fix: .*selectinload", finding), out
    assert re.search(r"slow statement: \d+ ms .*threshold 200 ms", out), out
    assert 'connection budget "demo" (application_name=demo-pool)' in out, out
    # The deploy's blocking index build, with the app's save that queued behind it...
    assert "blocking migration (warning) in application demo-migrate" in out, out
    migration = out[out.index("blocking migration"):]
    assert "DDL:    CREATE INDEX reviews_stars ON reviews (stars)" in migration, out
    assert re.search(r"waited: \d+ ms  INSERT INTO reviews .*\(demo-app\)", migration), out
    assert "fix:    CREATE INDEX CONCURRENTLY" in migration, out
    # ...once only: the same migration done CONCURRENTLY blocks nobody.
    assert out.count("blocking migration (") == 1, out
    # The N+1's foreign key has no index.
    assert "missing index (warning) in application demo-app: pgscout_demo.books has no index " \
           "leading with author_id" in out, out
    missing = out[out.index("missing index ("):]
    assert "fix:    CREATE INDEX CONCURRENTLY ON pgscout_demo.books (author_id)" in missing, out
    assert "/api/overview" in out and "/metrics" in out, out
    assert '"event"' not in out, f"JSON log lines reached the terminal\n{out}"
    assert_cleaned_up(demo)
    assert time.monotonic() - started < 60, "the demo took far longer than its --duration"


def test_ctrl_c_stops_the_demo_and_removes_its_database(run_demo):
    demo = run_demo()
    assert wait_until(lambda: "N+1 query loop" in demo.stdout() or demo.process.poll() is not None,
                      timeout=60, interval=0.2), f"no N+1 finding within 60 s\n{demo.output()}"
    cluster = demo.cluster_dir()
    assert cluster.exists() and processes_using(cluster), demo.output()

    demo.process.send_signal(signal.SIGINT)
    assert demo.wait(timeout=45) == 0, demo.output()
    assert_cleaned_up(demo)
