"""Where no C compiler built the extensions, pgscout runs its compiled modules' .py source: that
fallback must behave as the build CI tests. The sans-IO tests of those modules run again here,
in a pytest of their own with PGSCOUT_PURE_PYTHON=1 (tests/purepython.py)."""

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent
# The tests of every module setup.py compiles that need no server.
SANS_IO_TESTS = ["test_framer.py", "test_decoder.py", "test_fuzz.py", "test_nplusone.py",
                 "test_fingerprint.py", "test_comments.py", "test_slowlog.py", "test_statements.py",
                 "test_bus.py"]


def test_pure_python_modules_pass_the_sans_io_tests():
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *SANS_IO_TESTS],
        cwd=TESTS, env=os.environ | {"PGSCOUT_PURE_PYTHON": "1"}, capture_output=True,
        text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def test_build_training_runs_on_the_compiled_data_plane_alone():
    """setup.py trains gcc's profile with this module in pip's isolated build environment, where
    pglast and the other runtime dependencies are missing; a training that fails there costs
    every build its profile without failing it, so it fails here instead."""
    check = ("import runpy, sys; runpy.run_module('pgscout.dataplane.training', run_name='__main__'); "
             "loaded = {m.split('.')[0] for m in sys.modules}; "
             "assert not loaded & {'pglast', 'asyncpg', 'uvloop', 'prometheus_client', 'structlog', "
             "'yaml'}, loaded")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
