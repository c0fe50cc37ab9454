"""Streaming reads of a table's checkpoints, front to back, one window at a time."""
from __future__ import annotations

from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.checkpoints import describe_schema_difference
from pipelines.errors import PipelineError


def int_keys(array) -> np.ndarray:
    """Timestamp keys as int64 microseconds."""
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    return array.cast(pa.int64()).to_numpy(zero_copy_only=False)


class TableCursor:
    """Reads one table's shards in order and hands out its rows window by window.

    Checkpoints are sorted by key with no repeats; the cursor checks that as it goes,
    so a damaged or hand-edited checkpoint stops the merge with its file named.
    """

    def __init__(self, label: str, paths: list[str], schema: pa.Schema, batch_rows: int):
        self.label = label
        self.schema = schema
        self.key = schema.names[0]
        self._paths = list(paths)
        self._batch_rows = batch_rows
        self._batches: Iterator[pa.RecordBatch] | None = None
        self._path: str | None = None
        self._buffer: pa.RecordBatch | None = None
        self._buffer_keys: np.ndarray | None = None
        self._last_key: int | None = None

    def _next_batch(self) -> bool:
        """Load the next non-empty batch into the buffer; False at the end."""
        while True:
            if self._batches is None:
                if not self._paths:
                    return False
                self._path = self._paths.pop(0)
                self._batches = self._open(self._path)
            try:
                batch = next(self._batches, None)
            except (OSError, pa.ArrowException) as exc:
                raise PipelineError(f"checkpoint {self._path} of {self.label} is corrupt: {exc}") from None
            if batch is None:
                self._batches = None
                continue
            if batch.num_rows == 0:
                continue
            keys = int_keys(batch.column(0))
            if np.any(keys[1:] <= keys[:-1]) or (
                    self._last_key is not None and keys[0] <= self._last_key):
                raise PipelineError(f"checkpoint {self._path} of {self.label} has keys "
                                    "out of order or repeated")
            self._last_key = int(keys[-1])
            self._buffer, self._buffer_keys = batch, keys
            return True

    def _open(self, path: str) -> Iterator[pa.RecordBatch]:
        try:
            pf = pq.ParquetFile(storage.local_path(path), page_checksum_verification=True)
        except (OSError, pa.ArrowException) as exc:
            raise PipelineError(f"checkpoint {path} of {self.label} is not readable: {exc}") from None
        actual = pf.schema_arrow.remove_metadata()
        if not actual.equals(self.schema):
            raise PipelineError(f"checkpoint {path} of {self.label} has schema drift: "
                                f"{describe_schema_difference(actual, self.schema)}")
        return pf.iter_batches(batch_size=self._batch_rows, use_threads=False)

    def take_through(self, last_key: int) -> pa.Table:
        """Every remaining row whose key is at most ``last_key`` (int64 microseconds)."""
        parts = []
        while True:
            if self._buffer is None and not self._next_batch():
                break
            cut = int(np.searchsorted(self._buffer_keys, last_key, side="right"))
            if cut == self._buffer.num_rows:
                parts.append(self._buffer)
                self._buffer = self._buffer_keys = None
                continue
            if cut:
                parts.append(self._buffer.slice(0, cut))
                self._buffer = self._buffer.slice(cut)
                self._buffer_keys = self._buffer_keys[cut:]
            break
        return pa.Table.from_batches(parts, schema=self.schema)

    def take(self, rows: int) -> pa.Table:
        """The next ``rows`` rows (fewer at the end)."""
        parts, need = [], rows
        while need > 0:
            if self._buffer is None and not self._next_batch():
                break
            if self._buffer.num_rows <= need:
                parts.append(self._buffer)
                need -= self._buffer.num_rows
                self._buffer = self._buffer_keys = None
            else:
                parts.append(self._buffer.slice(0, need))
                self._buffer = self._buffer.slice(need)
                self._buffer_keys = self._buffer_keys[need:]
                need = 0
        return pa.Table.from_batches(parts, schema=self.schema)
