"""The extraction's pure transforms, and the Beam transform under TestPipeline."""
import datetime as dt
import os
import random

import apache_beam as beam
import pyarrow as pa
import pytest
from apache_beam.testing.test_pipeline import TestPipeline
from apache_beam.testing.util import assert_that, equal_to

from pipelines import checkpoints
from pipelines.catalog import Column, TableSpec
from pipelines.errors import PipelineError
from pipelines.extract.transforms import FAILED, ExtractShards, conform, sort_and_dedupe

T0 = dt.datetime(2025, 1, 6, tzinfo=dt.timezone.utc)


def _table(rows):
    return pa.table({
        "interval_time": pa.array([T0 + dt.timedelta(minutes=k) for k, _ in rows],
                                  pa.timestamp("us", tz="UTC")),
        "x": pa.array([v for _, v in rows], pa.float64()),
    })


def test_dedupe_is_independent_of_source_order():
    rows = [(0, 1.0), (1, 5.0), (1, 2.0), (2, None), (2, 3.0), (3, 4.0)]
    results = set()
    for seed in range(5):
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        table, dropped = sort_and_dedupe(_table(shuffled), "interval_time", "drop", "t")
        assert dropped == 2
        results.add(tuple(table.column("x").to_pylist()))
    assert results == {(1.0, 2.0, 3.0, 4.0)}


def test_duplicate_keys_error_policy_names_the_table():
    with pytest.raises(PipelineError, match="reg_eurusd: 1 duplicate interval_time"):
        sort_and_dedupe(_table([(0, 1.0), (0, 2.0)]), "interval_time", "error", "reg_eurusd")


def test_conform_reports_type_changes_and_drift():
    schema = pa.schema([pa.field("interval_time", pa.timestamp("us", tz="UTC"), False),
                        pa.field("x", pa.float64())])
    bad = _table([(0, 1.0)]).set_column(1, "x", pa.array(["a"]))
    with pytest.raises(PipelineError, match="column type changed: x is string"):
        conform(bad, schema, "t")
    with pytest.raises(PipelineError, match="schema drift"):
        conform(_table([(0, 1.0)]).rename_columns(["interval_time", "y"]), schema, "t")


def _tasks(warehouse_tables, root, policy="drop"):
    import datetime as dt2

    from pipelines import sql
    from pipelines.window import window_from_dates

    shard = window_from_dates(dt2.date(2025, 1, 6), dt2.date(2025, 1, 6))
    tasks = []
    for name in warehouse_tables:
        spec = TableSpec("ds", name, "pair", False, name, (Column("x", f"{name}_x", "FLOAT64"),))
        schema = checkpoints.output_schema(spec, "interval_time")
        select = sql.select_shard(spec, "interval_time", shard)
        count = sql.count_shard(spec, "interval_time", shard, None)
        tasks.append(checkpoints.ShardTask(
            spec, shard, checkpoints.shard_path(root, False, "eurusd", name, shard),
            select, count, checkpoints.fingerprint(select, count, schema, policy)))
    return tasks


@pytest.fixture
def tiny_warehouse(tmp_path):
    import duckdb

    path = str(tmp_path / "w.duckdb")
    con = duckdb.connect(path)
    con.execute("SET TimeZone='UTC'; CREATE SCHEMA ds")
    base = "TIMESTAMPTZ '2025-01-06 00:00:00+00' + to_minutes(i::INT)"
    con.execute(f"CREATE TABLE ds.a AS SELECT {base} AS interval_time, i * 1.0 AS x FROM range(100) r(i)")
    con.execute(f"CREATE TABLE ds.b AS SELECT {base} AS interval_time, i * 2.0 AS x FROM range(50) r(i)")
    con.execute(f"INSERT INTO ds.b SELECT {base}, -1.0 FROM range(3) r(i)")
    con.close()
    return path


def test_extract_shards_transform_emits_commit_records(tiny_warehouse, tmp_path):
    tasks = _tasks(["a", "b"], str(tmp_path / "ck"))
    with TestPipeline() as p:
        out = p | beam.Create(tasks) | ExtractShards(f"duckdb://{tiny_warehouse}", "interval_time", "drop")
        summary = out.records | beam.Map(lambda r: (r["table"], r["rows"], r["source_keys"],
                                                    r["duplicates_dropped"]))
        assert_that(summary, equal_to([("a", 100, 100, 0), ("b", 50, 50, 3)]), label="records")
        assert_that(out[FAILED], equal_to([]), label="no failures")
    for task in tasks:
        assert checkpoints.shard_is_done(task)


