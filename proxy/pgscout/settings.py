"""Configuration: the settings model, where each value comes from, and the upstream target.

Owns: the frozen settings dataclasses and their defaults; loading them from a YAML file, from
`PGSCOUT_<SECTION>_<KEY>` environment variables and from CLI overrides (overrides > environment >
file > defaults); the libpq-style upstream (postgresql:// URL, DATABASE_URL, PG* variables);
validation whose errors name the offending key; and the effective configuration as YAML with
secrets redacted.
Must not: import anything from pgscout (it is a leaf: standard library and yaml only), open
connections, or read any file other than the config file (TLS paths are only checked to exist).
Dataclasses built directly in code are not validated: validation happens in `load_settings`.
"""

from __future__ import annotations

import difflib
import math
import os
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

import yaml

ENV_PREFIX = "PGSCOUT_"
# Written in place of a secret by effective_yaml; refused on load so a printed config can never
# run with a guessable admin token.
REDACTED = "<redacted>"
SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "json", "console")
DEFAULT_POSTGRES_PORT = 5432
# Lets operators (and pgscout's own pg_stat_activity reading) tell the control connection apart.
CONTROL_APPLICATION_NAME = "pgscout-control"

# libpq environment variables, used for whatever the upstream URL leaves out (as libpq does).
LIBPQ_ENVIRONMENT = {
    "PGHOST": "host",
    "PGPORT": "port",
    "PGDATABASE": "dbname",
    "PGUSER": "user",
    "PGPASSWORD": "password",
    "PGSSLMODE": "sslmode",
    "PGSSLROOTCERT": "sslrootcert",
    "PGSSLCERT": "sslcert",
    "PGSSLKEY": "sslkey",
}
_URL_KEYWORDS = frozenset(LIBPQ_ENVIRONMENT.values())


class ConfigError(ValueError):
    """A setting is unknown, mistyped or out of range, or the config file is unusable.

    The message starts with the key (and the environment variable, when one supplied it), e.g.
    "slowlog.threshold_ms: expected a number, got 'abc'".
    """


