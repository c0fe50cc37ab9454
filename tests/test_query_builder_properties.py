"""Property: no identifier escapes the query builder's quoting.

Whatever the names (arbitrary unicode, quotes, backticks, semicolons, SQL keywords,
comments ``--`` and ``/*``, newlines, the select-list placeholder itself), every query of
:mod:`pipelines.sql` either

* is refused with a PipelineError that names an offending input, which really is not a
  plain identifier (or project id); plain names are never refused; or
* parses with sqlglot, in its GoogleSQL text (read as ``bigquery``) and in its DuckDB
  rendering (read as ``duckdb``), into a tree whose identifiers are exactly the inputs,
  each in its place: the select list is the key then every (source AS output) pair in
  order, every table reference is (project, dataset, table), every other column is the
  key, and no identifier appears that was not an input or one of the builder's own
  aliases.

:func:`pipelines.sql.quote_all` (the DuckDB merge's column lists, the BigQuery source's
INFORMATION_SCHEMA query) is held to the same property.
"""
import collections
import datetime as dt
import re

import sqlglot
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot import exp

from pipelines import sql
from pipelines.catalog import Column, TableSpec
from pipelines.errors import PipelineError
from pipelines.window import UTC, window_from_dates

SETTINGS = settings(max_examples=200, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
WINDOW = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 7))
MIN_VALID = dt.datetime(2000, 1, 1, tzinfo=UTC)
DIALECTS = ("bigquery", "duckdb")

# The specification, written independently of the code under test.
PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,299}")
PROJECT = re.compile(r"(?:[a-z][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")

KEYWORDS = ["select", "SELECT", "from", "where", "table", "AS", "null", "true", "and",
            "interval_time", "n_rows", "n_keys", "n_bad", "s", "b", "_", "__",
            "bqx_select_list_placeholder", "first_key", "last_key"]
FRAGMENTS = ["`", '"', "'", ";", "--", "/*", "*/", "\\", "\n", "\r", "\t", " ", ".", "/",
             "..", "\x00", "é", "ℌ", "\u200b", "\U0001f600", "$", "@", "-", ":"]
HOSTILE = ["x` FROM t; DROP TABLE y; --", 'x" FROM t; DROP TABLE y; --', "a`b", 'a"b',
           "a'b", "a;b", "a -- b", "a /* b */", "../../x", "reg_eurusd\n", "\nreg", "",
           " ", "1abc", "a.b", "ds.t", "`a`", '"a"', "a\\`b", "ａｂｃ", "a" * 301]

plain_names = st.one_of(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,15}", fullmatch=True),
                        st.sampled_from(KEYWORDS))
hostile_names = st.one_of(
    st.sampled_from(HOSTILE),
    st.text(max_size=12),
    st.builds(lambda a, f, b: a + f + b, plain_names, st.sampled_from(FRAGMENTS), plain_names),
)
# Mostly plain, so that about half the queries are built and parsed.
names = st.one_of(plain_names, plain_names, plain_names, plain_names, plain_names,
                  plain_names, plain_names, hostile_names)
projects = st.one_of(st.none(), st.sampled_from(["bqx-ml", "my-project-42",
                                                 "example.com:proj-1"]), names)
columns = st.lists(st.tuples(names, names), min_size=1, max_size=4)


def _acceptable(name) -> bool:
    return isinstance(name, str) and PLAIN.fullmatch(name) is not None


def _acceptable_project(project) -> bool:
    return project is None or (isinstance(project, str) and PROJECT.fullmatch(project) is not None)


def _build_or_refusal(build, plain: list, project=None):
    """Run ``build``; check the refusal contract if it raises. Returns the query or None."""
    ok = all(_acceptable(n) for n in plain) and _acceptable_project(project)
    try:
        query = build()
    except PipelineError as exc:
        assert not ok, f"plain names refused: {exc}"
        culprits = [n for n in plain if not _acceptable(n)]
        if not _acceptable_project(project):
            culprits.append(project)
        assert any(repr(c) in str(exc) for c in culprits), (str(exc), culprits)
        assert "\n" not in str(exc).replace("\\n", ""), "the error must be one line"
        return None
    assert ok, f"built a query from non-plain names {plain!r} / project {project!r}"
    return query


def _trees(query: sql.Query):
    """The query parsed from its GoogleSQL text and from its DuckDB rendering."""
    assert query.duckdb
    for dialect, text in (("bigquery", str(query)), ("duckdb", query.duckdb)):
        statements = sqlglot.parse(text, read=dialect)
        assert len(statements) == 1, f"{dialect}: {len(statements)} statements in {text!r}"
        tree = statements[0]
        assert not list(tree.find_all(exp.Command)), text
        yield dialect, tree


def _identifiers(tree) -> collections.Counter:
    return collections.Counter(i.this for i in tree.find_all(exp.Identifier))


def _tables(tree) -> list[tuple[str, str, str]]:
    return [(t.catalog, t.db, t.name) for t in tree.find_all(exp.Table)]


def _table_ref(project, dataset, table):
    return (project or "", dataset, table)


