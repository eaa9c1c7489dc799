"""Configuration loading: defaults, the shipped file, validation, precedence and the upstream."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pgscout.settings import ( Address, Budget, ConfigError, Settings, Upstream, effective_yaml, load_settings, parse_upstream_url, )

SHIPPED_CONFIG = Path(__file__).resolve().parent.parent / "config" / "pgscout.yaml"


@pytest.fixture
def write_config(tmp_path):
    def write(text: str) -> str:
        path = tmp_path / "pgscout.yaml"
        path.write_text(text)
        return str(path)

    return write


def test_defaults_load_without_a_file():
    settings = load_settings(None, {})
    assert settings == Settings()
    assert settings.proxy.listen == Address("127.0.0.1", 6434)
    assert settings.proxy.upstream is None
    assert settings.slowlog.threshold_ms == 500
    assert settings.nplusone.min_distinct_ratio == 0.8
    assert settings.budgets == ()


def test_shipped_config_documents_every_key_with_its_default():
    assert load_settings(str(SHIPPED_CONFIG), {}) == Settings()
    document = yaml.safe_load(SHIPPED_CONFIG.read_text())
    defaults = yaml.safe_load(effective_yaml(Settings()))
    assert list(document) == list(defaults)
    for section, keys in defaults.items():
        if isinstance(keys, dict):
            assert list(document[section]) == list(keys), section


def test_file_values_are_typed(write_config):
    path = write_config(
        """
proxy:
  listen: "[::1]:7432"
  write_buffer_low_bytes: 1024
slowlog:
  threshold_ms: 250
  per_application: {reporting: 5000, web: 12.5}
nplusone:
  enabled: false
budgets:
  - {name: web, application_name: web, max_connections: 40, enforce: true}
  - {name: all-app, user: app, max_connections: 90}
