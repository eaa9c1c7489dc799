"""Fingerprinter: enrichment of StatementDone events, from events alone."""

import re
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgscout.dataplane.events import Session, StatementDone
from pgscout.analysis.fingerprint import (MAX_PARSE_CHARS, PARSE_BUDGET_SECONDS, Fingerprinter,
                                          abandoned_parses, fingerprint_text)

HEX16 = re.compile(r"[0-9a-f]{16}")


def statement(sql, statement_count=1, param_sig=None, standard_strings=True, truncated=False,
              n_params=0):
    return StatementDone(
        session=Session(conn_id=1, client_addr="127.0.0.1:5000", standard_strings=standard_strings),
        sql=sql,
        statement_count=statement_count,
        truncated=truncated,
        extended=param_sig is not None,
        sent_at=10.0,
        done_at=10.002,
        tag="SELECT 1",
        rows=1,
        sqlstate=None,
        param_sig=param_sig,
        n_params=n_params,
        params=None,
        pipelined=False,
    )


def enriched(sql, fingerprinter=None, **kwargs):
    ev = statement(sql, **kwargs)
    (fingerprinter or Fingerprinter(cache_size=100)).on_statement(ev)
    return ev


def test_literal_and_placeholder_forms_share_a_fingerprint():
    literal = enriched("SELECT * FROM users WHERE id = 42 AND email = 'a@b.c'")
    bound = enriched("SELECT * FROM users WHERE id = $1 AND email = $2")
    assert literal.fingerprint == bound.fingerprint
    assert HEX16.fullmatch(literal.fingerprint)
    assert literal.normalized == "SELECT * FROM users WHERE id = $1 AND email = $2"
    assert literal.kind == "select"


def test_in_lists_of_any_length_share_a_fingerprint():
    prints = {
        fingerprint_text(sql)[0]
        for sql in [
            "select * from t where a in (1)",
            "select * from t where a in (1, 2, 3, 4, 5)",
            "select * from t where a in ($1, $2)",
        ]
    }
    assert len(prints) == 1


def test_different_queries_get_different_fingerprints():
    assert fingerprint_text("select * from users")[0] != fingerprint_text("select * from posts")[0]


def test_comments_are_stripped_and_parsed_into_tags():
    plain = enriched("select * from posts where id = 1")
    commented = enriched(
        "select * from posts where id = 2 /*controller='posts',action='show',"
        "traceparent='00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01'*/"
    )
    assert commented.fingerprint == plain.fingerprint
    assert commented.normalized == "select * from posts where id = $1"
    assert commented.tags["controller"] == "posts"
    assert plain.tags == {}


def test_comment_markers_inside_literals_are_text_and_real_comments_still_tag():
    quoted = enriched("select * from posts where note = '-- no /* tag=x */' and id = 3")
    plain = enriched("select * from posts where note = 'y' and id = 4")
    line = enriched("select * from posts where note = 'z' and id = 5 -- controller='posts'")
    assert quoted.tags == {} and quoted.fingerprint == plain.fingerprint
    assert line.tags == {"controller": "posts"} and line.fingerprint == plain.fingerprint
    assert quoted.param_sig != plain.param_sig != line.param_sig


def test_simple_query_param_sig_depends_on_text_not_on_comments():
    first = enriched("select * from t where id = 1 /*traceparent='a'*/")
    same = enriched("select * from t where id = 1 /*traceparent='b'*/")
    other = enriched("select * from t where id = 2")
    assert first.param_sig == same.param_sig
    assert first.param_sig != other.param_sig
    assert first.fingerprint == other.fingerprint


def test_extended_protocol_param_sig_is_left_alone():
    assert enriched("select * from t where id = $1", param_sig=1234, n_params=1).param_sig == 1234


