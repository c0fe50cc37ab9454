"""sample -> extract -> merge (both methods) -> validate, on a small warehouse."""
import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import PAIR, ROWS, run_module
from pipelines import checkpoints


@pytest.fixture(scope="module")
def merged(extracted, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    paths = {}
    for method in ("polars", "duckdb"):
        path = str(out / f"{method}.parquet")
        proc = run_module("pipelines.merge", "--pair", PAIR, "--method", method,
                          "--checkpoint-root", extracted, "--output", path)
        assert proc.returncode == 0, proc.stderr
        assert "PASS" in proc.stdout
        paths[method] = path
    return paths


def test_manifest_records_every_table_and_the_drops(extracted):
    manifest = checkpoints.load_manifest(extracted, PAIR)
    totals = manifest.totals()
    groups = {t["group"] for t in manifest.tables}
    assert groups == {"targets", "pair", "tri", "mkt", "var", "csi"}
    assert totals["duplicates_dropped"] > 0, "the sample has duplicate keys"
    assert totals["bad_keys_dropped"] > 0, "the sample has 1970 keys"
    assert manifest.targets["rows"] == ROWS
    for entry in manifest.tables:
        assert len(entry["shards"]) == 2  # ROWS minutes span two one-day shards
        for shard in entry["shards"]:
            assert shard["rows"] == shard["source_keys"]
    assert checkpoints.verify_checkpoints(manifest) == []


def test_shared_tables_live_in_the_shared_area(extracted):
    manifest = checkpoints.load_manifest(extracted, PAIR)
    for entry in manifest.tables:
        area = entry["shards"][0]["path"].split("/")[0]
        assert area == ("shared" if entry["shared"] else "pairs")


def test_both_methods_write_the_same_file(merged):
    a, b = (pq.read_table(merged[m]) for m in ("polars", "duckdb"))
    assert a.schema.equals(b.schema)
    assert a.equals(b)


def test_training_file_shape_and_order(merged, extracted):
    manifest = checkpoints.load_manifest(extracted, PAIR)
    table = pq.read_table(merged["polars"])
    assert table.num_rows == ROWS
    names = table.schema.names
    assert names[0] == "interval_time"
    targets = [n for n in names if n.startswith("target_")]
    assert names[1:50] == targets and len(targets) == 49
    expected = ["interval_time"] + [c[1] for t in manifest.tables for c in t["columns"]]
    assert names == expected
    keys = table.column(0).cast(pa.int64()).to_numpy()
    assert (keys[1:] > keys[:-1]).all()


def test_windowed_merge_equals_a_plain_left_join(merged, extracted):
    """Reference: pyarrow's own LEFT JOIN of every whole table onto the targets."""
    manifest = checkpoints.load_manifest(extracted, PAIR)
    out = pq.read_table(merged["duckdb"])
    spine = pa.concat_tables([pq.read_table(p) for p in manifest.shard_files(manifest.targets)])
    for entry in manifest.tables[1:]:
        part = pa.concat_tables([pq.read_table(p) for p in manifest.shard_files(entry)])
        ref = spine.select(["interval_time"]).join(part, "interval_time", join_type="left outer")
        ref = ref.sort_by("interval_time")
        for name in part.schema.names[1:]:
            assert out.column(name).equals(ref.column(name)), name


def test_gaps_become_nulls_and_reports_are_written(merged):
    report = json.load(open(merged["polars"][:-len(".parquet")] + ".validation.json"))
    assert report["ok"] is True
    assert report["rows"] == ROWS
    assert report["families"]["pair"]["nulls"] > 0


def test_validate_cli_on_the_output(merged):
    proc = run_module("pipelines.validate", merged["polars"])
    assert proc.returncode == 0, proc.stderr
    assert "PASS" in proc.stdout


def test_rerun_extract_does_no_work(extracted, warehouse):
    before = checkpoints.read_json(checkpoints.manifest_path(
        extracted, PAIR, checkpoints.find_windows(extracted, PAIR)[0]))
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", extracted, "--shard-days", "1")
    assert proc.returncode == 0, proc.stderr
    assert "to_do=0" in proc.stderr
    after = checkpoints.read_json(checkpoints.manifest_path(
        extracted, PAIR, checkpoints.find_windows(extracted, PAIR)[0]))
    assert before == after


def test_second_pair_reuses_the_shared_tables(extracted, warehouse, tmp_path):
    proc = run_module("pipelines.extract", "--pair", "gbpusd", "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", extracted, "--shard-days", "1")
    assert proc.returncode == 0, proc.stderr
    manifest = checkpoints.load_manifest(extracted, "gbpusd")
    shared = sum(len(t["shards"]) for t in manifest.tables if t["shared"])
    own = sum(len(t["shards"]) for t in manifest.tables if not t["shared"])
    # Only the pair's own tables were extracted: the shared ones were already committed.
    assert f"done_before={shared}" in proc.stderr and f"to_do={own}" in proc.stderr
