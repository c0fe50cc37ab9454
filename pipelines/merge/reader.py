"""Reading a table's checkpoints a run of whole shards at a time, front to back.

Every table of a manifest has the same shards (the same time spans, in order), so a
row group of the training file is a run of whole shards for every table. A shard is
read whole, once: its bytes are checked against the manifest's size and CRC32C as they
arrive, then decoded (there is no separate CRC32C pass before the merge), and no shard
stays open between row groups, so 667 tables cost nothing while idle.

A table too wide to read at once is read in slices of columns, and each slice reads
only its own column chunks (pyarrow checks their pages' CRCs), so from a bucket every
byte is downloaded once. Its shards' CRC32C is checked by the first slice against the
checksum the storage keeps: in a bucket the one GCS computed when the extract uploaded
the shard (it rejects an upload whose bytes differ from the CRC32C sent with it), a
metadata request; locally the file read through once more. From a bucket, a read's
shards are fetched at once (each fetch mostly waits on the network) and then checked in
shard order, as a read in turn would.
"""
from __future__ import annotations

import collections
import functools
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.checkpoints import describe_schema_difference
from pipelines.errors import PipelineError, first_line


# Fetches of one read's shards from a bucket, run at once: each is a few requests that
# mostly wait on the network (BENCHMARKS.md, "What a merge asks of its checkpoints"). The
# read holds all its decoded shards before it hands them on anyway; what overlaps is
# only their bytes as fetched, at most about a read's worth.
# Shared by the merge's reader threads; a fetch never waits on another.
_BUCKET_FETCHES = ThreadPoolExecutor(8, thread_name_prefix="merge-fetch")


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
    """Hands out one table's rows, a run of whole shards at a time: every column, or a
    slice of its columns.

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
        self._last_key: int | None = None
        self._manifest_path = manifest_path
        # The footers of the shards a table's slices are reading, kept from one slice
        # to the next so that only the first reads them (from GCS a read is a request),
        # and dropped with the last slice.
        self._footers: dict[str, pq.FileMetaData] = {}

    def read_shards(self, first: int, count: int, features: range | None = None) -> pa.Table:
        """The rows of shards ``first`` to ``first + count - 1``: every column, or the
        key and the feature columns at positions ``features`` (0 is the first feature).

        A read of every column reads each shard whole and checks its size, CRC32C, rows
        and key order. A slice reads only its own column chunks; the first slice (from
        the first feature on) checks each shard's stored CRC32C and its key order. A
        table's first slice must be read before its later ones are handed on, so that a
        damaged shard is reported as such, not by whichever slice decodes it first.
        """
        names = None
        if features is not None:
            names = [self.schema.names[0]] + self.schema.names[1:][features.start:features.stop]
        first_read = features is None or features.start == 0
        shards = self._shards[first:first + count]
        at_once = len(shards) > 1 and storage.is_gcs(shards[0][0])
        if at_once:
            pending = [_BUCKET_FETCHES.submit(self._read, path, entry, names, first_read)
                       for path, entry in shards]
            fetches = [future.result for future in pending]
        else:
            fetches = [functools.partial(self._read, path, entry, names, first_read)
                       for path, entry in shards]
        parts = []
        try:
            # In shard order, as a sequential read would: the first problem reported is
            # the earliest shard's, and keys are checked across shards in time order.
            for (path, _entry), fetch in zip(shards, fetches):
                part = fetch()
                if first_read:
                    self._check_keys(path, part)
                parts.append(part)
        finally:
            if at_once:  # on a failure, no fetch may go on behind the merge's back
                for future in pending:
                    future.cancel()
                wait(pending)
        if features is not None:
            # The last slice is done with the footers; any of another row group (kept
            # by a slice that finished after the last one) is stale.
            last, paths = features.stop >= len(self.schema) - 1, {p for p, _ in shards}
            for path in list(self._footers):  # a copy: other slices may add to it meanwhile
                if last or path not in paths:
                    self._footers.pop(path, None)
        if not parts:
            empty = self.schema.empty_table()
            return empty if names is None else empty.select(names)
        return pa.concat_tables(parts)

    def _read(self, path: str, entry: dict[str, Any], names: list[str] | None,
              first_read: bool) -> pa.Table:
        try:
            if names is None:
                data = storage.read_buffer(path)
                if len(data) != entry["bytes"] or storage.bytes_crc32c(data) != entry["crc32c"]:
                    raise PipelineError(self._damage(path, entry, data))
                return self._decode(path, entry, pa.BufferReader(data), names, True)
            if first_read and storage.crc32c(path) != entry["crc32c"]:
                raise PipelineError(self._damage(path, entry))
            with storage.open_input(path) as source:
                # One read of the slice's column chunks (they are consecutive), not one
                # per column chunk: from GCS each read is a request.
                return self._decode(path, entry, source, names, False, footer=path)
        except FileNotFoundError:
            raise PipelineError(f"checkpoint missing: {path} ({self.label})") from None
        except OSError as exc:  # a folder in its place, no permission, a failed request
            raise PipelineError(f"checkpoint {path} of {self.label} could not be read: "
                                f"{first_line(exc)}") from None

    def _decode(self, path: str, entry: dict[str, Any], source, names: list[str] | None,
                read_checked: bool, footer: str | None = None) -> pa.Table:
        """Decode ``names`` (None: every column) of the shard in ``source``, checking its
        schema and rows (:meth:`read_shards` checks its keys). When ``read_checked`` the
        bytes decoded are the ones whose CRC32C was checked, so an error is damage;
        otherwise it may also be a read that failed. With ``footer`` (the shard's path)
        the read is a slice's: its column chunks come in one ranged read, and the
        shard's footer is kept for the table's next slice."""
        try:
            pf = pq.ParquetFile(source, page_checksum_verification=True,
                                pre_buffer=footer is not None,
                                metadata=self._footers.get(footer) if footer else None)
            if footer:
                self._footers[footer] = pf.metadata
            actual = pf.schema_arrow.remove_metadata()
            # Columns are named by the expected schema: check it before reading them.
            table = pf.read(columns=names, use_threads=False) if actual.equals(self.schema) else None
        except (OSError, pa.ArrowException) as exc:
            problem = "is corrupt" if read_checked else "is corrupt or could not be read"
            raise PipelineError(f"checkpoint {path} of {self.label} {problem}: {first_line(exc)}") from None
        if table is None:
            raise PipelineError(f"checkpoint {path} of {self.label} has schema drift: "
                                f"{describe_schema_difference(actual, self.schema)}")
        if table.num_rows != entry["rows"]:
            raise PipelineError(f"checkpoint {path} of {self.label} holds {table.num_rows} rows, "
                                f"its manifest entry says {entry['rows']}")
        return table

    def _damage(self, path: str, entry: dict[str, Any], data: pa.Buffer | None = None) -> str:
        """The one line describing a shard whose bytes (``data``, or the stored file's)
        are not the recorded ones."""
        from pipelines import checkpoints

        problems = list(checkpoints.verify_shard(path, entry, self.schema, True, self._manifest_path))
        if problems:
            return problems[0]
        read = "" if data is None else f" ({len(data)} bytes, CRC32C {storage.bytes_crc32c(data)})"
        return f"checkpoint {path} of {self.label} changed while it was read{read}"

    def _check_keys(self, path: str, table: pa.Table) -> None:
        keys = int_keys(table.column(0))
        if len(keys) == 0:
            return
        if np.any(keys[1:] <= keys[:-1]) or (self._last_key is not None and keys[0] <= self._last_key):
            raise PipelineError(f"checkpoint {path} of {self.label} has keys out of order or repeated")
        self._last_key = int(keys[-1])


def read_ahead(pool: Executor, reads: Iterable[tuple[Callable[[], pa.Table], int]],
               ahead_bytes: float) -> Iterator[pa.Table]:
    """The result of each of ``reads`` (pairs of a read, such as a
    :meth:`ShardCursor.read_shards`, and the bytes it will return), in order, run on
    ``pool`` ahead of the one handed out while their bytes add up to at most
    ``ahead_bytes`` (one read at least).

    Reading a shard is mostly file reads, checksums and decoding, which release the GIL:
    while the caller joins one table the next ones are read on the other cores. The
    reads ahead are bounded by bytes, not by count, so that what waits read is the same
    whether the tables are small (few rows) or large.
    """
    upcoming = iter(reads)
    following = next(upcoming, None)
    running: collections.deque = collections.deque()
    held = 0

    def top_up():
        nonlocal following, held
        while following is not None and (not running or held + following[1] <= ahead_bytes):
            read, nbytes = following
            running.append((pool.submit(read), nbytes))
            held += nbytes
            following = next(upcoming, None)

    try:
        while True:
            top_up()
            if not running:
                return
            read, nbytes = running.popleft()
            held -= nbytes
            top_up()
            yield read.result()
            del read
    finally:
        # On an error (or the caller stopping early) no read may go on behind its back.
        for read, _ in running:
            read.cancel()
        for read, _ in running:
            if not read.cancelled():
                read.exception()