def test_extended_statement_with_nothing_bound_is_told_apart_by_its_text():
    # asyncpg prepares a text with its values formatted in: the Bind (of no values) is the same
    # for every lookup, the text is not.
    fingerprinter = Fingerprinter(cache_size=100)
    first, second, again = (enriched(f"select * from t where id = {i}", fingerprinter,
                                     param_sig=1234, n_params=0) for i in (1, 2, 1))
    assert first.param_sig != second.param_sig
    assert first.param_sig == again.param_sig
    assert first.fingerprint == second.fingerprint


def test_multi_statement_query_is_described_whole_in_one_pass():
    sql = "BEGIN; UPDATE accounts SET balance = 0 WHERE id = 7; SELECT 1; COMMIT"
    fingerprinter = Fingerprinter(cache_size=100)
    ev = enriched(sql, fingerprinter, statement_count=4)
    assert ev.normalized == "BEGIN; UPDATE accounts SET balance = $1 WHERE id = $2; SELECT $3; COMMIT"
    assert ev.kind == "txn"  # the first statement's
    again = enriched(sql.replace("7", "8"), fingerprinter, statement_count=4)
    assert again.fingerprint == ev.fingerprint
    assert ev.fingerprint != fingerprint_text("UPDATE accounts SET balance = 5 WHERE id = 1")[0]


def test_a_long_multi_statement_script_costs_one_description():
    script = "".join(f"insert into t values ({i}, 'row {i}');" for i in range(3000))
    fingerprinter = Fingerprinter(cache_size=100)
    ev = enriched(script, fingerprinter, statement_count=3000)
    assert HEX16.fullmatch(ev.fingerprint)
    assert ev.normalized.startswith("insert into t values ($1, $2);insert into t values ($3, $4);")
    assert "row 1" not in ev.normalized


def test_semicolon_inside_a_string_stays_in_its_literal():
    ev = enriched("select ';' ; select 2", statement_count=2)
    assert ev.normalized == "select $1 ; select $2"


def test_backslash_escapes_are_redacted_when_standard_conforming_strings_is_off():
    sql = "insert into people (name) values ('O\\'Brien <secret>')"
    ev = enriched(sql, standard_strings=False)
    assert "secret" not in ev.normalized
    assert ev.normalized == "insert into people (name) values ($1)"


def test_numbers_in_ddl_are_redacted():
    for sql in ("alter sequence orders_id_seq restart with 4242",
                "create table t (a int default 4242 check (a <> 4242))",
                "alter table t alter column a set default 4242"):
        assert "4242" not in enriched(sql).normalized, sql


def test_a_truncated_text_is_fingerprinted_from_its_prefix():
    ev = enriched("select * from t where a in (1, 2, 3", truncated=True)
    assert HEX16.fullmatch(ev.fingerprint)
    assert ev.normalized == "select * from t where a in ($1, $2, $3"


def test_normalized_text_is_cut_for_display():
    sql = "select " + ", ".join(f"c{i}" for i in range(2000)) + " from t"
    ev = statement(sql)
    Fingerprinter(cache_size=10, display_chars=100).on_statement(ev)
    assert len(ev.normalized) == 100


def test_cache_hits_for_the_same_text():
    fingerprinter = Fingerprinter(cache_size=2)
    for _ in range(3):
        enriched("select 1", fingerprinter)
    info = fingerprinter.cache_info()
    assert (info.hits, info.misses) == (2, 1)


def test_cache_is_bounded():
    fingerprinter = Fingerprinter(cache_size=2)
    for i in range(5):
        enriched(f"select c{i} from t", fingerprinter)
    assert fingerprinter.cache_info().currsize == 2


def test_tags_dict_is_not_shared_between_events():
    fingerprinter = Fingerprinter(cache_size=10)
    first = enriched("select 1 /*route='1'*/", fingerprinter)
    first.tags["mutated"] = "yes"
    assert enriched("select 1 /*route='1'*/", fingerprinter).tags == {"route": "1"}


