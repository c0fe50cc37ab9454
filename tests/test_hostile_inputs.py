"""Hostile and broken input: every case gets one ``error:`` line naming the culprit, a
non-zero exit, and nothing lost or half-written.

The corpus, case by case, and the tests that cover it (``bad`` = tests/test_bad_inputs.py,
``here`` = this file; "nothing lost or half-written" is checked by comparing every file's
size and CRC32C before and after, or that nothing was committed):

* unknown or malformed pair
    bad::test_extract_refuses_bad_pairs, here::test_merge_refuses_bad_pairs
* a pair that tries to leave its folder (``../../x``)
    bad::test_extract_refuses_bad_pairs, here::test_merge_refuses_bad_pairs
* a table name from INFORMATION_SCHEMA that tries to leave its folder
    here::test_table_name_that_leaves_its_folder
* a targets table name (catalog) that tries to leave its folder
    here::test_catalog_targets_table_that_leaves_its_folder
* a hand-edited manifest whose shard path is ``../../x``, absolute, ``./``, or another
  table's file (a valid copy of the shard waits where it points)
    here::test_manifest_shard_path_cannot_leave_the_root
* gs:// URIs with ``.``/``..`` segments (checkpoint root, output, validated file)
    here::test_gcs_paths_with_dot_segments_are_refused, here::test_check_gcs_path
* a checkpoint root that is a file
    here::test_checkpoint_root_that_is_a_file
* table names with quotes, backticks, semicolons, SQL
    bad::test_malformed_table_name_in_the_warehouse,
    here::test_hostile_names_in_listings_are_refused
* column names (features and targets) with quotes, backticks, semicolons, SQL
    here::test_hostile_column_name_in_the_warehouse,
    here::test_hostile_names_in_listings_are_refused,
    tests/test_query_builder_properties.py (the query builder itself)
* hostile names, types or counts in a hand-edited manifest
    here::test_manifest_edited_by_hand_is_malformed,
    here::test_manifest_edited_by_hand_is_refused_by_the_merge
* a missing targets table
    bad::test_extract_pair_without_targets
* an empty table (feature table; targets table)
    here::test_empty_feature_table_is_refused, here::test_empty_targets_table_is_refused
* a table whose schema changes between shards
    here::test_merge_refuses_a_shard_with_another_schema,
    here::test_schema_change_during_extraction,
    bad::test_column_type_changed_since_discovery_is_redone_not_mixed
* a column whose type changes
    bad::test_column_type_changed_since_discovery_is_redone_not_mixed,
    bad::test_merge_refuses_schema_drift_even_with_a_forged_record,
    here::test_schema_change_during_extraction
* keys from 1970: never extracted, counted per table as ``bad_keys_dropped`` on the
  window's first shard (README, "Bad keys"); a window ending before the catalog's
  ``min_valid_key`` is refused, one starting before it starts there
    here::test_1970_keys_are_dropped_and_counted, here::test_window_before_2000_is_refused,
    here::test_window_starting_before_2000_is_clipped
* duplicate keys with ``--on-duplicate-keys=error``
    bad::test_duplicate_keys_with_error_policy
* two columns that collide after prefixing (also when only letter case differs)
    here::test_columns_colliding_after_prefixing, here::test_collisions_ignore_letter_case
* a truncated or corrupted checkpoint (also with its record and manifest forged to match)
    bad::test_merge_refuses_damaged_checkpoints,
    here::test_corrupt_pages_with_forged_checksums,
    here::test_truncated_checkpoint_with_forged_checksums
* a manifest edited by hand (checksums changed): the manifest is named, not the shard
    here::test_manifest_with_edited_checksums
* an output path that already holds a file, or is a folder
    bad::test_merge_does_not_overwrite_without_flag, here::test_output_that_is_a_folder

A local ``--output`` or ``--checkpoint-root`` with ``..`` is the user's own choice of
folder and is resolved like any path; what is refused is a path built from input (pair,
table names, manifest entries) that would leave its root, and any ``gs://`` path with
``.``/``..`` segments (object names are not resolved like folders).
"""
import datetime as dt
import json
import os
import re
import shutil

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import PAIR, run_module
from pipelines import checkpoints, storage
from pipelines.catalog import DEFAULT_CATALOG, load_catalog, plan_tables
from pipelines.errors import PipelineError
from pipelines.extract.plan import clip_window, make_plan
from pipelines.extract.transforms import extract_shard
from pipelines.sources import DuckDBSource
from pipelines.window import UTC, Window, window_from_dates

