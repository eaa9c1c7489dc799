"""What a statement touches, read from its normalized text's parse tree, for the findings.

Owns: parsing normalized SQL (literals already redacted) into libpg_query's JSON tree, bounded by
MAX_PARSED_CHARS and cached per fingerprint; the relations a statement reads or writes; the
lock-taking DDL operations the blocking-migration finding knows (`risky_ddl`); and the equality
filter of a single-table statement (`equality_filter`) the missing-index finding checks.
Must not: raise on any text (unparseable SQL describes nothing), or see the raw SQL.
"""

from __future__ import annotations

import json
from collections import OrderedDict

from pglast import parser as pg

MAX_PARSED_CHARS = 10_000
CACHE_ENTRIES = 2048
# Functions a column default may call without making it volatile (evaluated once at ALTER).
_STABLE_DEFAULTS = frozenset({"now", "transaction_timestamp", "statement_timestamp",
                              "current_timestamp", "current_date", "localtimestamp"})

_cache: OrderedDict[str, list | None] = OrderedDict()


def statements(fingerprint: str, normalized: str) -> list[dict] | None:
    """The parse trees of every statement in `normalized`; None when it does not parse."""
    if fingerprint in _cache:
        _cache.move_to_end(fingerprint)
        return _cache[fingerprint]
    trees = None
    if len(normalized) <= MAX_PARSED_CHARS:
        try:
            trees = [entry["stmt"] for entry in json.loads(pg.parse_sql_json(normalized))["stmts"]]
        except Exception:  # pglast.parser.ParseError, or text the lexer fallback described
            trees = None
    _cache[fingerprint] = trees
    if len(_cache) > CACHE_ENTRIES:
        _cache.popitem(last=False)
    return trees


def _walk(node):
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item)


def relations(trees: list[dict]) -> set[tuple[str | None, str]]:
    """(schema or None, table) of every relation named anywhere in the statements."""
    found = set()
    for node in _walk(trees):
        for key in ("RangeVar", "relation", "pktable"):
            value = node.get(key)
            if isinstance(value, dict) and "relname" in value:
                found.add((value.get("schemaname"), value["relname"]))
    return found


def risky_ddl(trees: list[dict]) -> list[tuple[str, str | None, str, str]]:
    """(operation, schema, table, detail) for each DDL that locks out other sessions while it
    scans or rewrites the table: create_index (without CONCURRENTLY), add_foreign_key (without
    NOT VALID), set_not_null, add_column_volatile_default, alter_column_type."""
    found = []
    for tree in trees:
        index = tree.get("IndexStmt")
        if index is not None and not index.get("concurrent"):
            relation = index["relation"]
            found.append(("create_index", relation.get("schemaname"), relation["relname"],
                          index.get("idxname", "")))
        alter = tree.get("AlterTableStmt")
        if alter is None or alter.get("objtype") != "OBJECT_TABLE":
            continue
        relation = alter["relation"]
        schema, table = relation.get("schemaname"), relation["relname"]
        for command in alter.get("cmds", ()):
            cmd = command.get("AlterTableCmd", {})
            subtype = cmd.get("subtype")
            definition = cmd.get("def", {})
            if subtype == "AT_AddConstraint":
                constraint = definition.get("Constraint", {})
                if constraint.get("contype") == "CONSTR_FOREIGN" and not constraint.get("skip_validation"):
                    found.append(("add_foreign_key", schema, table, constraint.get("conname", "")))
            elif subtype == "AT_SetNotNull":
                found.append(("set_not_null", schema, table, cmd.get("name", "")))
            elif subtype == "AT_AlterColumnType":
                found.append(("alter_column_type", schema, table, cmd.get("name", "")))
            elif subtype == "AT_AddColumn":
                column = definition.get("ColumnDef", {})
                if _volatile_default(column):
                    found.append(("add_column_volatile_default", schema, table,
                                  column.get("colname", "")))
    return found


def _volatile_default(column: dict) -> bool:
    for constraint in column.get("constraints", ()):
        constraint = constraint.get("Constraint", {})
        if constraint.get("contype") != "CONSTR_DEFAULT":
            continue
        for node in _walk(constraint.get("raw_expr")):
            call = node.get("FuncCall")
            if call is not None:
                name = call["funcname"][-1]["String"]["sval"].lower()
                if name not in _STABLE_DEFAULTS:
                    return True
    return False


def equality_filter(trees: list[dict]) -> tuple[str | None, str, tuple[str, ...]] | None:
    """(schema, table, columns) of one SELECT, UPDATE or DELETE on one table whose WHERE
    compares columns for equality with a parameter or a constant (`=`, `= ANY`, `IN`)."""
    if len(trees) != 1:
        return None
    tree = trees[0]
    if "SelectStmt" in tree:
        statement = tree["SelectStmt"]
        if statement.get("withClause") or statement.get("op", "SETOP_NONE") != "SETOP_NONE":
            return None
        sources = statement.get("fromClause", [])
        if len(sources) != 1 or "RangeVar" not in sources[0]:
            return None
        relation = sources[0]["RangeVar"]
    elif "UpdateStmt" in tree or "DeleteStmt" in tree:
        statement = tree.get("UpdateStmt") or tree["DeleteStmt"]
        if statement.get("fromClause") or statement.get("usingClause") or statement.get("withClause"):
            return None
        relation = statement["relation"]
    else:
        return None
    columns: list[str] = []
    for node in _conjuncts(statement.get("whereClause")):
        expr = node.get("A_Expr")
        if expr is None or expr.get("kind") not in ("AEXPR_OP", "AEXPR_OP_ANY", "AEXPR_IN"):
            continue
        if expr["name"][-1]["String"]["sval"] != "=":
            continue
        for side, other in (("lexpr", "rexpr"), ("rexpr", "lexpr")):
            column = _column(expr.get(side))
            if column is not None and _is_value(expr.get(other)):
                if column not in columns:
                    columns.append(column)
                break
    if not columns:
        return None
    return relation.get("schemaname"), relation["relname"], tuple(columns[:4])


def _conjuncts(where):
    if not isinstance(where, dict):
        return
    boolean = where.get("BoolExpr")
    if boolean is not None:
        if boolean.get("boolop") == "AND_EXPR":
            for arg in boolean["args"]:
                yield from _conjuncts(arg)
        return
    yield where


def _column(node) -> str | None:
    if not isinstance(node, dict):
        return None
    if "TypeCast" in node:
        return _column(node["TypeCast"].get("arg"))
    ref = node.get("ColumnRef")
    if ref is None:
        return None
    last = ref["fields"][-1]
    return last.get("String", {}).get("sval")


def _is_value(node) -> bool:
    if isinstance(node, list):  # IN (...)
        return bool(node) and all(_is_value(item) for item in node)
    if not isinstance(node, dict):
        return False
    if "TypeCast" in node:
        return _is_value(node["TypeCast"].get("arg"))
    if "List" in node:
        return _is_value(node["List"].get("items", []))
    return "ParamRef" in node or "A_Const" in node
