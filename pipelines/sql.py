"""The query builder: every query is written once, in GoogleSQL, and translated for DuckDB.

Queries are built as sqlglot expressions, so identifiers are always quoted by the
library (never pasted into strings), then rendered as GoogleSQL. The DuckDB source runs
``to_duckdb(sql)``: the same text, transpiled.
"""
from __future__ import annotations

import datetime as dt
from typing import Sequence

import sqlglot
from sqlglot import exp

from pipelines.catalog import TableSpec
from pipelines.window import UTC, Window

_TIMESTAMP = exp.DataType.build("TIMESTAMP", dialect="bigquery")


def timestamp_literal(t: dt.datetime) -> exp.Expression:
    """A GoogleSQL TIMESTAMP constant for ``t`` (UTC)."""
    text = t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f+00")
    return exp.cast(exp.Literal.string(text), _TIMESTAMP)


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


def select_shard(spec: TableSpec, key: str, shard: Window, project: str | None = None) -> str:
    """GoogleSQL reading one table's rows in ``shard``: the key, then its output columns.

    Columns come out under their output names (prefixed with the table's stem), so the
    checkpoint already has the training file's column names.
    """
    columns = [_col(key)] + [
        exp.alias_(_col(c.source), c.output, quoted=True) for c in spec.columns
    ]
    query = (
        exp.select(*columns)
        .from_(_table(spec.dataset, spec.table, project))
        .where(_in_window(key, shard))
    )
    return query.sql(dialect="bigquery")


def count_shard(spec: TableSpec, key: str, shard: Window, min_valid: dt.datetime | None,
                project: str | None = None) -> str:
    """GoogleSQL counting a shard's rows and distinct keys (and, when ``min_valid`` is
    given, the table's rows whose key is before it: the bad keys that are dropped)."""
    table = _table(spec.dataset, spec.table, project)
    shard_counts = (
        exp.select(
            exp.alias_(exp.Count(this=exp.Star()), "n_rows", quoted=True),
            exp.alias_(exp.Count(this=exp.Distinct(expressions=[_col(key)])), "n_keys",
                       quoted=True),
        )
        .from_(table.copy())
        .where(_in_window(key, shard))
    )
    if min_valid is None:
        return shard_counts.sql(dialect="bigquery")
    bad = (
        exp.select(exp.alias_(exp.Count(this=exp.Star()), "n_bad", quoted=True))
        .from_(table.copy())
        .where(exp.LT(this=_col(key), expression=timestamp_literal(min_valid)))
    )
    query = exp.select(
        exp.column("n_rows", table="s", quoted=True),
        exp.column("n_keys", table="s", quoted=True),
        exp.column("n_bad", table="b", quoted=True),
    ).from_(exp.alias_(exp.Subquery(this=shard_counts), "s", table=True)).join(
        exp.alias_(exp.Subquery(this=bad), "b", table=True), join_type="CROSS")
    return query.sql(dialect="bigquery")


def key_range(dataset: str, table: str, key: str, min_valid: dt.datetime,
              project: str | None = None) -> str:
    """GoogleSQL for the first and last valid key of a table (the default window)."""
    query = (
        exp.select(
            exp.alias_(exp.Min(this=_col(key)), "first_key", quoted=True),
            exp.alias_(exp.Max(this=_col(key)), "last_key", quoted=True),
        )
        .from_(_table(dataset, table, project))
        .where(exp.GTE(this=_col(key), expression=timestamp_literal(min_valid)))
    )
    return query.sql(dialect="bigquery")


def to_duckdb(googlesql: str) -> str:
    """Translate one GoogleSQL statement for DuckDB."""
    return sqlglot.transpile(googlesql, read="bigquery", write="duckdb")[0]


def quote_all(names: Sequence[str], dialect: str = "bigquery") -> list[str]:
    """Identifiers quoted for ``dialect``."""
    return [exp.to_identifier(n, quoted=True).sql(dialect=dialect) for n in names]