def test_extract_shards_transform_routes_data_errors_to_failed(tiny_warehouse, tmp_path):
    tasks = _tasks(["a", "b"], str(tmp_path / "ck"), policy="error")
    with TestPipeline() as p:
        out = p | beam.Create(tasks) | ExtractShards(f"duckdb://{tiny_warehouse}", "interval_time", "error")
        assert_that(out.records | beam.Map(lambda r: r["table"]), equal_to(["a"]), label="ok")
        assert_that(out[FAILED] | beam.Map(lambda line: line.split(":")[0]),
                    equal_to(["ds.b shard 20250106T0000-20250107T0000"]), label="failed")
    assert not checkpoints.shard_is_done(tasks[1])


def _memory_limit(url):
    """DuckDB's memory limit on the source opened from ``url``, and the same size as
    DuckDB shows it when set on a database of its own."""
    import contextlib

    import duckdb

    from pipelines.sources import open_source

    setting = "SELECT current_setting('memory_limit') AS m"
    # Closed at once: every connection to a file in one process shares one database,
    # and so one limit.
    with contextlib.closing(open_source(url)) as source:
        limit, shown = source.memory_limit, source.query_rows(setting)[0]["m"]
    con = duckdb.connect()
    con.execute(f"SET memory_limit = '{limit}'")
    return limit, shown, con.execute(setting).fetchone()[0]


def test_a_warehouse_is_read_within_duckdbs_memory_limit(tiny_warehouse):
    from pipelines.sources import DUCKDB_MEMORY_LIMIT, open_source

    limit, shown, expected = _memory_limit(f"duckdb://{tiny_warehouse}")
    assert (limit, shown) == (DUCKDB_MEMORY_LIMIT, expected)
    limit, shown, expected = _memory_limit(f"duckdb://{tiny_warehouse}?memory_limit=64MB")
    assert (limit, shown) == ("64MB", expected)
    for query, error in [("memory_limit=lots", "memory_limit='lots': not a memory size"),
                         ("memory_limit=5'12MB", "memory_limit=\"5'12MB\": not a memory size"),
                         ("memory_limit=", "parameter memory_limit must be given once, with a value"),
                         ("memory_limit=1GB&memory_limit=2GB", "must be given once"),
                         ("memory=1GB", "unknown parameter.*memory; known: memory_limit")]:
        with pytest.raises(PipelineError, match=error):
            open_source(f"duckdb://{tiny_warehouse}?{query}")
    # A size of the right form that DuckDB itself refuses: one line, and the file is
    # not left open (read-only, it would keep this process from opening it otherwise),
    # even while the error, whose traceback holds the half-made source, is kept.
    import duckdb

    with pytest.raises(PipelineError, match=r"cannot open DuckDB warehouse .* with memory_limit="
                                            r"99999999999999999999TB: .*too large") as refused:
        open_source(f"duckdb://{tiny_warehouse}?memory_limit=99999999999999999999TB")
    duckdb.connect(tiny_warehouse).close()
    del refused


def test_a_warehouse_whose_name_holds_a_question_mark_or_percent_opens(tiny_warehouse, tmp_path):
    """In a duckdb:// URL the path is percent-encoded, so a ``?`` in a file name is not
    taken for the parameters; duckdb_url writes such URLs, and a plain path works too."""
    import contextlib
    import shutil

    from pipelines.sources import duckdb_url, open_source

    odd = str(tmp_path / "w?x%41 y.duckdb")
    shutil.copy(tiny_warehouse, odd)
    url = duckdb_url(odd)
    assert url.startswith("duckdb://") and "?" not in url
    for given in (url, url + "?memory_limit=64MB", odd):
        with contextlib.closing(open_source(given)) as source:
            assert source.path == odd and source.url == url
            assert source.query_rows("SELECT count(*) AS n FROM ds.a") == [{"n": 100}]
    with pytest.raises(PipelineError, match=r"w%3Fx%2541%20y\.duckdb"):
        open_source(url + "?memory=1GB")