@pytest.mark.parametrize(
    "sql",
    [
        "selec garbage ( 'secret'",
        "select 'unterminated",
        "\x00\x01\x02 binary \xff",
        "select \ufffd from t where a = 'x'",
        "select \ud800 'lone surrogate'",
        ")))))(((((;;;;''''$$",
        "",
        ";",
        "/* only a comment */",
        "select " + "(" * 3000 + "1" + ")" * 3000,
    ],
)
def test_unusual_text_never_raises_and_gets_a_fingerprint(sql):
    fingerprinter = Fingerprinter(cache_size=10)
    ev = enriched(sql, fingerprinter)
    assert HEX16.fullmatch(ev.fingerprint)
    assert "secret" not in ev.normalized
    assert ev.kind in {"select", "dml", "ddl", "utility", "txn", "other"}


def test_unparseable_text_is_lexed_literal_and_placeholder_alike():
    fingerprinter = Fingerprinter(cache_size=10)
    literal = enriched("selec * from t where a = 'x' and b in (1, 2, 3)", fingerprinter)
    bound = enriched("selec * from t where a = $1 and b in ($2)", fingerprinter)
    assert literal.fingerprint == bound.fingerprint
    assert literal.normalized == "selec * from t where a = $1 and b in ($2, $3, $4)"
    assert fingerprinter.lexed_statements == 2


def test_replaced_utf8_uses_the_lexer():
    fingerprinter = Fingerprinter(cache_size=10)
    ev = enriched("select name from t where name = 'caf\ufffd'", fingerprinter)
    assert ev.normalized == "select name from t where name = $1"
    assert fingerprinter.lexed_statements == 1


def test_huge_text_is_described_without_parsing_and_not_cached():
    rows = ",".join(f"({i}, 'secret {i}')" for i in range(20_000))
    sql = f"INSERT INTO items (id, name) VALUES {rows}"
    assert len(sql) > MAX_PARSE_CHARS
    fingerprinter = Fingerprinter(cache_size=10)
    ev = enriched(sql, fingerprinter)
    shorter = enriched(sql[: sql.rindex(",")], fingerprinter)
    assert ev.kind == "dml"
    assert ev.normalized.startswith("INSERT INTO items (id, name) VALUES ($1, $2),")
    assert "secret" not in ev.normalized
    assert ev.fingerprint == shorter.fingerprint
    assert ev.param_sig != shorter.param_sig
    assert fingerprinter.cache_info().currsize == 0


def test_string_literals_pglast_keeps_are_redacted():
    for sql in [
        "COPY t FROM '/home/secret/file.csv'",
        "PREPARE TRANSACTION 'secret-gid'",
        "CREATE FUNCTION f() RETURNS text AS $body$ SELECT 'secret' $body$ LANGUAGE sql",
        "ALTER ROLE app PASSWORD 'secret'",
    ]:
        assert "secret" not in fingerprint_text(sql)[1], sql


