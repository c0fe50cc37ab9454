"""The training-file writer assembles row groups a column batch at a time.

The strongest check available: the assembled file is byte for byte what pyarrow's own
writer makes of the whole table with the same row groups and options.
"""
import io
import os
import re

import duckdb
import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_module
from pipelines.merge import thrift_compact
from pipelines.merge.writer import (METADATA_KEY, TrainingFileWriter, _encoding_options,
                                    encoded_by_polars, read_footer)

KEY = "interval_time"


def _table(rows: int = 1000, seed: int = 1) -> pa.Table:
    rng = np.random.default_rng(seed)
    cols = {KEY: pa.array(np.arange(rows) * 60_000_000, pa.int64()).cast(pa.timestamp("us", "UTC"))}
    for i in range(40):
        nulls = rng.random(rows) < 0.1
        cols[f"c{i}"] = pa.array(rng.random(rows), mask=nulls)
        if i % 9 == 4:  # integer and string columns among the floats, as features have them
            cols[f"n{i}"] = pa.array(rng.integers(0, 100, rows), mask=nulls)
            cols[f"s{i}"] = pa.array(np.array(["lo", "mid", "hi"])[rng.integers(0, 3, rows)], mask=nulls)
    cols["label"] = pa.array([f"x{i % 7}" for i in range(rows)])
    cols["count"] = pa.array(rng.integers(0, 100, rows))
    cols["open"] = pa.array(rng.random(rows) < 0.5)
    return pa.table(cols)


def _by_pyarrow(table: pa.Table) -> pa.Table:
    """``table`` without the columns the writer has Polars encode."""
    return table.select([f.name for f in table.schema if not encoded_by_polars(f, KEY)])


def _chunks(data: bytes) -> dict[tuple[int, str], bytes]:
    """Every column chunk's bytes (its pages), by row group and column."""
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    chunks = {}
    for g in range(md.num_row_groups):
        for c in range(md.num_columns):
            chunk = md.row_group(g).column(c)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else chunk.data_page_offset
            chunks[g, chunk.path_in_schema] = data[start:start + chunk.total_compressed_size]
    return chunks


def _assembled(table: pa.Table, groups, batches, threads: int | None = None,
               piece_bytes: float = 4096) -> bytes:
    """``table`` written by TrainingFileWriter in ``groups`` of rows, each handed over in
    ``batches`` of columns, in pieces of about ``piece_bytes`` (small: many pieces)."""
    sink = io.BytesIO()
    writer = TrainingFileWriter(sink, table.schema, {"pair": "eurusd"}, threads=threads,
                                piece_bytes=piece_bytes)
    for lo, hi in groups:
        writer.begin_row_group(hi - lo)
        for a, b in batches:
            writer.write_columns(table.slice(lo, hi - lo).select(list(range(a, b))))
        writer.end_row_group()
    writer.close()
    return sink.getvalue()


def _pyarrow_reference(table: pa.Table, groups) -> bytes:
    sink = io.BytesIO()
    with pq.ParquetWriter(sink, table.schema, **_encoding_options(table.schema, KEY)) as writer:
        for lo, hi in groups:
            writer.write_table(table.slice(lo, hi - lo), row_group_size=hi - lo)
        writer.add_key_value_metadata({METADATA_KEY: b'{"pair": "eurusd"}'})
    return sink.getvalue()


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("piece_bytes", [1, 4096, 1 << 30])
def test_assembled_file_is_byte_identical_to_pyarrows(tmp_path, threads, nested, piece_bytes):
    """Columns encoded on the appending thread (1 thread) or on 3 at once, in pieces of
    one column each, of a few columns cut across the caller's batches, or of a whole
    row group. The footer's schema is gathered from the pieces' footers, so a nested
    column (several schema elements for one field; no feature has one) is checked too.
    Without integer and string columns pyarrow encodes every chunk, so the file is
    pyarrow's own."""
    table = _by_pyarrow(_table())
    if nested:
        table = table.add_column(7, "window", pa.array([[float(i), None] for i in range(1000)]))
    groups = [(0, 600), (600, 1000)]
    data = _assembled(table, groups, [(0, 5), (5, 30), (30, table.num_columns)], threads,
                      piece_bytes)
    assert data == _pyarrow_reference(table, groups)
    path = tmp_path / "t.parquet"
    path.write_bytes(data)
    assert pq.read_table(path).equals(table)
    if nested:
        return
    assert pl.read_parquet(path).to_arrow().cast(table.schema).equals(table)
    assert duckdb.sql(f"SELECT count(*), sum(c3) FROM '{path}'").fetchone() == pytest.approx(
        (1000, pa.compute.sum(table["c3"]).as_py()))
    assert pq.ParquetFile(path).metadata.row_group(1).column(0).statistics.has_min_max


