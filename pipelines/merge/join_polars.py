"""The window join in Polars: LEFT JOIN of every table's rows onto the spine rows."""
from __future__ import annotations

from typing import Iterable

import polars as pl
import pyarrow as pa

from pipelines.merge.reader import has_keys, int_keys


class PolarsJoin:
    """Joins one window at a time with Polars' hash join, keeping the spine's order.

    Tables arrive one by one and are dropped once joined, so a window costs its output
    plus one table. A table whose keys are exactly the spine's needs no join at all.
    """

    name = "polars"

    def __init__(self, key: str, schema: pa.Schema, memory_budget: int, temp_dir: str):
        self.key = key
        self.schema = schema

    def join(self, spine: pa.Table, parts: Iterable[pa.Table]) -> pa.Table:
        """``spine`` (the key first) with every part's columns LEFT JOINed on the key;
        column types are the parts' own (the writer casts to the training schema)."""
        spine_keys = int_keys(spine.column(0))
        keys = pl.from_arrow(spine.select([self.key]))
        columns, names = list(spine.columns), list(spine.schema.names)
        for part in parts:
            names.extend(part.schema.names[1:])
            if has_keys(part, spine_keys):
                columns.extend(part.columns[1:])
                continue
            joined = keys.join(pl.from_arrow(part), on=self.key, how="left",
                               maintain_order="left").drop(self.key)
            columns.extend(joined.to_arrow().columns)
        return pa.Table.from_arrays(columns, names=names)

    def close(self) -> None:
        """Nothing to release."""
