"""SQL comment tags: sqlcommenter and marginalia.

Owns: finding the comments in a statement's text (outside string literals, quoted identifiers and
dollar quotes; block comments nest as in PostgreSQL), parsing the tags ORMs put there, and the
comment-stripped text that the fingerprinter feeds to pglast.

- sqlcommenter (SQLAlchemy, Django, OpenTelemetry, Rails 7.1): `/*key='value',key2='v%20x'*/`;
  keys and values are URL-encoded, `'` inside a value is escaped as `\\'`.
- marginalia (Rails): `/*application:Blog,controller:posts,action:index*/`; a value may itself
  contain `:` (`line:/app/x.rb:12`).
Both forms are also accepted in `--` line comments. A comment that fits neither form yields no
tags. Only the attribution keys in ATTRIBUTION_KEYS are kept: a comment is the application's
free text, and anything else in it (a note, a user id) must not reach logs or the API.
Values are cut at MAX_VALUE_CHARS; when two comments carry one key the first wins.

Read interface: `parse_comments(sql) -> ParsedComments(tags, text)`, `may_hold_comments(sql)`
(a cheap test that lets a caller skip the parse of a text without comments) and
`trace_id(tags) -> str | None` (the W3C trace id from a `traceparent` tag).
Must not: log, raise on any input, or keep anything between calls.
"""

from __future__ import annotations

import re
from typing import NamedTuple
from urllib.parse import unquote

# sqlcommenter's and marginalia's attribution keys (OpenTelemetry, Django, SQLAlchemy, Rails).
ATTRIBUTION_KEYS = frozenset({"action", "application", "controller", "db_driver", "db_framework",
                              "framework", "job", "line", "route", "traceparent"})
MAX_VALUE_CHARS = 200

# Characters that can start a comment or something that hides one: found by a plain character
# class (fast in `re`), then the lexeme is matched at that position.
_LEXEME_START = re.compile(r"['\"$/-]")
# Strings may run unterminated to the end of the text, as the server's lexer would read them.
_LEXEME = re.compile(
    r"""
      '(?:[^']|'')*'?                                                  # standard string
    | "(?:[^"]|"")*"?                                                  # quoted identifier
    | \$(?<![\w$]\$)(?P<tag>(?:[^\W\d]\w*)?)\$.*?(?:\$(?P=tag)\$|\Z)  # dollar quote
    | (?P<block>/\*)
    | (?P<line>--[^\r\n]*)
    """,
    re.VERBOSE | re.DOTALL,
)
_ESCAPE_STRING = re.compile(r"'(?:[^'\\]|\\.|'')*'?", re.DOTALL)  # the part after E
_IDENTIFIER_CHAR = re.compile(r"[\w$]")
_BLOCK_EDGE = re.compile(r"/\*|\*/")

_SQLCOMMENTER_PAIR = r"\s*([^\s=,']+)\s*=\s*'([^'\\]*(?:\\.[^'\\]*)*)'\s*"
_SQLCOMMENTER_BODY = re.compile(rf"{_SQLCOMMENTER_PAIR}(?:,{_SQLCOMMENTER_PAIR})*", re.DOTALL)
_SQLCOMMENTER_PAIRS = re.compile(_SQLCOMMENTER_PAIR, re.DOTALL)
_MARGINALIA_KEY = re.compile(r"[A-Za-z_][\w.\-]*")
_TRACEPARENT = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}(?:-.*)?")


class ParsedComments(NamedTuple):
    tags: dict[str, str]
    text: str  # the statement with every comment replaced by one space, outer whitespace stripped


def may_hold_comments(sql: str) -> bool:
    """False when `sql` has no comment for certain: its parse is `({}, sql.strip())`."""
    return "/*" in sql or "--" in sql


