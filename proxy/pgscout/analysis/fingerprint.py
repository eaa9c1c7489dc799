"""Statement enrichment: fingerprint, normalized text, kind, comment tags, parameter signature.

Owns: deriving, once per distinct SQL text (bounded LRU), what every other observer reads from a
StatementDone: `fingerprint` (16 hex chars, libpg_query through pglast: the literal and `$1`
forms of a query, and IN lists of any length, share one), `normalized` (pglast's normalize of the
comment-stripped text: literals become `$n`), `kind`, `tags` (proxy.observers.comments) and,
for the simple protocol, `param_sig` (Python's salted hash of the comment-stripped text, so the
text itself is never kept for it). A multi-statement simple Query is split once and the piece at
`query_index` is described.

Text pglast cannot take (a ParseError, over MAX_PARSE_CHARS, or holding NUL or the U+FFFD the
decoder puts for invalid UTF-8) goes to a literal-stripping lexer instead; its fingerprints are
blake2b-derived with their own personalization, so they do not share pglast's hash inputs.
The cache is keyed by the comment-stripped text, so the comment scan runs per execution (a few
microseconds when there is a comment) and the parse once per distinct statement text.
Text over MAX_PARSE_CHARS (bulk INSERTs, giant IN lists) is not cached and is described from its
first LEXED_PREFIX_CHARS characters, as one statement, since that work is repeated for each
execution. The lexer reads at most LEXED_PREFIX_CHARS of any statement (about 0.5 us a character,
pglast about 0.3).

Read interface (for the Collector and the API): `cache_info()` (hits, misses, maxsize,
currsize), `lexed_statements` (statements described by the fallback lexer).
Helpers for other code: `fingerprint_text(sql) -> (fingerprint, normalized, kind)`.
Must not: raise out of `on_statement` for any text, log, or import asyncio/sockets/prometheus.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections import OrderedDict
from typing import Final, NamedTuple

from pglast import parser as pg

from pgscout.dataplane.events import StatementDone
from pgscout.analysis.comments import parse_comments

MAX_PARSE_CHARS: Final = 100_000
_CONSTANT: Final = re.compile(r"""("(?:[^"]|"")*")|'(?:[^']|'')*'|(?<![\w$.])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?""")
_NOT_KEYABLE: Final = re.compile(r"\\|\$(?!\d)")
# Characters the fingerprint cache may hold (texts and their normalized forms): ~4 bytes each
# at worst, so at most ~64 MB whatever the statements.
CACHE_CHARS: Final = 16_000_000
LEXED_PREFIX_CHARS: Final = 8_000

_KIND_BY_FIRST_WORD = {
    **dict.fromkeys(("select", "values", "table"), "select"),
    **dict.fromkeys(("insert", "update", "delete", "merge", "copy"), "dml"),
    **dict.fromkeys(
        ("begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release"), "txn"
    ),
    **dict.fromkeys(
        (
            "set", "reset", "show", "fetch", "move", "close", "listen", "unlisten", "notify",
            "discard", "deallocate", "prepare", "execute", "declare", "explain", "vacuum",
            "analyze", "analyse", "lock", "checkpoint", "cluster", "reindex", "load", "refresh",
            "call", "do",
        ),
        "utility",
    ),
    **dict.fromkeys(
        (
            "create", "alter", "drop", "truncate", "grant", "revoke", "comment", "security",
            "import", "reassign",
        ),
        "ddl",
    ),
}
_FIRST_WORDS = re.compile(r"[\s(]*([A-Za-z]+)(?:\s+([A-Za-z]+))?")
# Inside WITH, a data-modifying statement opens a CTE body `(` or follows the last CTE `)`;
# FOR UPDATE and ON CONFLICT DO UPDATE never follow a parenthesis.
_WITH_DML = re.compile(r"[()]\s*(?:insert|update|delete|merge)\b", re.IGNORECASE)

# Literals pglast's normalize leaves in place (COPY file names, PREPARE TRANSACTION ids,
# function bodies, DDL defaults): string and dollar-quoted text is redacted after it.
_MAY_HOLD_STRING = re.compile(r"'|\$(?!\d)")

