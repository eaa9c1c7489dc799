"""Build hook: compiles pgscout's per-statement path (protocol constants, framing, decoding, the
bus, the observers) to C extensions with mypyc; everything else about the package is declared in
pyproject.toml.

Owns: which modules are compiled and when compiling is skipped. The compiled modules' .py files
stay in the wheel and are the fallback: with PGSCOUT_PURE_PYTHON=1, in an editable install (so
an edited file is what runs), or when the C build fails (no compiler), pgscout runs them as-is.
Must not: change what a module does; compiled and interpreted runs pass the same tests.
"""

import os
import sys

from setuptools import setup

COMPILED_MODULES = [
    "proxy/pgscout/dataplane/wire.py",
    "proxy/pgscout/dataplane/framer.py",
    "proxy/pgscout/dataplane/decoder.py",
    "proxy/pgscout/dataplane/events.py",
    "proxy/pgscout/dataplane/relaying.py",
    "proxy/pgscout/analysis/bus.py",
    "proxy/pgscout/analysis/comments.py",
    "proxy/pgscout/analysis/fingerprint.py",
    "proxy/pgscout/analysis/nplusone.py",
    "proxy/pgscout/analysis/slowlog.py",
    "proxy/pgscout/analysis/statements.py",
    "proxy/pgscout/analysis/replay.py",
    "proxy/pgscout/analysis/timeouts.py",
    "proxy/pgscout/analysis/migrations.py",
    "proxy/pgscout/analysis/opentransactions.py",
    "proxy/pgscout/analysis/indexes.py",
    "proxy/pgscout/histogram.py",
    "proxy/pgscout/labels.py",
]


def compiled_extensions():
    if os.environ.get("PGSCOUT_PURE_PYTHON") or "editable_wheel" in sys.argv:
        return []
    from mypyc.build import mypycify

    # A dotted group name puts the shared library inside the package (proxy/pgscout/pgscout__mypyc.*.so),
    # so an in-place build imports from any working directory, not only the repository root.
    extensions = mypycify(COMPILED_MODULES, opt_level="3", group_name="pgscout.pgscout")
    for extension in extensions:
        extension.optional = True  # a failed C build installs the pure-Python modules
    return extensions


setup(ext_modules=compiled_extensions())
