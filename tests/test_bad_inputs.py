"""Bad input gets one clear error line naming the culprit, a non-zero exit, and leaves
everything already written as it was."""
import datetime as dt
import json
import logging
import os
import shutil

import duckdb
import pyarrow.parquet as pq
import pytest

from conftest import PAIR, extract_window, file_states, run_module
from pipelines import checkpoints, storage
from pipelines.errors import PipelineError
from pipelines.window import window_from_dates


def _error_line(proc):
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def ck(extracted, tmp_path):
    """A private copy of the committed extraction to break."""
    root = str(tmp_path / "ck")
    shutil.copytree(extracted, root)
    return root


def _merge(root, out, *extra, env=None):
    return run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", root,
                      "--output", out, *extra, env=env)


@pytest.mark.parametrize("pair, expected", [
    ("usdeur", "unknown pair 'usdeur'"),
    ("eur/usd", "malformed pair"),
    ("../../x", "malformed pair"),
])
def test_extract_refuses_bad_pairs(pair, expected, warehouse, tmp_path):
    proc = run_module("pipelines.extract", "--pair", pair, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", str(tmp_path))
    assert proc.returncode == 2
    assert expected in _error_line(proc)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module, variable, value, expected", [
    ("pipelines.extract", "SHARD_DAYS", "abc", "SHARD_DAYS='abc' is not a whole number"),
    ("pipelines.extract", "SHARD_DAYS", "0", "SHARD_DAYS=0 must be at least 1"),
    ("pipelines.extract", "SAMPLE_ROWS", "1e4", "SAMPLE_ROWS='1e4' is not a whole number"),
    ("pipelines.extract", "WINDOW_DAYS", "seventy", "WINDOW_DAYS='seventy' is not a whole number"),
    ("pipelines.extract", "ON_DUPLICATE_KEYS", "eror", "ON_DUPLICATE_KEYS='eror' must be one of: drop, error"),
    ("pipelines.extract", "EXTRACTION_WORKERS", "0", "EXTRACTION_WORKERS=0 must be at least 1"),
    ("pipelines.merge", "WINDOW_DAYS", "0", "WINDOW_DAYS=0 must be at least 1"),
])
def test_bad_environment_values_are_refused_naming_the_variable(module, variable, value, expected,
                                                                tmp_path):
    """A job configured by the environment (as on Cloud Run) names the variable in one
    line and writes nothing; before, some of these gave a traceback, and a mistyped
    ON_DUPLICATE_KEYS silently dropped repeated keys."""
    proc = run_module(module, "--pair", PAIR, "--checkpoint-root", str(tmp_path / "ck"),
                      env={variable: value, "BQX_DATA_DIR": str(tmp_path)})
    assert proc.returncode == 2, proc.stderr
    assert _error_line(proc) == f"error: {expected}"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("module, args, expected", [
    ("pipelines.extract", ["--pair", PAIR, "--days", "abc"], "argument --days: invalid int value: 'abc'"),
    ("pipelines.extract", ["--pair", PAIR, "--on-duplicate-keys", "eror"],
     "argument --on_duplicate_keys/--on-duplicate-keys: invalid choice: 'eror'"),
    ("pipelines.merge", [PAIR, "--days", "abc"], "argument --days: invalid int value: 'abc'"),
    ("pipelines.merge", [PAIR, "--bogus"], "unrecognized arguments: --bogus"),
    ("pipelines.prune", ["--keep-windows", "x"], "argument --keep-windows: invalid int value: 'x'"),
    ("pipelines.cost", ["--queries-per-pair", "x"], "argument --queries-per-pair: invalid int value"),
    ("pipelines.sample", ["--pairs", PAIR], "the following arguments are required: --warehouse"),
    ("pipelines.validate", [], "the following arguments are required: path"),
    ("pipelines.demo", ["--rows", "x"], "argument --rows: invalid int value: 'x'"),
])
def test_a_malformed_option_is_one_line_naming_it(module, args, expected, tmp_path):
    """argparse prints the whole usage before its error (for the extract job, Beam's
    dozens of lines); every command prints one line instead, exits 2, writes nothing."""
    proc = run_module(module, *args, env={"BQX_DATA_DIR": str(tmp_path)}, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"error: {expected}"), proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.endswith("(--help lists the options)\n")
    assert os.listdir(tmp_path) == []