@SETTINGS
@given(dataset=names, table=names, key=names, cols=columns, project=projects)
def test_select_shard_quotes_every_identifier(dataset, table, key, cols, project):
    spec = TableSpec(dataset, table, "pair", False, "stem",
                     tuple(Column(src, out, "FLOAT64") for src, out in cols))
    plain = [dataset, table, key] + [n for pair in cols for n in pair]
    query = _build_or_refusal(lambda: sql.select_shard(spec, key, WINDOW, project), plain, project)
    if query is None:
        return
    for dialect, tree in _trees(query):
        assert isinstance(tree, exp.Select), dialect
        projected = []
        for e in tree.expressions:
            if isinstance(e, exp.Alias):
                assert isinstance(e.this, exp.Column), (dialect, e.sql())
                projected.append((e.this.name, e.alias))
            else:
                assert isinstance(e, exp.Column), (dialect, e.sql())
                projected.append((e.name, None))
        assert projected == [(key, None)] + [tuple(c) for c in cols], dialect
        assert _tables(tree) == [_table_ref(project, dataset, table)], dialect
        where_columns = [c.name for c in tree.args["where"].find_all(exp.Column)]
        assert where_columns == [key, key], dialect
        expected = collections.Counter([key, key, key, dataset, table]
                                       + [n for pair in cols for n in pair]
                                       + ([project] if project else []))
        assert _identifiers(tree) == expected, dialect


@SETTINGS
@given(dataset=names, table=names, key=names, project=projects, bad_keys=st.booleans())
def test_count_shard_quotes_every_identifier(dataset, table, key, project, bad_keys):
    spec = TableSpec(dataset, table, "pair", False, "stem", ())
    floor = MIN_VALID if bad_keys else None
    query = _build_or_refusal(lambda: sql.count_shard(spec, key, WINDOW, floor, project),
                              [dataset, table, key], project)
    if query is None:
        return
    own = {"n_rows", "n_keys", "n_bad", "s", "b"}
    for dialect, tree in _trees(query):
        assert _tables(tree) == [_table_ref(project, dataset, table)] * (2 if bad_keys else 1)
        for column in tree.find_all(exp.Column):
            if column.table:  # the outer select of the two counts
                assert (column.table, column.name) in {("s", "n_rows"), ("s", "n_keys"),
                                                       ("b", "n_bad")}, dialect
            else:
                assert column.name == key, dialect
        ids = _identifiers(tree)
        inputs = collections.Counter({key: (4 if bad_keys else 3)})
        inputs.update([dataset, table] * (2 if bad_keys else 1))
        if project:
            inputs.update([project] * (2 if bad_keys else 1))
        # Every input where it belongs, nothing else but the builder's own aliases.
        assert not inputs - ids, dialect
        assert set(ids - inputs) <= own, (dialect, ids - inputs)


@SETTINGS
@given(dataset=names, table=names, key=names, project=projects)
def test_key_range_quotes_every_identifier(dataset, table, key, project):
    query = _build_or_refusal(lambda: sql.key_range(dataset, table, key, MIN_VALID, project),
                              [dataset, table, key], project)
    if query is None:
        return
    for dialect, tree in _trees(query):
        assert _tables(tree) == [_table_ref(project, dataset, table)], dialect
        assert [c.name for c in tree.find_all(exp.Column)] == [key, key, key], dialect
        assert [e.alias for e in tree.expressions] == ["first_key", "last_key"], dialect
        expected = collections.Counter([key, key, key, dataset, table, "first_key", "last_key"]
                                       + ([project] if project else []))
        assert _identifiers(tree) == expected, dialect


@SETTINGS
@given(cols=st.lists(st.one_of(names, projects.filter(bool)), min_size=1, max_size=5),
       dialect=st.sampled_from(DIALECTS))
def test_quote_all_round_trips_or_refuses(cols, dialect):
    def acceptable(n):
        return _acceptable(n) or (isinstance(n, str) and PROJECT.fullmatch(n) is not None)

    try:
        quoted = sql.quote_all(cols, dialect)
    except PipelineError as exc:
        culprits = [n for n in cols if not acceptable(n)]
        assert culprits, f"plain names refused: {exc}"
        assert any(repr(c) in str(exc) for c in culprits), (str(exc), culprits)
        return
    assert all(acceptable(n) for n in cols), cols
    # Exactly what sqlglot renders (quote_all wraps names itself, for speed).
    assert quoted == [sqlglot.exp.to_identifier(n, quoted=True).sql(dialect=dialect) for n in cols]
    tree = sqlglot.parse_one(f"SELECT {', '.join(quoted)} FROM t", read=dialect)
    assert [e.name for e in tree.expressions] == cols


def test_the_hostile_examples_are_all_refused():
    """The corpus of names in the module docstring, each named by the refusal."""
    for name in HOSTILE + [f"a{f}b" for f in FRAGMENTS if f not in ("-",)]:
        if _acceptable(name):
            continue
        spec = TableSpec("ds", "t", "pair", False, "t", (Column(name, "t_x", "FLOAT64"),))
        try:
            sql.select_shard(spec, "interval_time", WINDOW)
        except PipelineError as exc:
            assert repr(name) in str(exc)
        else:
            raise AssertionError(f"{name!r} was spliced into SQL")