class _Invalid(Exception):
    """A value failed validation; the caller prefixes the key. `where` extends the key path."""

    def __init__(self, message: str, where: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.where = where


# --------------------------------------------------------------------------------------------
# Addresses and the upstream target


@dataclass(frozen=True)
class Address:
    """A TCP listen address; `str()` gives back "HOST:PORT" (IPv6 hosts in brackets)."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def _parse_port(text: str, *, allow_zero: bool) -> int:
    lowest = 0 if allow_zero else 1
    if not text.isascii() or not text.isdigit() or not lowest <= int(text) <= 65535:
        raise _Invalid(f"invalid port {text!r} (expected {lowest}-65535)")
    return int(text)


def _split_host_port(text: str) -> tuple[str, str | None]:
    """Split "host", "host:port", "[v6]" or "[v6]:port"; the port stays text."""
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise _Invalid(f"invalid bracketed IPv6 address in {text!r}")
        return host, rest[1:] if rest else None
    host, colon, port = text.partition(":")
    if colon and ":" in port:
        raise _Invalid(f"IPv6 addresses need brackets, e.g. [::1]:6434; got {text!r}")
    return host, port if colon else None


def _parse_address(text: str) -> Address:
    host, port = _split_host_port(text)
    if not host or port is None:
        raise _Invalid(f"expected HOST:PORT, got {text!r}")
    # Port 0 asks the OS for a free port, which tests and ephemeral sidecars rely on.
    return Address(host, _parse_port(port, allow_zero=True))


@dataclass(frozen=True)
class Upstream:
    """The database pgscout forwards to, as libpq would understand it.

    `host` is a hostname, an IP address or a Unix socket directory (starting with "/").
    The password is only for pgscout's own control connection; it never appears in repr/str,
    `display()` or effective_yaml.
    """

    host: str
    port: int = DEFAULT_POSTGRES_PORT
    database: str | None = None
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    sslmode: str = "prefer"
    sslrootcert: str | None = None
    sslcert: str | None = None
    sslkey: str | None = None

    @property
    def is_unix_socket(self) -> bool:
        return self.host.startswith("/")

    @property
    def socket_path(self) -> str:
        """The server's unix socket file (libpq's convention), for a socket-directory host."""
        return f"{self.host.rstrip('/')}/.s.PGSQL.{self.port}"

    def display(self) -> str:
        """Where pgscout connects, for logs and error messages: "host:port" or the socket path."""
        if self.is_unix_socket:
            return self.socket_path
        return str(Address(self.host, self.port))

    def control_dsn(self, database: str | None = None) -> str:
        """A DSN for asyncpg.connect() for pgscout's own queries (max_connections, activity),
        to `database` (the catalog looks into the applications' own), else the upstream's."""
        return self._url(
            include_password=True,
            database=database or self.database or "postgres",
            extra=(("application_name", CONTROL_APPLICATION_NAME),),
        )

    def _url(self, *, include_password: bool, database: str | None, extra=()) -> str:
        password = self.password if include_password else None
        userinfo = ""
        if self.user is not None or password is not None:
            userinfo = _quote(self.user or "")
            if password is not None:
                userinfo += ":" + _quote(password)
            userinfo += "@"
        query: list[tuple[str, str]] = []
        if self.is_unix_socket:
            # A socket directory cannot sit in the authority part; libpq and asyncpg both
            # take it (and its port) from the query string.
            netloc = userinfo
            query += [("host", self.host), ("port", str(self.port))]
        else:
            netloc = userinfo + str(Address(self.host, self.port))
        query.append(("sslmode", self.sslmode))
        for name in ("sslrootcert", "sslcert", "sslkey"):
            value = getattr(self, name)
            if value is not None:
                query.append((name, value))
        query += extra
        path = "/" + _quote(database) if database is not None else ""
        return f"postgresql://{netloc}{path}?" + "&".join(f"{k}={_quote(v)}" for k, v in query)


def _quote(text: str) -> str:
    return urllib.parse.quote(text, safe="")


_BAD_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _percent_decode(text: str, part: str) -> str:
    """Decode %XX like libpq: a malformed escape or %00 is an error, '+' stays '+'.

    The message names only the URL part, never the text: it may be a password.
    """
    if "%" not in text:
        return text
    if _BAD_PERCENT.search(text) or "%00" in text:
        raise _Invalid(f"invalid percent-encoding in the {part}")
    try:
        return urllib.parse.unquote_to_bytes(text).decode("utf-8")
    except UnicodeDecodeError:
        raise _Invalid(f"the {part} is not UTF-8 after percent-decoding") from None


# A DNS name, an IPv4 address or (unbracketed by _split_host_port) an IPv6 one; a Unix socket
# directory starts with "/" instead. Without this, "not a url" would be looked up as a host name.
_HOST_NAME = re.compile(r"[A-Za-z0-9._-]+|[0-9A-Fa-f:.]*:[0-9A-Fa-f:.%A-Za-z]*")


def _url_parameters(url: str) -> dict[str, str]:
    """The libpq keywords a postgresql:// URL (or a bare "host:port") sets, decoded."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        host, port = _split_host_port(url)
        if not host or not (host.startswith("/") or _HOST_NAME.fullmatch(host)):
            shown = f", got {url!r}" if "@" not in url else ""  # it may carry a password
            raise _Invalid(f"expected a postgresql:// URL or HOST:PORT{shown}")
        return {"host": host} | ({"port": port} if port is not None else {})
    if scheme not in ("postgresql", "postgres"):
        raise _Invalid(f"unsupported URL scheme {scheme!r} (expected postgresql:// or postgres://)")
    rest, _, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    # The last "@" ends the userinfo, so an unescaped "@" in a password still parses.
    userinfo, _, hostspec = authority.rpartition("@")
    parameters: dict[str, str] = {}
    user, colon, password = userinfo.partition(":")
    if user:
        parameters["user"] = _percent_decode(user, "user name")
    if colon and password:
        parameters["password"] = _percent_decode(password, "password")
    if "," in hostspec:
        raise _Invalid("several hosts are not supported: pgscout forwards to one server")
    host, port = _split_host_port(hostspec)
    if host:
        host = _percent_decode(host, "host")
        if not (host.startswith("/") or _HOST_NAME.fullmatch(host)):
            raise _Invalid(f"invalid host {host!r} (expected a host name, an IP address or a "
                           f"socket directory)")
        parameters["host"] = host
    if port:
        parameters["port"] = port
    if slash and path:
        parameters["dbname"] = _percent_decode(path, "database name")
    for item in query.split("&") if query else ():
        key, equals, value = item.partition("=")
        if not equals:
            raise _Invalid(f"query parameter {_percent_decode(key, 'query')!r} has no '=' value")
        key = _percent_decode(key, "query")
        value = _percent_decode(value, f"{key} parameter")
        if key == "ssl" and value == "true":  # libpq's JDBC-compatible spelling
            key, value = "sslmode", "require"
        if key in _URL_KEYWORDS:
            parameters[key] = value
    return parameters


def _default_socket_directory() -> str:
    # libpq's default is compiled in: Debian/Ubuntu packages and the postgres image use
    # /var/run/postgresql, source builds /tmp.
    return "/var/run/postgresql" if os.path.isdir("/var/run/postgresql") else "/tmp"


def _upstream_from(parameters: Mapping[str, tuple[str, str]]) -> Upstream:
    """Build an Upstream from libpq keywords, each with the label of where it came from."""

    def value(keyword: str) -> str | None:
        entry = parameters.get(keyword)
        return entry[0] if entry else None

    def fail(keyword: str, message: str) -> ConfigError:
        return ConfigError(f"{parameters[keyword][1]}: {message}")

    host = value("host") or _default_socket_directory()
    if "," in host:
        raise fail("host", "several hosts are not supported: pgscout forwards to one server")
    port = DEFAULT_POSTGRES_PORT
    if value("port"):
        try:
            port = _parse_port(value("port"), allow_zero=False)
        except _Invalid as error:
            raise fail("port", error.message) from None
    sslmode = value("sslmode") or "prefer"
    if sslmode not in SSLMODES:
        raise fail("sslmode", f"invalid sslmode {sslmode!r} (expected one of {', '.join(SSLMODES)})")
    return Upstream(
        host=host,
        port=port,
        database=value("dbname") or None,
        user=value("user") or None,
        password=value("password") or None,
        sslmode=sslmode,
        sslrootcert=value("sslrootcert") or None,
        sslcert=value("sslcert") or None,
        sslkey=value("sslkey") or None,
    )


def _labelled_url_parameters(url: str, label: str) -> dict[str, tuple[str, str]]:
    try:
        return {key: (value, label) for key, value in _url_parameters(url).items()}
    except _Invalid as error:
        raise ConfigError(f"{label}: {error.message}") from None


def parse_upstream_url(url: str) -> Upstream:
    """Parse a postgresql:// or postgres:// URL, or a bare "host:port", like libpq.

    Query parameters host, port, dbname, user, password, sslmode, sslrootcert, sslcert and sslkey
    are honoured; others (application_name, connect_timeout...) belong to the client and are
    ignored. Errors name "proxy.upstream".
    """
    return _upstream_from(_labelled_url_parameters(url, "proxy.upstream"))


def _resolve_upstream(configured: str, label: str, environ: Mapping[str, str]) -> Upstream | None:
    """proxy.upstream if set, else DATABASE_URL, else only the PG* variables; None if nothing."""
    parameters = {
        keyword: (environ[variable], f"{variable} (proxy.upstream)")
        for variable, keyword in LIBPQ_ENVIRONMENT.items()
        if environ.get(variable)
    }
    if not configured and environ.get("DATABASE_URL"):
        configured, label = environ["DATABASE_URL"], "DATABASE_URL (proxy.upstream)"
    if not configured and not parameters:
        return None
    if configured:
        parameters |= _labelled_url_parameters(configured, label)
    return _upstream_from(parameters)


# --------------------------------------------------------------------------------------------
# Value kinds: how a key is checked, read from an environment string, and written back


def _show(value: object) -> str:
    return repr(value) if isinstance(value, str) else f"{type(value).__name__} {value!r}"


class _Kind:
    def from_text(self, text: str) -> object:
        """Turn an environment/CLI string into the value a YAML file would hold."""
        return text

    def check(self, value: object) -> object:
        raise NotImplementedError

    def dump(self, value: object) -> object:
        return value


class _Integer(_Kind):
    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def from_text(self, text: str) -> object:
        try:
            return int(text.strip())
        except ValueError:
            raise _Invalid(f"expected an integer, got {text!r}") from None

    def check(self, value: object) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise _Invalid(f"expected an integer, got {_show(value)}")
        if value < self.minimum:
            raise _Invalid(f"must be at least {self.minimum}, got {value}")
        return value


class _Number(_Kind):
    def __init__(self, minimum: float, *, above_minimum: bool = False, maximum: float | None = None):
        self.minimum, self.above_minimum, self.maximum = minimum, above_minimum, maximum

    def from_text(self, text: str) -> object:
        try:
            return float(text.strip())
        except ValueError:
            raise _Invalid(f"expected a number, got {text!r}") from None

    def check(self, value: object) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise _Invalid(f"expected a number, got {_show(value)}")
        if self.maximum is not None and not self.minimum <= value <= self.maximum:
            raise _Invalid(f"must be between {self.minimum:g} and {self.maximum:g}, got {value}")
        if value < self.minimum or (self.above_minimum and value == self.minimum):
            bound = "greater than" if self.above_minimum else "at least"
            raise _Invalid(f"must be {bound} {self.minimum:g}, got {value}")
        return float(value)


class _Flag(_Kind):
    WORDS = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}

    def from_text(self, text: str) -> object:
        try:
            return self.WORDS[text.strip().lower()]
        except KeyError:
            raise _Invalid(f"expected true/false/yes/no/1/0, got {text!r}") from None

    def check(self, value: object) -> bool:
        if not isinstance(value, bool):
            raise _Invalid(f"expected true or false, got {_show(value)}")
        return value