"""
    )
    settings = load_settings(path, {})
    assert settings.proxy.listen == Address("::1", 7432)
    assert str(settings.proxy.listen) == "[::1]:7432"
    assert settings.proxy.write_buffer_low_bytes == 1024
    assert settings.slowlog.threshold_ms == 250.0
    assert settings.slowlog.per_application == {"reporting": 5000.0, "web": 12.5}
    assert settings.nplusone.enabled is False
    assert settings.budgets == (
        Budget(name="web", application_name="web", max_connections=40, enforce=True),
        Budget(name="all-app", user="app", max_connections=90),
    )


def test_empty_file_and_commented_out_section_mean_defaults(write_config):
    assert load_settings(write_config(""), {}) == Settings()
    assert load_settings(write_config("slowlog:\n  # threshold_ms: 10\n"), {}) == Settings()


def test_budget_matches_only_the_fields_it_sets():
    budget = Budget(name="web", max_connections=10, application_name="web", database="app")
    assert budget.matches("web", "anyone", "app")
    assert not budget.matches("worker", "anyone", "app")
    assert not budget.matches("web", "anyone", "other")
    assert Budget(name="all", max_connections=10).matches("x", "y", "z")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("slowlog:\n  treshold_ms: 5\n", "slowlog.treshold_ms: unknown key; did you mean 'threshold_ms'?"),
        ("slowlogs:\n  threshold_ms: 5\n", "slowlogs: unknown section"),
        ("slowlog:\n  threshold_ms: abc\n", "slowlog.threshold_ms: expected a number, got 'abc'"),
        ("slowlog:\n  threshold_ms: -1\n", "slowlog.threshold_ms: must be at least 0"),
        ("statements:\n  max_fingerprints: 10.5\n", "statements.max_fingerprints: expected an integer"),
        ("statements:\n  max_fingerprints: true\n", "statements.max_fingerprints: expected an integer"),
        ("statements:\n  max_fingerprints: 0\n", "statements.max_fingerprints: must be at least 1"),
        ("nplusone:\n  enabled: 1\n", "nplusone.enabled: expected true or false"),
        ("nplusone:\n  min_distinct_ratio: 1.5\n", "nplusone.min_distinct_ratio: must be between 0 and 1"),
        ("nplusone:\n  idle_gap_ms: 0\n", "nplusone.idle_gap_ms: must be greater than 0"),
        ("nplusone:\n  warning_n: 200\n", "nplusone.warning_n: must not exceed nplusone.critical_n"),
        ("log:\n  level: verbose\n", "log.level: expected one of debug, info, warning, error"),
        ("proxy:\n  listen: localhost\n", "proxy.listen: expected HOST:PORT"),
        ("proxy:\n  listen: ::1:6432\n", "proxy.listen: IPv6 addresses need brackets"),
        ("proxy:\n  listen: host:70000\n", "proxy.listen: invalid port '70000'"),
        ("proxy:\n  upstream: postgresql://db/app?sslmode=sometimes\n", "proxy.upstream: invalid sslmode"),
        ("proxy:\n  upstream: postgresql://db:port/app\n", "proxy.upstream: invalid port 'port'"),
        ("proxy:\n  write_buffer_low_bytes: 262144\n", "proxy.write_buffer_low_bytes: must be less than"),
        ("proxy:\n  client_tls_cert: /nonexistent.pem\n", "proxy.client_tls_key: client TLS needs both"),
        (
            "proxy:\n  client_tls_cert: /nonexistent.pem\n  client_tls_key: /nonexistent.key\n",
            "proxy.client_tls_cert: no such file '/nonexistent.pem'",
        ),
        ("slowlog:\n  per_application: {web: fast}\n", "slowlog.per_application.web: expected a number"),
        ("slowlog:\n  per_application: [web]\n", "slowlog.per_application: expected a mapping"),
        ("budgets:\n  - {max_connections: 5}\n", "budgets[0].name: required"),
        ("budgets:\n  - {name: a, max_connections: 0}\n", "budgets[0].max_connections: must be at least 1"),
        ("budgets:\n  - {name: a, max_connections: 5, pool: 3}\n", "budgets[0].pool: unknown key"),
        (
            "budgets:\n  - {name: a, max_connections: 5}\n  - {name: a, max_connections: 6}\n",
            "budgets[1].name: duplicate budget name 'a'",
        ),
        ("admin:\n  token: <redacted>\n", "admin.token: <redacted> is the placeholder"),
        ("proxy: 5\n", "proxy: expected a mapping of keys"),
    ],
)
def test_bad_settings_name_the_key(write_config, text, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(write_config(text), {})
    assert str(raised.value).startswith(message)


def test_client_tls_files_that_exist_are_accepted(write_config, tmp_path):
    cert, key = tmp_path / "server.crt", tmp_path / "server.key"
    cert.write_text("cert")
    key.write_text("key")
    path = write_config(f"proxy:\n  client_tls_cert: {cert}\n  client_tls_key: {key}\n")
    settings = load_settings(path, {})
    assert (settings.proxy.client_tls_cert, settings.proxy.client_tls_key) == (str(cert), str(key))


def test_file_problems_name_the_file(write_config, tmp_path):
    missing = str(tmp_path / "absent.yaml")
    with pytest.raises(ConfigError, match=f"^{missing}: cannot read config file"):
        load_settings(missing, {})
    broken = write_config("proxy:\n  listen: [unclosed\n")
    with pytest.raises(ConfigError, match=f"^{broken}: invalid YAML: .*line"):
        load_settings(broken, {})
    with pytest.raises(ConfigError, match="expected a mapping of sections"):
        load_settings(write_config("- proxy\n"), {})


def test_a_section_given_twice_is_refused_rather_than_half_ignored(write_config):
    path = write_config("proxy:\n  listen: 0.0.0.0:1\nproxy:\n  drain_timeout_seconds: 1\n")
    with pytest.raises(ConfigError, match="duplicate key 'proxy'"):
        load_settings(path, {})


def test_environment_overrides_file_and_cli_overrides_environment(write_config):
    path = write_config("slowlog:\n  threshold_ms: 100\n  keep: 7\nlog:\n  level: debug\n")
    environ = {"PGSCOUT_SLOWLOG_THRESHOLD_MS": "250", "PGSCOUT_LOG_LEVEL": "warning"}
    settings = load_settings(path, environ, {"log.level": "error"})
    assert settings.slowlog.threshold_ms == 250.0
    assert settings.slowlog.keep == 7
    assert settings.log.level == "error"


def test_environment_strings_are_parsed_to_each_keys_type():
    environ = {
        "PGSCOUT_PROXY_LISTEN": "0.0.0.0:7432",
        "PGSCOUT_STATEMENTS_MAX_FINGERPRINTS": "77",
        "PGSCOUT_NPLUSONE_ENABLED": "no",
        "PGSCOUT_NPLUSONE_INCLUDE_WRITES": "1",
        "PGSCOUT_SLOWLOG_LOG_PARAMETERS": "TRUE",
        "PGSCOUT_SLOWLOG_PER_APPLICATION": '{"web": 200}',
        "PGSCOUT_BUDGETS": "[{name: web, max_connections: 40}]",
        "PGSCOUT_ADMIN_TOKEN": "0x1F:s3cret",
        "PGSCOUT_CONFIG": "/not/a/setting",  # other PGSCOUT_* names are not settings
    }
    settings = load_settings(None, environ)
    assert settings.proxy.listen == Address("0.0.0.0", 7432)
    assert settings.statements.max_fingerprints == 77
    assert settings.nplusone.enabled is False
    assert settings.nplusone.include_writes is True
    assert settings.slowlog.log_parameters is True
    assert settings.slowlog.per_application == {"web": 200.0}
    assert settings.budgets == (Budget(name="web", max_connections=40),)
    assert settings.admin.token == "0x1F:s3cret"


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        (
            "PGSCOUT_SLOWLOG_THRESHOLD_MS",
            "abc",
            "PGSCOUT_SLOWLOG_THRESHOLD_MS (slowlog.threshold_ms): expected a number, got 'abc'",
        ),
        ("PGSCOUT_NPLUSONE_ENABLED", "maybe", "PGSCOUT_NPLUSONE_ENABLED (nplusone.enabled): expected true/false"),
        ("PGSCOUT_METRICS_TOP_K", "1.5", "PGSCOUT_METRICS_TOP_K (metrics.top_k): expected an integer"),
        ("PGSCOUT_SLOWLOG_TRESHOLD_MS", "5", "PGSCOUT_SLOWLOG_TRESHOLD_MS: unknown key"),
        ("PGSCOUT_BUDGETS", "[{name: a}]", "PGSCOUT_BUDGETS (budgets[0].max_connections): required"),
        ("PGSCOUT_SLOWLOG_PER_APPLICATION", "{web: [", "PGSCOUT_SLOWLOG_PER_APPLICATION (slowlog.per_application)"),
    ],
)
def test_bad_environment_values_name_the_variable_and_key(variable, value, message):
    with pytest.raises(ConfigError) as raised:
        load_settings(None, {variable: value})
    assert str(raised.value).startswith(message)


def test_unknown_cli_override_is_refused():
    with pytest.raises(ConfigError, match="^proxy.lisen: unknown setting"):
        load_settings(None, {}, {"proxy.lisen": "127.0.0.1:1"})


def test_upstream_from_a_url_with_percent_encoding():
    upstream = parse_upstream_url(
        "postgresql://app%40corp:p%40ss%2Fw+rd@db.example:5433/my%20db"
        "?sslmode=verify-full&sslrootcert=%2Fetc%2Fca.pem&application_name=web&connect_timeout=3"
    )
    assert upstream == Upstream(
        host="db.example",
        port=5433,
        database="my db",
        user="app@corp",
        password="p@ss/w+rd",
        sslmode="verify-full",
        sslrootcert="/etc/ca.pem",
    )
    assert upstream.display() == "db.example:5433"


@pytest.mark.parametrize(
    ("url", "host", "port", "database"),
    [
        ("postgres://[::1]:6543/app", "::1", 6543, "app"),
        ("postgresql://%2Fvar%2Frun%2Fpostgresql/app", "/var/run/postgresql", 5432, "app"),
        ("postgresql:///app?host=/tmp&port=5499", "/tmp", 5499, "app"),
        ("db.internal:6000", "db.internal", 6000, None),
        ("db.internal", "db.internal", 5432, None),
    ],
)
def test_upstream_forms(url, host, port, database):
    upstream = parse_upstream_url(url)
    assert (upstream.host, upstream.port, upstream.database, upstream.sslmode) == (host, port, database, "prefer")


def test_url_without_host_means_the_local_unix_socket_like_libpq():
    for configured in ({"DATABASE_URL": "postgresql:///app"}, {"PGSCOUT_PROXY_UPSTREAM": "postgresql://"}):
        upstream = load_settings(None, configured).proxy.upstream
        assert upstream.is_unix_socket
        assert upstream.display().endswith("/.s.PGSQL.5432")


def test_libpq_ssl_true_spelling_means_require():
    assert parse_upstream_url("postgresql://db/app?ssl=true").sslmode == "require"


def test_unix_socket_upstream_displays_the_socket_path():
    assert parse_upstream_url("postgresql:///app?host=/tmp&port=5499").display() == "/tmp/.s.PGSQL.5499"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://db/app?sslmode=always", "proxy.upstream: invalid sslmode 'always'"),
        ("postgresql://db:0/app", "proxy.upstream: invalid port '0'"),
        ("postgresql://db/app?port=x", "proxy.upstream: invalid port 'x'"),
        ("postgresql://u:%zz@db/app", "proxy.upstream: invalid percent-encoding in the password"),
        ("postgresql://a,b/app", "proxy.upstream: several hosts are not supported"),
        ("mysql://db/app", "proxy.upstream: unsupported URL scheme 'mysql'"),
    ],
)
def test_bad_upstream_urls(url, message):
    with pytest.raises(ConfigError) as raised:
        parse_upstream_url(url)
    assert str(raised.value).startswith(message)
    assert "%zz" not in str(raised.value)


def test_upstream_precedence_setting_then_database_url_then_pg_variables():
    pg_only = {"PGHOST": "pghost", "PGPORT": "5440", "PGDATABASE": "pgdb", "PGUSER": "pguser"}
    from_pg = load_settings(None, pg_only).proxy.upstream
    assert (from_pg.host, from_pg.port, from_pg.database, from_pg.user) == ("pghost", 5440, "pgdb", "pguser")

    with_url = {**pg_only, "DATABASE_URL": "postgresql://urlhost/urldb"}
    from_url = load_settings(None, with_url).proxy.upstream
    # As in libpq, PG* variables fill in what the URL leaves out.
    assert (from_url.host, from_url.port, from_url.database, from_url.user) == ("urlhost", 5440, "urldb", "pguser")

    with_setting = {**with_url, "PGSCOUT_PROXY_UPSTREAM": "postgresql://envhost:5999/envdb"}
    assert load_settings(None, with_setting).proxy.upstream.host == "envhost"
    cli = load_settings(None, with_setting, {"proxy.upstream": "clihost:6001"}).proxy.upstream
    assert (cli.host, cli.port) == ("clihost", 6001)


def test_upstream_password_and_ssl_from_pg_variables():
    upstream = load_settings(
        None, {"PGHOST": "/run/pg", "PGPASSWORD": "pw", "PGSSLMODE": "require", "PGSSLROOTCERT": "/ca.pem"}
    ).proxy.upstream
    assert upstream == Upstream(host="/run/pg", password="pw", sslmode="require", sslrootcert="/ca.pem")


def test_bad_upstream_from_the_environment_names_the_variable():
    with pytest.raises(ConfigError, match=r"^PGPORT \(proxy.upstream\): invalid port 'abc'"):
        load_settings(None, {"PGHOST": "db", "PGPORT": "abc"})
    with pytest.raises(ConfigError, match=r"^DATABASE_URL \(proxy.upstream\): invalid sslmode"):
        load_settings(None, {"DATABASE_URL": "postgresql://db/app?sslmode=x"})


def test_password_is_not_in_repr_or_display():
    upstream = parse_upstream_url("postgresql://app:hunter2@db/app")
    assert "hunter2" not in repr(upstream)
    assert "hunter2" not in str(upstream)
    assert "hunter2" not in upstream.display()


def test_control_dsn_carries_credentials_and_falls_back_to_the_postgres_database():
    dsn = parse_upstream_url("postgresql://app:p%40ss@db:5433?sslmode=require").control_dsn()
    assert dsn.startswith("postgresql://app:p%40ss@db:5433/postgres?")
    assert "sslmode=require" in dsn
    assert parse_upstream_url(dsn) == parse_upstream_url("postgresql://app:p%40ss@db:5433/postgres?sslmode=require")


def test_effective_yaml_round_trips(write_config, tmp_path):
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("c")
    key.write_text("k")
    environ = {
        "DATABASE_URL": "postgresql://app@%2Frun%2Fpg/my%20db?sslmode=disable&port=5499",
        "PGSCOUT_PROXY_LISTEN": "[::]:0",
        "PGSCOUT_PROXY_CLIENT_TLS_CERT": str(cert),
        "PGSCOUT_PROXY_CLIENT_TLS_KEY": str(key),
        "PGSCOUT_SLOWLOG_PER_APPLICATION": "{web: 20, 'odd: name': 1.5}",
        "PGSCOUT_BUDGETS": "[{name: web, database: app, max_connections: 4, enforce: true}]",
        "PGSCOUT_NPLUSONE_MIN_DISTINCT_RATIO": "0.5",
        "PGSCOUT_LOG_FORMAT": "json",
    }
    settings = load_settings(None, environ)
    assert load_settings(write_config(effective_yaml(settings)), {}) == settings


def test_effective_yaml_never_contains_the_password_or_token(write_config):
    environ = {"DATABASE_URL": "postgresql://app:hunter2@db/app", "PGSCOUT_ADMIN_TOKEN": "t0ps3cret"}
    settings = load_settings(None, environ)
    printed = effective_yaml(settings)
    assert "hunter2" not in printed
    assert "t0ps3cret" not in printed
    # The printed token is a placeholder that is refused, never a working token...
    with pytest.raises(ConfigError, match="admin.token"):
        load_settings(write_config(printed), {})
    # ...and supplying the secrets again the libpq / PGSCOUT_ way restores the same settings.
    restored = load_settings(write_config(printed), {"PGPASSWORD": "hunter2", "PGSCOUT_ADMIN_TOKEN": "t0ps3cret"})
    assert restored == settings