def test_extract_help_lists_the_jobs_own_options(tmp_path):
    """Beam's parser alone prints only --help; the job prints its options and creates
    nothing (no sample warehouse, no checkpoints)."""
    proc = run_module("pipelines.extract", "--help", env={"BQX_DATA_DIR": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    for text in ("--pair PAIR", "--days N", "[WINDOW_DAYS]", "[AS_OF_DATE]", "--checkpoint-root",
                 "--runner"):
        assert text in proc.stdout
    assert os.listdir(tmp_path) == []


def test_extract_pair_without_targets(warehouse, tmp_path):
    proc = run_module("pipelines.extract", "--pair", "audnzd", "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", str(tmp_path))
    assert proc.returncode == 2
    assert "targets table bqx_ml_v3_analytics_v2.targets_audnzd not found" in _error_line(proc)


def test_extract_missing_source(tmp_path):
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source",
                      f"duckdb://{tmp_path}/nope.duckdb", "--checkpoint-root", str(tmp_path))
    assert proc.returncode == 2
    assert "nope.duckdb" in _error_line(proc)


def test_extract_over_the_warehouse_memory_limit(warehouse, tmp_path):
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source",
                      f"duckdb://{warehouse}?memory_limit=100KB", "--checkpoint-root", str(tmp_path))
    assert proc.returncode == 2
    assert "more than DuckDB's memory limit (100KB); raise it" in _error_line(proc)
    assert os.listdir(tmp_path) == []


def test_duplicate_keys_with_error_policy(warehouse, tmp_path):
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", str(tmp_path), "--shard-days", "1",
                      "--on-duplicate-keys", "error")
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "duplicate interval_time" in line and "shard" in line
    assert not checkpoints.find_windows(str(tmp_path), PAIR)


def test_malformed_table_name_in_the_warehouse(warehouse, tmp_path):
    bad = str(tmp_path / "bad.duckdb")
    shutil.copy(warehouse, bad)
    con = duckdb.connect(bad)
    con.execute('CREATE TABLE bqx_ml_v3_features_v2."reg_eurusd_x`; DROP TABLE y" '
                "AS SELECT TIMESTAMPTZ '2025-01-06 00:00:00+00' AS interval_time, 1.0 AS a")
    con.close()
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{bad}",
                      "--checkpoint-root", str(tmp_path / "ck"))
    assert proc.returncode == 2
    assert "malformed name 'reg_eurusd_x`; DROP TABLE y'" in _error_line(proc)


def test_column_type_changed_since_discovery_is_redone_not_mixed(warehouse, extracted, tmp_path):
    """A column whose type changes in the source gives new checkpoints for that table
    (the fingerprint covers the schema), never a mix of old and new shards."""
    changed = str(tmp_path / "changed.duckdb")
    shutil.copy(warehouse, changed)
    root = str(tmp_path / "ck")
    shutil.copytree(extracted, root)
    con = duckdb.connect(changed)
    table, column = con.execute(
        "SELECT table_name, column_name FROM information_schema.columns WHERE table_schema = "
        "'bqx_ml_v3_features_v2' AND table_name LIKE '%eurusd' AND data_type = 'DOUBLE' "
        "ORDER BY 1, 2 LIMIT 1").fetchone()
    con.execute(f'ALTER TABLE bqx_ml_v3_features_v2."{table}" ALTER "{column}" TYPE VARCHAR')
    con.close()
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{changed}",
                      "--checkpoint-root", root, "--shard-days", "1")
    assert proc.returncode == 0, proc.stderr
    assert "to_do=2" in proc.stderr
    manifest = checkpoints.load_manifest(root, PAIR)
    entry = next(t for t in manifest.tables if t["table"] == table)
    assert [c[2] for c in entry["columns"] if c[0] == column] == ["STRING"]