# Lexing without lookbehinds (slow in `re`): identifiers are matched whole, so an E/B/X/N/U&
# string prefix, a digit or a `$` can only be seen where a token starts.
_STRING = r"""
      [eE]'(?:[^'\\]|\\.|'')*'?
    | (?:[bBxXnN]|[uU]&)?'(?:[^']|'')*'?
    | \$(?P<tag>(?:[^\W\d]\w*)?)\$.*?(?:\$(?P=tag)\$|\Z)
"""
_IDENTIFIER = r'[^\W\d][\w$]*|"(?:[^"]|"")*"?'
_STATEMENT_END = re.compile(
    rf"{_STRING} | {_IDENTIFIER} | (?P<semicolon>;)", re.VERBOSE | re.DOTALL
)
_LITERAL = re.compile(
    rf"""
      (?P<string>{_STRING})
    | (?P<identifier>{_IDENTIFIER})
    | \$\d+
    | (?:0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)
    """,
    re.VERBOSE | re.DOTALL,
)
_PLACEHOLDER = re.compile(r"\$\d+")
_SPACE_AROUND_SYMBOL = re.compile(r"\s*([^\w\s$?\"])\s*")
# In the hashed shape of lexed text every literal is `?` with no spaces around symbols, so a list
# of literals, or a run of such lists (VALUES rows), collapses to one.
_LITERAL_LIST = re.compile(r"\(\?(?:,\?)*\)(?:,\(\?(?:,\?)*\))*")


class StatementShape(NamedTuple):
    fingerprint: str
    normalized: str
    kind: str
    param_sig: int  # hash of the comment-stripped statement text
    parsed: bool  # False when the fallback lexer described it


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class DerivedText(NamedTuple):
    tags: dict[str, str]
    statements: tuple[StatementShape, ...]  # one per statement of the text, at least one


class Fingerprinter:
    """Bus observer that fills the enrichment fields of each StatementDone; runs first."""

    def __init__(self, cache_size: int, cache_chars: int = CACHE_CHARS) -> None:
        # Keyed by comment-stripped text: per-request comments (traceparent) make every raw
        # text unique, so only the comment scan is repeated per execution, never the parse.
        self._cache: OrderedDict[str, tuple[StatementShape, ...]] = OrderedDict()
        self._cache_size = cache_size
        self._cache_chars = cache_chars
        self._cached_chars = 0
        self._hits = self._misses = 0
        self.lexed_statements = 0

    def _describe_cached(self, key: str, text: str) -> tuple[StatementShape, ...]:
        """describe_statements through an LRU bounded in entries and in characters kept (keys
        plus normalized texts), so a flood of large distinct statements cannot grow memory."""
        cache = self._cache
        statements = cache.get(key)
        if statements is not None:
            self._hits += 1
            cache.move_to_end(key)
            return statements
        self._misses += 1
        statements = describe_statements(text)
        size = len(key) + sum(len(shape.normalized) for shape in statements)
        if size > self._cache_chars:
            return statements
        cache[key] = statements
        self._cached_chars += size
        while len(cache) > self._cache_size or self._cached_chars > self._cache_chars:
            old_text, old = cache.popitem(last=False)
            self._cached_chars -= len(old_text) + sum(len(shape.normalized) for shape in old)
        return statements

    def on_statement(self, ev: StatementDone) -> None:
        sql = ev.sql
        if len(sql) > MAX_PARSE_CHARS:
            tags, statements = derive(sql)
        else:
            tags, text = parse_comments(sql)
            key = constant_free_key(text) if ev.param_sig is None else None
            if key is None:
                statements = self._describe_cached(text, text)
            else:
                # Literals inline (simple protocol): every execution is a new text, but all its
                # variants share one cache entry; the parameter signature is this text's own.
                statements = self._describe_cached(key, text)
                ev.param_sig = hash(text)
        # The server and pglast can disagree on the count (another server version's syntax):
        # extra statements are described as the last one.
        shape = statements[min(ev.query_index, len(statements) - 1)]
        ev.fingerprint = shape.fingerprint
        ev.normalized = shape.normalized
        ev.kind = shape.kind
        if tags:
            ev.tags = tags
        if ev.param_sig is None:
            ev.param_sig = shape.param_sig
        if not shape.parsed:
            self.lexed_statements += 1

    def cache_info(self) -> CacheInfo:
        return CacheInfo(self._hits, self._misses, self._cache_size, len(self._cache))


def constant_free_key(text: str) -> str | None:
    """A cache key shared by single statements that differ only in their constants.

    libpg_query's fingerprint ignores constant values, so such texts share every derived field
    but the parameter signature. Constants (standard strings, numbers) become a NUL, which
    never occurs in query text; quoted identifiers are kept whole. None for what this simple
    lexing cannot read safely: backslash escapes (E'' strings), dollar quotes, several statements.
    """
    if _NOT_KEYABLE.search(text) is not None or ";" in text.rstrip("; \t\r\n"):
        return None
    return _CONSTANT.sub("\\g<1>\x00", text)


