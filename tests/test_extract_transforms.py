"""The extraction's pure transforms, and the Beam transform under TestPipeline."""
import datetime as dt
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