def test_merge_without_extraction(tmp_path):
    proc = _merge(str(tmp_path), str(tmp_path / "o.parquet"))
    assert proc.returncode == 2
    assert "no committed extraction of pair 'eurusd'" in _error_line(proc)


def test_merge_of_incomplete_extraction(ck, tmp_path):
    window = checkpoints.find_windows(ck, PAIR)[0]
    os.unlink(checkpoints.success_path(ck, PAIR, window))
    proc = _merge(ck, str(tmp_path / "o.parquet"), "--start-date", window.start.date().isoformat(),
                  "--end-date", (window.end.date().fromordinal(window.end.date().toordinal() - 1)).isoformat())
    assert proc.returncode == 2
    assert "extraction incomplete" in _error_line(proc)


def test_merge_takes_the_window_ending_last_and_refuses_two(warehouse, ck, tmp_path, caplog):
    """An extraction run again on a later day has a default window ending later, so the
    merge after it, given no dates, takes the committed window that ends last; two that
    end on the same day are ambiguous."""
    (default,) = checkpoints.find_windows(ck, PAIR)  # 2025-01-06 .. 2025-01-07
    extract_window(warehouse, ck, "2025-01-06", "2025-01-06")  # yesterday's, say
    with caplog.at_level(logging.INFO, logger="pipelines.checkpoints"):
        assert checkpoints.load_manifest(ck, PAIR).window == default
    assert f"has 2 extracted windows under {ck}; using the one ending last, {default.id}" in caplog.text

    extract_window(warehouse, ck, "2025-01-07", "2025-01-07")  # ends with the default
    before = file_states(ck)
    proc = _merge(ck, str(tmp_path / "o.parquet"))
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "has 2 extracted windows whose last day is 2025-01-07" in line
    assert default.id in line and "--start-date/--end-date" in line
    assert file_states(ck) == before and not os.path.exists(tmp_path / "o.parquet")


def test_days_extracts_and_merges_the_last_days_of_the_targets(warehouse, ck, tmp_path):
    """--days N (WINDOW_DAYS) takes the last N days of the default window. The merge
    given the same N takes that window even when another one ends the same day; --days
    with dates, or below 1, is refused in one line by both jobs."""
    (default,) = checkpoints.find_windows(ck, PAIR)  # 2025-01-06 .. 2025-01-07
    with pytest.raises(PipelineError, match=r"no extracted window of at most 1 days under .*; run "
                                            r"the extract job with --days 1 first$"):
        checkpoints.load_manifest(ck, PAIR, days=1)

    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", ck, "--shard-days", "1", env={"WINDOW_DAYS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert "window: the last 1 days the targets cover, 2025-01-07 .. 2025-01-07 (--days)" in proc.stderr
    last_day = window_from_dates(dt.date(2025, 1, 7), dt.date(2025, 1, 7))
    assert sorted(checkpoints.find_windows(ck, PAIR)) == [default, last_day]

    # Both end on 2025-01-07: without --days that is ambiguous; with it, the longest of
    # at most N days.
    with pytest.raises(PipelineError, match="2 extracted windows whose last day is 2025-01-07"):
        checkpoints.load_manifest(ck, PAIR)
    assert checkpoints.load_manifest(ck, PAIR, days=1).window == last_day
    assert checkpoints.load_manifest(ck, PAIR, days=2).window == default
    assert checkpoints.load_manifest(ck, PAIR, days=30).window == default

    out = str(tmp_path / "o.parquet")
    proc = _merge(ck, out, env={"WINDOW_DAYS": "1"})
    assert proc.returncode == 0, proc.stderr
    assert f"using the longest of at most 1 days among those ending last, {last_day.id}" in proc.stderr
    spine = checkpoints.load_manifest(ck, PAIR, days=1).targets["rows"]
    assert pq.read_metadata(out).num_rows == spine

    before = file_states(ck)
    bad = ((["--days", "1", "--start-date", "2025-01-07", "--end-date", "2025-01-07"],
            "give --days or --start-date/--end-date, not both"),
           (["--days", "0"], "--days must be at least 1, not 0"))
    for args, expected in bad:
        for module, extra in (("pipelines.merge", ["--output", str(tmp_path / "x.parquet")]),
                              ("pipelines.extract", ["--source", f"duckdb://{warehouse}"])):
            proc = run_module(module, "--pair", PAIR, "--checkpoint-root", ck, *extra, *args)
            assert proc.returncode == 2, proc.stderr
            assert expected in _error_line(proc)
    assert file_states(ck) == before and not os.path.exists(tmp_path / "x.parquet")


