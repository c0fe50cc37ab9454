"""The window join in Polars: LEFT JOIN of every table's rows onto the spine rows."""
from __future__ import annotations

import polars as pl
import pyarrow as pa


class PolarsJoin:
    """Joins one window at a time with Polars' hash join, keeping the spine's order."""

    name = "polars"

    def __init__(self, key: str, schema: pa.Schema, memory_budget: int, temp_dir: str):
        self.key = key
        self.schema = schema

    def join(self, spine: pa.Table, parts: list[pa.Table]) -> pa.Table:
        """``spine`` (key + targets) with every part's columns LEFT JOINed on the key."""
        left = pl.from_arrow(spine)
        keys = left.select(self.key)
        frames = [left]
        for part in parts:
            right = pl.from_arrow(part)
            joined = keys.join(right, on=self.key, how="left", maintain_order="left")
            frames.append(joined.drop(self.key))
        wide = pl.concat(frames, how="horizontal")
        return wide.to_arrow().cast(self.schema)

    def close(self) -> None:
        """Nothing to release."""
