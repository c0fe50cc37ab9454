"""Sources of feature tables: the embedded DuckDB warehouse (and BigQuery in the cloud).

A source answers three things: the columns of every table of a dataset (from
INFORMATION_SCHEMA), a GoogleSQL query as an Arrow table, and a GoogleSQL query as rows.
The DuckDB source translates GoogleSQL with :func:`pipelines.sql.to_duckdb`.
"""
from __future__ import annotations

import os
import threading
from typing import Any, Protocol

import pyarrow as pa

from pipelines.errors import PipelineError

DEFAULT_DATA_DIR = "data"


def default_warehouse_path() -> str:
    """The embedded sample warehouse (``$BQX_DATA_DIR/warehouse.duckdb``)."""
    return os.path.join(os.environ.get("BQX_DATA_DIR", DEFAULT_DATA_DIR), "warehouse.duckdb")


class Source(Protocol):
    """What the extract job needs from a warehouse."""

    url: str
    project: str | None

    def table_columns(self, dataset: str) -> dict[str, list[tuple[str, str]]]:
        """Every table of ``dataset`` with its (column, type) pairs in ordinal order."""

    def query_arrow(self, googlesql: str) -> pa.Table:
        """Run a GoogleSQL query; return its result as Arrow."""

    def query_rows(self, googlesql: str) -> list[dict[str, Any]]:
        """Run a small GoogleSQL query; return its rows as dicts."""

    def close(self) -> None:
        """Release connections."""


class DuckDBSource:
    """A DuckDB file laid out like the BigQuery datasets (one schema per dataset)."""

    def __init__(self, path: str):
        import duckdb

        self.path = path
        self.url = f"duckdb://{path}"
        self.project = None
        if not os.path.isfile(path):
            raise PipelineError(f"DuckDB warehouse not found: {path}")
        try:
            self._con = duckdb.connect(path, read_only=True)
        except duckdb.Error as exc:
            raise PipelineError(f"cannot open DuckDB warehouse {path}: {exc}") from None
        self._con.execute("SET TimeZone = 'UTC'")
        # One connection serves one thread at a time; Beam may call from several.
        self._lock = threading.Lock()

    def table_columns(self, dataset: str) -> dict[str, list[tuple[str, str]]]:
        rows = self._fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = ? ORDER BY table_name, ordinal_position", [dataset])
        out: dict[str, list[tuple[str, str]]] = {}
        for table, column, dtype in rows:
            out.setdefault(table, []).append((column, dtype))
        return out

    def query_arrow(self, googlesql: str) -> pa.Table:
        from pipelines.sql import to_duckdb

        with self._lock:
            cur = self._con.cursor()
        try:
            return cur.execute(to_duckdb(googlesql)).to_arrow_table()
        finally:
            cur.close()

    def query_rows(self, googlesql: str) -> list[dict[str, Any]]:
        from pipelines.sql import to_duckdb

        with self._lock:
            cur = self._con.cursor()
        try:
            cur.execute(to_duckdb(googlesql))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]
        finally:
            cur.close()

    def _fetch(self, sql: str, params: list[Any]) -> list[tuple]:
        with self._lock:
            cur = self._con.cursor()
        try:
            return cur.execute(sql, params).fetchall()
        finally:
            cur.close()

    def close(self) -> None:
        self._con.close()


def open_source(url: str) -> Source:
    """Open a source from its URL: ``duckdb:///path/file.duckdb`` (or a plain path)."""
    if url.startswith("duckdb://"):
        return DuckDBSource(url[len("duckdb://"):])
    if url.startswith("bigquery://"):
        raise PipelineError(f"source {url}: BigQuery sources are not available in this build")
    if url.endswith(".duckdb"):
        return DuckDBSource(url)
    raise PipelineError(f"unknown source {url!r}: expected duckdb:///path/to/file.duckdb "
                        "or bigquery://PROJECT")
