"""The yardsticks the merge is measured against, each run as its own process:

``python -m bench.anchors NAME CHECKPOINT_ROOT PAIR OUTPUT``

- ``floor``: read every checkpoint (pyarrow) and write one file of the output's shape
  with the fastest writer available (Polars), no join: the least any merge must spend.
- ``polars_eager``: what users reach for first: read each table, LEFT JOIN it onto the
  targets one by one in Polars, write the frame.
- ``polars_lazy``: one lazy 667-way join plan, collected with the streaming engine.
- ``duckdb_one_plan``: one SQL statement with every LEFT JOIN, written by DuckDB's COPY.
"""
from __future__ import annotations

import sys

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import checkpoints


def _tables(root: str, pair: str):
    manifest = checkpoints.load_manifest(root, pair)
    return manifest, [(entry, manifest.shard_files(entry)) for entry in manifest.tables]


def _read(paths: list[str]) -> pa.Table:
    return pa.concat_tables([pq.read_table(p) for p in paths])


def floor(root: str, pair: str, out: str) -> None:
    """Read everything, then write a frame of the output's shape (spine rows, every column)."""
    manifest, tables = _tables(root, pair)
    spine_rows = manifest.targets["rows"]
    columns = []
    for _entry, paths in tables:
        table = _read(paths)
        for name, column in zip(table.schema.names[1:], table.columns[1:]):
            # Same shape as the output: spine rows per column (pad or cut, no join).
            column = column.combine_chunks()
            if len(column) >= spine_rows:
                column = column.slice(0, spine_rows)
            else:
                column = pa.concat_arrays([column, pa.nulls(spine_rows - len(column), column.type)])
            columns.append(pl.Series(name, column))
        if len(columns) == len(table.columns) - 1:  # the targets: add the key first
            key = table.column(0).combine_chunks().slice(0, spine_rows)
            columns.insert(0, pl.Series(manifest.key, key))
    pl.DataFrame(columns).write_parquet(out)


def polars_eager(root: str, pair: str, out: str) -> None:
    """Read each table and LEFT JOIN it onto the targets, one after the other."""
    manifest, tables = _tables(root, pair)
    frame = pl.from_arrow(_read(tables[0][1]))
    for _entry, paths in tables[1:]:
        frame = frame.join(pl.from_arrow(_read(paths)), on=manifest.key, how="left",
                           maintain_order="left")
    frame.write_parquet(out)


def polars_lazy(root: str, pair: str, out: str) -> None:
    """One lazy plan with every join, executed by the streaming engine."""
    manifest, tables = _tables(root, pair)
    plan = pl.scan_parquet(tables[0][1])
    for _entry, paths in tables[1:]:
        plan = plan.join(pl.scan_parquet(paths), on=manifest.key, how="left", maintain_order="left")
    plan.sink_parquet(out)


def duckdb_one_plan(root: str, pair: str, out: str) -> None:
    """One SQL statement joining every table, written with COPY."""
    import duckdb

    manifest, tables = _tables(root, pair)
    key = f'"{manifest.key}"'
    selects, joins = ["t0.*"], []
    for i, (entry, paths) in enumerate(tables[1:], start=1):
        files = ", ".join(f"'{p}'" for p in paths)
        selects += [f't{i}."{c[1]}"' for c in entry["columns"]]
        joins.append(f"LEFT JOIN read_parquet([{files}]) AS t{i} ON t{i}.{key} = t0.{key}")
    spine = ", ".join(f"'{p}'" for p in tables[0][1])
    con = duckdb.connect()
    con.execute(f"COPY (SELECT {', '.join(selects)} FROM read_parquet([{spine}]) AS t0 "
                f"{' '.join(joins)} ORDER BY t0.{key}) TO '{out}' (FORMAT PARQUET)")


ANCHORS = {f.__name__: f for f in (floor, polars_eager, polars_lazy, duckdb_one_plan)}

if __name__ == "__main__":
    name, root, pair, out = sys.argv[1:5]
    ANCHORS[name](root, pair, out)
