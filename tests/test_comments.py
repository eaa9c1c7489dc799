"""Comment tags (sqlcommenter, marginalia) and comment stripping."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgscout.analysis.comments import ATTRIBUTION_KEYS, MAX_VALUE_CHARS, parse_comments, trace_id

TRACEPARENT = "00-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01"


def test_text_without_comments_is_returned_unchanged_with_no_tags():
    sql = "SELECT * FROM users WHERE id = $1"
    assert parse_comments(sql) == ({}, sql)


def test_django_sqlcommenter_tags_are_url_decoded_and_stripped():
    sql = (
        "SELECT * FROM polls_question /*controller='index',"
        "db_driver='django.db.backends.postgresql',"
        f"framework='django%3A4.2',route='%5Epolls/%24',traceparent='{TRACEPARENT}'*/"
    )
    tags, text = parse_comments(sql)
    assert text == "SELECT * FROM polls_question"
    assert tags == {
        "controller": "index",
        "db_driver": "django.db.backends.postgresql",
        "framework": "django:4.2",
        "route": "^polls/$",
        "traceparent": TRACEPARENT,
    }


def test_sqlalchemy_sqlcommenter_with_escaped_quote_in_value():
    tags, _ = parse_comments(
        "select 1 /*db_driver='psycopg',db_framework='sqlalchemy%3A2.0',route='it\\'s%20here'*/"
    )
    assert tags == {"db_driver": "psycopg", "db_framework": "sqlalchemy:2.0", "route": "it's here"}


def test_marginalia_tags_keep_colons_and_commas_inside_values():
    tags, text = parse_comments(
        "SELECT posts.* FROM posts /*application:Blog,controller:posts,action:index,"
        "line:/app/models/post.rb:12:in `each', block*/"
    )
    assert text == "SELECT posts.* FROM posts"
    assert tags == {
        "application": "Blog",
        "controller": "posts",
        "action": "index",
        "line": "/app/models/post.rb:12:in `each', block",
    }


def test_line_comment_tags_and_leading_comment():
    tags, text = parse_comments("/* application:worker */ select 1 -- route:'/x'\n")
    assert text == "select 1"
    assert tags == {"application": "worker", "route": "'/x'"}


@pytest.mark.parametrize(
    "sql",
    [
        "select '/* not a comment */', '-- nor this'",
        "select E'\\' /* still a string', 1",
        "select $$ /* body */ $$, $fn$ -- $$ $fn$",
        'select "weird -- column" from t',
    ],
)
def test_comment_markers_inside_literals_are_not_comments(sql):
    assert parse_comments(sql) == ({}, sql)


def test_nested_block_comment_is_one_comment():
    tags, text = parse_comments("select /* outer /* inner */ still comment */ 1")
    assert text.split() == ["select", "1"]


def test_unterminated_comment_runs_to_the_end():
    assert parse_comments("select 1 /* job:b") == ({"job": "b"}, "select 1")


def test_free_text_comment_gives_no_tags():
    assert parse_comments("select 1 /* the slow one, see ticket 42 */").tags == {}


def test_only_attribution_keys_are_kept_and_values_are_bounded():
    many = ",".join(f"k{i}='v'" for i in range(40))
    long_value = "x" * 1000
    tags, _ = parse_comments(f"select 1 /*route='{long_value}',note='card 4111'*/ /*{many}*/")
    assert tags == {"route": "x" * MAX_VALUE_CHARS}


def test_first_comment_wins_for_a_repeated_key():
    assert parse_comments("select 1 /*route='1'*/ /*route='2'*/").tags == {"route": "1"}


def test_trace_id_from_traceparent():
    assert trace_id({"traceparent": TRACEPARENT}) == "5bd66ef5095369c7b0d1f8f4bd33716a"


@pytest.mark.parametrize(
    "traceparent",
    [
        "",
        "garbage",
        "00-00000000000000000000000000000000-c532cb4098ac3dd2-01",
        "00-5bd66ef5095369c7b0d1f8f4bd33716a-0000000000000000-01",
        "ff-5bd66ef5095369c7b0d1f8f4bd33716a-c532cb4098ac3dd2-01",
        "00-5bd66ef5095369c7b0d1f8f4bd3371-c532cb4098ac3dd2-01",
    ],
)
def test_invalid_traceparent_has_no_trace_id(traceparent):
    assert trace_id({"traceparent": traceparent}) is None


def test_no_traceparent_no_trace_id():
    assert trace_id({"controller": "x"}) is None


@settings(max_examples=300, deadline=None)
@given(sql=st.text(alphabet=st.sampled_from(list("ab:=,'\"$E/*-\\\n %")), max_size=60))
def test_any_text_parses_without_raising_and_within_bounds(sql):
    tags, text = parse_comments(sql)
    assert set(tags) <= ATTRIBUTION_KEYS
    assert all(len(value) <= MAX_VALUE_CHARS for value in tags.values())
    assert len(text) <= len(sql) + sql.count("/*") + sql.count("--")
