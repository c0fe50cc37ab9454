"""Tests for pipelines.validate: small training files written with pyarrow in tmp_path."""
from __future__ import annotations

import json
import math
import os

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.errors import PipelineError
from pipelines.validate import (KeyDigest, Report, default_report_path, key_digest, main,
                                validate_file)

ROWS = 300
ROW_GROUP = 70  # 5 row groups: 70, 70, 70, 70, 20
START_US = 1736121600 * 1_000_000  # 2025-01-06T00:00:00Z
MINUTE_US = 60_000_000
TARGETS = ["target_bqx45_h15", "target_bqx45_h30", "target_bqx90_h15"]
# (table, stem, group, n columns)
TABLES = [
    ("reg_eurusd", "reg", "pair", 3),
    ("agg_eurusd", "agg", "pair", 2),
    ("tri_agg_eur", "tri_agg_eur", "tri", 4),
    ("mkt_vol", "mkt_vol", "mkt", 2),
    ("var_usd", "var_usd", "var", 3),
    ("csi_eur", "csi_eur", "csi", 3),
]
N_FEATURES = sum(t[3] for t in TABLES)  # 17 -> 21 columns with key and targets


def default_keys(rows=ROWS):
    return START_US + MINUTE_US * np.arange(rows, dtype=np.int64)


def digest_of(keys_us):
    """Independent digest: crc32c over little-endian int64 microseconds."""
    return f"{google_crc32c.value(np.asarray(keys_us, dtype='<i8').tobytes()):08x}"


def build_table(keys_us=None, rows=ROWS):
    """Key, targets and features with known NULLs and infinities.

    NULLs: target_bqx45_h30 has 30 (10%); every tri column is NULL on even rows (50%,
    family above the 10% warning line); reg_c1 has 6. Infinities: reg_c0 has 2 +inf and
    1 -inf; csi_eur_c2 has 1 -inf.
    """
    keys_us = default_keys(rows) if keys_us is None else np.asarray(keys_us, dtype=np.int64)
    rng = np.random.default_rng(7)
    cols = {"interval_time": pa.array(keys_us, pa.int64()).cast(pa.timestamp("us", tz="UTC"))}
    for t in TARGETS:
        v = rng.normal(size=rows)
        mask = np.zeros(rows, bool)
        if t == "target_bqx45_h30":
            mask[-30:] = True
        cols[t] = pa.array(v, pa.float64(), mask=mask)
    for table, stem, group, n in TABLES:
        for c in range(n):
            name = f"{stem}_c{c}"
            v = rng.normal(size=rows)
            mask = np.zeros(rows, bool)
            if group == "tri":
                mask[::2] = True
            if name == "reg_c1":
                mask[[3, 50, 70, 71, 150, 299]] = True
            if name == "reg_c0":
                v[[5, 100]] = np.inf
                v[200] = -np.inf
            if name == "csi_eur_c2":
                v[10] = -np.inf
            cols[name] = pa.array(v, pa.float64(), mask=mask)
    return pa.table(cols)


def training_meta(table, **overrides):
    keys = table.column("interval_time").cast(pa.int64()).fill_null(0).to_numpy()
    meta = {
        "format": 1, "pair": "eurusd", "method": "polars",
        "window": {"start": "2025-01-06T00:00:00+00:00", "end": "2025-01-07T00:00:00+00:00"},
        "key": "interval_time",
        "spine_rows": table.num_rows,
        "spine_digest": digest_of(keys),
        "targets": list(TARGETS),
        "tables": [{"table": t, "stem": s, "group": g, "columns": n} for t, s, g, n in TABLES],
    }
    meta.update(overrides)
    return meta


def write(path, table, meta=None, row_group_size=ROW_GROUP):
    if meta is not None:
        table = table.replace_schema_metadata({"bqx.training": json.dumps(meta)})
    pq.write_table(table, path, row_group_size=row_group_size)
    return path


@pytest.fixture
def good(tmp_path):
    table = build_table()
    return write(tmp_path / "training_eurusd.parquet", table, training_meta(table))


def failures_text(report):
    return "\n".join(report.hard_failures)


# ------------------------------------------------------------------------- digest

