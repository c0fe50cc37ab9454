"""Reading a table's checkpoints a run of whole shards at a time, front to back.

Every table of a manifest has the same shards (the same time spans, in order), so a
row group of the training file is a run of whole shards for every table. Each shard is
read whole, once: its bytes are checked against the manifest's size and CRC32C as they
arrive, then decoded. The merge thus reads every checkpoint exactly once and verified
(it used to read each one twice: a CRC32C pass before the merge, then the merge), and
no shard stays open between row groups, so 667 tables cost nothing while idle.
"""
from __future__ import annotations

import collections
from concurrent.futures import Executor
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.checkpoints import describe_schema_difference
from pipelines.errors import PipelineError


def _first_line(exc: BaseException) -> str:
    """An exception's first line: errors are one line, whatever pyarrow adds."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def int_keys(array) -> np.ndarray:
    """Timestamp keys as int64 microseconds."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.cast(pa.int64()).to_numpy(zero_copy_only=False)


def has_keys(part: pa.Table, keys: np.ndarray) -> bool:
    """True when ``part``'s key column (its first) is exactly ``keys``: its rows are
    then already the LEFT JOIN's result, with no join at all."""
    return part.num_rows == len(keys) and np.array_equal(int_keys(part.column(0)), keys)


class ShardCursor:
    """Hands out one table's rows, a number of whole shards at a time.

    ``shards`` are (path, manifest entry) pairs in time order. Each shard must have the
    size, CRC32C, row count and schema its entry states, and keys must increase
    strictly across the table: a damaged or hand-edited checkpoint stops the merge with
    its file named.
    """

    def __init__(self, label: str, shards: list[tuple[str, dict[str, Any]]], schema: pa.Schema,
                 manifest_path: str | None = None):
        self.label = label
        self.schema = schema
        self._shards = list(shards)
        self._next = 0
        self._last_key: int | None = None
        self._manifest_path = manifest_path

    def read_shards(self, count: int) -> pa.Table:
        """The rows of the next ``count`` shards."""
        parts = []
        for path, entry in self._shards[self._next:self._next + count]:
            parts.append(self._read(path, entry))
        self._next += count
        if not parts:
            return self.schema.empty_table()
        return pa.concat_tables(parts)

    def skip(self, count: int) -> None:
        """Pass over the next ``count`` shards unread."""
        self._next += count

    def _read(self, path: str, entry: dict[str, Any]) -> pa.Table:
        try:
            data = storage.read_buffer(path)
        except FileNotFoundError:
            raise PipelineError(f"checkpoint missing: {path} ({self.label})") from None
        if len(data) != entry["bytes"] or storage.bytes_crc32c(data) != entry["crc32c"]:
            raise PipelineError(self._damage(path, entry, data))
        try:
            pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
            table = pf.read(use_threads=False)
        except (OSError, pa.ArrowException) as exc:
            raise PipelineError(f"checkpoint {path} of {self.label} is corrupt: {_first_line(exc)}") from None
        actual = table.schema.remove_metadata()
        if not actual.equals(self.schema):
            raise PipelineError(f"checkpoint {path} of {self.label} has schema drift: "
                                f"{describe_schema_difference(actual, self.schema)}")
        if table.num_rows != entry["rows"]:
            raise PipelineError(f"checkpoint {path} of {self.label} holds {table.num_rows} rows, "
                                f"its manifest entry says {entry['rows']}")
        self._check_keys(path, table)
        return table

    def _damage(self, path: str, entry: dict[str, Any], data: pa.Buffer) -> str:
        """The one line describing a shard whose bytes are not the recorded ones."""
        from pipelines import checkpoints

        problems = list(checkpoints.verify_shard(path, entry, self.schema, True, self._manifest_path))
        if problems:
            return problems[0]
        return (f"checkpoint {path} of {self.label} changed while it was read "
                f"({len(data)} bytes, CRC32C {storage.bytes_crc32c(data)})")

    def _check_keys(self, path: str, table: pa.Table) -> None:
        keys = int_keys(table.column(0))
        if len(keys) == 0:
            return
        if np.any(keys[1:] <= keys[:-1]) or (self._last_key is not None and keys[0] <= self._last_key):
            raise PipelineError(f"checkpoint {path} of {self.label} has keys out of order or repeated")
        self._last_key = int(keys[-1])


def read_ahead(pool: Executor, cursors: Iterable[ShardCursor], count: int,
               depth: int) -> Iterator[pa.Table]:
    """Each cursor's next ``count`` shards (:meth:`ShardCursor.read_shards`), in order,
    read on ``pool`` up to ``depth`` cursors ahead of the one handed out.

    Reading a shard is mostly file reads, checksums and decoding, which release the GIL:
    while the caller joins one table the next ones are read on the other cores. Only
    ``depth`` tables are read ahead, so memory grows by those tables, not a batch.
    """
    upcoming = iter(cursors)
    reads: collections.deque = collections.deque()
    try:
        for cursor in upcoming:
            reads.append(pool.submit(cursor.read_shards, count))
            if len(reads) > depth:
                yield reads.popleft().result()
        while reads:
            yield reads.popleft().result()
    finally:
        # On an error (or the caller stopping early) no read may go on behind its back.
        for read in reads:
            read.cancel()
        for read in reads:
            if not read.cancelled():
                read.exception()
