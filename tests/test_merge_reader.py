"""Reading tables ahead of the join (pipelines.merge.reader.read_ahead),
a wide table in slices of columns, and shards that are damaged, gone or unreadable.

The read-ahead tests use stand-in cursors that only count their reads: read_ahead needs
nothing else of a ShardCursor, and the real cursors are covered by every merge test."""
import functools
from concurrent.futures import Executor, Future, ThreadPoolExecutor

import pytest

from pipelines.errors import PipelineError
from pipelines.merge.reader import read_ahead


class _Cursor:
    def __init__(self, index: int, log: list, fail: bool = False):
        self.index, self.log, self.fail = index, log, fail

    def read_shards(self, count: int):
        self.log.append(self.index)
        if self.fail:
            raise PipelineError(f"checkpoint of table {self.index} is corrupt")
        return (self.index, count)


class _AtOnce(Executor):
    """Runs each read as it is submitted, so the log holds exactly the reads started,
    however slowly a loaded machine would start a pool's threads."""

    def submit(self, fn, /, *args, **kwargs):
        future = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:  # noqa: BLE001 - handed on, as a pool does
            future.set_exception(exc)
        return future


def test_tables_come_in_order_with_reads_ahead_bounded_by_bytes():
    """Reads run ahead of the table handed out while their bytes add up to the limit:
    many small ones, a single one larger than the limit alone, never more."""
    sizes = [10, 10, 30, 5, 5, 5, 1, 1, 50, 10, 10, 10]
    log: list = []
    most_ahead = 0
    with _AtOnce() as pool:
        handed = []
        for table in read_ahead(pool, [(functools.partial(_Cursor(i, log).read_shards, 3), size)
                                       for i, size in enumerate(sizes)], ahead_bytes=25):
            handed.append(table)
            ahead = [i for i in log if i >= len(handed)]
            assert sum(sizes[i] for i in ahead) <= 25 or len(ahead) == 1
            most_ahead = max(most_ahead, len(ahead))
    assert handed == [(i, 3) for i in range(len(sizes))]
    assert sorted(log) == list(range(len(sizes)))
    assert most_ahead >= 4  # the small ones: 5, 5, 5, 1, 1 (and 5, 1, 1 behind)


def test_a_failed_read_is_raised_in_its_turn_and_nothing_is_read_after_it():
    log: list = []
    reads = [(functools.partial(_Cursor(i, log, fail=i == 3).read_shards, 1), 10) for i in range(10)]
    with ThreadPoolExecutor(2) as pool:
        handed = []
        with pytest.raises(PipelineError, match="table 3 is corrupt"):
            for table in read_ahead(pool, reads, ahead_bytes=20):
                handed.append(table)
        after_error = sorted(log)
        pool.shutdown(wait=True)
    assert handed == [(0, 1), (1, 1), (2, 1)]
    # Reads already running when the error came may finish; none starts afterwards.
    assert sorted(log) == after_error and max(after_error) <= 5


def test_a_shard_gone_since_the_preflight_is_named(tmp_path):
    """A checkpoint deleted between the merge's preflight and its read (local files:
    storage.read_buffer raises FileNotFoundError, which the cursor names)."""
    import pyarrow as pa

    from pipelines.merge.reader import ShardCursor

    gone = str(tmp_path / "20250106T0000-20250107T0000.parquet")
    schema = pa.schema([("interval_time", pa.timestamp("us", tz="UTC")), ("x", pa.float64())])
    cursor = ShardCursor("features.agg_eurusd", [(gone, {"bytes": 1, "crc32c": "0", "rows": 1})],
                         schema)
    with pytest.raises(PipelineError, match=r"checkpoint missing: .*20250106T0000.*agg_eurusd"):
        cursor.read_shards(0, 1)


def _two_shards(tmp_path):
    """A table of two checkpoint shards (key and 6 float columns), written as the
    extract job writes them, and a cursor over them."""
    import numpy as np
    import pyarrow as pa

    from pipelines.checkpoints import write_shard
    from pipelines.merge.reader import ShardCursor

    key = pa.field("interval_time", pa.timestamp("us", tz="UTC"))
    schema = pa.schema([key] + [pa.field(f"f{i}", pa.float64()) for i in range(6)])
    shards, tables = [], []
    for s in range(2):
        rows = np.arange(s * 100, s * 100 + 100)
        table = pa.table([pa.array(rows * 60_000_000, pa.int64()).cast(key.type)]
                         + [pa.array(rows * 1.5 + i) for i in range(6)], schema=schema)
        path = str(tmp_path / f"shard{s}.parquet")
        size, crc = write_shard(table, path)
        shards.append((path, {"bytes": size, "crc32c": crc, "rows": 100}))
        tables.append(table)
    return ShardCursor("features.wide_eurusd", shards, schema), pa.concat_tables(tables)