def test_key_digest_matches_independent_crc_and_ignores_chunking():
    keys = default_keys()
    arr = pa.array(keys, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    whole = KeyDigest().update(arr).hexdigest()
    assert whole == digest_of(keys)
    state = None
    for i in range(0, ROWS, 70):
        state = key_digest(state, arr.slice(i, 70))
    assert state.hexdigest() == whole
    chunked = pa.chunked_array([arr.slice(0, 10), arr.slice(10)])
    assert KeyDigest().update(chunked).hexdigest() == whole
    # Another unit is converted to microseconds first.
    ns = arr.cast(pa.timestamp("ns", tz="UTC"))
    assert KeyDigest().update(ns).hexdigest() == whole


def test_key_digest_refuses_non_timestamps():
    with pytest.raises(TypeError):
        KeyDigest().update(pa.array([1, 2, 3]))


# ------------------------------------------------------------------------- valid file

def test_valid_file_passes_with_exact_numbers(good):
    assert pq.ParquetFile(good).num_row_groups == 5
    r = validate_file(good)
    assert r.ok, r.hard_failures
    assert r.hard_failures == []
    assert r.rows == ROWS and r.columns == 1 + len(TARGETS) + N_FEATURES and r.row_groups == 5
    assert r.layout == "bqx.training" and r.pair == "eurusd"
    assert r.key_min == "2025-01-06T00:00:00+00:00"
    assert r.key_max == "2025-01-06T04:59:00+00:00"
    assert r.key_digest == digest_of(default_keys())
    assert r.footer_bytes > 0 and r.file_bytes > r.footer_bytes

    fam = r.families
    assert list(fam) == ["targets", "pair", "tri", "mkt", "var", "csi"]
    assert fam["targets"] == {"tables": 1, "columns": 3, "cells": 900, "nulls": 30,
                              "null_rate": 30 / 900, "infinities": 0}
    assert fam["pair"]["tables"] == 2 and fam["pair"]["columns"] == 5
    assert fam["pair"]["nulls"] == 6 and fam["pair"]["null_rate"] == 6 / 1500
    assert fam["tri"]["nulls"] == 600 and fam["tri"]["null_rate"] == 0.5
    assert fam["mkt"]["nulls"] == 0 and fam["csi"]["tables"] == 1
    assert r.target_null_rates == {"target_bqx45_h15": 0.0, "target_bqx45_h30": 0.1,
                                   "target_bqx90_h15": 0.0}
    assert r.infinities == {"total": 4, "by_family": {"targets": 0, "pair": 3, "tri": 0,
                                                      "mkt": 0, "var": 0, "csi": 1}}
    assert [t["table"] for t in r.tables] == [t[0] for t in TABLES]
    assert r.tables[2]["null_rate"] == 0.5 and r.tables[0]["infinities"] == 3
    # Warnings, not failures: the NULL-heavy family and the infinities.
    assert any("family tri" in w and "50.00%" in w for w in r.warnings)
    assert not any("family pair" in w for w in r.warnings)
    assert any("4 infinite" in w for w in r.warnings)


def test_column_batches_of_three_give_the_same_report(good):
    small = validate_file(good, columns_per_batch=3).to_dict()
    one = validate_file(good, columns_per_batch=1).to_dict()
    big = validate_file(good).to_dict()
    assert small == big == one


def test_the_library_refuses_bad_arguments_before_opening_anything(good, tmp_path):
    """Unknown expected keys and fewer than one column per read are the caller's
    mistakes, for a file, a training set in parts and a comparison alike."""
    from pipelines.validate import compare_files, validate_training_set

    for call in (lambda **kw: validate_file(good, **kw),
                 lambda **kw: validate_training_set(tmp_path / "no-such-set", **kw)):
        with pytest.raises(ValueError, match="columns_per_batch must be at least 1"):
            call(columns_per_batch=0)
        with pytest.raises(ValueError, match=r"unknown expected keys \['rows'\]"):
            call(expected={"rows": 3})
    with pytest.raises(ValueError, match="columns_per_batch must be at least 1"):
        compare_files(good, good, columns_per_batch=0)


def test_reads_are_row_group_by_row_group_in_column_batches(good, monkeypatch):
    calls = []
    orig = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        calls.append((i, list(columns) if columns is not None else None))
        return orig(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    monkeypatch.setattr(pq.ParquetFile, "read", lambda *a, **k: pytest.fail("whole read"))
    assert validate_file(good, columns_per_batch=3).ok
    assert all(cols is not None and len(cols) <= 3 for _, cols in calls)
    # Each row group: the key, then ceil(20 / 3) = 7 batches covering every column once.
    for rg in range(5):
        cols = [c for i, cs in calls if i == rg for c in cs]
        assert sorted(cols) == sorted(pq.ParquetFile(good).schema_arrow.names)
    assert len(calls) == 5 * (1 + 7)


def test_cli_pass_writes_report_beside_file(good, capsys):
    assert main([str(good)]) == 0
    out = capsys.readouterr().out
    report_path = good.parent / "training_eurusd.validation.json"
    assert default_report_path(str(good)) == str(report_path)
    data = json.loads(report_path.read_text())
    assert data["ok"] is True and data["hard_failures"] == []
    assert data["rows"] == ROWS and data["columns"] == 21
    assert data["families"]["tri"]["null_rate"] == 0.5
    assert data["target_null_rates"]["target_bqx45_h30"] == 0.1
    assert data["infinities"]["total"] == 4 and data["infinities"]["by_family"]["csi"] == 1
    assert "300 rows x 21 columns" in out
    assert "5 row groups" in out
    assert "target_bqx45_h30  10.00%" in out
    assert "2025-01-06T00:00:00+00:00 .. 2025-01-06T04:59:00+00:00" in out
    assert out.rstrip().splitlines()[-2] == "PASS"
    # No temp files left behind.
    assert sorted(p.name for p in good.parent.iterdir()) == [
        "training_eurusd.parquet", "training_eurusd.validation.json"]


@pytest.mark.parametrize("mode", [[], ["--compare", "SELF"]])
def test_cli_refuses_a_column_count_below_one_in_one_line(good, capsys, mode):
    """Validating and comparing alike: exit 2 (bad input, not a failed file), one line
    naming the option, no traceback and no report written."""
    args = [str(good), "--columns-per-batch", "0"] + [str(good) if a == "SELF" else a for a in mode]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == "error: --columns-per-batch 0: must be at least 1\n"
    assert not os.path.exists(default_report_path(str(good)))


def test_cli_report_option_and_quiet(good, tmp_path, capsys):
    target = tmp_path / "elsewhere.json"
    assert main([str(good), "--report", str(target), "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == "PASS"
    assert json.loads(target.read_text())["ok"] is True
    assert not (good.parent / "training_eurusd.validation.json").exists()


# ------------------------------------------------------------------------- hard failures

def test_duplicate_key_within_row_group(tmp_path):
    keys = default_keys()
    keys[11] = keys[10]
    keys[11:] = np.maximum.accumulate(keys[11:])  # still ascending apart from the tie
    table = build_table(keys)
    path = write(tmp_path / "t.parquet", table, training_meta(table))
    r = validate_file(path)
    assert not r.ok
    assert r.duplicate_keys == 1 and r.unordered_keys == 0
    assert "1 duplicate key(s)" in failures_text(r) and "row 11" in failures_text(r)


def test_duplicate_key_across_row_group_boundary(tmp_path):
    keys = default_keys()
    keys[ROW_GROUP] = keys[ROW_GROUP - 1]  # first row of group 1 repeats last of group 0
    table = build_table(keys)
    path = write(tmp_path / "t.parquet", table, training_meta(table))
    assert pq.ParquetFile(path).metadata.row_group(0).num_rows == ROW_GROUP
    for batch in (3, 2000):
        r = validate_file(path, columns_per_batch=batch)
        assert r.duplicate_keys == 1 and r.unordered_keys == 0
        assert f"row {ROW_GROUP}" in failures_text(r)
        assert not r.ok


def test_keys_out_of_order(tmp_path):
    keys = default_keys()
    keys[[40, 41]] = keys[[41, 40]]
    keys[[139, 140]] = keys[[140, 139]]  # straddles the boundary of groups 1 and 2
    table = build_table(keys)
    path = write(tmp_path / "t.parquet", table, training_meta(table))
    r = validate_file(path)
    assert not r.ok and r.unordered_keys == 2 and r.duplicate_keys == 0
    assert "out of ascending order" in failures_text(r)
    assert "row 41" in failures_text(r)


def test_step_back_across_row_group_boundary(tmp_path):
    keys = default_keys()
    keys[ROW_GROUP:] -= 5 * MINUTE_US  # group 1 starts before group 0 ends
    table = build_table(keys)
    path = write(tmp_path / "t.parquet", table, training_meta(table))
    r = validate_file(path)
    assert r.unordered_keys == 1 and f"row {ROW_GROUP}" in failures_text(r)


def test_null_keys(tmp_path):
    table = build_table()
    keys = pa.array(default_keys(), pa.int64(), mask=np.arange(ROWS) == 5)
    table = table.set_column(0, "interval_time", keys.cast(pa.timestamp("us", tz="UTC")))
    path = write(tmp_path / "t.parquet", table, training_meta(table))
    r = validate_file(path)
    assert r.key_nulls == 1 and "NULL value(s) in key" in failures_text(r)
    assert r.duplicate_keys == 0 and r.unordered_keys == 0


def test_missing_target(tmp_path):
    table = build_table()
    meta = training_meta(table)
    table = table.drop_columns(["target_bqx90_h15"])
    path = write(tmp_path / "t.parquet", table, meta)
    r = validate_file(path)
    assert not r.ok
    assert "1 expected target(s) missing: target_bqx90_h15" in failures_text(r)


def test_row_count_differs_from_spine_rows(tmp_path):
    table = build_table()
    path = write(tmp_path / "t.parquet", table, training_meta(table, spine_rows=301))
    r = validate_file(path)
    assert not r.ok and "row count 300 != spine_rows 301" in failures_text(r)
    # expected takes precedence over the file's metadata, both ways.
    assert validate_file(path, expected={"spine_rows": 300}).ok
    good = write(tmp_path / "g.parquet", table, training_meta(table))
    assert "!= spine_rows 299" in failures_text(validate_file(good, expected={"spine_rows": 299}))


def test_wrong_digest(tmp_path):
    table = build_table()
    path = write(tmp_path / "t.parquet", table, training_meta(table, spine_digest="deadbeef"))
    r = validate_file(path)
    assert not r.ok and "!= spine_digest deadbeef" in failures_text(r)
    # Same rows, shifted keys: the count passes, the digest catches it.
    shifted = build_table(default_keys() + MINUTE_US)
    right = training_meta(table)["spine_digest"]
    p2 = write(tmp_path / "s.parquet", shifted, training_meta(shifted))
    assert not validate_file(p2, expected={"spine_digest": right}).ok
    assert validate_file(path, expected={"spine_digest": right.upper()}).ok


def test_column_count_mismatch(tmp_path):
    table = build_table()
    meta = training_meta(table)
    meta["tables"][3]["columns"] = 3  # mkt_vol really has 2
    path = write(tmp_path / "t.parquet", table, meta)
    r = validate_file(path)
    assert not r.ok
    assert "column count mismatch: the file has 21 columns" in failures_text(r)
    assert "metadata describes 22" in failures_text(r)
    # The positional walk shows where the layout drifts.
    assert "columns of table mkt_vol do not follow the metadata" in failures_text(r)


def test_extra_column_beyond_metadata(tmp_path):
    table = build_table()
    meta = training_meta(table)
    table = table.append_column("csi_eur_c3", pa.array(np.zeros(ROWS)))
    r = validate_file(write(tmp_path / "t.parquet", table, meta))
    assert "column count mismatch" in failures_text(r)
    assert r.families["unassigned"]["columns"] == 1


def test_key_not_first_and_key_missing(tmp_path):
    table = build_table()
    meta = training_meta(table)
    moved = table.select([1, 0] + list(range(2, table.num_columns)))
    r = validate_file(write(tmp_path / "a.parquet", moved, meta))
    assert "'interval_time' is column 1, not the first column" in failures_text(r)
    gone = table.drop_columns(["interval_time"])
    r = validate_file(write(tmp_path / "b.parquet", gone, meta))
    assert "key column 'interval_time' is missing" in failures_text(r)


def test_wrong_pair(good):
    r = validate_file(good, expected={"pair": "gbpusd"})
    assert "file is for pair 'eurusd', expected 'gbpusd'" in failures_text(r)
    with pytest.raises(ValueError):
        validate_file(good, expected={"spine_row": 1})


def test_cli_fail_exit_1_lists_every_failure(tmp_path, capsys):
    keys = default_keys()
    keys[ROW_GROUP] = keys[ROW_GROUP - 1]
    table = build_table(keys)
    meta = training_meta(table, spine_rows=299, targets=TARGETS + ["target_bqx2880_h105"])
    path = write(tmp_path / "training_eurusd.parquet", table, meta)
    assert main([str(path)]) == 1
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "training_eurusd.validation.json").read_text())
    assert report["ok"] is False and len(report["hard_failures"]) >= 3
    assert "FAIL (" in out
    for failure in report["hard_failures"]:
        assert f"  - {failure}" in out.splitlines()
    assert main([str(path), "--quiet"]) == 1
    quiet = capsys.readouterr().out
    assert quiet.startswith("FAIL (") and "row count 300 != spine_rows 299" in quiet


# ------------------------------------------------------------------------- no metadata

def test_file_without_metadata_validates_with_warning(tmp_path):
    path = write(tmp_path / "plain.parquet", build_table())
    r = validate_file(path)
    assert r.ok, r.hard_failures
    assert r.layout == "unknown"
    assert any("no bqx.training metadata" in w for w in r.warnings)
    assert r.families["targets"]["columns"] == 3 and r.families["targets"]["nulls"] == 30
    assert r.families["reg"]["tables"] is None and r.families["reg"]["columns"] == 3
    assert r.families["tri"]["null_rate"] == 0.5
    assert set(r.target_null_rates) == set(TARGETS)
    assert "layout unknown" in r.summary()


def test_file_without_metadata_or_targets_fails(tmp_path):
    table = build_table().drop_columns(TARGETS)
    r = validate_file(write(tmp_path / "plain.parquet", table))
    assert not r.ok and "no target column" in failures_text(r)


# ------------------------------------------------------------------------- exit 2

def test_missing_file_exit_2(tmp_path, capsys):
    missing = tmp_path / "nope.parquet"
    assert main([str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and str(missing) in err
    with pytest.raises(PipelineError):
        validate_file(missing)


def test_non_parquet_file_exit_2(tmp_path, capsys):
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("interval_time,target\n2025-01-06,1.0\n")
    assert main([str(bogus)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(bogus) in err and "not a parquet file" in err
    assert not (tmp_path / "bogus.validation.json").exists()


def test_truncated_parquet_exit_2(good, tmp_path, capsys):
    data = good.read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(data[:4] + data[-8:])  # magic bytes right, footer gone
    assert main([str(cut)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(cut) in err


def test_report_roundtrips_as_json(good, tmp_path):
    r = validate_file(good)
    out = tmp_path / "r.json"
    r.write_json(out)
    data = json.loads(out.read_text())
    assert data == json.loads(json.dumps(r.to_dict()))
    assert set(data) >= {"ok", "hard_failures", "warnings", "rows", "columns", "row_groups",
                         "footer_bytes", "file_bytes", "families", "target_null_rates",
                         "infinities", "key_min", "key_max"}
    assert all(not (isinstance(v, float) and math.isnan(v))
               for st in data["families"].values() for v in st.values())
    assert isinstance(r, Report)


def test_reads_are_bounded_by_bytes_whatever_the_rows(tmp_path, monkeypatch):
    """By default a read decodes about READ_BYTES of values, so a long file is read in
    batches of fewer columns (2,000 columns of 100,000 rows were 1.6 GB per read), and
    the report is the same as with any explicit column count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.validate import MAX_COLUMNS_PER_READ, READ_BYTES, columns_per_read

    assert columns_per_read(100_000) == 20 and columns_per_read(100_000) * 100_000 * 8 <= READ_BYTES
    assert columns_per_read(10) == MAX_COLUMNS_PER_READ and columns_per_read(10**9) == 16
    assert columns_per_read(1_000, 64_000) == 16 and columns_per_read(1_000, 800_000) == 100

    path = str(tmp_path / "long.parquet")
    rows = 300_000  # 2.4 MB a column: 16 columns a read by default
    keys = pa.array(np.arange(rows, dtype="int64") * 60_000_000).cast(pa.timestamp("us", tz="UTC"))
    columns = {"interval_time": keys, "target_a": pa.array(np.ones(rows))}
    columns.update({f"f_{i:02d}": pa.array(np.full(rows, float(i))) for i in range(40)})
    pq.write_table(pa.table(columns), path, row_group_size=rows)
    from pipelines import validate

    read, widths = validate._read, []

    def counted(pf, rg, columns, path):  # observes the reads; every read is real
        widths.append(len(columns))
        return read(pf, rg, columns, path)

    monkeypatch.setattr(validate, "_read", counted)
    default = validate_file(path).to_dict()
    assert max(widths) == 16 and sum(widths) == 1 + 41  # the key, then 41 columns
    explicit = validate_file(path, columns_per_batch=MAX_COLUMNS_PER_READ).to_dict()
    assert max(widths) == 41
    assert default == explicit and default["rows"] == rows