def test_as_of_pins_the_default_window_and_is_refused_where_it_cannot_apply(warehouse, ck, tmp_path):
    """AS_OF_DATE (--as-of) is the day taken as today: the targets reach 2025-01-07, so
    as of that day the default window ends on the 6th, whenever the job runs (the
    workflow sets it once per execution), and the merge given the same day takes that
    window although another ends later. With dates, after today or malformed it is
    refused in one line by both jobs and nothing is written."""
    (default,) = checkpoints.find_windows(ck, PAIR)  # 2025-01-06 .. 2025-01-07
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", ck, "--shard-days", "1",
                      env={"AS_OF_DATE": "2025-01-07"})
    assert proc.returncode == 0, proc.stderr
    assert "window ends with 2025-01-06, the last whole day before the --as-of day" in proc.stderr
    first_day = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 6))
    assert sorted(checkpoints.find_windows(ck, PAIR)) == [first_day, default]

    out = str(tmp_path / "o.parquet")
    proc = _merge(ck, out, env={"AS_OF_DATE": "2025-01-07"})
    assert proc.returncode == 0, proc.stderr
    assert f"using the one ending last before the --as-of day 2025-01-07, {first_day.id}" in proc.stderr
    spine = checkpoints.load_manifest(ck, PAIR, first_day).targets["rows"]
    assert pq.read_metadata(out).num_rows == spine < checkpoints.load_manifest(ck, PAIR).targets["rows"]

    before = file_states(ck)
    later = (dt.datetime.now(dt.timezone.utc) + dt.timedelta(days=2)).date().isoformat()
    bad = (({"AS_OF_DATE": "2025-01-07"}, ["--start-date", "2025-01-06", "--end-date", "2025-01-06"],
            "error: give --as-of or --start-date/--end-date, not both: --as-of only works out "
            "the window the dates would replace"),
           ({}, ["--as-of", later], f"error: --as-of {later} is after today ("),
           ({"AS_OF_DATE": "7 Jan"}, [], "error: --as-of '7 Jan' is not a date like 2024-01-31"))
    for env, args, expected in bad:
        for module, extra in (("pipelines.merge", ["--output", str(tmp_path / "x.parquet")]),
                              ("pipelines.extract", ["--source", f"duckdb://{warehouse}"])):
            proc = run_module(module, "--pair", PAIR, "--checkpoint-root", ck, *extra, *args, env=env)
            assert proc.returncode == 2, proc.stderr
            assert _error_line(proc).startswith(expected), proc.stderr
    # No window ends before the 6th: the merge says so.
    proc = _merge(ck, str(tmp_path / "x.parquet"), "--as-of", "2025-01-06")
    assert proc.returncode == 2, proc.stderr
    assert _error_line(proc) == (f"error: pair 'eurusd' has no extracted window ending before the "
                                 f"--as-of day 2025-01-06 under {ck}; run the extract job with --as-of "
                                 "2025-01-06 first")
    assert file_states(ck) == before and not os.path.exists(tmp_path / "x.parquet")


