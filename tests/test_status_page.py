"""The status page at `/`, loaded in a real headless Chromium in front of real traffic.

A missing browser is a failure, not a skip: install `chromium` (Debian package) and the
`playwright` Python package (it drives /usr/bin/chromium; no browser download needed).
"""

from __future__ import annotations

from pathlib import Path

import time

import psycopg
import pytest

from pgharness import APP_DATABASE

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOT = Path(__file__).resolve().parent / "output" / "status-page.png"
AUTHORS = 12
TOKEN = "page-test-token"

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: apt-get install -y chromium"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture(scope="module")
def library(pg):
    """Two tables in the shared test database: authors and their books."""
    with psycopg.connect(pg.dsn("trust_user", "app"), autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS page_books, page_authors")
        connection.execute("CREATE TABLE page_authors (id int PRIMARY KEY, name text)")
        connection.execute("CREATE TABLE page_books (id serial PRIMARY KEY, author_id int, title text)")
        connection.execute("INSERT INTO page_authors SELECT i, 'author ' || i FROM generate_series(1, %s) i",
                           (AUTHORS,))
        connection.execute("INSERT INTO page_books (author_id, title) "
                           "SELECT i %% %s + 1, 'book ' || i FROM generate_series(1, %s) i",
                           (AUTHORS, AUTHORS * 3))
    yield
    with psycopg.connect(pg.dsn("trust_user", "app"), autocommit=True) as connection:
        connection.execute("DROP TABLE IF EXISTS page_books, page_authors")


def run_n_plus_one(proxy) -> None:
    """One request that loads the authors, then each author's books one query at a time."""
    with psycopg.connect(proxy.dsn("trust_user", "app", application_name="page-app")) as connection:
        authors = connection.execute("SELECT id, name FROM page_authors ORDER BY id").fetchall()
        for author_id, _ in authors:
            connection.execute("SELECT id, title FROM page_books WHERE author_id = %s",
                               (author_id,)).fetchall()
        connection.commit()


def test_status_page_shows_n_plus_one_and_top_statements(browser, library, start_pgscout):
    proxy = start_pgscout()
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"http://{proxy.host}:{proxy.admin_port}/")
    page.wait_for_selector("#state.live", timeout=10_000)

    run_n_plus_one(proxy)
    run_n_plus_one(proxy)

    finding = page.wait_for_selector(".finding", timeout=15_000)
    text = finding.inner_text()
    assert "N+1 loop" in text and f"N = {AUTHORS}" in text, text
    assert "page-app" in text, text
    assert "FROM page_authors" in text and "FROM page_books WHERE author_id = $1" in text, text
    assert "author_id = ANY($1)" in text, text  # plain psycopg: the fix is one batched query
    rows = page.locator("#fingerprints tbody tr td.sql")
    rows.first.wait_for(timeout=5_000)
    statements = " ".join(rows.all_inner_texts())
    assert "FROM page_books WHERE author_id = $1" in statements, statements
    # Two polls apart, the charts have a point of their own to draw.
    page.wait_for_selector("#rate-chart polyline", timeout=10_000)
    assert errors == []

    SCREENSHOT.parent.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOT), full_page=True)
    page.close()


def test_status_page_asks_for_the_admin_token_and_sends_it(browser, start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_ADMIN_TOKEN": TOKEN})
    assert proxy.admin_get("/")[0] == 200
    assert proxy.admin_get("/api/overview")[0] == 401
    page = browser.new_page()
    page.goto(f"http://{proxy.host}:{proxy.admin_port}/")

    page.wait_for_selector("#token-form:not([hidden])", timeout=10_000)
    # No data yet: the page must not claim a verdict it has not read.
    assert page.inner_text("#findings") == "Loading…"
    page.fill("#token", "wrong")
    page.click("#token-form button")
    page.wait_for_selector("#token-error:text('refused')", timeout=10_000)
    page.fill("#token", TOKEN)
    page.click("#token-form button")

    page.wait_for_selector("#state.live", timeout=10_000)
    assert page.is_hidden("#token-form")
    assert page.evaluate("sessionStorage.getItem('pgscout.adminToken')") == TOKEN
    page.close()


def test_status_page_draws_the_last_minutes_on_load(browser, start_pgscout):
    proxy = start_pgscout()
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE), autocommit=True) as connection:
        deadline = time.monotonic() + 11  # three of pgscout's own samples, five seconds apart
        while time.monotonic() < deadline:
            connection.execute("SELECT 1")
            time.sleep(0.005)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"http://{proxy.host}:{proxy.admin_port}/")
    page.wait_for_selector("#state.live", timeout=10_000)
    # Right after the first poll, the chart already has the points pgscout sampled before.
    points = page.get_attribute("#rate-chart polyline", "points").split()
    assert len(points) >= 2, points
    assert page.inner_text("#findings") == "No finding yet."
    assert errors == []
    page.close()


def test_status_page_says_over_budget_and_resets_statistics(browser, start_pgscout, tmp_path):
    config = tmp_path / "pgscout.yaml"
    config.write_text("budgets:\n  - {name: page-soft, application_name: page-budget, max_connections: 1}\n")
    proxy = start_pgscout(config=config)
    dsn = proxy.dsn("trust_user", APP_DATABASE, application_name="page-budget")
    with psycopg.connect(dsn, autocommit=True) as first, psycopg.connect(dsn, autocommit=True):
        first.execute("SELECT 'counted before the reset'")
        page = browser.new_page()
        page.goto(f"http://{proxy.host}:{proxy.admin_port}/")
        over = page.wait_for_selector("#budgets .over-budget", timeout=10_000)
        assert "over budget" in over.inner_text()
        assert "2 of 1" in page.inner_text("#budgets")
        page.wait_for_selector("#fingerprints td.sql", timeout=10_000)

        page.click("#reset")
        page.wait_for_selector("#fingerprints td.empty:text('No statements yet.')", timeout=10_000)
        assert page.inner_text("#stats-reset").startswith("since ")
        page.close()


def test_status_page_shows_a_transaction_left_open_with_its_fix(browser, library, start_pgscout):
    proxy = start_pgscout(env={"PGSCOUT_FINDINGS_IDLE_IN_TRANSACTION_SECONDS": "1"})
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.goto(f"http://{proxy.host}:{proxy.admin_port}/")
    page.wait_for_selector("#state.live", timeout=10_000)
    with psycopg.connect(proxy.dsn("trust_user", APP_DATABASE, application_name="page-idler")) as connection:
        connection.execute("UPDATE page_books SET title = 'secret-page-literal' WHERE id = 1")
        finding = page.wait_for_selector(".finding:has-text('Idle in transaction')", timeout=15_000)
        text = finding.inner_text()
        connection.rollback()
    assert "page-idler" in text and "wrote rows" in text, text
    assert "UPDATE page_books SET title = $1 WHERE id = $2" in text, text
    assert "idle_in_transaction_session_timeout" in text, text
    assert "secret-page-literal" not in text
    assert errors == []
    page.close()
