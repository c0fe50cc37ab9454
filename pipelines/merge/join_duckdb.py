"""The window join in DuckDB SQL.

One SQL statement with hundreds of joins cannot even be planned in reasonable time, so
each window is joined in batches of tables: every batch is one LEFT JOIN chain onto the
spine's keys, ordered by key, and each batch's result is handed on in turn (they all
have the spine's rows in the spine's order). A table whose keys are exactly the spine's
needs no join and is handed on as it is (as the Polars join does).
"""
from __future__ import annotations

from typing import Iterable, Iterator

import pyarrow as pa

from pipelines.merge.reader import has_keys, int_keys
from pipelines.sql import quote_all

# Long LEFT JOIN chains cost DuckDB memory superlinearly (48 tables of 5,760 rows ran
# out of 768 MB; 8 take 0.1 s and under 200 MB).
TABLES_PER_QUERY = 8


class DuckDBJoin:
    """Joins one window at a time in DuckDB, within the memory budget."""

    name = "duckdb"

    def __init__(self, key: str, schema: pa.Schema, memory_budget: int, temp_dir: str):
        import duckdb

        self.key = key
        self.schema = schema
        self.con = duckdb.connect()
        self.con.execute("SET TimeZone = 'UTC'")
        # DuckDB's share of the budget: the joined window itself lives in Arrow memory.
        self.memory_limit = max(memory_budget // 4, 64 << 20)
        self.con.execute(f"SET memory_limit = '{self.memory_limit}B'")
        self.con.execute("SET threads = 1")
        self.con.execute("SET allocator_flush_threshold = '16MB'")
        self.con.execute("SET temp_directory = ?", [temp_dir])
        self.con.execute("SET preserve_insertion_order = true")
        self._queries: dict[tuple[int, int], str] = {}

    def _query(self, first: int, parts: list[pa.Table]) -> str:
        # Keyed by the tables' columns: each column batch of a row group joins other tables.
        cache_key = (first, tuple(tuple(p.schema.names) for p in parts))
        if cache_key not in self._queries:
            key = quote_all([self.key], "duckdb")[0]
            select, joins = [], []
            for i, part in enumerate(parts):
                alias = f"t{first + i}"
                select += [f"{alias}.{c}" for c in quote_all(part.schema.names[1:], "duckdb")]
                joins.append(f"LEFT JOIN {alias} ON {alias}.{key} = s.{key}")
            self._queries[cache_key] = (
                f"SELECT {', '.join(select)} FROM spine_keys AS s {' '.join(joins)} "
                f"ORDER BY s.{key}")
        return self._queries[cache_key]

    def join(self, keys: pa.Table, parts: Iterable[pa.Table]) -> Iterator[pa.Table]:
        """For each query's worth of ``parts`` in turn (see :meth:`_queries_of`), their
        columns but the key LEFT JOINed onto ``keys`` (the spine's key column): one row
        per key, in the keys' order. Column types are DuckDB's (the writer casts to the
        training schema)."""
        spine_keys = int_keys(keys.column(0))
        self.con.register("spine_keys", keys)
        try:
            first = 0
            for batch in self._queries_of(parts, spine_keys):
                if isinstance(batch, pa.Table):  # already aligned with the spine
                    yield batch.select(batch.schema.names[1:])
                    continue
                for i, part in enumerate(batch):
                    self.con.register(f"t{first + i}", part)
                result = self.con.execute(self._query(first, batch)).to_arrow_table()
                if result.num_rows != keys.num_rows:
                    raise AssertionError("a LEFT JOIN on unique keys changed the row count")
                for i in range(len(batch)):
                    self.con.unregister(f"t{first + i}")
                first += len(batch)
                del batch
                # Compact copies: DuckDB hands back vector-sized chunks whose buffers
                # would otherwise stay alive, several per column, until written. The
                # result is dropped before the copy is handed on, not when it comes back.
                joined = pa.Table.from_arrays([c.combine_chunks() for c in result.columns],
                                              names=result.schema.names)
                del result
                yield joined
                del joined
        finally:
            self.con.unregister("spine_keys")

    def _queries_of(self, parts: Iterable[pa.Table], spine_keys) -> Iterable[list[pa.Table] | pa.Table]:
        """Consecutive tables to join, at most TABLES_PER_QUERY and ~a third of DuckDB's
        memory limit per query (its inputs, hash tables and result: at 100,000 rows 8
        tables ran out of a 384 MiB limit); a table aligned with the spine comes alone,
        as itself, in its place."""
        batch: list[pa.Table] = []
        size = 0
        for part in parts:
            aligned = has_keys(part, spine_keys)
            if batch and (aligned or len(batch) == TABLES_PER_QUERY
                          or size + part.nbytes > self.memory_limit / 3):
                yield batch
                batch, size = [], 0
            if aligned:
                yield part
                continue
            batch.append(part)
            size += part.nbytes
        if batch:
            yield batch

    def close(self) -> None:
        """Close the connection."""
        self.con.close()