def _fresh(cursor):
    """A new cursor over the same shards: a cursor checks that its keys only increase,
    so each checked read of the same shards needs its own."""
    from pipelines.merge.reader import ShardCursor

    return ShardCursor(cursor.label, cursor._shards, cursor.schema)


def test_a_table_read_in_slices_gives_its_columns_with_the_key(tmp_path, monkeypatch):
    """Each slice reads its own column chunks: no shard is read whole into memory."""
    from pipelines import storage

    cursor, whole = _two_shards(tmp_path)
    assert _fresh(cursor).read_shards(0, 2).equals(whole)

    def no_whole_read(path):
        raise AssertionError(f"{path} read whole")

    monkeypatch.setattr(storage, "read_buffer", no_whole_read)
    first, later = cursor.read_shards(0, 2, range(0, 4)), cursor.read_shards(0, 2, range(4, 6))
    assert first.equals(whole.select(["interval_time", "f0", "f1", "f2", "f3"]))
    assert later.equals(whole.select(["interval_time", "f4", "f5"]))
    assert cursor.read_shards(1, 1, range(4, 6)).equals(whole.select(["interval_time", "f4", "f5"]).slice(100))


def test_damage_is_found_by_the_first_slice_and_by_a_later_slices_page_checksums(tmp_path):
    """The first slice checks each shard's CRC32C; a later slice reads only its own
    columns, whose data pages pyarrow checks against their CRCs."""
    import pyarrow.parquet as pq

    cursor, _ = _two_shards(tmp_path)
    path = cursor._shards[1][0]
    chunk = pq.ParquetFile(path).metadata.row_group(0).column(6)  # f5, in the later slice
    data = bytearray(open(path, "rb").read())
    data[chunk.data_page_offset + chunk.total_compressed_size - 5] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(PipelineError, match=r"shard1\.parquet is corrupt: CRC32C"):
        cursor.read_shards(0, 2, range(0, 4))
    with pytest.raises(PipelineError, match=r"checkpoint .*shard1\.parquet of features\.wide_eurusd is corrupt"):
        cursor.read_shards(0, 2, range(4, 6))
    assert cursor.read_shards(0, 1, range(4, 6)).num_rows == 100  # the sound shard reads


def test_a_later_slice_of_a_shard_gone_since_is_named(tmp_path):
    import os

    cursor, _ = _two_shards(tmp_path)
    os.unlink(cursor._shards[0][0])
    with pytest.raises(PipelineError, match=r"checkpoint missing: .*shard0\.parquet \(features\.wide_eurusd\)"):
        cursor.read_shards(0, 2, range(4, 6))


def test_a_shard_that_cannot_be_read_is_named(tmp_path):
    """A folder where a shard should be: neither a missing file nor damage, one line."""
    import os
    import shutil

    cursor, _ = _two_shards(tmp_path)
    path = cursor._shards[1][0]
    os.unlink(path)
    os.mkdir(path)
    for features in (None, range(4, 6)):
        with pytest.raises(PipelineError, match=r"checkpoint .*shard1\.parquet of features\.wide_eurusd "
                                                r"could not be read"):
            _fresh(cursor).read_shards(1, 1, features)
    shutil.rmtree(path)


def test_a_spine_slice_must_hold_the_keys_the_merge_wrote(tmp_path):
    """The merge writes a row group's key column first, from the spine keys it read at
    the start, and reads the targets in slices afterwards: a slice whose keys are not
    those (its shards rewritten in between) stops the merge instead of being joined."""
    from pipelines.merge.job import _read_run
    from pipelines.merge.reader import int_keys

    cursor, whole = _two_shards(tmp_path)
    keys = int_keys(whole.column(0))
    assert _read_run(cursor, 0, 2, range(0, 3), keys).equals(whole.select(whole.schema.names[:4]))
    with pytest.raises(PipelineError, match=r"features\.wide_eurusd changed while merging"):
        _read_run(cursor, 0, 2, range(3, 6), keys + 1)
    assert _read_run(cursor, 0, 2, range(3, 6), None).num_rows == 200  # not the spine: joined