@pytest.mark.parametrize(
    ("sql", "kind"),
    [
        ("SELECT 1", "select"),
        ("select * from t for update", "select"),
        ("VALUES (1), (2)", "select"),
        ("TABLE t", "select"),
        ("(select 1) union (select 2)", "select"),
        ("WITH x AS (SELECT 1) SELECT * FROM x", "select"),
        ("WITH x AS (SELECT 1) SELECT * FROM x FOR UPDATE", "select"),
        ("INSERT INTO t VALUES (1) ON CONFLICT (id) DO UPDATE SET a = 1", "dml"),
        ("UPDATE t SET a = 1", "dml"),
        ("DELETE FROM t", "dml"),
        ("MERGE INTO t USING s ON t.id = s.id WHEN MATCHED THEN DELETE", "dml"),
        ("COPY t FROM STDIN", "dml"),
        ("WITH gone AS (DELETE FROM t RETURNING *) SELECT count(*) FROM gone", "dml"),
        ("WITH x AS MATERIALIZED (SELECT 1) INSERT INTO t SELECT * FROM x", "dml"),
        ("BEGIN", "txn"),
        ("START TRANSACTION ISOLATION LEVEL SERIALIZABLE", "txn"),
        ("COMMIT", "txn"),
        ("END", "txn"),
        ("ROLLBACK", "txn"),
        ("ABORT", "txn"),
        ("SAVEPOINT s1", "txn"),
        ("RELEASE SAVEPOINT s1", "txn"),
        ("ROLLBACK TO SAVEPOINT s1", "txn"),
        ("PREPARE TRANSACTION 'gid'", "txn"),
        ("COMMIT PREPARED 'gid'", "txn"),
        ("SET search_path = public", "utility"),
        ("RESET ALL", "utility"),
        ("SHOW server_version", "utility"),
        ("FETCH 10 FROM c", "utility"),
        ("MOVE NEXT IN c", "utility"),
        ("CLOSE c", "utility"),
        ("LISTEN jobs", "utility"),
        ("UNLISTEN *", "utility"),
        ("NOTIFY jobs, 'x'", "utility"),
        ("DISCARD ALL", "utility"),
        ("DEALLOCATE ALL", "utility"),
        ("PREPARE q AS SELECT 1", "utility"),
        ("EXECUTE q", "utility"),
        ("DECLARE c CURSOR FOR SELECT 1", "utility"),
        ("EXPLAIN ANALYZE SELECT 1", "utility"),
        ("VACUUM t", "utility"),
        ("ANALYZE t", "utility"),
        ("LOCK TABLE t IN ACCESS EXCLUSIVE MODE", "utility"),
        ("CREATE TABLE t (a int)", "ddl"),
        ("ALTER TABLE t ADD COLUMN b int", "ddl"),
        ("DROP TABLE t", "ddl"),
        ("TRUNCATE t", "ddl"),
        ("GRANT SELECT ON t TO app", "ddl"),
        ("REVOKE SELECT ON t FROM app", "ddl"),
        ("COMMENT ON TABLE t IS 'x'", "ddl"),
        ("", "other"),
    ],
)
def test_kind_classification(sql, kind):
    assert fingerprint_text(sql)[2] == kind


SQLISH = st.text(
    alphabet=st.sampled_from(list("selctSELCT ()$1'\"E;,-/*\\\n\x00\ufffdé")) | st.characters(),
    max_size=80,
)


@settings(max_examples=300, deadline=None)
@given(sql=SQLISH, standard_strings=st.booleans(), truncated=st.booleans())
def test_any_text_is_enriched_without_raising(sql, standard_strings, truncated):
    ev = enriched(sql, standard_strings=standard_strings, truncated=truncated)
    assert HEX16.fullmatch(ev.fingerprint)
    assert ev.kind in {"select", "dml", "ddl", "utility", "txn", "other"}
    assert isinstance(ev.param_sig, int)


def test_cache_is_bounded_in_characters_too():
    fingerprinter = Fingerprinter(cache_size=10_000, cache_chars=50_000)
    for i in range(100):
        enriched(f"select {'x' * 1000} as c{i}", fingerprinter)
    assert fingerprinter.cache_info().currsize <= 25
    assert fingerprinter._cached_chars <= 50_000


def test_inline_literal_variants_share_one_cache_entry_but_keep_their_own_signature():
    fingerprinter = Fingerprinter(cache_size=100)
    events = [enriched(f"SELECT * FROM users WHERE id = {i} AND name = 'user {i}';", fingerprinter)
              for i in range(500)]
    assert fingerprinter.cache_info().misses == 1
    assert len({ev.fingerprint for ev in events}) == 1
    assert len({ev.param_sig for ev in events}) == 500


