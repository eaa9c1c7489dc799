"""Statement enrichment: fingerprint, normalized text, kind, comment tags, parameter signature.

Owns: deriving, once per distinct SQL text (bounded LRU), what every other observer reads from a
StatementDone: `fingerprint` (16 hex chars, libpg_query through pglast: the literal and `$1`
forms of a query, and IN lists of any length, share one), `normalized` (pglast's normalize of the
comment-stripped text: literals become `$n`, cut to `display_chars`, the only SQL text any other
observer keeps), `kind`, `may_change_settings` (not a query or a write, or one calling
set_config: observers that follow settings read the raw text only then), `tags`
(pgscout.analysis.comments) and, for a statement with nothing bound (the simple protocol, or an
extended one without parameters: asyncpg prepares even a text with its values formatted in),
`param_sig` (Python's salted hash of the comment-stripped text, so the text itself is never kept
for it: the values are in the text, and a Bind of no values would make every lookup look alike). A multi-statement simple Query arrives as one event and is described whole, in one
pass: libpg_query fingerprints and normalizes every statement of a text together.

Text pglast cannot take (a ParseError, cut by the data plane, over MAX_PARSE_CHARS, holding NUL
or the U+FFFD the decoder puts for invalid UTF-8, or backslashes while the session runs with
standard_conforming_strings off, which pglast would read differently from the server) goes to a
literal-stripping lexer instead; its fingerprints are blake2b-derived with their own
personalization, so they do not share pglast's hash inputs. The lexer reads at most
LEXED_PREFIX_CHARS of any text (about 0.5 us a character, pglast about 0.3).
The cache is keyed by the comment-stripped text, so the comment scan runs per execution (a few
microseconds when there is a comment, skipped when none can be or the text is the last
comment-free one again) and the parse once per distinct statement text.
This runs in the analysis process, never on the forwarding loop: a slow parse delays analysis
(which sheds load when it falls behind), not traffic. libpg_query's normalize costs about 0.1 ms
per level of nested subquery (a second for 100 KB of them), so a text with many parentheses is parsed
in a thread (pglast releases the GIL) for at most PARSE_BUDGET_SECONDS; past that the parse is
abandoned, counted, and the lexer describes that text. One abandoned parse runs on at a time;
while it does, such texts go straight to the lexer.

Read interface (for the Collector and the API): `cache_info()` (hits, misses, maxsize,
currsize), `lexed_statements` (statements described by the fallback lexer).
Helpers for other code: `fingerprint_text(sql) -> (fingerprint, normalized, kind)`.
Must not: raise out of `on_statement` for any text, log, or import asyncio/sockets/prometheus.
"""

from __future__ import annotations

import hashlib
import itertools
import re
import threading
from collections import OrderedDict
from typing import Final, NamedTuple

from mypy_extensions import i64
from pglast import parser as pg

from pgscout.analysis.bus import StatementObserver
from pgscout.analysis.comments import may_hold_comments, parse_comments
from pgscout.dataplane.events import StatementDone

MAX_PARSE_CHARS: Final = 100_000
PARSE_BUDGET_SECONDS: Final = 0.25
# Texts with fewer parentheses than this cannot nest deeply enough to be slow: parsed inline.
_GUARDED_PARENTHESES: Final = 64
DEFAULT_DISPLAY_CHARS: Final = 2048
# What constant_free_key puts for a constant: a NUL (never in query text) and its kind. A string
# and a number in the same place are not the same statement: `a 'y'` is a constant of type a,
# `a 7` a syntax error.
_STRING_CONSTANT: Final = b"\x00s"
_NUMERIC_CONSTANT: Final = b"\x00n"
# Characters the fingerprint cache may hold (texts and their normalized forms): ~4 bytes each
# at worst, so at most ~16 MB whatever the statements.
CACHE_CHARS: Final = 4_000_000
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
# A query or a write changes a run-time setting only through set_config().
_SET_CONFIG_CALL = re.compile(r"set_config", re.IGNORECASE)