class _Text(_Kind):
    def check(self, value: object) -> str:
        if not isinstance(value, str):
            raise _Invalid(f"expected a string, got {_show(value)}")
        return value


class _Secret(_Text):
    def check(self, value: object) -> str:
        if super().check(value) == REDACTED:
            raise _Invalid(f"{REDACTED} is the placeholder effective_yaml prints; set the real value")
        return value

    def dump(self, value: object) -> object:
        return REDACTED if value else ""


class _Choice(_Text):
    def __init__(self, choices: tuple[str, ...]) -> None:
        self.choices = choices

    def check(self, value: object) -> str:
        if super().check(value) not in self.choices:
            raise _Invalid(f"expected one of {', '.join(self.choices)}, got {value!r}")
        return value


class _ListenAddress(_Text):
    def check(self, value: object) -> Address:
        return _parse_address(super().check(value))

    def dump(self, value: object) -> object:
        return str(value)


class _UpstreamURL(_Text):
    """Checked as a string here; resolved (with DATABASE_URL and PG*) once all layers merged."""

    def dump(self, value: object) -> object:
        if value is None:
            return ""
        return value._url(include_password=False, database=value.database)


class _YamlText(_Kind):
    def from_text(self, text: str) -> object:
        try:
            return _load_yaml(text)
        except yaml.YAMLError as error:
            raise _Invalid(f"expected YAML or JSON, {_yaml_problem(error)}") from None


