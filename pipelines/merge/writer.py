"""Writing the training file: large row groups, assembled a piece of columns at a time.

With ~17,000 columns a parquet footer costs ~80 bytes per column chunk, 1.3 MiB per
row group, and every reader parses all of it even to read 50 columns. One row group per
merge window (what fits in memory, a few thousand rows) gave a 100,000-row file a footer
of 40+ MiB and made DuckDB take 2-5 s to read 50 columns. So row groups are large
(:data:`pipelines.merge.budget.ROW_GROUP_ROWS`) and each is written a piece of columns
at a time: the piece is encoded as a one-row-group parquet file in memory, its column
chunks are appended to the output as they are, and its footer entries, with their byte
offsets moved, are kept for the file's footer. (pyarrow's own writer can only write a
row group from one table holding all of its columns.)

A column chunk's bytes depend only on its own column, so the columns can be cut into
pieces encoded on several threads (pyarrow releases the GIL while it compresses) and
appended in order: the file is the same whatever the cut. The writer streams: columns
are gathered into pieces of a fixed size as the caller hands them over, and a piece is
taken only when a place among a fixed number in the writer is free. So what the writer
holds (pieces waiting, being encoded, encoded and waiting their turn) is a number of
bytes set by its piece size, whichever of the caller and the encoders is the slower,
and whatever the row count.

For the same reason a piece's integer and string columns are encoded by Polars and
its other columns by pyarrow, and their chunks appended in column order. Polars gives
integers a sorted dictionary (pyarrow's follows first appearance, and compresses worse)
and packs dictionary indices in longer runs: with pyarrow alone, those columns were
0.4-0.7% larger than Polars writes them, and the whole file 0.004% larger
(BENCHMARKS.md, "Integer and string columns").
"""
from __future__ import annotations

import functools
import io
import json
import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, BinaryIO

import google_crc32c
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.merge import thrift_compact as tc

METADATA_KEY = b"bqx.training"
OUTPUT_COMPRESSION = "zstd"
# Polars' default (zstd 3), so that the training file is no larger than Polars would
# write it (`python -m bench.read FILE --polars-size`); level 1 encodes faster but was
# larger on the benchmark's feature-like data.
OUTPUT_COMPRESSION_LEVEL = 3
MAGIC = b"PAR1"
PAGE_ROWS_LIMIT = 1 << 30
# Bytes of a piece of columns encoded at once, unless the caller gives its own.
PIECE_BYTES = 32 << 20
# Pieces in the writer beyond one per encoding thread: one ready for the first thread to
# finish, and one encoded that waits for the piece before it (pieces finish out of order).
SPARE_PIECES = 2

# Field ids of parquet.thrift that hold byte offsets into the file.
# Only a chunk's pages are copied; the offsets into them are moved, and the fields that
# point at other bytes of its file (page indexes, bloom filters) are dropped.
_CHUNK_OFFSETS = (2,)               # ColumnChunk: file_offset
_CHUNK_ELSEWHERE = (4, 5, 6, 7)     # ColumnChunk: offset and column index offsets, lengths
_COLUMN_META = 3                    # ColumnChunk.meta_data
_META_OFFSETS = (9, 10, 11)         # ColumnMetaData: data/index/dictionary page
_META_ELSEWHERE = (14, 15)          # ColumnMetaData: bloom filter offset, length
_META_COMPRESSED, _META_DATA_PAGE, _META_DICTIONARY_PAGE = 7, 9, 11
_RG_COLUMNS, _RG_BYTES, _RG_ROWS, _RG_OFFSET, _RG_COMPRESSED = 1, 2, 3, 5, 6
_FMD_SCHEMA, _FMD_ROWS, _FMD_ROW_GROUPS, _FMD_KV, _FMD_ORDERS = 2, 3, 4, 5, 7
_SCHEMA_CHILDREN = 5                # SchemaElement.num_children