def test_a_query_that_cannot_spill_names_the_folder_and_how_to_choose_another(tmp_path):
    """Over DuckDB's memory limit a query spills to the warehouse's path plus ``.tmp``.
    When DuckDB cannot make that folder (a file stands in its way here, as a read-only
    folder would for any user but root), one line names it and the URL parameter that
    moves it; with ``?temp_directory=DIR`` the same query runs."""
    import contextlib
    import re

    import duckdb

    from pipelines.sources import open_source

    path = tmp_path / "w.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE SCHEMA d; CREATE TABLE d.t AS SELECT range AS a, random() AS b FROM range(3000000)")
    con.close()
    blocked = tmp_path / "w.duckdb.tmp"
    blocked.write_text("not a folder")
    sql = "SELECT a, b FROM d.t ORDER BY b"
    with contextlib.closing(open_source(f"duckdb://{path}?memory_limit=30MB")) as source:
        with pytest.raises(PipelineError, match=(
                rf"memory limit \(30MB\) and could not spill to {re.escape(str(blocked))} "
                rf"\(IO Error: .*\); give it a writable folder with --source "
                rf"'duckdb://{re.escape(str(path))}\?temp_directory=DIR', or raise memory_limit")):
            source.query_arrow(sql)
    spill = tmp_path / "spill"
    with contextlib.closing(open_source(f"duckdb://{path}?memory_limit=30MB&temp_directory={spill}")) as source:
        assert source.temp_directory == str(spill)
        assert source.query_arrow(sql).num_rows == 3_000_000


def test_a_shard_over_the_memory_limit_fails_saying_how_to_raise_it(tiny_warehouse, tmp_path, caplog):
    from pipelines.extract.batches import TaskBatch

    url = f"duckdb://{tiny_warehouse}?memory_limit=100KB"
    tasks = _tasks(["a", "b"], str(tmp_path / "ck"))
    with caplog.at_level("WARNING", logger="pipelines.extract.batches"), TestPipeline() as p:
        out = p | beam.Create([TaskBatch(tasks)]) | ExtractShards(url, "interval_time", "drop")
        assert_that(out.records, equal_to([]), label="none written")
        assert_that(out[FAILED] | beam.Map(lambda line: (line.split(":")[0],
                                                         "memory limit (100KB)" in line,
                                                         "?memory_limit=SIZE" in line)),
                    equal_to([(t.label, True, True) for t in tasks]), label="failed")
    assert not any(checkpoints.shard_is_done(t) for t in tasks)
    # The two shards' counts were asked in one query first; its failure is said, not hidden.
    assert any(r.getMessage().startswith("the counts of 2 shards: source ")
               and r.getMessage().endswith("; counting each shard alone") for r in caplog.records)


def test_sorted_input_skips_the_sort_with_the_same_result():
    rows = [(k, float(k)) for k in range(50)]
    table = pa.concat_tables([_table(rows[:20]), _table(rows[20:])])  # two chunks
    fast, dropped = sort_and_dedupe(table, "interval_time", "drop", "t")
    slow, _ = sort_and_dedupe(_table(rows[::-1]), "interval_time", "drop", "t")
    assert dropped == 0 and fast.equals(slow)
    assert fast.column(0).num_chunks == 1  # as the sort's output: bytes do not depend on chunking
    # Non-decreasing with a repeat still takes the deduplicating path.
    table, dropped = sort_and_dedupe(_table([(0, 1.0), (1, 2.0), (1, 1.0)]), "interval_time", "drop", "t")
    assert dropped == 1 and table.column("x").to_pylist() == [1.0, 1.0]


def test_write_shard_checksum_is_the_files(tmp_path):
    from pipelines import storage

    path = str(tmp_path / "s.parquet")
    nbytes, crc = checkpoints.write_shard(_table([(k, k * 0.5) for k in range(100)]), path)
    assert (nbytes, crc) == (storage.size(path), storage.crc32c(path))
    assert [p.name for p in tmp_path.iterdir()] == ["s.parquet"]  # no temporary left


def test_task_batches_round_trip_and_share_the_work(tmp_path):
    from pipelines.extract.batches import MAX_BATCH_TASKS, make_batches

    tasks = _tasks([f"t{i}" for i in range(40)], str(tmp_path))
    batches = make_batches(tasks, workers=2)
    assert [t for b in batches for t in b.tasks()] == tasks
    assert len(batches) >= 2 * 4 and all(len(b) <= MAX_BATCH_TASKS for b in batches)
    assert max(len(b) for b in make_batches(tasks * 20, workers=1)) == MAX_BATCH_TASKS