FEATURES = "bqx_ml_v3_features_v2"
TARGETS = "bqx_ml_v3_analytics_v2"
TS = ("interval_time", "TIMESTAMP")


# --------------------------------------------------------------------------- helpers

def _error_line(proc) -> str:
    """The one ``error:`` line of a failed run (and its exit status is 2)."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, proc.stderr
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _listing(folder) -> dict:
    """Every file under ``folder`` (temporaries too) with its size and CRC32C."""
    out = {}
    for parent, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(parent, name)
            out[os.path.relpath(path, folder)] = (os.path.getsize(path), storage.crc32c(path))
    return out


def _extract(source: str, root: str, *extra: str):
    return run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{source}",
                      "--checkpoint-root", root, "--shard-days", "1", *extra)


def _merge(root: str, out: str, *extra: str, pair: str = PAIR):
    return run_module("pipelines.merge", "--pair", pair, "--checkpoint-root", root,
                      "--output", out, *extra)


@pytest.fixture
def ck(extracted, tmp_path) -> str:
    """A private copy of the committed extraction to break."""
    root = str(tmp_path / "ck")
    shutil.copytree(extracted, root)
    return root


@pytest.fixture
def broken(warehouse, tmp_path):
    """``broken(*statements)``: a private copy of the warehouse with SQL run on it."""
    def make(*statements: str) -> str:
        path = str(tmp_path / "broken.duckdb")
        shutil.copy(warehouse, path)
        con = duckdb.connect(path)
        for statement in statements:
            con.execute(statement)
        con.close()
        return path
    return make


def _manifest_file(root: str) -> str:
    return checkpoints.manifest_path(root, PAIR, checkpoints.find_windows(root, PAIR)[0])


def _edit_manifest(root: str, edit) -> None:
    path = _manifest_file(root)
    data = json.loads(storage.read_bytes(path))
    edit(data)
    storage.write_bytes(path, json.dumps(data, indent=1, sort_keys=True).encode())


def _feature_entry(data: dict) -> dict:
    """The first feature table of a manifest's JSON with at least two shards."""
    return data["tables"][1]


def _forge(root: str, shard_path: str, rows: int) -> None:
    """Make the commit record and the manifest agree with ``shard_path`` as it is now."""
    nbytes, crc = storage.size(shard_path), storage.crc32c(shard_path)
    record = json.loads(storage.read_bytes(checkpoints.record_path(shard_path)))
    record.update(bytes=nbytes, crc32c=crc, rows=rows)
    checkpoints.write_record(checkpoints.record_path(shard_path), record)

    def edit(data):
        for table in data["tables"]:
            for shard in table["shards"]:
                if os.path.join(root, *shard["path"].split("/")) == shard_path:
                    table["rows"] += rows - shard["rows"]
                    shard.update(bytes=nbytes, crc32c=crc, rows=rows)
    _edit_manifest(root, edit)


def _refused_merge(root: str, tmp_path, expected: str, *extra: str, pair: str = PAIR) -> str:
    """Run a merge that must be refused; check nothing under ``tmp_path`` changed."""
    before = _listing(tmp_path)
    out = str(tmp_path / "out" / "training.parquet")
    line = _error_line(_merge(root, out, *extra, pair=pair))
    assert expected in line, line
    assert _listing(tmp_path) == before
    return line


# --------------------------------------------------------------------------- pairs and paths

@pytest.mark.parametrize("pair, expected", [
    ("usdeur", "unknown pair 'usdeur'"),
    ("eurusd\n", "malformed pair 'eurusd\\n'"),
    ("../../x", "malformed pair '../../x'"),
])
def test_merge_refuses_bad_pairs(ck, tmp_path, pair, expected):
    _refused_merge(ck, tmp_path, expected, pair=pair)


def test_output_that_is_a_folder(ck, tmp_path):
    folder = tmp_path / "out"
    (folder / "keep.txt").parent.mkdir()
    (folder / "keep.txt").write_text("mine")
    before = _listing(tmp_path)
    line = _error_line(_merge(ck, str(folder), pair=PAIR))
    assert f"output {folder} is a folder" in line, line
    assert _listing(tmp_path) == before