class _ThresholdsByApplication(_YamlText):
    def check(self, value: object) -> dict[str, float]:
        if not isinstance(value, dict):
            raise _Invalid(f"expected a mapping of application_name to milliseconds, got {_show(value)}")
        thresholds = {}
        for application, threshold in value.items():
            if not isinstance(application, str):
                raise _Invalid(f"application names must be strings, got {_show(application)}")
            try:
                thresholds[application] = _Number(0).check(threshold)
            except _Invalid as error:
                raise _Invalid(error.message, where=f".{application}") from None
        return thresholds


@dataclass(frozen=True, kw_only=True)
class Budget:
    """A connection budget: at most `max_connections` sessions matching every field that is set."""

    name: str
    application_name: str | None = None
    user: str | None = None
    database: str | None = None
    max_connections: int
    enforce: bool = False

    def matches(self, application_name: str, user: str, database: str) -> bool:
        return (
            (self.application_name is None or self.application_name == application_name)
            and (self.user is None or self.user == user)
            and (self.database is None or self.database == database)
        )


class _Budgets(_YamlText):
    KINDS = {
        "name": _Text(),
        "application_name": _Text(),
        "user": _Text(),
        "database": _Text(),
        "max_connections": _Integer(1),
        "enforce": _Flag(),
    }

    def check(self, value: object) -> tuple[Budget, ...]:
        if not isinstance(value, list):
            raise _Invalid(f"expected a list of budgets, got {_show(value)}")
        budgets = []
        for index, entry in enumerate(value):
            where = f"[{index}]"
            if not isinstance(entry, dict):
                raise _Invalid(f"expected a mapping, got {_show(entry)}", where)
            for key in entry:
                if key not in self.KINDS:
                    raise _Invalid(_unknown(key, self.KINDS), f"{where}.{key}")
            for required in ("name", "max_connections"):
                if required not in entry:
                    raise _Invalid("required", f"{where}.{required}")
            checked = {}
            for key, raw in entry.items():
                try:
                    checked[key] = self.KINDS[key].check(raw)
                except _Invalid as error:
                    raise _Invalid(error.message, f"{where}.{key}") from None
            if any(budget.name == checked["name"] for budget in budgets):
                raise _Invalid(f"duplicate budget name {checked['name']!r}", f"{where}.name")
            budgets.append(Budget(**checked))
        return tuple(budgets)

    def dump(self, value: object) -> object:
        return [
            {key: item for key in self.KINDS if (item := getattr(budget, key)) is not None}
            for budget in value
        ]