def fingerprint_text(sql: str) -> tuple[str, str, str]:
    """(fingerprint, normalized, kind) of the first statement in `sql`, uncached."""
    shape = derive(sql).statements[0]
    return shape.fingerprint, shape.normalized, shape.kind


def derive(sql: str) -> DerivedText:
    """Everything the fingerprinter takes from one SQL text; never raises."""
    if len(sql) <= MAX_PARSE_CHARS:
        tags, text = parse_comments(sql)
        return DerivedText(tags, describe_statements(text))
    tags, prefix = parse_comments(sql[:LEXED_PREFIX_CHARS])
    return DerivedText(tags, (_lex(prefix)[0]._replace(param_sig=hash(sql)),))


def describe_statements(text: str) -> tuple[StatementShape, ...]:
    """One shape per statement of comment-free `text` (at least one); never raises."""
    if "\x00" in text or "\ufffd" in text:
        return _lex(text)
    pieces = _split(text) if ";" in text else (text,)
    return tuple(_describe(piece) for piece in pieces)


def _split(text: str) -> tuple[str, ...]:
    try:
        pieces = pg.split(text)
    except pg.ParseError:
        # pglast's scanner-only split drops statements it cannot read: split on `;` ourselves.
        pieces = _split_on_semicolons(text)
    return pieces or (text,)


def _split_on_semicolons(text: str) -> tuple[str, ...]:
    ends = [m.start() for m in _STATEMENT_END.finditer(text) if m.lastgroup == "semicolon"]
    starts = [0] + [end + 1 for end in ends]
    pieces = (text[start:end].strip() for start, end in zip(starts, [*ends, len(text)]))
    return tuple(piece for piece in pieces if piece)


def _describe(statement: str) -> StatementShape:
    try:
        fingerprint = pg.fingerprint(statement)
        normalized = pg.normalize(statement)
    except (pg.ParseError, UnicodeEncodeError):  # UnicodeEncodeError: lone surrogates
        return _lex(statement)[0]
    if _MAY_HOLD_STRING.search(normalized):
        normalized = _redact_strings(normalized)
    return StatementShape(fingerprint, normalized, _classify(normalized), hash(statement), True)


def _classify(normalized: str) -> str:
    words = _FIRST_WORDS.match(normalized)
    if words is None:
        return "other"
    first = words.group(1).lower()
    if first == "with":
        return "dml" if _WITH_DML.search(normalized) else "select"
    second = (words.group(2) or "").lower()
    if first == "prepare" and second == "transaction":
        return "txn"
    return _KIND_BY_FIRST_WORD.get(first, "other")


def _redact_strings(normalized: str) -> str:
    """Replace the string and dollar-quoted literals pglast kept with `$n` after its own."""
    numbers = [int(n[1:]) for n in _PLACEHOLDER.findall(normalized)]
    next_number = itertools.count(max(numbers, default=0) + 1)

    def redact(token: re.Match) -> str:
        return f"${next(next_number)}" if token.lastgroup == "string" else token.group()

    return _LITERAL.sub(redact, normalized)


def _lex(text: str) -> tuple[StatementShape, ...]:
    """Describe comment-free text without a parser: one shape per `;`-separated statement."""
    return tuple(_lexed_shape(piece) for piece in _split_on_semicolons(text) or (text,))


def _lexed_shape(statement: str) -> StatementShape:
    """The lexer reads at most LEXED_PREFIX_CHARS: it is the slow path, and a prefix that long
    already tells statements apart."""
    next_number = itertools.count(1)

    def replace(token: re.Match) -> str:
        return token.group() if token.lastgroup == "identifier" else f"${next(next_number)}"

    normalized = " ".join(_LITERAL.sub(replace, statement[:LEXED_PREFIX_CHARS]).split())
    shape = _SPACE_AROUND_SYMBOL.sub(r"\1", _PLACEHOLDER.sub("?", normalized.lower()))
    fingerprint = hashlib.blake2b(
        _LITERAL_LIST.sub("(?)", shape).encode("utf-8", "surrogatepass"),
        digest_size=8,
        person=b"pgscout-lexer",
    ).hexdigest()
    return StatementShape(fingerprint, normalized, _classify(normalized), hash(statement), False)
