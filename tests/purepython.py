"""PGSCOUT_PURE_PYTHON=1 for a test run: pgscout's compiled modules are imported from their .py
source, so the fallback that runs where no C extension was built passes the same tests.

Owns: a meta-path finder for `pgscout.*` that never picks an extension module.
Must not: touch any other package's imports (pglast, uvloop and asyncpg are extensions).
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

ENABLED = bool(os.environ.get("PGSCOUT_PURE_PYTHON"))
_SOURCE_ONLY = [(importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES)]


class _SourceFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if not name.startswith("pgscout.") or path is None:
            return None
        for entry in path:
            spec = importlib.machinery.FileFinder(entry, *_SOURCE_ONLY).find_spec(name, target)
            if spec is not None:
                return spec
        return None


def install() -> None:
    if "pgscout.dataplane.decoder" in sys.modules:
        raise RuntimeError("pgscout was imported before the pure-Python finder was installed")
    sys.meta_path.insert(0, _SourceFinder)
    import pgscout.dataplane.decoder  # noqa: PLC0415 (the check that it worked)

    assert pgscout.dataplane.decoder.__file__.endswith(".py"), pgscout.dataplane.decoder.__file__