def _setting(default, kind: _Kind):
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata={"kind": kind})
    return field(default=default, metadata={"kind": kind})


# --------------------------------------------------------------------------------------------
# The settings model. Every key here is documented, with its default, in config/pgscout.yaml.


@dataclass(frozen=True)
class ProxySettings:
    # 6434, not 6432: PgBouncer (and pgcat, Odyssey) listen on 6432, and pgscout often runs beside one.
    listen: Address = _setting(Address("127.0.0.1", 6434), _ListenAddress())
    upstream: Upstream | None = _setting(None, _UpstreamURL())
    connect_timeout_seconds: float = _setting(5.0, _Number(0, above_minimum=True))
    # PostgreSQL's authentication_timeout: from accept to the end of authentication.
    startup_timeout_seconds: float = _setting(60.0, _Number(0, above_minimum=True))
    drain_timeout_seconds: float = _setting(30.0, _Number(0))
    # How much of one message pgscout decodes; longer ones are still forwarded whole.
    max_message_bytes: int = _setting(1 << 30, _Integer(1))
    # Off, as in PostgreSQL (client_connection_check_interval = 0); never after a Terminate.
    cancel_on_client_hangup: bool = _setting(False, _Flag())
    # The upstream URL's sslcert/sslkey are for the control connection unless this is set.
    upstream_cert_for_sessions: bool = _setting(False, _Flag())
    write_buffer_high_bytes: int = _setting(262144, _Integer(1))
    write_buffer_low_bytes: int = _setting(65536, _Integer(0))
    client_tls_cert: str = _setting("", _Text())
    client_tls_key: str = _setting("", _Text())


@dataclass(frozen=True)
class AdminSettings:
    # 9434, not 9187: 9187 is postgres_exporter's default (9127 pgbouncer_exporter's), often beside pgscout.
    listen: Address = _setting(Address("127.0.0.1", 9434), _ListenAddress())
    token: str = _setting("", _Secret())


@dataclass(frozen=True)
class LogSettings:
    level: str = _setting("info", _Choice(LOG_LEVELS))
    format: str = _setting("auto", _Choice(LOG_FORMATS))


@dataclass(frozen=True)
class StatementSettings:
    fingerprint_cache_size: int = _setting(10000, _Integer(1))
    max_fingerprints: int = _setting(5000, _Integer(1))
    max_sql_chars: int = _setting(32768, _Integer(64))
    display_chars: int = _setting(2048, _Integer(64))
    analysis_backlog_bytes: int = _setting(8 << 20, _Integer(65536))


@dataclass(frozen=True)
class MetricsSettings:
    top_k: int = _setting(50, _Integer(0))
    sql_text_max_chars: int = _setting(200, _Integer(1))


@dataclass(frozen=True)
class SlowlogSettings:
    threshold_ms: float = _setting(500.0, _Number(0))
    per_application: dict[str, float] = _setting({}, _ThresholdsByApplication())
    log_parameters: bool = _setting(False, _Flag())
    max_per_second: int = _setting(10, _Integer(0))
    keep: int = _setting(200, _Integer(0))