def _encoding_options(schema: pa.Schema, key: str) -> dict:
    """Statistics only on the key (they let readers skip row groups by time; on every
    column they would make the footer several times larger), dictionary encoding for
    all but floats (feature floats rarely repeat; Polars encodes integers so, and without
    it the benchmark's integer columns were larger than Polars' file), no Arrow schema blob
    (parquet's own schema round-trips these types)."""
    dictionary = [f.name for f in schema if not pa.types.is_floating(f.type) and f.name != key]
    return dict(compression=OUTPUT_COMPRESSION, compression_level=OUTPUT_COMPRESSION_LEVEL,
                use_dictionary=dictionary or False,
                # Pages cut by size (1 MiB) only, as Polars cuts them: pyarrow's default
                # of 20,000 rows per page cut a 100,000-row column into 5 pages compressed
                # apart, 3.8% larger than Polars' file (no page index is written to use
                # smaller pages for).
                max_rows_per_page=PAGE_ROWS_LIMIT,
                write_statistics=[key] if key in schema.names else False,
                store_schema=False)


def encode_row_group(table: pa.Table, key: str) -> pa.Buffer:
    """``table`` as a parquet file of one row group, in memory."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=max(table.num_rows, 1),
                   **_encoding_options(table.schema, key))
    return sink.getvalue()


def encoding_threads() -> int:
    """Threads that encode a column batch: one per core, at most 4 (measured on 2 cores
    only; a cap keeps a large machine from cutting batches into many small pieces)."""
    return max(1, min(4, os.cpu_count() or 1))


def encoded_by_polars(field: pa.Field, key: str) -> bool:
    """Whether ``field``'s column chunks are Polars' (integers and strings, not the key)."""
    return field.name != key and (pa.types.is_integer(field.type) or pa.types.is_string(field.type)
                                  or pa.types.is_large_string(field.type))


def encode_row_group_polars(table: pa.Table) -> pa.Buffer:
    """``table`` as a parquet file of one row group written by Polars, in memory, with
    the training file's compression and no statistics (only the key has them)."""
    sink = io.BytesIO()
    pl.from_arrow(table).write_parquet(
        sink, compression=OUTPUT_COMPRESSION, compression_level=OUTPUT_COMPRESSION_LEVEL,
        statistics=False, row_group_size=max(table.num_rows, 1))
    return pa.py_buffer(sink.getbuffer())  # the written bytes themselves, not a copy


def _encode_piece(table: pa.Table, key: str) -> list[tuple[pa.Buffer, dict, list[int]]]:
    """``table`` encoded as one-row-group files, pyarrow's first, then Polars' for its
    integer and string columns when it has any: each with its decoded footer and the
    positions in ``table`` of its columns."""
    by_polars = [encoded_by_polars(f, key) for f in table.schema]
    polars = [i for i, p in enumerate(by_polars) if p]
    others = [i for i, p in enumerate(by_polars) if not p]
    files = []
    for positions, encode in ((others, lambda t: encode_row_group(t, key)),
                              (polars, encode_row_group_polars)):
        if positions:
            data = encode(table.select(positions))
            files.append((data, read_footer(data)[0], positions))
    return files


def read_footer(data: pa.Buffer) -> tuple[dict, int]:
    """The decoded FileMetaData of an in-memory parquet file and its start offset."""
    tail = data[len(data) - 8:].to_pybytes()
    if tail[4:] != MAGIC:
        raise ValueError("not a parquet file")
    start = len(data) - 8 - int.from_bytes(tail[:4], "little")
    return tc.decode_struct(data[start:len(data) - 8].to_pybytes()), start


def _fields(schema: list[dict]) -> list[list[dict]]:
    """A footer's schema elements (the root first) grouped by top-level field: each
    field's element and those of its children, depth first."""
    fields, i = [], 1
    while i < len(schema):
        start, pending = i, 1
        while pending:  # this element and, recursively, its children
            pending += schema[i].get(_SCHEMA_CHILDREN, (None, 0))[1] - 1
            i += 1
        fields.append(schema[start:i])
    return fields


def _leaves(field: list[dict]) -> int:
    """Leaf columns (column chunks) of a field's schema elements."""
    return sum(1 for e in field if not e.get(_SCHEMA_CHILDREN, (None, 0))[1])


def _shift(fields: dict, ids: tuple[int, ...], by: int) -> None:
    for fid in ids:
        if fid in fields and fields[fid][1] > 0:
            ctype, value = fields[fid]
            fields[fid] = (ctype, value + by)