# Literals pglast's normalize leaves in place (COPY file names, PREPARE TRANSACTION ids,
# function bodies, DDL defaults): string and dollar-quoted text is redacted after it.
_MAY_HOLD_STRING = re.compile(r"'|\$(?!\d)")

# Lexing without lookbehinds (slow in `re`): identifiers are matched whole, so an E/B/X/N/U&
# string prefix, a digit or a `$` can only be seen where a token starts.
_ESCAPED_STRING = r"'(?:[^'\\]|\\.|'')*'?"
_DOLLAR_QUOTED = r"\$(?P<tag>(?:[^\W\d]\w*)?)\$.*?(?:\$(?P=tag)\$|\Z)"
# With standard_conforming_strings off, a backslash escapes the next character in every string.
_STANDARD_STRING = rf"[eE]{_ESCAPED_STRING} | (?:[bBxXnN]|[uU]&)?'(?:[^']|'')*'? | {_DOLLAR_QUOTED}"
_BACKSLASH_STRING = rf"(?:[eEbBxXnN]|[uU]&)?{_ESCAPED_STRING} | {_DOLLAR_QUOTED}"
_IDENTIFIER = r'[^\W\d][\w$]*|"(?:[^"]|"")*"?'


def _literal_lexer(string: str) -> re.Pattern:
    return re.compile(
        rf"""
          (?P<string>{string})
        | (?P<identifier>{_IDENTIFIER})
        | \$\d+
        | (?P<number>0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?)
        """,
        re.VERBOSE | re.DOTALL,
    )


_LITERAL = _literal_lexer(_STANDARD_STRING)
_BACKSLASH_LITERAL = _literal_lexer(_BACKSLASH_STRING)
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
    # Until the fingerprinter has looked at the displayed text: whatever the kind, it may.
    may_change_settings: bool = True
    # The text writes constants in place (the normalized text has placeholders it has not): a
    # bound statement's executions differ by them too (a page's OFFSET formatted in).
    constants: bool = False


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class DerivedText(NamedTuple):
    tags: dict[str, str]
    shape: StatementShape