def test_table_name_that_leaves_its_folder(broken, tmp_path):
    source = broken(f'CREATE TABLE {FEATURES}."agg_eurusd_/../../../escaped" AS '
                    f"SELECT * FROM {FEATURES}.agg_eurusd")
    before = _listing(tmp_path)
    line = _error_line(_extract(source, str(tmp_path / "ck")))
    assert "malformed name 'agg_eurusd_/../../../escaped'" in line
    assert _listing(tmp_path) == before


def test_catalog_targets_table_that_leaves_its_folder(ck, tmp_path):
    text = DEFAULT_CATALOG.read_text()
    catalog = tmp_path / "catalog.toml"
    catalog.write_text(text.replace('targets_table = "targets_{pair}"',
                                    'targets_table = "../targets_{pair}"'))
    line = _refused_merge(ck, tmp_path, "malformed name '../targets_eurusd'",
                          "--catalog", str(catalog))
    assert "targets_table" in line


@pytest.mark.parametrize("escape", ["parent", "absolute", "other_table", "dot_segment"])
def test_manifest_shard_path_cannot_leave_the_root(ck, tmp_path, escape):
    """A hand-edited shard path is refused before anything is read, even when a valid
    copy of the shard waits at the place it points to."""
    data = json.loads(storage.read_bytes(_manifest_file(ck)))
    entry = _feature_entry(data)
    real = os.path.join(ck, *entry["shards"][0]["path"].split("/"))
    planted = str(tmp_path / "planted" / "x.parquet")
    os.makedirs(os.path.dirname(planted))
    shutil.copy(real, planted)
    path = {
        "parent": os.path.relpath(planted, ck).replace(os.sep, "/"),
        "absolute": planted,
        "other_table": data["tables"][2]["shards"][0]["path"],
        "dot_segment": entry["shards"][0]["path"].replace("/", "/./", 1),
    }[escape]
    _edit_manifest(ck, lambda d: d["tables"][1]["shards"][0].update(path=path))
    line = _refused_merge(ck, tmp_path, "is malformed")
    assert f"path {path!r} is not one of this table's shard files" in line


def test_gcs_paths_with_dot_segments_are_refused(warehouse, ck, tmp_path):
    """Refused before any request is made: no emulator runs here, and no credentials."""
    env = {"STORAGE_EMULATOR_HOST": ""}
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", "gs://bucket/ck/../other", env=env)
    assert ("gs://bucket/ck/../other: '.' and '..' segments are not allowed in a gs:// path"
            in _error_line(proc))
    _refused_merge("gs://bucket/ck/./x", tmp_path, "gs://bucket/ck/./x: '.' and '..'")
    before = _listing(tmp_path)
    proc = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", ck,
                      "--output", "gs://bucket/training/../../x.parquet", env=env)
    assert "gs://bucket/training/../../x.parquet: '.' and '..'" in _error_line(proc)
    proc = run_module("pipelines.validate", "gs://bucket/training/../x.parquet", env=env)
    assert "gs://bucket/training/../x.parquet: '.' and '..'" in _error_line(proc)
    assert _listing(tmp_path) == before


def test_check_gcs_path():
    for bad in ("gs://b/..", "gs://b/../x", "gs://b/a/./x", "gs://b/a/../../x", "gs://./x"):
        with pytest.raises(PipelineError, match="'.' and '..' segments"):
            storage.check_gcs_path(bad)
    for good in ("gs://b/a..b/x", "gs://b/x/", "gs://b/.hidden/x", "gs://b/x...", "../local"):
        assert storage.check_gcs_path(good) == good


def test_checkpoint_root_that_is_a_file(warehouse, tmp_path):
    root = tmp_path / "ck"
    root.write_bytes(b"not a folder")
    before = _listing(tmp_path)
    assert "checkpoint root" in _error_line(_extract(warehouse, str(root)))
    assert "is not a folder" in _error_line(_merge(str(root), str(tmp_path / "o.parquet")))
    assert _listing(tmp_path) == before


# --------------------------------------------------------------------------- names