def test_demo_merges_the_window_it_extracted_beside_others(tmp_path):
    """The README's first command run again after a --days extraction by hand into the
    same folder: both windows end on the same day, and the demo still merges its own
    (also with AS_OF_DATE set, which would clash with the dates it merges by)."""
    env = {"BQX_DATA_DIR": str(tmp_path)}
    demo = ("pipelines.demo", "--rows", "3000")  # 2025-01-06 .. 2025-01-08
    proc = run_module(*demo, env=env)
    assert proc.returncode == 0, proc.stderr
    root = str(tmp_path / "checkpoints")
    (full,) = checkpoints.find_windows(root, PAIR)
    proc = run_module("pipelines.extract", "--pair", PAIR, "--days", "1", "--sample-rows", "3000",
                      env=env)
    assert proc.returncode == 0, proc.stderr
    assert len(checkpoints.find_windows(root, PAIR)) == 2
    today = dt.datetime.now(dt.timezone.utc).date().isoformat()  # shapes nothing: data of 2025
    proc = run_module(*demo, env={**env, "WINDOW_DAYS": "", "AS_OF_DATE": today})
    assert proc.returncode == 0, proc.stderr
    output = tmp_path / "output" / f"training_{PAIR}.parquet"
    assert pq.read_metadata(output).num_rows == checkpoints.load_manifest(root, PAIR, full).targets["rows"]


def _first_feature_shard(root, table=1):
    """The first shard of the manifest's ``table`` (0: the targets, 1: the first features)."""
    manifest = checkpoints.load_manifest(root, PAIR)
    return manifest.shard_files(manifest.tables[table])[0]


