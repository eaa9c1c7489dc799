"""Where no C compiler built the extensions, pgscout runs its compiled modules' .py source: that
fallback must behave as the build CI tests. The sans-IO tests of those modules run again here,
in a pytest of their own with PGSCOUT_PURE_PYTHON=1 (tests/purepython.py); and the constants the
Cython build reads from .pxd files are checked against the modules' own."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pgscout.dataplane import records, wire

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


@pytest.mark.parametrize("module", [wire, records])
def test_the_compiled_decoders_constants_are_the_modules_own(module):
    """wire.pxd and records.pxd give the Cython-compiled framer and decoder these values as C
    constants: one that drifted from the .py would make the compiled build read another protocol."""
    declared = Path(module.__file__).with_name(Path(module.__file__).name.split(".")[0] + ".pxd")
    constants = dict(re.findall(r"^    (\w+) = (-?\d+)$", declared.read_text(), re.M))
    assert constants
    assert {name: int(value) for name, value in constants.items()} == {
        name: getattr(module, name) for name in constants}