def test_hostile_column_name_in_the_warehouse(broken, tmp_path):
    source = broken(f'ALTER TABLE {FEATURES}.agg_eurusd ADD COLUMN "x""; DROP TABLE y; --" DOUBLE')
    before = _listing(tmp_path)
    line = _error_line(_extract(source, str(tmp_path / "ck")))
    assert f"""malformed name 'x"; DROP TABLE y; --' in {FEATURES}.agg_eurusd""" in line
    assert _listing(tmp_path) == before


HOSTILE_NAMES = ["a`b", 'a"b', "a'b", "a;b", "x; DROP TABLE t; --", "a -- b", "a/*b*/",
                 "a b", "agg\n", "a.b", "../x", "é", "a\\b", ""]


@pytest.mark.parametrize("where, name", [
    (where, name) for where in ("feature column", "target column", "table")
    for name in HOSTILE_NAMES if name or where == "feature column"])
def test_hostile_names_in_listings_are_refused(where, name):
    """What INFORMATION_SCHEMA lists is input: a name that is not plain letters, digits
    and '_' is refused by name wherever it would reach SQL or a path."""
    features = {"agg_eurusd": [TS, ("mean", "DOUBLE")]}
    targets = [TS, ("target_a", "DOUBLE")]
    if where == "feature column":
        features["agg_eurusd"].append((name, "DOUBLE"))
    elif where == "target column":
        targets.append(("target_" + name, "DOUBLE"))
        name = "target_" + name
    else:
        name = f"agg_eurusd_{name}"
        features[name] = [TS, ("mean", "DOUBLE")]
    with pytest.raises(PipelineError, match="malformed name") as err:
        plan_tables(load_catalog(), PAIR, features, targets)
    assert repr(name) in str(err.value)


def test_columns_colliding_after_prefixing(broken, tmp_path):
    ts = "SELECT interval_time, 1.0::DOUBLE AS {} FROM " + f"{TARGETS}.targets_eurusd"
    source = broken(f"CREATE TABLE {FEATURES}.zzz_eurusd AS {ts.format('a_b')}",
                    f"CREATE TABLE {FEATURES}.zzz_a_eurusd AS {ts.format('b')}")
    before = _listing(tmp_path)
    line = _error_line(_extract(source, str(tmp_path / "ck")))
    assert (f"output column 'zzz_a_b' comes from both {FEATURES}.zzz_a_eurusd and "
            f"{FEATURES}.zzz_eurusd") in line
    assert _listing(tmp_path) == before


def test_collisions_ignore_letter_case():
    """DuckDB and BigQuery column names are case-insensitive: 'zzz_A_b' is 'zzz_a_b'."""
    features = {"zzz_eurusd": [TS, ("A_b", "DOUBLE")], "zzz_a_eurusd": [TS, ("b", "DOUBLE")]}
    with pytest.raises(PipelineError, match="'zzz_A_b' comes from both .*zzz_a_eurusd "
                                            r"\(as 'zzz_a_b'\) and .*zzz_eurusd"):
        plan_tables(load_catalog(), PAIR, features, [TS, ("target_a", "DOUBLE")])


# --------------------------------------------------------------------------- empty tables

def _no_commit(root: str) -> None:
    """No manifest, success marker or temporary file anywhere under ``root``."""
    files = _listing(root)
    assert not [f for f in files if "manifests" in f or storage.TEMP_MARK in f], files
    # Every shard left is complete: it has its commit record, or is the empty table's.
    for name in files:
        if name.endswith(".json"):
            assert name[:-5] + ".parquet" in files


ONE_DAY = ("--start-date", "2025-01-06", "--end-date", "2025-01-06")


def test_empty_feature_table_is_refused(broken, tmp_path):
    source = broken(f"DELETE FROM {FEATURES}.mkt_breadth")
    root = str(tmp_path / "ck")
    line = _error_line(_extract(source, root, *ONE_DAY))
    assert (f"table {FEATURES}.mkt_breadth has no rows in window 20250106T0000-20250107T0000: "
            "its 8 column(s) would be entirely NULL") in line
    _no_commit(root)
    # Its shards will be read again next time, not trusted as done.
    assert not [f for f in _listing(root) if "mkt_breadth" in f and f.endswith(".json")]