def parse_comments(sql: str) -> ParsedComments:
    """Split `sql` into its comment tags and its comment-free text."""
    if not may_hold_comments(sql):
        return ParsedComments({}, sql.strip())
    tags: dict[str, str] = {}
    kept: list[str] = []
    kept_from = 0
    position = 0
    while True:
        start = _LEXEME_START.search(sql, position)
        if start is None:
            break
        position = start.start()
        lexeme = _LEXEME.match(sql, position)
        if lexeme is None:
            position += 1
            continue
        if lexeme.group("block") is not None:
            body_start = lexeme.end()
            end = _end_of_block_comment(sql, body_start)
            body = sql[body_start : end - 2] if sql.endswith("*/", 0, end) else sql[body_start:end]
        elif lexeme.group("line") is not None:
            end = lexeme.end()
            body = sql[position + 2 : end]
        else:
            if sql[position] == "'" and _is_escape_string_prefix(sql, position - 1):
                escape_string = _ESCAPE_STRING.match(sql, position)
                assert escape_string is not None  # it matches any text starting with '
                lexeme = escape_string
            position = lexeme.end()
            continue
        kept.append(sql[kept_from:position])
        kept.append(" ")
        kept_from = position = end
        _add_tags(body, tags)
    kept.append(sql[kept_from:])
    return ParsedComments(tags, "".join(kept).strip())


def trace_id(tags: dict[str, str]) -> str | None:
    """The 32-hex trace id of a valid `traceparent` tag (W3C Trace Context), else None."""
    traceparent = tags.get("traceparent")
    if not traceparent:
        return None
    match = _TRACEPARENT.fullmatch(traceparent.strip().lower())
    if match is None:
        return None
    version, trace, span = match.groups()
    if version == "ff" or trace == "0" * 32 or span == "0" * 16:
        return None
    return trace


def _is_escape_string_prefix(sql: str, index: int) -> bool:
    """True when sql[index] is the E of an E'' string (a lone E, not the end of an identifier)."""
    return (
        index >= 0
        and sql[index] in "eE"
        and (index == 0 or _IDENTIFIER_CHAR.match(sql, index - 1) is None)
    )


def _end_of_block_comment(sql: str, body_start: int) -> int:
    """Offset just past the `*/` closing a (possibly nested) block comment, or len(sql)."""
    depth = 1
    position = body_start
    while True:
        edge = _BLOCK_EDGE.search(sql, position)
        if edge is None:
            return len(sql)
        position = edge.end()
        depth += 1 if edge.group() == "/*" else -1
        if depth == 0:
            return position


def _add_tags(body: str, tags: dict[str, str]) -> None:
    body = body.strip()
    if not body:
        return
    pairs = _sqlcommenter_pairs(body)
    if pairs is None:
        pairs = _marginalia_pairs(body)
    for key, value in pairs:
        if key in ATTRIBUTION_KEYS:
            tags.setdefault(key, value[:MAX_VALUE_CHARS])


def _sqlcommenter_pairs(body: str) -> list[tuple[str, str]] | None:
    if _SQLCOMMENTER_BODY.fullmatch(body) is None:
        return None
    pairs = []
    for key, value in _SQLCOMMENTER_PAIRS.findall(body):
        if "\\" in value:
            value = re.sub(r"\\(.)", r"\1", value, flags=re.DOTALL)
        pairs.append((_url_decoded(key), _url_decoded(value)))
    return pairs


def _url_decoded(text: str) -> str:
    return unquote(text) if "%" in text else text


def _marginalia_pairs(body: str) -> list[tuple[str, str]]:
    """`key:value,key:value`; a part without a key belongs to the previous value (a comma in it)."""
    pairs: list[tuple[str, str]] = []
    for part in body.split(","):
        key, colon, value = part.partition(":")
        key = key.strip()
        if colon and _MARGINALIA_KEY.fullmatch(key):
            pairs.append((key, value.strip()))
        elif pairs:
            previous_key, previous_value = pairs[-1]
            pairs[-1] = (previous_key, f"{previous_value},{part}".strip())
        else:
            return []
    return pairs
