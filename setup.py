"""Build hook: compiles pgscout's per-statement path (protocol constants, framing, decoding, the
bus, the observers) to C extensions with mypyc; everything else about the package is declared in
pyproject.toml.

Owns: which modules are compiled, how (with gcc, profile-guided: compiled once instrumented, run
on pgscout.dataplane.training's traffic, compiled again with that profile), and when compiling
is skipped. The compiled modules' .py files stay in the wheel and are the fallback: with
PGSCOUT_PURE_PYTHON=1, in an editable install (so an edited file is what runs), or when the C
build fails (no compiler), pgscout runs them as-is.
Must not: change what a module does; compiled and interpreted runs pass the same tests; let a
failed training run cost more than the profile (the build then compiles once more without one).
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

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


# gcc moves the code the training never ran out of the way of the code it did: under load a
# statement costs the cache lines it touches, code included. Decoding a prepared statement takes
# about a tenth less, warm and with the caches swept (benchmarks/perstatement.py); a simple
# Query, whose time is mostly CPython's text decoding, no measurably less.
_PROFILE_GENERATE = ["-fprofile-generate", "-fprofile-update=single"]
_PROFILE_USE = ["-fprofile-use", "-fprofile-partial-training", "-Wno-missing-profile"]
_TRAINING = [sys.executable, "-m", "pgscout.dataplane.training"]
_TRAINING_TIMEOUT_SECONDS = 300


class ProfileGuidedBuildExt(build_ext):
    """build_ext, twice when the compiler is gcc: instrumented, then with the training's profile."""

    def build_extensions(self) -> None:
        if not self.extensions or "gcc" not in os.path.basename(self.compiler.compiler_so[0]):
            super().build_extensions()
            return
        base = {id(ext): (list(ext.extra_compile_args), list(ext.extra_link_args))
                for ext in self.extensions}
        self._compile(base, _PROFILE_GENERATE)
        profiled = self._train()
        self._compile(base, _PROFILE_USE if profiled else [])

    def _compile(self, base, flags: list[str]) -> None:
        for ext in self.extensions:
            compile_args, link_args = base[id(ext)]
            ext.extra_compile_args = compile_args + flags
            ext.extra_link_args = link_args + flags
        self.force = True  # the same sources again, with other flags
        super().build_extensions()

    def _train(self) -> bool:
        """Run the training on the instrumented extensions, imported from where they will be."""
        root = Path(self.build_lib)
        if not (root / "pgscout" / "__init__.py").exists():
            # `build_ext --inplace` alone: build_py did not run, so the .py files are only in
            # the source tree, and the extensions go there (setuptools copies them after this).
            self.copy_extensions_to_source()
            root = Path(self.get_finalized_command("build_py").get_package_dir("pgscout")).parent
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(
            filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
        try:
            subprocess.run(_TRAINING, env=env, check=True, timeout=_TRAINING_TIMEOUT_SECONDS)
        except (OSError, subprocess.SubprocessError) as exc:
            print(f"profile training failed, compiling without a profile: {exc}", file=sys.stderr)
            return False
        return True


setup(ext_modules=compiled_extensions(), cmdclass={"build_ext": ProfileGuidedBuildExt})