def test_empty_targets_table_is_refused(broken, tmp_path):
    source = broken(f"DELETE FROM {TARGETS}.targets_eurusd")
    root = str(tmp_path / "ck")
    line = _error_line(_extract(source, root))
    assert "targets table targets_eurusd has no rows with interval_time after 2000-01-01" in line
    assert not os.path.exists(root)
    line = _error_line(_extract(source, root, *ONE_DAY))
    assert (f"table {TARGETS}.targets_eurusd has no rows in window "
            "20250106T0000-20250107T0000: the training file would have no rows") in line
    _no_commit(root)


# --------------------------------------------------------------------------- schema changes

def test_merge_refuses_a_shard_with_another_schema(ck, tmp_path):
    """The table's second shard gained a column; its record and the manifest were forged
    to match its bytes."""
    manifest = checkpoints.load_manifest(ck, PAIR)
    shard = manifest.shard_files(manifest.tables[1])[1]
    table = pq.read_table(shard)
    table = table.append_column("agg_extra", pa.array([1.0] * table.num_rows))
    checkpoints.write_shard(table, shard)
    _forge(ck, shard, table.num_rows)
    line = _refused_merge(ck, tmp_path, "has schema drift: unexpected column agg_extra")
    assert os.path.basename(shard) in line


def _plan_then_change(path: str, *statements: str):
    """Plan an extraction of ``path``, then change the source under it."""
    source = DuckDBSource(path)
    try:
        plan = make_plan(source, load_catalog(), PAIR,
                         window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 7)),
                         os.path.join(os.path.dirname(path), "ck"), 1, "drop")
    finally:
        source.close()
    con = duckdb.connect(path)
    for statement in statements:
        con.execute(statement)
    con.close()
    return plan


@pytest.mark.parametrize("change, expected", [
    ("ALTER TABLE {t} DROP COLUMN mean_5", "the source refused the query"),
    ("ALTER TABLE {t} RENAME TO gone", "the source refused the query"),
    ("ALTER TABLE {t} ALTER mean_5 TYPE VARCHAR; UPDATE {t} SET mean_5 = 'n/a'",
     "column type changed: agg_mean_5 is string, expected double"),
])
def test_schema_change_during_extraction(broken, change, expected):
    """The source changes between discovery and a shard's read: that shard fails with
    its table named, and writes nothing."""
    path = broken()
    plan = _plan_then_change(path, change.format(t=f"{FEATURES}.agg_eurusd"))
    task = next(t for t in plan.tasks if t.spec.table == "agg_eurusd")
    source = DuckDBSource(path)
    try:
        with pytest.raises(PipelineError, match=f"{FEATURES}.agg_eurusd shard .*{expected}"):
            extract_shard(source, task, "interval_time", "drop")
    finally:
        source.close()
    assert not os.path.exists(task.path) and not os.path.exists(task.record_path)


# --------------------------------------------------------------------------- 1970 keys

def test_1970_keys_are_dropped_and_counted(warehouse, extracted):
    """The sample's mkt_ tables hold 1970-01-01 keys: none reaches a checkpoint, and each
    table's count of them is on the record of the window's first shard."""
    manifest = checkpoints.load_manifest(extracted, PAIR)
    con = duckdb.connect(warehouse, read_only=True)
    try:
        for entry in manifest.tables:
            in_source = con.execute(
                f"SELECT count(*) FROM {entry['dataset']}.{entry['table']} "
                "WHERE interval_time < TIMESTAMPTZ '2000-01-01 00:00:00+00'").fetchone()[0]
            counted = [s["bad_keys_dropped"] for s in entry["shards"]]
            assert counted == [in_source] + [0] * (len(counted) - 1), entry["table"]
            if entry["table"].startswith("mkt_"):
                assert in_source > 0
    finally:
        con.close()
    assert manifest.totals()["bad_keys_dropped"] > 0
    floor = dt.datetime(2000, 1, 1, tzinfo=UTC)
    for entry in manifest.tables:
        for path in manifest.shard_files(entry):
            keys = pq.read_table(path, columns=["interval_time"]).column(0)
            assert len(keys) == 0 or keys[0].as_py() >= floor


def test_window_before_2000_is_refused(warehouse, tmp_path):
    root = str(tmp_path / "ck")
    line = _error_line(_extract(warehouse, root, "--start-date", "1970-01-01",
                                "--end-date", "1970-01-01"))
    assert "window 1970-01-01 .. 1970-01-01 ends before 2000-01-01" in line
    assert not os.path.exists(root)


