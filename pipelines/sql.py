"""The query builder: every query is written once, in GoogleSQL, and translated for DuckDB.

Queries are built as sqlglot expressions and rendered by sqlglot for both engines at
build time: a :class:`Query` is the GoogleSQL text (a ``str``) carrying its DuckDB
translation, so no engine parses SQL in the hot path. The long column lists of the
extraction queries are spliced into the rendered frame with each dialect's own quote
characters.

Every identifier a query is built from (project, dataset, table, key, columns and
their aliases) is checked here, whatever the caller already checked: a name that is not
plain letters, digits and ``_`` (a project: lower-case letters, digits and ``-``) is
refused with a :class:`pipelines.catalog.MalformedName` (a PipelineError naming it), so
no input can reach the SQL text except as the quoted identifier it is
(tests/test_query_builder_properties.py).
"""
from __future__ import annotations

import datetime as dt
import functools
import re
from typing import Sequence

import sqlglot
from sqlglot import exp

from pipelines.catalog import MalformedName, TableSpec, check_identifier
from pipelines.window import UTC, Window

_TIMESTAMP = exp.DataType.build("TIMESTAMP", dialect="bigquery")
# A Google Cloud project id (6-30 characters), optionally domain-scoped
# (``example.com:project``); they are quoted, never split.
_PROJECT = re.compile(r"(?:[a-z][a-z0-9.-]{0,61}[a-z0-9]:)?[a-z][a-z0-9-]{4,28}[a-z0-9]")
_SELECT_LIST = "bqx_select_list_placeholder"


def check_project(project: str | None, where: str) -> str | None:
    """Return ``project`` (or None) if it is a Google Cloud project id; raise a
    MalformedName naming it otherwise."""
    if project is not None and (not isinstance(project, str)
                                or not _PROJECT.fullmatch(project)):
        raise MalformedName(f"malformed project {project!r} in {where}: expected a Google "
                            "Cloud project id (lower-case letters, digits and '-')")
    return project


def _check_table(dataset: str, table: str, project: str | None) -> None:
    """Refuse a table reference that is not plain identifiers."""
    where = "a query's table reference"
    check_project(project, where)
    check_identifier(dataset, where)
    check_identifier(table, where)


def _check_spec(spec: TableSpec, key: str, project: str | None) -> None:
    """Refuse a table spec (or key, or project) whose names are not plain."""
    _check_table(spec.dataset, spec.table, project)
    where = f"the query of {spec.dataset}.{spec.table}"
    check_identifier(key, where)
    for column in spec.columns:
        check_identifier(column.source, where)
        check_identifier(column.output, where)


class Query(str):
    """GoogleSQL text that also carries its DuckDB translation, made when it was built."""

    duckdb: str | None = None

    def __new__(cls, googlesql: str, duckdb: str | None = None):
        obj = super().__new__(cls, googlesql)
        obj.duckdb = duckdb
        return obj

    def __reduce__(self):
        return (Query, (str(self), self.duckdb))


def _rendered(query: exp.Expression, select_list: Sequence[tuple[str, str | None]] = ()) -> Query:
    """Render ``query`` for both engines; ``select_list`` (source, alias) replaces the
    placeholder column, quoted per dialect."""
    texts = {}
    for dialect in ("bigquery", "duckdb"):
        text = query.sql(dialect=dialect)
        if select_list:
            placeholder = _quote(_SELECT_LIST, dialect)
            text = text.replace(placeholder, _select_list(tuple(select_list), dialect), 1)
        texts[dialect] = text
    return Query(texts["bigquery"], texts["duckdb"])


@functools.lru_cache(maxsize=None)
def _quote_chars(dialect: str) -> tuple[str, str]:
    quoted = exp.to_identifier("x", quoted=True).sql(dialect=dialect)
    return quoted[0], quoted[-1]


def _quote(name: str, dialect: str) -> str:
    # Splicing is only safe for names without quote characters: checked again here.
    check_identifier(name, "a query's column list")
    start, end = _quote_chars(dialect)
    return f"{start}{name}{end}"


def _select_list(columns: tuple[tuple[str, str | None], ...], dialect: str) -> str:
    return ", ".join(_quote(src, dialect) + (f" AS {_quote(alias, dialect)}" if alias else "")
                     for src, alias in columns)