class Fingerprinter(StatementObserver):
    """Bus observer that fills the enrichment fields of each StatementDone; runs first."""

    def __init__(self, cache_size: int, cache_chars: int = CACHE_CHARS,
                 display_chars: int = DEFAULT_DISPLAY_CHARS) -> None:
        # Keyed by comment-stripped text: per-request comments (traceparent) make every raw
        # text unique, so only the comment scan is repeated per execution, never the parse.
        self._cache: OrderedDict[str, StatementShape] = OrderedDict()
        self._cache_size = cache_size
        self._display_chars = display_chars
        self._cache_chars = cache_chars
        self._cached_chars = 0
        self._hits = self._misses = 0
        self.lexed_statements = 0
        # The cache's most recently used entry: a statement run again and again (a prepared
        # one, a loop) is answered without the OrderedDict's generic method calls.
        self._newest_key: str | None = None
        self._newest_shape: StatementShape | None = None
        # The last text seen to hold no comment, and its strip(): the same text repeats (each
        # batch's records carry one copy of it), and comparing is cheaper than scanning it.
        self._plain_sql = ""
        self._plain_text = ""

    def _describe_cached(self, key: str, text: str, backslashes: bool) -> StatementShape:
        """describe() through an LRU bounded in entries and in characters kept (keys plus
        normalized texts), so a flood of large distinct statements cannot grow memory."""
        cache = self._cache
        if backslashes:
            key = "\x00" + key  # the same text lexes differently: a key of its own
        newest = self._newest_shape
        if newest is not None and key == self._newest_key:
            self._hits += 1
            return newest
        shape = cache.get(key)
        if shape is not None:
            self._hits += 1
            cache.move_to_end(key)
            self._newest_key, self._newest_shape = key, shape
            return shape
        self._misses += 1
        shape = self._displayed(describe(text, backslashes))
        size = len(key) + len(shape.normalized)
        if size > self._cache_chars:
            return shape
        cache[key] = shape
        self._cached_chars += size
        while len(cache) > self._cache_size or self._cached_chars > self._cache_chars:
            old_text, old = cache.popitem(last=False)
            self._cached_chars -= len(old_text) + len(old.normalized)
        if cache:  # evictions take the oldest first: the new entry is the last to go
            self._newest_key, self._newest_shape = key, shape
        else:
            self._newest_key = self._newest_shape = None
        return shape

    def _displayed(self, shape: StatementShape) -> StatementShape:
        """`shape` as events carry it: normalized cut for display, and what is judged of that text."""
        normalized = shape.normalized[:self._display_chars]
        return shape._replace(normalized=normalized, may_change_settings=(
            shape.kind not in ("select", "dml") or _SET_CONFIG_CALL.search(normalized) is not None))

    def on_statement(self, ev: StatementDone) -> None:
        sql = ev.sql
        backslashes = not ev.session.standard_strings and "\\" in sql
        tags: dict[str, str] | None
        if ev.truncated or len(sql) > MAX_PARSE_CHARS:
            tags, derived = derive(sql, backslashes)
            shape = self._displayed(derived)
        else:
            unbound = ev.param_sig is None or not ev.n_params
            lexable = unbound and not backslashes
            plain = sql == self._plain_sql  # the last text known to hold no comment
            text = self._plain_text if plain else sql.strip()
            # A key proves there is no comment: its lexing refuses any -- or /* outside a literal.
            key = constant_free_key(text) if lexable else None
            tags = None
            if key is None and not plain:
                if may_hold_comments(sql):
                    tags, text = parse_comments(sql)
                    if lexable:
                        key = constant_free_key(text)
                else:  # building parse_comments' answer (a NamedTuple) costs more than this test
                    self._plain_sql, self._plain_text = sql, text
            if key is None:
                shape = self._describe_cached(text, text, backslashes)
                if unbound:
                    ev.param_sig = shape.param_sig
                elif shape.constants:
                    ev.param_sig = hash((ev.param_sig, shape.param_sig))
            else:
                # Literals inline: every execution is a new text, but all its variants share one
                # cache entry; the parameter signature is this text's own.
                shape = self._describe_cached(key, text, False)
                ev.param_sig = hash(text)
        ev.fingerprint = shape.fingerprint
        ev.normalized = shape.normalized
        ev.kind = shape.kind
        ev.may_change_settings = shape.may_change_settings
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
    never occurs in query text, and their kind; quoted identifiers are kept whole. None for what
    this lexing cannot read safely: backslash escapes (E'' strings), dollar quotes, comments,
    unterminated quotes, several statements.
    A loop over the UTF-8 bytes, not a regular expression: every byte of a multi-byte character
    is >= 0x80, so quotes, digits and operators are found exactly as in the text, and compiled
    (native byte indexing) it reads a pgbench statement in under a microsecond where `re`, with
    a lookbehind tried at every position, took five.
    """
    if "\\" in text:
        return None
    try:
        data = text.encode()  # UTF-8: mypyc's own fast path, where naming a codec is a look-up
    except UnicodeEncodeError:
        return None  # a lone surrogate: the decoder never makes one, a caller might
    parts: list[bytes] = []
    n: i64 = len(data)
    start: i64 = 0  # data[start:i] is still to be copied
    i: i64 = 0
    previous: i64 = 32  # the byte before data[i] (a space before the start)
    while i < n:
        c: i64 = data[i]
        if c >= 65 or c == 32:
            # Letters, spaces and the rest of the text: nothing to read (a backslash, 92, was
            # refused above), tested first since most bytes are these.
            previous = c
            i += 1
            continue
        if c == 39 or c == 34:  # ' a string constant, or " a quoted identifier ('' and "" escape)
            end = _closing_quote(data, i)
            if end < 0:
                return None
            if c == 39:
                parts.append(data[start:i])
                parts.append(_STRING_CONSTANT)
                start = end
            i = end
            previous = c
        elif 48 <= c <= 57 and not _continues_a_name(previous):
            end = _number_end(data, i)
            parts.append(data[start:i])
            parts.append(_NUMERIC_CONSTANT)
            previous = data[end - 1]
            i = start = end
        elif (c == 45 or c == 47) and i + 1 < n and data[i + 1] == (45 if c == 45 else 42):
            return None  # -- or /*: a comment, for parse_comments to strip before a second try
        elif c == 36 and not (i + 1 < n and 48 <= data[i + 1] <= 57):  # a $ not of $n
            return None
        elif c == 59 and not _ends_the_text(data, i):  # a ; with a statement after it
            return None
        else:
            previous = c
            i += 1
    parts.append(data[start:])
    return b"".join(parts).decode()


def _ends_the_text(data: bytes, i: i64) -> bool:
    """Whether only semicolons and whitespace follow data[i] (read in place: a slice and a strip
    would be an allocation and a method call for the ; that ends most texts)."""
    n: i64 = len(data)
    j: i64 = i + 1
    while j < n:
        c: i64 = data[j]
        if not (c == 59 or c == 32 or c == 9 or c == 13 or c == 10):
            return False
        j += 1
    return True


def _closing_quote(data: bytes, i: i64) -> i64:
    """The position after the quote that closes the one at data[i] (a doubled one is inside), or -1."""
    quote: i64 = data[i]
    n: i64 = len(data)
    j: i64 = i + 1
    while j < n:
        if data[j] == quote:
            if j + 1 < n and data[j + 1] == quote:
                j += 2
                continue
            return j + 1
        j += 1
    return -1


def _number_end(data: bytes, i: i64) -> i64:
    """The end of the numeric constant at data[i]: digits, a fraction, an exponent."""
    n: i64 = len(data)
    j = _digits_end(data, i)
    if j < n and data[j] == 46:  # .
        j = _digits_end(data, j + 1)
    if j < n and (data[j] == 69 or data[j] == 101):  # E e
        k: i64 = j + 1
        if k < n and (data[k] == 43 or data[k] == 45):  # + -
            k += 1
        if k < n and 48 <= data[k] <= 57:
            j = _digits_end(data, k)
    return j


def _digits_end(data: bytes, i: i64) -> i64:
    n: i64 = len(data)
    while i < n and 48 <= data[i] <= 57:
        i += 1
    return i


def _continues_a_name(c: i64) -> bool:
    """Whether a digit after this byte is part of a name (t1, $1, x.5), not a constant; a byte of
    a multi-byte character counts as a letter."""
    return c > 127 or c == 95 or c == 36 or c == 46 or 48 <= c <= 57 or 65 <= c <= 90 or 97 <= c <= 122


def fingerprint_text(sql: str) -> tuple[str, str, str]:
    """(fingerprint, normalized, kind) of `sql` (all its statements together), uncached."""
    shape = derive(sql).shape
    return shape.fingerprint, shape.normalized, shape.kind


def derive(sql: str, backslashes: bool = False) -> DerivedText:
    """Everything the fingerprinter takes from one SQL text; never raises. A text over
    MAX_PARSE_CHARS is described from its first LEXED_PREFIX_CHARS characters."""
    if len(sql) <= MAX_PARSE_CHARS:
        tags, text = parse_comments(sql)
        return DerivedText(tags, describe(text, backslashes))
    tags, prefix = parse_comments(sql[:LEXED_PREFIX_CHARS])
    return DerivedText(tags, _lexed_shape(prefix, backslashes)._replace(param_sig=hash(sql)))


def describe(text: str, backslashes: bool = False) -> StatementShape:
    """The shape of comment-free `text`, all its statements together; never raises.
    `backslashes`: the session reads a backslash in any string as an escape."""
    if backslashes or "\x00" in text or "\ufffd" in text:
        return _lexed_shape(text, backslashes)
    parsed = _parse(text) if text.count("(") < _GUARDED_PARENTHESES else _parse_within_budget(text)
    if parsed is None:
        return _lexed_shape(text, False)
    fingerprint, normalized = parsed
    kind = _classify(normalized)
    if kind == "ddl" or _MAY_HOLD_STRING.search(normalized):
        # pglast's normalize leaves DDL's numbers (RESTART WITH n, DEFAULT n, CHECK (c <> n))
        # and some strings (COPY file names, function bodies) in place.
        normalized = _redact_literals(normalized, numbers=kind == "ddl")
    return StatementShape(fingerprint, normalized, kind, hash(text), True,
                          constants=normalized.count("$") > text.count("$"))


def _parse(text: str) -> tuple[str, str] | None:
    try:
        return pg.fingerprint(text), pg.normalize(text)
    except (pg.ParseError, UnicodeEncodeError):  # UnicodeEncodeError: lone surrogates
        return None


class _AbandonedParses:
    """The parse still running past its budget, and how many were given up."""

    def __init__(self) -> None:
        self.thread: threading.Thread | None = None
        self.count = 0


_abandoned: Final = _AbandonedParses()


def _parse_within_budget(text: str) -> tuple[str, str] | None:
    running = _abandoned.thread
    if running is not None and running.is_alive():
        _abandoned.count += 1
        return None
    result: list[tuple[str, str] | None] = []
    thread = threading.Thread(target=lambda: result.append(_parse(text)), daemon=True)
    thread.start()
    thread.join(PARSE_BUDGET_SECONDS)
    if not result:
        _abandoned.thread = thread
        _abandoned.count += 1
        return None
    return result[0]


def abandoned_parses() -> int:
    """Parses given up past PARSE_BUDGET_SECONDS (or skipped while one still ran)."""
    return _abandoned.count


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


def _redact_literals(normalized: str, numbers: bool) -> str:
    """Replace the literals pglast kept (strings, and numbers too when asked) with `$n` after
    its own."""
    placeholders = [int(n[1:]) for n in _PLACEHOLDER.findall(normalized)]
    next_number = itertools.count(max(placeholders, default=0) + 1)
    redacted = ("string", "number") if numbers else ("string",)

    def redact(token: re.Match) -> str:
        return f"${next(next_number)}" if token.lastgroup in redacted else token.group()

    return _LITERAL.sub(redact, normalized)


def _lexed_shape(statement: str, backslashes: bool) -> StatementShape:
    """The lexer reads at most LEXED_PREFIX_CHARS: it is the slow path, and a prefix that long
    already tells statements apart."""
    next_number = itertools.count(1)

    def replace(token: re.Match) -> str:
        return token.group() if token.lastgroup == "identifier" else f"${next(next_number)}"

    lexer = _BACKSLASH_LITERAL if backslashes else _LITERAL
    normalized = " ".join(lexer.sub(replace, statement[:LEXED_PREFIX_CHARS]).split())
    shape = _SPACE_AROUND_SYMBOL.sub(r"\1", _PLACEHOLDER.sub("?", normalized.lower()))
    fingerprint = hashlib.blake2b(
        _LITERAL_LIST.sub("(?)", shape).encode("utf-8", "surrogatepass"),
        digest_size=8,
        person=b"pgscout-lexer",
    ).hexdigest()
    # `normalized` covers the first LEXED_PREFIX_CHARS: the placeholders of the same prefix.
    constants = normalized.count("$") > statement[:LEXED_PREFIX_CHARS].count("$")
    return StatementShape(fingerprint, normalized, _classify(normalized), hash(statement), False,
                          constants=constants)