@dataclass(frozen=True)
class NPlusOneSettings:
    enabled: bool = _setting(True, _Flag())
    include_writes: bool = _setting(False, _Flag())
    idle_gap_ms: float = _setting(1000.0, _Number(0, above_minimum=True))
    segment_max_events: int = _setting(5000, _Integer(1))
    segment_max_seconds: float = _setting(60.0, _Number(0, above_minimum=True))
    owner_ring: int = _setting(8, _Integer(1))
    owner_min_rows: int = _setting(2, _Integer(1))
    child_max_params: int = _setting(8, _Integer(0))
    min_distinct: int = _setting(5, _Integer(1))
    min_distinct_ratio: float = _setting(0.8, _Number(0, maximum=1))
    max_pipelined_ratio: float = _setting(0.2, _Number(0, maximum=1))
    max_think_ms: float = _setting(50.0, _Number(0))
    max_median_rows: int = _setting(100, _Integer(1))
    duplicate_min: int = _setting(3, _Integer(2))
    no_owner_min_run: int = _setting(10, _Integer(1))
    max_tracks: int = _setting(256, _Integer(1))
    warning_loop_ms: float = _setting(50.0, _Number(0))
    warning_n: int = _setting(20, _Integer(1))
    critical_loop_ms: float = _setting(500.0, _Number(0))
    critical_n: int = _setting(100, _Integer(1))
    report_interval_seconds: float = _setting(60.0, _Number(0, above_minimum=True))
    keep: int = _setting(200, _Integer(0))
    # Statements that read only pg_catalog / information_schema (driver and tool introspection)
    # are neither owners nor children unless this is on.
    include_catalog: bool = _setting(False, _Flag())
    # Children on other connections of the same application (and trace) count toward an owner.
    correlate_connections: bool = _setting(True, _Flag())
    # Median think time allowed when the children are separated by soft boundaries (a pool
    # check-out per query is quick; unrelated requests on a pooled connection are further apart).
    boundary_max_think_ms: float = _setting(10.0, _Number(0))
    # Repeats at least this far apart with steady gaps are polling, not a loop or a duplicate.
    poll_min_interval_ms: float = _setting(10.0, _Number(0))
    # Gaps count as steady when 80% of them are within this fraction of their median.
    poll_max_jitter_ratio: float = _setting(0.25, _Number(0, maximum=1))
    # Normalized SQL kept per owner and child (and shown in findings) is cut at this length.
    sql_text_max_chars: int = _setting(500, _Integer(40))
    # Estimated bytes the detector may retain (statement shapes, open segments, roll-ups);
    # past it the least recently active segments are judged early and forgotten.
    max_memory_bytes: int = _setting(32 * 1024 * 1024, _Integer(1024 * 1024))


@dataclass(frozen=True)
class FindingsSettings:
    # Other sessions' statements must have queued this long behind a DDL's lock for it to be a
    # blocking migration.
    blocking_migration_min_wait_ms: float = _setting(200.0, _Number(0, above_minimum=True))
    # A statement this slow in a session with statement_timeout = 0 makes the finding.
    no_statement_timeout_min_statement_ms: float = _setting(1000.0, _Number(0))
    long_transaction_seconds: float = _setting(60.0, _Number(0, above_minimum=True))
    idle_in_transaction_seconds: float = _setting(10.0, _Number(0, above_minimum=True))
    # Slow statements (besides N+1 children) whose filter column is checked for an index.
    missing_index_min_statement_ms: float = _setting(500.0, _Number(0))
    # Smaller tables are scanned cheaply: no missing-index finding on them.
    missing_index_min_table_rows: int = _setting(1000, _Integer(0))


@dataclass(frozen=True)
class ControlSettings:
    refresh_seconds: float = _setting(30.0, _Number(0, above_minimum=True))


@dataclass(frozen=True)
class Settings:
    proxy: ProxySettings = field(default_factory=ProxySettings)
    admin: AdminSettings = field(default_factory=AdminSettings)
    log: LogSettings = field(default_factory=LogSettings)
    statements: StatementSettings = field(default_factory=StatementSettings)
    metrics: MetricsSettings = field(default_factory=MetricsSettings)
    slowlog: SlowlogSettings = field(default_factory=SlowlogSettings)
    nplusone: NPlusOneSettings = field(default_factory=NPlusOneSettings)
    findings: FindingsSettings = field(default_factory=FindingsSettings)
    # A list rather than a section of keys: its kind sits on the field itself.
    budgets: tuple[Budget, ...] = field(default=(), metadata={"kind": _Budgets()})
    control: ControlSettings = field(default_factory=ControlSettings)


