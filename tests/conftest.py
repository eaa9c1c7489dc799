"""Shared fixtures: a real PostgreSQL cluster (`pg`), a pgscout in front of it (`pgscout`) and a
factory for tests that need a proxy of their own (`start_pgscout`).

Owns: fixture scopes and teardown, and attaching server/proxy output to failing test reports.
Must not: create anything at import time (unit tests that use no fixture start no server).
"""

from __future__ import annotations

import pytest

import purepython

if purepython.ENABLED:
    purepython.install()

from pgharness import Pgscout, PgscoutFactory, PgCluster, interrupt_on_termination


@pytest.fixture(scope="session")
def pg():
    cluster = PgCluster()
    interrupt_on_termination()
    try:
        yield cluster.create()
    finally:
        cluster.destroy()


@pytest.fixture(scope="module")
def pgscout(pg):
    proxy = Pgscout(pg.upstream_url())
    try:
        yield proxy.start()
    finally:
        proxy.cleanup()


@pytest.fixture
def start_pgscout(pg):
    factory = PgscoutFactory(pg)
    try:
        yield factory
    finally:
        factory.cleanup()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """On failure, append the postgres log and each involved pgscout's output to the report."""
    report = yield
    if report.failed:
        for value in getattr(item, "funcargs", {}).values():
            failure_report = getattr(value, "failure_report", None)
            if callable(failure_report):
                for title, text in failure_report():
                    report.sections.append((title, text))
    return report