def _timestamp_text(t: dt.datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")


def timestamp_literal(t: dt.datetime) -> exp.Expression:
    """A GoogleSQL TIMESTAMP constant for ``t`` (UTC)."""
    return exp.cast(exp.Literal.string(_timestamp_text(t)), _TIMESTAMP)


def _col(name: str) -> exp.Column:
    return exp.column(name, quoted=True)


def _table(spec_dataset: str, table: str, project: str | None) -> exp.Table:
    return exp.table_(table, db=spec_dataset, catalog=project, quoted=True)


def _in_window(key: str, window: Window) -> exp.Expression:
    # Plain comparisons on the partitioning column, so BigQuery prunes partitions.
    return exp.and_(
        exp.GTE(this=_col(key), expression=timestamp_literal(window.start)),
        exp.LT(this=_col(key), expression=timestamp_literal(window.end)),
    )


def select_shard(spec: TableSpec, key: str, shard: Window, project: str | None = None) -> Query:
    """GoogleSQL reading one table's rows in ``shard``: the key, then its output columns.

    Columns come out under their output names (prefixed with the table's stem), so the
    checkpoint already has the training file's column names.
    """
    _check_spec(spec, key, project)
    return _for_table(_select_template(key, project), spec, shard,
                      [(key, None)] + [(c.source, c.output) for c in spec.columns])


def count_shard(spec: TableSpec, key: str, shard: Window, min_valid: dt.datetime | None,
                project: str | None = None) -> Query:
    """GoogleSQL counting a shard's rows and distinct keys (and, when ``min_valid`` is
    given, the table's rows whose key is before it: the bad keys that are dropped)."""
    _check_spec(spec, key, project)
    return _for_table(_count_template(key, min_valid, project), spec, shard)


# Every table's queries have the same shape; only names and bounds differ. sqlglot takes
# ~10 ms to render a query in each dialect (13 of the 15 s of planning a pair's 668
# tables, and 3x that with 3 shards a table), so each shape is rendered once, with
# stand-in names and bounds, and a task's own (checked, plain) names and bounds replace
# them, quoted per dialect: the text is what rendering them directly gives (tested).
_DATASET, _TABLE = "bqx_dataset_placeholder", "bqx_table_placeholder"
_STAND_IN = Window(dt.datetime(1901, 2, 3, 4, 5, 6, 789012, tzinfo=UTC),
                   dt.datetime(1902, 3, 4, 5, 6, 7, 890123, tzinfo=UTC))


def _for_table(template: Query, spec: TableSpec, shard: Window,
               select_list: Sequence[tuple[str, str | None]] = ()) -> Query:
    """``template`` with ``spec``'s dataset and table, ``shard``'s bounds and the
    select list in place of the stand-ins."""
    texts = []
    for text, dialect in ((str(template), "bigquery"), (template.duckdb, "duckdb")):
        text = (text.replace(_quote(_DATASET, dialect), _quote(spec.dataset, dialect))
                .replace(_quote(_TABLE, dialect), _quote(spec.table, dialect)))
        for stand_in, bound in ((_STAND_IN.start, shard.start), (_STAND_IN.end, shard.end)):
            text = text.replace(f"'{_timestamp_text(stand_in)}'", f"'{_timestamp_text(bound)}'")
        if select_list:
            text = text.replace(_quote(_SELECT_LIST, dialect), _select_list(tuple(select_list), dialect), 1)
        texts.append(text)
    return Query(*texts)


@functools.lru_cache(maxsize=64)
def _select_template(key: str, project: str | None) -> Query:
    return _rendered(select_expression(_DATASET, _TABLE, key, _STAND_IN, project))


@functools.lru_cache(maxsize=64)
def _count_template(key: str, min_valid: dt.datetime | None, project: str | None) -> Query:
    return _rendered(count_expression(_DATASET, _TABLE, key, _STAND_IN, min_valid, project))


def select_expression(dataset: str, table: str, key: str, shard: Window,
                      project: str | None = None) -> exp.Expression:
    """The shard read as a sqlglot tree (the select list is a placeholder column)."""
    return (
        exp.select(_col(_SELECT_LIST))
        .from_(_table(dataset, table, project))
        .where(_in_window(key, shard))
    )


def count_expression(dataset: str, table: str, key: str, shard: Window,
                     min_valid: dt.datetime | None, project: str | None = None) -> exp.Expression:
    """The shard's counts as a sqlglot tree."""
    table_ref = _table(dataset, table, project)
    shard_counts = (
        exp.select(
            exp.alias_(exp.Count(this=exp.Star()), "n_rows", quoted=True),
            exp.alias_(exp.Count(this=exp.Distinct(expressions=[_col(key)])), "n_keys",
                       quoted=True),
        )
        .from_(table_ref.copy())
        .where(_in_window(key, shard))
    )
    if min_valid is None:
        return shard_counts
    bad = (
        exp.select(exp.alias_(exp.Count(this=exp.Star()), "n_bad", quoted=True))
        .from_(table_ref.copy())
        .where(exp.LT(this=_col(key), expression=timestamp_literal(min_valid)))
    )
    return exp.select(
        exp.column("n_rows", table="s", quoted=True),
        exp.column("n_keys", table="s", quoted=True),
        exp.column("n_bad", table="b", quoted=True),
    ).from_(exp.alias_(exp.Subquery(this=shard_counts), "s", table=True)).join(
        exp.alias_(exp.Subquery(this=bad), "b", table=True), join_type="CROSS")


BATCH_TASK = "task"


@functools.lru_cache(maxsize=None)
def _null_int64(dialect: str) -> str:
    # Rendered once: sqlglot takes milliseconds per call.
    return exp.cast(exp.null(), exp.DataType.build("BIGINT")).sql(dialect=dialect)


def count_batch(counts: Sequence[tuple[Query, bool]]) -> Query:
    """One GoogleSQL query answering several :func:`count_shard` queries at once.

    ``counts`` holds (count query, whether it counts bad keys). The answer has one row
    per query: ``task`` (its position in ``counts``), ``n_rows``, ``n_keys`` and ``n_bad``
    (NULL where the query does not count bad keys). Each query is used whole as a
    subquery, so every count means exactly what its own (fingerprinted) text says; only
    the round trips are shared (one query job instead of one per shard on BigQuery).
    """
    if not counts:
        raise ValueError("count_batch needs at least one count query")
    texts = []
    for dialect in ("bigquery", "duckdb"):
        task, rows, keys, bad = (_quote(n, dialect) for n in (BATCH_TASK, "n_rows", "n_keys", "n_bad"))
        null = _null_int64(dialect)
        parts = []
        for i, (query, with_bad) in enumerate(counts):
            if not isinstance(query, Query) or not query.duckdb:
                raise ValueError("count_batch takes queries built by count_shard")
            text = str(query) if dialect == "bigquery" else query.duckdb
            parts.append(f"SELECT {int(i)} AS {task}, {rows}, {keys}, "
                         f"{bad if with_bad else null} AS {bad} FROM ({text}) AS {_quote('c', dialect)}")
        texts.append(" UNION ALL ".join(parts))
    return Query(*texts)


def key_range(dataset: str, table: str, key: str, min_valid: dt.datetime,
              project: str | None = None) -> Query:
    """GoogleSQL for the first and last valid key of a table (the default window)."""
    _check_table(dataset, table, project)
    check_identifier(key, f"the query of {dataset}.{table}")
    query = (
        exp.select(
            exp.alias_(exp.Min(this=_col(key)), "first_key", quoted=True),
            exp.alias_(exp.Max(this=_col(key)), "last_key", quoted=True),
        )
        .from_(_table(dataset, table, project))
        .where(exp.GTE(this=_col(key), expression=timestamp_literal(min_valid)))
    )
    return _rendered(query)


def to_duckdb(googlesql: str) -> str:
    """Translate one GoogleSQL statement for DuckDB (free for a :class:`Query`)."""
    if isinstance(googlesql, Query) and googlesql.duckdb:
        return googlesql.duckdb
    return sqlglot.transpile(googlesql, read="bigquery", write="duckdb")[0]


def quote_all(names: Sequence[str], dialect: str = "bigquery") -> list[str]:
    """Identifiers quoted for ``dialect``: plain identifiers, or project ids.

    Anything else is refused (MalformedName): sqlglot doubles a backtick inside a
    GoogleSQL quoted identifier, and BigQuery reads a backslash there as an escape, so
    only names without either can be quoted faithfully for both engines. Such names
    hold no quote character, so they are wrapped in the dialect's quotes directly (what
    sqlglot renders, tested; asking sqlglot per name was slow over 17,000 columns).
    """
    for name in names:
        if not (isinstance(name, str) and _PROJECT.fullmatch(name)):
            check_identifier(name, "a quoted name list")
    start, end = _quote_chars(dialect)
    return [f"{start}{name}{end}" for name in names]
