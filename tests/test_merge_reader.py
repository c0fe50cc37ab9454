"""Reading a column batch's tables ahead of the join (pipelines.merge.reader.read_ahead),
and a shard that disappears before it is read.

The read-ahead tests use stand-in cursors that only count their reads: read_ahead needs
nothing else of a ShardCursor, and the real cursors are covered by every merge test."""
from concurrent.futures import ThreadPoolExecutor

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


def test_tables_come_in_order_with_at_most_depth_read_ahead():
    log: list = []
    with ThreadPoolExecutor(2) as pool:
        handed = []
        for table in read_ahead(pool, [_Cursor(i, log) for i in range(10)], 3, depth=2):
            handed.append(table)
            assert len(log) <= len(handed) + 2
    assert handed == [(i, 3) for i in range(10)]
    assert sorted(log) == list(range(10))


def test_a_failed_read_is_raised_in_its_turn_and_nothing_is_read_after_it():
    log: list = []
    cursors = [_Cursor(i, log, fail=i == 3) for i in range(10)]
    with ThreadPoolExecutor(2) as pool:
        handed = []
        with pytest.raises(PipelineError, match="table 3 is corrupt"):
            for table in read_ahead(pool, cursors, 1, depth=2):
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
        cursor.read_shards(1)