@pytest.mark.parametrize("threads", [1, 3])
def test_integer_and_string_chunks_are_polars_and_the_rest_pyarrows(tmp_path, threads):
    """Integer and string columns amid floats: each chunk is the bytes its encoder
    writes for that column (Polars' for integers and strings, pyarrow's for the rest),
    the chunks follow the schema's order, the footer's schema is pyarrow's, and every
    reader gets the table back."""
    table = _table()
    groups = [(0, 600), (600, 1000)]
    data = _assembled(table, groups, [(0, 5), (5, 30), (30, table.num_columns)], threads)
    ours = _chunks(data)
    pyarrow_file = _pyarrow_reference(table, groups)
    reference = _chunks(pyarrow_file)
    polars_columns = [f.name for f in table.schema if encoded_by_polars(f, KEY)]
    assert {"n4", "s4", "label", "count"} <= set(polars_columns)
    for g, (lo, hi) in enumerate(groups):
        sink = io.BytesIO()
        pl.from_arrow(table.slice(lo, hi - lo).select(polars_columns)).write_parquet(
            sink, compression="zstd", compression_level=3, statistics=False)
        reference.update({(g, name): chunk for (_, name), chunk in _chunks(sink.getvalue()).items()})
    assert ours == reference
    md = pq.ParquetFile(io.BytesIO(data)).metadata
    offsets = [md.row_group(g).column(c).data_page_offset
               for g in range(md.num_row_groups) for c in range(md.num_columns)]
    assert offsets == sorted(offsets)
    # Polars' offset indexes are not copied, so the footer must not point at them.
    assert not any(md.row_group(g).column(c).has_offset_index
                   for g in range(md.num_row_groups) for c in range(md.num_columns))
    assert md.schema.equals(pq.ParquetFile(io.BytesIO(pyarrow_file)).metadata.schema)
    # Polars' integer dictionary is sorted, pyarrow's in order of first appearance.
    assert len(ours[0, "count"]) < len(_chunks(pyarrow_file)[0, "count"])
    path = tmp_path / "t.parquet"
    path.write_bytes(data)
    assert pq.read_table(path).equals(table)
    assert pl.read_parquet(path).to_arrow().cast(table.schema).equals(table)
    assert duckdb.sql(f"SELECT count(*), sum(n13), count(s22) FROM '{path}'").fetchone() == (
        1000, pa.compute.sum(table["n13"]).as_py(), 1000 - table["s22"].null_count)


def test_a_file_without_row_groups_has_pyarrows_footer():
    table = _table()
    assert _assembled(table, [], []) == _pyarrow_reference(table, [])


def test_encoded_values_are_written_as_they_are():
    chunk = {1: (thrift_compact.I64, 42), 3: (thrift_compact.BINARY, b"x")}
    lst = (thrift_compact.LIST, (thrift_compact.STRUCT, [chunk, chunk]))
    plain = thrift_compact.encode_struct({2: lst})
    encoded = thrift_compact.encode_value(thrift_compact.STRUCT, chunk)
    assert thrift_compact.encode_struct(
        {2: (thrift_compact.LIST, (thrift_compact.STRUCT, [encoded, chunk]))}) == plain
    assert thrift_compact.encode_struct({2: (thrift_compact.LIST, thrift_compact.encode_value(*lst))}) == plain


def test_footer_round_trips_through_the_thrift_codec():
    data = pa.py_buffer(_pyarrow_reference(_table(), [(0, 1000)]))
    footer, start = read_footer(data)
    raw = data[start:len(data) - 8].to_pybytes()
    assert thrift_compact.encode_struct(footer) == raw
    with pytest.raises(thrift_compact.ThriftError):
        thrift_compact.decode_struct(raw[:-3])


def test_columns_out_of_order_or_short_row_groups_are_refused():
    table = _table(10)
    writer = TrainingFileWriter(io.BytesIO(), table.schema, {})
    writer.begin_row_group(10)
    with pytest.raises(ValueError, match="do not follow column 0"):
        writer.write_columns(table.select(["c0"]))
    writer.write_columns(table.select([KEY]))
    with pytest.raises(RuntimeError, match=f"after 1 of {table.num_columns} columns"):
        writer.end_row_group()
    with pytest.raises(ValueError, match="9 rows for a row group of 10"):
        writer.write_columns(table.slice(0, 9).select(["c0"]))