def test_batched_counts_equal_each_tasks_own(tiny_warehouse, tmp_path):
    from pipelines.extract.batches import batch_counts
    from pipelines.extract.transforms import _ask
    from pipelines.sources import open_source

    tasks = _tasks(["a", "b"], str(tmp_path))
    source = open_source(f"duckdb://{tiny_warehouse}")
    try:
        alone = [source.query_rows(t.count_sql)[0] for t in tasks]
        assert batch_counts(source, tasks, _ask) == alone == [
            {"n_rows": 100, "n_keys": 100}, {"n_rows": 53, "n_keys": 50}]
        # A table the source refuses: every task asks alone, so its own error names it.
        missing = _tasks(["a", "gone"], str(tmp_path))
        assert batch_counts(source, missing, _ask) == [None, None]
    finally:
        source.close()


def test_a_batch_with_a_missing_table_fails_only_that_task(tiny_warehouse, tmp_path):
    from pipelines.extract.batches import TaskBatch

    tasks = _tasks(["a", "gone", "b"], str(tmp_path / "ck"))
    with TestPipeline() as p:
        out = (p | beam.Create([TaskBatch(tasks)])
               | ExtractShards(f"duckdb://{tiny_warehouse}", "interval_time", "drop"))
        assert_that(out.records | beam.Map(lambda r: (r["table"], r["rows"], r["source_keys"])),
                    equal_to([("a", 100, 100), ("b", 50, 50)]), label="records")
        assert_that(out[FAILED] | beam.Map(lambda line: line.split(":")[0]),
                    equal_to(["ds.gone shard 20250106T0000-20250107T0000"]), label="failed")
    assert [checkpoints.shard_is_done(t) for t in tasks] == [True, False, True]


def test_a_read_with_other_rows_than_counted_fails_its_shard(tiny_warehouse, tmp_path):
    """A row added to the table between its count and its read (or a read that repeated
    rows) fails the shard in one line, before anything is written: dropping repeated keys
    would otherwise hide rows read twice."""
    import contextlib

    import duckdb

    from pipelines.extract.transforms import extract_shard
    from pipelines.sources import open_source

    task = _tasks(["a"], str(tmp_path / "ck"))[0]
    with contextlib.closing(open_source(f"duckdb://{tiny_warehouse}")) as source:
        counts = source.query_rows(task.count_sql)[0]
    assert counts["n_rows"] == 100
    con = duckdb.connect(tiny_warehouse)
    con.execute("INSERT INTO ds.a SELECT TIMESTAMPTZ '2025-01-06 00:00:00+00', -1.0")
    con.close()
    with contextlib.closing(open_source(f"duckdb://{tiny_warehouse}")) as source:
        with pytest.raises(PipelineError, match=r"^ds\.a shard \S+: read 101 rows, but the count "
                                                r"query found 100: the table changed"):
            extract_shard(source, task, "interval_time", "drop", counts)
        assert not checkpoints.shard_is_done(task) and not os.path.exists(task.path)
        # Counted again, the shard is extracted, its repeated key dropped and counted.
        assert extract_shard(source, task, "interval_time", "drop")["duplicates_dropped"] == 1
    assert checkpoints.shard_is_done(task)


def test_verification_rereads_only_shards_this_run_did_not_write(tiny_warehouse, tmp_path, monkeypatch):
    """A shard whose record states the CRC32C this run computed from the bytes it wrote
    is not read back to checksum it again; any other is checked whole, and damage found."""
    from pipelines import storage
    from pipelines.extract.transforms import extract_shard
    from pipelines.extract.verify import check_task
    from pipelines.sources import open_source

    task = _tasks(["a"], str(tmp_path / "ck"))[0]
    source = open_source(f"duckdb://{tiny_warehouse}")
    try:
        record = extract_shard(source, task, "interval_time", "drop")
    finally:
        source.close()
    with monkeypatch.context() as m:
        m.setattr(storage, "crc32c", lambda path: pytest.fail("checksummed a fresh shard"))
        assert check_task(task, "interval_time", record["crc32c"]) == (record, [])
    with open(task.path, "r+b") as fh:  # damage in the middle, same size
        fh.seek(storage.size(task.path) // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    for written_crc in (None, "00000000"):  # an earlier run's shard, or rewritten since
        found, problems = check_task(task, "interval_time", written_crc)
        assert found is None and "is corrupt: CRC32C" in problems[0]