# Top-level name -> the section's dataclass, or the kind of a top-level list (budgets).
_SECTIONS: dict[str, type | _Kind] = {
    top.name: top.metadata.get("kind") or top.default_factory for top in fields(Settings)
}
# Top-level name -> {key: kind} for a section, or the list's kind.
_SCHEMA: dict[str, _Kind | dict[str, _Kind]] = {
    name: section
    if isinstance(section, _Kind)
    else {key.name: key.metadata["kind"] for key in fields(section)}
    for name, section in _SECTIONS.items()
}


# --------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class _Given:
    """One value from one layer; text from the environment or CLI is converted by the key's kind."""

    value: object
    is_text: bool
    variable: str | None = None  # the environment variable that supplied it


def _label(name: str, given: _Given | None) -> str:
    return f"{given.variable} ({name})" if given is not None and given.variable else name


def _fail(key: str, given: _Given, message: str, where: str = "") -> ConfigError:
    return ConfigError(f"{_label(key + where, given)}: {message}")


def _unknown(name: object, known, what: str = "key") -> str:
    close = difflib.get_close_matches(str(name), list(known), n=1)
    hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
    return f"unknown {what}; {hint}"


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice, where PyYAML would silently keep the last."""


def _construct_mapping_without_duplicates(loader, node, deep=False):
    seen = set()
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark
                )
            seen.add(key_node.value)
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping_without_duplicates
)


def _load_yaml(text: str) -> object:
    return yaml.load(text, Loader=_StrictLoader)


def _yaml_problem(error: yaml.YAMLError) -> str:
    problem = getattr(error, "problem", None) or str(error)
    mark = getattr(error, "problem_mark", None)
    return f"{problem} (line {mark.line + 1}, column {mark.column + 1})" if mark else problem


def _file_layer(path: str) -> dict[str, _Given]:
    try:
        with open(path, encoding="utf-8") as file:
            document = _load_yaml(file.read())
    except OSError as error:
        raise ConfigError(f"{path}: cannot read config file: {error.strerror or error}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: config file is not UTF-8") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: invalid YAML: {_yaml_problem(error)}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {_show(document)}")
    layer: dict[str, _Given] = {}
    for section, body in document.items():
        kinds = _SCHEMA.get(section)
        if kinds is None:
            raise ConfigError(f"{section}: {_unknown(section, _SCHEMA, 'section')}")
        if isinstance(kinds, _Kind):
            layer[section] = _Given(body, is_text=False)
            continue
        if body is None:  # a section whose keys are all commented out
            continue
        if not isinstance(body, dict):
            raise ConfigError(f"{section}: expected a mapping of keys, got {_show(body)}")
        for key, value in body.items():
            if key not in kinds:
                raise ConfigError(f"{section}.{key}: {_unknown(key, kinds)}")
            layer[f"{section}.{key}"] = _Given(value, is_text=False)
    return layer


def _environment_layer(environ: Mapping[str, str]) -> dict[str, _Given]:
    """PGSCOUT_<SECTION>_<KEY> variables (PGSCOUT_BUDGETS for the list).

    A variable under a known section's prefix must name a real key, so a typo fails loudly;
    other PGSCOUT_* names (say, one the CLI reads) are left alone.
    """
    layer: dict[str, _Given] = {}
    for variable, text in environ.items():
        if not variable.startswith(ENV_PREFIX):
            continue
        rest = variable[len(ENV_PREFIX):]
        for section, kinds in _SCHEMA.items():
            if isinstance(kinds, _Kind):
                if rest == section.upper():
                    layer[section] = _Given(text, is_text=True, variable=variable)
                continue
            prefix = section.upper() + "_"
            if rest.startswith(prefix):
                key = rest[len(prefix):].lower()
                if key not in kinds:
                    raise ConfigError(f"{variable}: {_unknown(key, kinds)}")
                layer[f"{section}.{key}"] = _Given(text, is_text=True, variable=variable)
    return layer


def _override_layer(overrides: Mapping[str, str]) -> dict[str, _Given]:
    """CLI flags as "section.key" (or "budgets") -> text, converted like environment values."""
    layer: dict[str, _Given] = {}
    for dotted, text in overrides.items():
        section, _, key = dotted.partition(".")
        kinds = _SCHEMA.get(section)
        known = key in kinds if isinstance(kinds, dict) else kinds is not None and not key
        if not known:
            raise ConfigError(f"{dotted}: unknown setting")
        layer[dotted] = _Given(text, is_text=True)
    return layer


def _checked(key: str, kind: _Kind, given: _Given) -> object:
    try:
        value = kind.from_text(given.value) if given.is_text else given.value
        return kind.check(value)
    except _Invalid as error:
        raise _fail(key, given, error.message, error.where) from None


def load_settings(
    path: str | None,
    environ: Mapping[str, str],
    overrides: Mapping[str, str] | None = None,
) -> Settings:
    """Load settings: overrides > environment (PGSCOUT_*) > file > defaults, then validate.

    The upstream is proxy.upstream if any layer sets it, else DATABASE_URL, else the libpq PG*
    variables (which also fill in what a URL leaves out); None when there is none at all.
    """
    given = _file_layer(path) if path is not None else {}
    given |= _environment_layer(environ)
    given |= _override_layer(overrides or {})

    sections = {}
    for name, kinds in _SCHEMA.items():
        if isinstance(kinds, _Kind):
            sections[name] = _checked(name, kinds, given[name]) if name in given else ()
            continue
        values = {
            key: _checked(f"{name}.{key}", kind, given[f"{name}.{key}"])
            for key, kind in kinds.items()
            if f"{name}.{key}" in given
        }
        if name == "proxy":
            label = _label("proxy.upstream", given.get("proxy.upstream"))
            values["upstream"] = _resolve_upstream(values.get("upstream", ""), label, environ)
        sections[name] = _SECTIONS[name](**values)
    settings = Settings(**sections)
    _check_together(settings)
    return settings


def _check_together(settings: Settings) -> None:
    """Rules that involve more than one key."""
    proxy, nplusone = settings.proxy, settings.nplusone
    if proxy.write_buffer_low_bytes >= proxy.write_buffer_high_bytes:
        raise ConfigError(
            f"proxy.write_buffer_low_bytes: must be less than proxy.write_buffer_high_bytes "
            f"({proxy.write_buffer_low_bytes} >= {proxy.write_buffer_high_bytes})"
        )
    if bool(proxy.client_tls_cert) != bool(proxy.client_tls_key):
        missing = "proxy.client_tls_key" if proxy.client_tls_cert else "proxy.client_tls_cert"
        raise ConfigError(f"{missing}: client TLS needs both a certificate and a key")
    for key in ("client_tls_cert", "client_tls_key"):
        file_path = getattr(proxy, key)
        if file_path and not os.path.isfile(file_path):
            raise ConfigError(f"proxy.{key}: no such file {file_path!r}")
    if nplusone.boundary_max_think_ms > nplusone.max_think_ms:
        raise ConfigError(
            f"nplusone.boundary_max_think_ms: must not exceed nplusone.max_think_ms "
            f"({nplusone.boundary_max_think_ms:g} > {nplusone.max_think_ms:g})"
        )
    for measure in ("loop_ms", "n"):
        warning = getattr(nplusone, f"warning_{measure}")
        critical = getattr(nplusone, f"critical_{measure}")
        if warning > critical:
            raise ConfigError(
                f"nplusone.warning_{measure}: must not exceed nplusone.critical_{measure} "
                f"({warning:g} > {critical:g})"
            )


# --------------------------------------------------------------------------------------------
# Writing back


def effective_yaml(settings: Settings) -> str:
    """The effective configuration as YAML that load_settings accepts again.

    The upstream password is left out of the URL (supply it with PGPASSWORD or ~/.pgpass, which
    the libpq rules pick up again) and the admin token is written as the REDACTED placeholder,
    which load_settings refuses so the printed file never runs with a known token.
    """
    document: dict[str, object] = {}
    for name, kinds in _SCHEMA.items():
        value = getattr(settings, name)
        if isinstance(kinds, _Kind):
            document[name] = kinds.dump(value)
        else:
            document[name] = {key: kind.dump(getattr(value, key)) for key, kind in kinds.items()}
    notes = []
    if settings.proxy.upstream is not None and settings.proxy.upstream.password is not None:
        notes.append("# proxy.upstream: password redacted; supply it with PGPASSWORD or ~/.pgpass\n")
    if settings.admin.token:
        notes.append(f"# admin.token: redacted; set the real token with {ENV_PREFIX}ADMIN_TOKEN\n")
    return "".join(notes) + yaml.safe_dump(document, sort_keys=False, allow_unicode=True)
