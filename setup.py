"""Build hook: compiles pgscout's per-statement path to C extensions: framing and decoding with
Cython (each .py source with its augmenting .pxd of C types beside it), the protocol constants,
events, the bus and the observers with mypyc; everything else about the package is declared in
pyproject.toml.

Owns: which modules are compiled and when compiling is skipped. The compiled modules' .py files
stay in the wheel and are the fallback: with PGSCOUT_PURE_PYTHON=1, in an editable install (so
an edited file is what runs), or when the C build fails (no compiler), pgscout runs them as-is.
Must not: change what a module does; compiled and interpreted runs pass the same tests.
"""

import os
import sys

from setuptools import setup

# The data plane's work per chunk. Cython, not mypyc: with the C types of their .pxd files, the
# relaying legs' data_received (forward, decode, emit) take 4,346 instructions per pgbench -S -M
# prepared statement in the running data plane, 8,042 compiled by mypyc (callgrind), because a
# typed bytes index, a C-integer field and a cdef method call are plain C where mypyc boxes more.
CYTHON_MODULES = ["proxy/pgscout/dataplane/framer.py", "proxy/pgscout/dataplane/decoder.py",
                  "proxy/pgscout/dataplane/relaying.py"]
MYPYC_MODULES = [
    "proxy/pgscout/dataplane/wire.py",
    "proxy/pgscout/dataplane/events.py",
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
    extensions = mypycify(MYPYC_MODULES, opt_level="3", group_name="pgscout.pgscout")
    from Cython.Build import cythonize

    # The .pxd files declare the types; the .py annotations are for mypy and a reader.
    extensions += cythonize(CYTHON_MODULES, compiler_directives={"language_level": 3,
                                                                 "annotation_typing": False})
    for extension in extensions:
        extension.optional = True  # a failed C build installs the pure-Python modules
    return extensions


setup(ext_modules=compiled_extensions())