class TrainingFileWriter:
    """Writes the training file to a local path or a writable binary stream.

    Call ``begin_row_group``, then ``write_columns`` with consecutive column batches of
    the schema (the first starts with the key), then ``end_row_group``; ``close`` writes
    the footer with the ``bqx.training`` metadata. Each call is checked as it is made.

    Writing happens behind the caller: the columns handed over are gathered into pieces
    of about ``piece_bytes`` (a column is never split), ``threads`` encode pieces at once
    (default :func:`encoding_threads`) and one thread appends them to the file in order.
    ``write_columns`` returns once its columns are taken: at most ``threads`` +
    :data:`SPARE_PIECES` pieces are in the writer, and the caller waits for a place
    only when the encoders are the slower. An error in the background is raised by a
    later call, by :meth:`close` at the latest.
    """

    def __init__(self, sink: str | BinaryIO, schema: pa.Schema, metadata: dict[str, Any],
                 threads: int | None = None, piece_bytes: float = PIECE_BYTES):
        self.schema = schema
        self._threads = threads or encoding_threads()
        self._encoders = (ThreadPoolExecutor(self._threads, thread_name_prefix="parquet-encode")
                          if self._threads > 1 else None)
        self._appender = ThreadPoolExecutor(1, thread_name_prefix="parquet-append")
        self._appending: Future = self._appender.submit(lambda: None)
        self._failure: BaseException | None = None
        self._piece_bytes = piece_bytes
        # Places for pieces, taken when a piece is handed to the encoders and given back
        # once it is appended (or dropped).
        self._places = threading.Semaphore(self._threads + SPARE_PIECES)
        # Columns handed over and not yet in a piece, and their bytes.
        self._gathered: list[tuple[str, pa.ChunkedArray]] = []
        self._gathered_bytes = 0
        # Seconds the caller spent in write_columns waiting for a place: a large share
        # of the merge means the encoders are its slower stage.
        self.waited = 0.0
        self.key = schema.names[0]
        self._metadata = json.dumps(metadata, sort_keys=True).encode()
        self._owns_sink = isinstance(sink, str)
        self._out: BinaryIO = open(sink, "wb") if self._owns_sink else sink
        self._pos = 0
        self._crc = google_crc32c.Checksum()
        self._row_groups: list[dict] = []
        # The footer's file-level fields, gathered from the first row group's pieces:
        # version and writer name, the schema root, and per column its schema element
        # and column order, kept encoded (bytes, not Python objects) until the footer.
        self._file_fields: dict | None = None
        self._schema_root: dict | None = None
        self._schema_elements: list[tc.Encoded] = []
        self._column_orders: list[tc.Encoded] | None = []
        # The caller's side: the open row group's rows and its next column, to check
        # each call when it is made. The appending thread has its own (self._group).
        self._open_rows: int | None = None
        self._next_column = 0
        self._group: dict | None = None
        self.rows = 0
        self._emit(MAGIC)

    def _emit(self, data) -> None:
        self._out.write(data)
        self._crc.update(data)
        self._pos += len(data)

    @property
    def nbytes(self) -> int:
        """Bytes written so far."""
        return self._pos

    @property
    def crc32c(self) -> str:
        """CRC32C of every byte written so far, as 8 hex digits (as GCS reports it)."""
        return self._crc.digest().hex()

    def _in_order(self, task, *args) -> None:
        """Run ``task`` on the appending thread after every task before it; after a
        failure no task runs, and every call raises that failure."""
        self._raise_failure()

        def run():
            if self._failure is None:
                try:
                    task(*args)
                except BaseException as exc:
                    self._failure = exc
                    raise
        self._appending = self._appender.submit(run)

    def _raise_failure(self) -> None:
        if self._failure is not None:
            raise self._failure

    def begin_row_group(self, num_rows: int) -> None:
        """Start a row group of ``num_rows`` rows."""
        self._raise_failure()
        if self._open_rows is not None:
            raise RuntimeError("the previous row group is still open")
        self._open_rows, self._next_column = num_rows, 0
        self._in_order(self._begin, num_rows)

    def _begin(self, num_rows: int) -> None:
        self._group = {_RG_COLUMNS: (tc.LIST, (tc.STRUCT, [])), _RG_BYTES: (tc.I64, 0),
                       _RG_ROWS: (tc.I64, num_rows), _RG_COMPRESSED: (tc.I64, 0)}

    def write_columns(self, table: pa.Table) -> None:
        """Append the open row group's next columns (all of its rows, any number of
        columns); returns once they are taken, while they are encoded and written."""
        self._raise_failure()
        if self._open_rows is None:
            raise RuntimeError("write_columns outside a row group")
        expected = pa.schema([self.schema.field(i) for i in
                              range(self._next_column, self._next_column + table.num_columns)])
        if table.schema.names != expected.names:
            raise ValueError(f"columns {table.schema.names[:3]}... do not follow column "
                             f"{self._next_column} of the training schema")
        if table.num_columns and table.num_rows != self._open_rows:
            raise ValueError(f"{table.num_rows} rows for a row group of {self._open_rows}")
        columns = table.cast(expected).columns
        self._next_column += table.num_columns
        for name, column in zip(expected.names, columns):
            self._gathered.append((name, column))
            self._gathered_bytes += column.nbytes
            if self._gathered_bytes >= self._piece_bytes:
                self._hand_over()

    def _hand_over(self) -> None:
        """Hand the gathered columns to the encoders as one piece, once a place is free."""
        names, columns = zip(*self._gathered)
        piece = pa.Table.from_arrays(list(columns), names=list(names))
        self._gathered, self._gathered_bytes = [], 0
        del names, columns
        started = time.monotonic()
        while not self._places.acquire(timeout=0.1):
            self._raise_failure()  # after a failure no append runs to give a place back
        self.waited += time.monotonic() - started
        encoded = (self._encoders.submit(_encode_piece, piece, self.key) if self._encoders
                   else functools.partial(_encode_piece, piece, self.key))
        del piece
        self._in_order(self._append_piece, encoded)

    def _append_piece(self, encoded) -> None:
        """Append a piece once it is encoded (a write, a checksum, its footer entries)
        while the encoders compress the pieces after it; its place is given back."""
        try:
            files = encoded.result() if isinstance(encoded, Future) else encoded()
            del encoded
            self._append(self._group, files)
        finally:
            self._places.release()

    def _append(self, group: dict, files: list[tuple[pa.Buffer, dict, list[int]]]) -> None:
        """Append an encoded piece's column chunks to the open row group, in column
        order, whichever of the piece's files holds each."""
        if not self._row_groups:
            self._collect_file_fields(files)
        chunks = []
        for data, meta, positions in files:
            (piece,) = meta[_FMD_ROW_GROUPS][1][1]
            # A nested field has a chunk per leaf column, in order: (position, leaf).
            order = [(p, leaf) for p, field in zip(positions, _fields(meta[_FMD_SCHEMA][1][1]))
                     for leaf in range(_leaves(field))]
            chunks.extend(zip(order, [data] * len(order), piece[_RG_COLUMNS][1][1]))
            for fid in (_RG_BYTES, _RG_COMPRESSED):
                if fid in piece:
                    group[fid] = (tc.I64, group[fid][1] + piece[fid][1])
        for _, data, chunk in sorted(chunks, key=lambda c: c[0]):
            meta = chunk[_COLUMN_META][1]
            start = min(meta[fid][1] for fid in (_META_DATA_PAGE, _META_DICTIONARY_PAGE)
                        if fid in meta and meta[fid][1] > 0)
            size = meta[_META_COMPRESSED][1]  # every page of the chunk, headers included
            by = self._pos - start  # the chunk moves from ``start`` to self._pos
            _shift(chunk, _CHUNK_OFFSETS, by)
            _shift(meta, _META_OFFSETS, by)
            for fields, ids in ((chunk, _CHUNK_ELSEWHERE), (meta, _META_ELSEWHERE)):
                for fid in ids:  # Polars writes offset indexes
                    fields.pop(fid, None)
            if _RG_OFFSET not in group:
                group[_RG_OFFSET] = (tc.I64, self._pos)
            # Kept encoded until the footer is written: ~100 bytes per column chunk
            # instead of a dozen Python objects, for every row group of the file.
            group[_RG_COLUMNS][1][1].append(tc.encode_value(tc.STRUCT, chunk))
            self._emit(data.slice(start, size))

    def end_row_group(self) -> None:
        """Close the open row group; every column must have been written."""
        self._raise_failure()
        if self._open_rows is None or self._next_column != len(self.schema):
            raise RuntimeError(f"row group closed after {self._next_column} of "
                               f"{len(self.schema)} columns")
        if self._gathered:
            self._hand_over()
        self._open_rows = None
        self._in_order(self._end)

    def _end(self) -> None:
        self._row_groups.append(self._group)
        self.rows += self._group[_RG_ROWS][1]
        self._group = None

    def write(self, table: pa.Table) -> None:
        """Append ``table`` (every column) as one row group."""
        self.begin_row_group(table.num_rows)
        self.write_columns(table)
        self.end_row_group()

    def _collect_file_fields(self, files: list[tuple[pa.Buffer, dict, list[int]]]) -> None:
        """Keep a piece's schema elements and column orders, in column order; they follow
        the previous piece's, so concatenated they are the whole schema's. The
        file-level fields (version, writer name) are pyarrow's: its file comes first."""
        elements: dict[int, list] = {}
        orders: dict[int, list] = {}
        for _, meta, positions in files:
            (_, (_, schema)) = meta[_FMD_SCHEMA]
            if self._file_fields is None:
                self._file_fields = {fid: value for fid, value in meta.items()
                                     if fid not in (_FMD_SCHEMA, _FMD_ROWS, _FMD_ROW_GROUPS,
                                                    _FMD_KV, _FMD_ORDERS)}
                self._schema_root = schema[0]
            fields = _fields(schema)
            file_orders = iter(meta[_FMD_ORDERS][1][1]) if _FMD_ORDERS in meta else None
            for position, field in zip(positions, fields):
                elements[position] = [tc.encode_value(tc.STRUCT, e) for e in field]
                if file_orders is not None:  # one per leaf column
                    orders[position] = [tc.encode_value(tc.STRUCT, next(file_orders))
                                        for _ in range(_leaves(field))]
        for position in sorted(elements):
            self._schema_elements.extend(elements[position])
        if len(orders) == len(elements) and self._column_orders is not None:
            for position in sorted(orders):
                self._column_orders.extend(orders[position])
        else:  # optional in the footer, but all or none: without one piece's, none
            self._column_orders = None

    def _footer_template(self) -> dict:
        """The footer's file-level fields: schema, column orders, version and writer
        name, exactly as pyarrow would have written them for this schema."""
        if self._file_fields is None:  # no row group: those of an empty file
            template, _ = read_footer(encode_row_group(self.schema.empty_table(), self.key))
            return template
        root = dict(self._schema_root)
        root[_SCHEMA_CHILDREN] = (tc.I32, len(self.schema))
        template = dict(self._file_fields)
        template[_FMD_SCHEMA] = (tc.LIST, (tc.STRUCT, [root] + self._schema_elements))
        if self._column_orders:
            template[_FMD_ORDERS] = (tc.LIST, (tc.STRUCT, self._column_orders))
        return template

    def _stop_threads(self) -> None:
        if self._encoders is not None:
            self._encoders.shutdown(wait=True, cancel_futures=True)
        self._appender.shutdown(wait=True, cancel_futures=True)

    def discard(self) -> None:
        """Stop writing (pieces not yet encoded or appended are dropped) and close a sink
        this writer opened, without a footer (after a failure; the caller removes the
        file). Harmless after :meth:`close`."""
        self._stop_threads()
        if self._owns_sink and not self._out.closed:
            self._out.close()

    def close(self) -> None:
        """Write the footer and close a sink this writer opened."""
        self._raise_failure()
        if self._open_rows is not None:
            raise RuntimeError("close with a row group still open")
        self._appending.result()
        self._raise_failure()
        self._stop_threads()
        template = self._footer_template()
        template[_FMD_ROWS] = (tc.I64, self.rows)
        template[_FMD_ROW_GROUPS] = (tc.LIST, (tc.STRUCT, self._row_groups))
        template[_FMD_KV] = (tc.LIST, (tc.STRUCT, [
            {1: (tc.BINARY, METADATA_KEY), 2: (tc.BINARY, self._metadata)}]))
        footer = tc.encode_struct(template)
        self._emit(footer)
        self._emit(len(footer).to_bytes(4, "little"))
        self._emit(MAGIC)
        if self._owns_sink:
            self._out.close()