@pytest.mark.parametrize("first, second", [
    ('SELECT "c1" FROM t', 'SELECT "c2" FROM t'),              # digits inside quoted identifiers
    ("SELECT c1 FROM t", "SELECT c2 FROM t"),                  # ... and plain identifiers
    ("SELECT 'a' FROM t", "SELECT 'a' FROM u"),
    ("SELECT E'x\\'' FROM t", "SELECT E'x\\'' FROM u"),        # backslash escapes: exact keys
    ("SELECT $$1$$ FROM t", "SELECT $$1$$ FROM u"),            # dollar quotes: exact keys
    # A quote inside a comment opens no string: the code after it is compared, not skipped.
    ("SELECT x -- don't\nFROM t WHERE y = 'a'", "SELECT x -- don't\nFROM u WHERE y = 'a'"),
    ("SELECT x /* it's */ FROM t WHERE y = 'a'", "SELECT x /* it's */ FROM u WHERE y = 'a'"),
    # A string after a name is a typed constant (`date '2026-12-01'`); a number there is a
    # syntax error: a string and a number are different constants (found by the property below).
    ("SELECT a 'y'", "SELECT a 7"),
])
def test_shared_cache_entries_never_merge_different_statements(first, second):
    fingerprinter = Fingerprinter(cache_size=100)
    a, b = enriched(first, fingerprinter), enriched(second, fingerprinter)
    assert a.fingerprint == fingerprint_text(first)[0]
    assert b.fingerprint == fingerprint_text(second)[0]
    assert a.fingerprint != b.fingerprint


@settings(max_examples=200, deadline=None)
@given(st.lists(st.sampled_from(["SELECT", "a", "1", "'x'", '"c1"', '"c2"', "=", ",", "2.5", "$1",
                                 "(", ")", "FROM", "t", "WHERE", "-", "::", "int", "--", "/*", "*/",
                                 "\n", "'", "1e5", "t1", ";"]), max_size=12),
       st.lists(st.sampled_from(["1", "22", "'y'", "''", "3.0"]), min_size=1, max_size=3))
def test_texts_sharing_a_cache_key_share_the_fingerprint(tokens, constants):
    text = " ".join(tokens)
    fingerprinter = Fingerprinter(cache_size=100)
    first = enriched(text + " " + " ".join(constants), fingerprinter)
    second = enriched(text + " " + " ".join("7" for _ in constants), fingerprinter)
    assert first.fingerprint == fingerprint_text(first.sql)[0]
    assert second.fingerprint == fingerprint_text(second.sql)[0]


def test_bound_statements_that_differ_by_a_constant_in_the_text_differ_in_signature():
    """Django with server-side binding pages a tenant's rows: the tenant is bound, the OFFSET
    written into the text; pages are different statements, not one repeated."""
    page = "SELECT id FROM reviews WHERE stars = $1 ORDER BY id LIMIT 7 OFFSET {}"
    fingerprinter = Fingerprinter(cache_size=100)
    pages = [enriched(page.format(offset), fingerprinter, param_sig=1234, n_params=1)
             for offset in (7, 14, 7)]
    assert pages[0].fingerprint == pages[1].fingerprint
    assert pages[0].param_sig != pages[1].param_sig and pages[0].param_sig == pages[2].param_sig
    # With nothing written in, the Bind's signature is the statement's.
    assert enriched("SELECT id FROM reviews WHERE stars = $1", fingerprinter, param_sig=1234,
                    n_params=1).param_sig == 1234


def test_a_parse_past_its_budget_is_abandoned_for_the_lexer():
    # Seven subqueries nested 1,500 deep: 95 KB, under MAX_PARSE_CHARS; pglast's normalize of it
    # took about a second here, four times PARSE_BUDGET_SECONDS (one such nest takes a tenth).
    nest = "(select " * 1500 + "1" + ")" * 1500
    nested = "select " + ",".join([nest] * 7)
    assert len(nested) < MAX_PARSE_CHARS
    before = abandoned_parses()
    started = time.perf_counter()
    ev = enriched(nested)
    assert time.perf_counter() - started < PARSE_BUDGET_SECONDS + 0.5  # the budget and the lexer
    assert HEX16.fullmatch(ev.fingerprint)
    assert abandoned_parses() == before + 1