def test_window_starting_before_2000_is_clipped():
    window = window_from_dates(dt.date(1970, 1, 1), dt.date(2025, 1, 7))
    clipped = clip_window(window, load_catalog())
    assert clipped == Window(dt.datetime(2000, 1, 1, tzinfo=UTC), window.end)


# --------------------------------------------------------------------------- damaged checkpoints

def test_corrupt_pages_with_forged_checksums(ck, tmp_path):
    """Bytes flipped inside a shard, with its record and the manifest rewritten to the
    new CRC32C: the page checksums still catch it while merging, and nothing is
    published."""
    manifest = checkpoints.load_manifest(ck, PAIR)
    shard = manifest.shard_files(manifest.tables[1])[0]
    rows = pq.read_metadata(shard).num_rows
    with open(shard, "r+b") as fh:
        fh.seek(storage.size(shard) // 2)
        fh.write(b"\xde\xad\xbe\xef" * 4)
    _forge(ck, shard, rows)
    line = _refused_merge(ck, tmp_path, "is corrupt")
    assert os.path.basename(shard) in line and "agg_eurusd" in line


def test_truncated_checkpoint_with_forged_checksums(ck, tmp_path):
    manifest = checkpoints.load_manifest(ck, PAIR)
    shard = manifest.shard_files(manifest.tables[1])[0]
    rows = pq.read_metadata(shard).num_rows
    os.truncate(shard, storage.size(shard) // 2)
    _forge(ck, shard, rows)
    line = _refused_merge(ck, tmp_path, "is not readable parquet")
    assert os.path.basename(shard) in line


@pytest.mark.parametrize("field, value", [("crc32c", "0badf00d"), ("bytes", 12345),
                                          ("rows", 7)])
def test_manifest_with_edited_checksums(ck, tmp_path, field, value):
    """The manifest disagrees with a shard that its own commit record vouches for: the
    manifest is named as the culprit, not the shard."""
    def edit(data):
        shard = _feature_entry(data)["shards"][0]
        if field == "rows":
            _feature_entry(data)["rows"] += value - shard["rows"]
        shard[field] = value
    _edit_manifest(ck, edit)
    line = _refused_merge(ck, tmp_path, f"lists {field} {value!r} for checkpoint")
    assert "the manifest was edited by hand or is stale" in line
    assert _manifest_file(ck) in line


def _drop(key):
    return lambda d: _feature_entry(d)["shards"][0].pop(key)


@pytest.mark.parametrize("edit, expected", [
    (_drop("crc32c"), "crc32c None is not 8 lower-case hex digits"),
    (_drop("rows"), "shards[0].rows is not a non-negative integer"),
    (lambda d: _feature_entry(d)["shards"][0].update(bytes="12"),
     "shards[0].bytes is not a non-negative integer"),
    (lambda d: _feature_entry(d)["shards"].pop(), "not the window's end"),
    (lambda d: _feature_entry(d).update(rows=1), "is not the sum of its shards' rows"),
    (lambda d: d["window"].update(start="2025-01-05T00:00:00+00:00"), "its window"),
    (lambda d: _feature_entry(d)["columns"][0].__setitem__(1, 'x"; DROP TABLE t; --'),
     """malformed name 'x"; DROP TABLE t; --'"""),
    (lambda d: _feature_entry(d).update(table="../../etc"), "malformed name '../../etc'"),
    (lambda d: _feature_entry(d)["columns"][0].__setitem__(2, "BLOB"), "has type 'BLOB'"),
    (lambda d: d["tables"].append(d["tables"][1]), "comes from both"),
    (lambda d: d["tables"].reverse(), "tables[0] is not the targets table"),
    (lambda d: d.update(key="interval time"), "malformed name 'interval time'"),
])
def test_manifest_edited_by_hand_is_malformed(ck, tmp_path, edit, expected):
    _edit_manifest(ck, edit)
    with pytest.raises(PipelineError, match="is malformed: .*" + re.escape(expected)):
        checkpoints.load_manifest(ck, PAIR)


def test_manifest_edited_by_hand_is_refused_by_the_merge(ck, tmp_path):
    _edit_manifest(ck, _drop("crc32c"))
    line = _refused_merge(ck, tmp_path, "is malformed")
    assert _manifest_file(ck) in line and "re-run the extract job" in line

