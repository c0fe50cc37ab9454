"""The window join in Polars: LEFT JOIN of every table's rows onto the spine rows."""
from __future__ import annotations

from typing import Iterable, Iterator

import polars as pl
import pyarrow as pa

from pipelines.merge.reader import has_keys, int_keys

# Name of the row numbers a table's keys carry through the join (never a column of a
# checkpoint: those are the key and feature names, which have no leading underscores).
_ROW = "__bqx_row"


class PolarsJoin:
    """Joins one window at a time with Polars' hash join, keeping the spine's order.

    Tables arrive one by one and each is handed on joined, then dropped. Only the keys go through
    Polars: the join gives, for each spine row, the row of the table with its key (or
    none), and the table's columns are gathered by those rows one at a time, each input
    column freed once gathered. A table thus costs its own size once, not twice (its
    Polars copy and the joined copy, before), and a table whose keys are exactly the
    spine's needs no join at all.
    """

    name = "polars"

    def __init__(self, key: str, schema: pa.Schema, memory_budget: int, temp_dir: str):
        self.key = key
        self.schema = schema

    def join(self, keys: pa.Table, parts: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """For each of ``parts`` in turn, its columns but the key LEFT JOINed onto
        ``keys`` (the spine's key column): one row per key, in the keys' order. Column
        types are the parts' own (the writer casts to the training schema)."""
        spine_keys = int_keys(keys.column(0))
        frame = pl.from_arrow(keys)
        for part in parts:
            names = part.schema.names[1:]
            if has_keys(part, spine_keys):
                yield part.select(names)
                continue
            rows = self.matching_rows(frame, part)
            inputs = part.columns[1:]
            del part
            columns = []
            for i, column in enumerate(inputs):
                inputs[i] = None
                # One contiguous array first: gathering from several chunks (one per
                # shard) resolves the chunk of every row and was slower than the copy.
                columns.append(column.combine_chunks().take(rows))
                del column
            yield pa.Table.from_arrays(columns, names=names)
            del columns

    def matching_rows(self, keys: pl.DataFrame, part: pa.Table) -> pa.Array:
        """For each row of ``keys`` (a one-column frame of spine keys), the row of
        ``part`` with the same key, or NULL: the LEFT JOIN as row numbers."""
        right = pl.from_arrow(part.select([self.key])).with_row_index(_ROW)
        joined = keys.join(right, on=self.key, how="left", maintain_order="left")
        return joined.get_column(_ROW).to_arrow()

    def close(self) -> None:
        """Nothing to release."""