def test_row_group_rows_shapes_the_file_not_its_content(extracted, tmp_path):
    """One day per row group (the test pair spans two days) or one row group in all,
    row groups asked smaller than a shard (they hold one whole shard each), and a budget
    that forces one table per column batch and reads tables in slices of columns (with
    either join), or a small --column-batch-size: the same rows either way. The
    validation's reads are sized for the largest row group actually written."""
    from pipelines.merge import budget

    outputs = {}
    for name, args in {"one": [], "daily": ["--row-group-rows", "1440"],
                       "below_a_shard": ["--row-group-rows", "1"],
                       "tiny_batches": ["--memory-budget", "401MiB"],
                       "tiny_batches_duckdb": ["--memory-budget", "401MiB", "--method", "duckdb"],
                       "tiny_column_batch_size": ["--column-batch-size", "256KiB"],
                       }.items():
        out = str(tmp_path / f"{name}.parquet")
        proc = run_module("pipelines.merge", "--pair", "eurusd", "--checkpoint-root", extracted,
                          "--output", out, *args)
        assert proc.returncode == 0, proc.stderr
        outputs[name] = pq.ParquetFile(out)
        sliced = re.search(r"\((\d+) wide table\(s\) read in slices", proc.stderr)
        assert sliced and (int(sliced.group(1)) > 0) == name.startswith("tiny"), proc.stderr
        if name == "below_a_shard":
            meta = outputs[name].metadata
            largest = max(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
            batch = budget.batch_bytes(budget.parse_size(budget.DEFAULT_BUDGET))
            expected = budget.validation_columns(largest, batch)
            assert expected < budget.validation_columns(1, batch)
            assert re.search(rf"\[validate\] done .*columns_per_read={expected}\b", proc.stderr), proc.stderr
    assert outputs["one"].num_row_groups == 1
    assert outputs["daily"].num_row_groups == outputs["below_a_shard"].num_row_groups == 2
    assert "column batches each" in proc.stderr
    reference = outputs["one"].read()
    for name in ("daily", "below_a_shard", "tiny_batches", "tiny_batches_duckdb",
                 "tiny_column_batch_size"):
        assert outputs[name].read().equals(reference), name


def test_merge_validation_uses_the_writers_counts_and_reads_back_samples(extracted, tmp_path):
    """The merge's report equals a full read-back's, and counts that disagree with the
    file (as if a piece had been assembled wrongly) fail validation, naming the column."""
    import json

    from pipelines.validate import ColumnCounts, validate_file

    out = str(tmp_path / "t.parquet")
    proc = run_module("pipelines.merge", "--pair", "eurusd", "--checkpoint-root", extracted,
                      "--output", out, "--memory-budget", "401MiB")
    assert proc.returncode == 0, proc.stderr
    merged = json.loads(open(str(tmp_path / "t.validation.json")).read())
    assert merged["content_check"].startswith("counted while writing")
    full = validate_file(out).to_dict()
    for field in ("families", "target_null_rates", "infinities", "all_null_columns", "key_digest"):
        assert merged[field] == full[field], field

    names = pq.read_schema(out).names
    table = pq.read_table(out, columns=names[1:4])
    nulls = np.zeros(len(names), dtype=np.int64)
    nulls[1:4] = [c.null_count for c in table.columns]
    assert validate_file(out, counted=ColumnCounts(nulls, nulls * 0, names[1:4])).ok
    nulls[2] += 1
    report = validate_file(out, counted=ColumnCounts(nulls, nulls * 0, names[1:4]))
    assert [f for f in report.hard_failures if f.startswith(f"column {names[2]}:")], report.hard_failures


def test_a_file_that_is_not_the_bytes_written_is_not_published(extracted, tmp_path, monkeypatch):
    """The merge compares the stored file's size with what it wrote before validating.

    A mock: no emulator or file system here changes a local file between its write and
    its validation, so storage.size is made to report one byte more for the temporary.
    """

    from pipelines import checkpoints, storage
    from pipelines.errors import PipelineError
    from pipelines.merge import job
    from pipelines.validate import default_report_path
    from pipelines.window import window_from_options

    real_size = storage.size

    def size(path):
        grown = storage.TEMP_MARK in os.path.basename(str(path))
        return real_size(path) + (1 if grown else 0)

    monkeypatch.setattr(storage, "size", size)
    manifest = checkpoints.load_manifest(extracted, "eurusd", window_from_options(None, None))
    out = tmp_path / "out" / "t.parquet"
    with pytest.raises(PipelineError, match=r"holds \d+ bytes, the merge wrote \d+: not published"):
        job.merge(manifest, str(out), "polars", 1536 << 20)
    assert not out.exists() and not os.path.exists(default_report_path(str(out)))
    assert not [n for n in os.listdir(out.parent) if storage.TEMP_MARK in n]


def test_a_failure_behind_the_caller_is_raised_by_a_later_call():
    """Pieces are appended on the writer's own thread. A sink that breaks there (a pipe
    whose reader went away: EPIPE) fails a later call of the caller's, at the latest
    close, which waits for every append; nothing more is written after it."""
    table = _table(2000)
    read_end, write_end = os.pipe()
    sink = os.fdopen(write_end, "wb", buffering=0)
    first = table.select(list(range(0, 20)))
    # A piece is handed over with the first call's last column: it fails behind.
    writer = TrainingFileWriter(sink, table.schema, {}, threads=2, piece_bytes=first.nbytes)
    os.close(read_end)
    writer.begin_row_group(2000)
    writer.write_columns(first)
    with pytest.raises(BrokenPipeError):
        writer.write_columns(table.select(list(range(20, table.num_columns))))
        writer.end_row_group()
        writer.close()
    written = writer.nbytes
    with pytest.raises((BrokenPipeError, RuntimeError)):
        writer.end_row_group()
    writer.discard()
    assert writer.nbytes == written == 4  # only the magic reached the pipe
    sink.close()


def test_a_failed_encoding_stops_a_caller_waiting_for_a_place(monkeypatch):
    """An encoder that fails (a fault no real input produces here, so it is faked) must
    not leave the caller waiting for a place that no append will give back: the
    caller's call raises the encoder's error, and nothing but the magic is written."""
    from pipelines.merge import writer as writer_module

    def broken(piece, key):
        raise MemoryError("encoder ran out of memory")

    monkeypatch.setattr(writer_module, "_encode_piece", broken)
    table = _table()
    sink = io.BytesIO()
    # One column per piece: far more pieces than the writer has places.
    writer = TrainingFileWriter(sink, table.schema, {}, threads=2, piece_bytes=1)
    writer.begin_row_group(table.num_rows)
    with pytest.raises(MemoryError, match="encoder ran out of memory"):
        writer.write_columns(table)
        writer.end_row_group()
        writer.close()
    writer.discard()
    assert sink.getvalue() == writer_module.MAGIC


def test_the_caller_waits_for_a_place_and_the_writer_holds_a_fixed_number_of_pieces(monkeypatch):
    """However many columns are handed over, at most threads + SPARE_PIECES pieces are
    in the writer (handed to the encoders and not yet appended): the caller waits for a
    place instead. Encoding and appending are slowed so that every place fills: encoded
    pieces wait for the one appender."""
    import threading
    import time

    from pipelines.merge import writer as writer_module

    lock = threading.Lock()
    inside = [0, 0]  # pieces in the writer now, and the most at once
    real_encode, real_append = writer_module._encode_piece, TrainingFileWriter._append

    def slow_encode(piece, key):
        with lock:
            inside[0] += 1
            inside[1] = max(inside)
        time.sleep(0.02)
        return real_encode(piece, key)

    def counted_append(self, group, files):
        time.sleep(0.03)
        real_append(self, group, files)
        with lock:
            inside[0] -= 1

    monkeypatch.setattr(writer_module, "_encode_piece", slow_encode)
    monkeypatch.setattr(TrainingFileWriter, "_append", counted_append)
    table = _table()
    sink = io.BytesIO()
    writer = TrainingFileWriter(sink, table.schema, {}, threads=2, piece_bytes=1)
    writer.write(table)
    writer.close()
    assert inside == [0, 2 + writer_module.SPARE_PIECES]
    assert writer.waited > 0
    assert pq.read_table(io.BytesIO(sink.getvalue())).equals(table)


def test_column_orders_are_written_for_every_column_or_for_none(monkeypatch, tmp_path):
    """Column orders are optional in a footer, but when present there must be one per
    column. An encoder whose footer has none (neither pyarrow nor Polars writes such a
    file, so one is faked by dropping them from Polars' footers) leaves the training
    file without any."""
    from pipelines.merge import writer as writer_module

    real = writer_module.read_footer

    def without_polars_orders(data):
        meta, start = real(data)
        if b"Polars" in meta.get(6, (None, b""))[1]:
            meta.pop(7, None)
        return meta, start

    monkeypatch.setattr(writer_module, "read_footer", without_polars_orders)
    table = _table()
    path = tmp_path / "t.parquet"
    path.write_bytes(_assembled(table, [(0, 1000)], [(0, table.num_columns)]))
    footer, _ = real(pa.py_buffer(path.read_bytes()))
    assert 7 not in footer
    assert pq.read_table(path).equals(table)
    monkeypatch.undo()
    footer, _ = read_footer(pa.py_buffer(_assembled(table, [(0, 1000)], [(0, table.num_columns)])))
    assert len(footer[7][1][1]) == table.num_columns