@pytest.mark.parametrize("table", [0, 1], ids=["targets", "features"])
@pytest.mark.parametrize("damage, expected", [
    ("delete", "checkpoint missing"),
    ("truncate", "bytes, its record says"),
    ("flip", "is corrupt: CRC32C"),
])
def test_merge_refuses_damaged_checkpoints(ck, tmp_path, damage, expected, table):
    shard = _first_feature_shard(ck, table)
    if damage == "delete":
        os.unlink(shard)
    elif damage == "truncate":
        os.truncate(shard, storage.size(shard) - 100)
    else:
        with open(shard, "r+b") as fh:
            fh.seek(storage.size(shard) // 2)
            fh.write(b"\xde\xad\xbe\xef")
    out = str(tmp_path / "o.parquet")
    proc = _merge(ck, out)
    assert proc.returncode == 2
    line = _error_line(proc)
    assert expected in line and os.path.basename(shard) in line
    assert os.listdir(tmp_path / "ck") and not os.path.exists(out)
    assert [f for f in os.listdir(tmp_path) if f.startswith(".o.parquet")] == []


def test_merge_refuses_schema_drift_even_with_a_forged_record(ck, tmp_path):
    """A shard replaced by one of another schema, with its record edited to match."""
    import pyarrow as pa

    shard = _first_feature_shard(ck)
    table = pq.read_table(shard)
    drifted = table.set_column(1, table.schema.names[1], pa.array(["x"] * table.num_rows))
    nbytes, crc = checkpoints.write_shard(drifted, shard)
    record = json.load(open(checkpoints.record_path(shard)))
    record.update(bytes=nbytes, crc32c=crc)
    manifest_file = checkpoints.manifest_path(ck, PAIR, checkpoints.find_windows(ck, PAIR)[0])
    manifest = json.load(open(manifest_file))
    for t in manifest["tables"]:
        for s in t["shards"]:
            if ck + "/" + s["path"] == shard:
                s.update(bytes=nbytes, crc32c=crc)
    storage.write_bytes(manifest_file, json.dumps(manifest).encode())
    proc = _merge(ck, str(tmp_path / "o.parquet"))
    assert proc.returncode == 2
    line = _error_line(proc)
    assert "schema drift" in line and "is string, expected double" in line


def test_merge_does_not_overwrite_without_flag(extracted, tmp_path):
    out = tmp_path / "o.parquet"
    out.write_bytes(b"precious")
    proc = _merge(extracted, str(out))
    assert proc.returncode == 2
    assert "already exists; pass --overwrite" in _error_line(proc)
    assert out.read_bytes() == b"precious"


@pytest.mark.parametrize("args, expected", [
    (["--method", "pandas"], "unknown merge method 'pandas'"),
    (["--memory-budget", "lots"], "--memory-budget 'lots'"),
    (["--row-group-rows", "0"], "--row-group-rows must be at least 1, not 0"),
    (["--column-batch-size", "big"], "--column-batch-size 'big' is not a size"),
    (["--column-batch-size", "0"], "--column-batch-size must be more than 0 bytes"),
])
def test_merge_bad_options(extracted, tmp_path, args, expected):
    proc = _merge(extracted, str(tmp_path / "o.parquet"), *args)
    assert proc.returncode == 2
    assert expected in _error_line(proc)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("value, expected", [
    ("0", "ROW_GROUP_ROWS=0 must be at least 1"),
    ("abc", "ROW_GROUP_ROWS='abc' is not a whole number"),
])
def test_merge_bad_row_group_rows_environment(extracted, tmp_path, value, expected):
    proc = _merge(extracted, str(tmp_path / "o.parquet"), env={"ROW_GROUP_ROWS": value})
    assert proc.returncode == 2
    assert expected in _error_line(proc)
    assert os.listdir(tmp_path) == []


# Retry settings are read when the first gs:// call is prepared, before any request: an
# emulator address where nothing listens is never contacted.
NO_GCS = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:9"}
BAD_RETRY = [
    ({"BQX_RETRY_SECONDS": "0"}, "BQX_RETRY_SECONDS=0 must be more than 0 seconds"),
    ({"BQX_RETRY_SECONDS": "abc"}, "BQX_RETRY_SECONDS='abc' is not a number of seconds"),
    ({"BQX_RETRY_INITIAL_SECONDS": "-1"}, "BQX_RETRY_INITIAL_SECONDS=-1 must be more than 0 seconds"),
]


@pytest.mark.parametrize("env, expected", BAD_RETRY)
def test_merge_bad_retry_settings(tmp_path, env, expected):
    proc = _merge("gs://bqx-nowhere/ck", str(tmp_path / "o.parquet"), env={**NO_GCS, **env})
    assert proc.returncode == 2
    assert _error_line(proc) == f"error: {expected}"
    assert os.listdir(tmp_path) == []


def test_extract_bad_retry_settings(warehouse, tmp_path):
    env, expected = BAD_RETRY[1]
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", "gs://bqx-nowhere/ck", env={**NO_GCS, **env},
                      timeout=120)
    assert proc.returncode == 2
    assert _error_line(proc) == f"error: {expected}"
    assert os.listdir(tmp_path) == []


def test_merge_refuses_spine_keys_that_disagree_with_the_manifest(ck, tmp_path):
    """The merge writes each row group's key column from the spine keys it reads at the
    start, cut by the manifest's row counts. Keys that disagree with those counts (a
    targets shard rewritten after the preflight, which checked them) are refused before
    anything is written, not cut wrong. The preflight is skipped here by calling the
    row-group loop directly with the manifest's count changed in memory."""
    from pipelines.merge import budget, job
    from pipelines.merge.join_polars import PolarsJoin

    manifest = checkpoints.load_manifest(ck, PAIR)
    manifest.targets["shards"][0]["rows"] += 1
    out = str(tmp_path / "o.parquet")
    size = budget.parse_size(budget.DEFAULT_BUDGET)
    with pytest.raises(PipelineError, match=r"spine of eurusd changed since the preflight: "
                                            r"its shards hold (\d+) keys, the manifest (?!\1)\d+"):
        job._merge_row_groups(manifest, manifest.specs(), job.output_schema(manifest), out,
                              PolarsJoin, budget.ROW_GROUP_ROWS, size, budget.batch_bytes(size),
                              str(tmp_path))
    assert not os.path.exists(out)
