"""The bigquery merge: column parts, SQL, dry run (pure), and the whole merge against the
BigQuery and GCS emulators (``--staging load``; the emulator reads external tables as 0 rows)."""
from __future__ import annotations

import datetime as dt
import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import sqlglot
from sqlglot import exp

from conftest import run_module
from emulators import bq_emulator, gcs_emulator  # noqa: F401 (fixtures)
from pipelines import checkpoints
from pipelines.catalog import Column, TableSpec
from pipelines.checkpoints import Manifest, spec_to_json
from pipelines.errors import PipelineError
from pipelines.merge import bigquery as bqm
from pipelines.window import Window

KEY = "interval_time"
PAIR = "eurusd"
UTC = dt.timezone.utc


# --------------------------------------------------------------------------- pure

def _specs(total_columns: int = 17_038, sizes=(232, 64, 43, 42, 31, 15, 12, 8, 118, 98, 128, 22)):
    """Targets (49) + feature tables with the workload's column mix: key + all = total."""
    specs = [TableSpec("bqx_ml_v3_analytics_v2", f"targets_{PAIR}", "targets", False,
                       f"targets_{PAIR}", tuple(Column(f"target_{i}", f"target_bqx{i}_h15",
                                                       "FLOAT64") for i in range(49)))]
    left, t = total_columns - 1 - 49, 0
    while left:
        n = min(sizes[t % len(sizes)], left)
        specs.append(TableSpec("bqx_ml_v3_features_v2", f"tbl{t}_{PAIR}", "pair", False,
                               f"tbl{t}", tuple(Column(f"c{j}", f"tbl{t}_col_{j}", "FLOAT64")
                                                for j in range(n))))
        left -= n
        t += 1
    return specs


def _manifest(specs, rows=1000, root="gs://bqx-test/ck"):
    window = Window(dt.datetime(2025, 1, 6, tzinfo=UTC), dt.datetime(2025, 1, 8, tzinfo=UTC))
    tables = []
    for s in specs:
        entry = spec_to_json(s)
        entry["rows"] = rows
        entry["shards"] = [{"path": f"pairs/{PAIR}/{s.table}/20250106T0000-20250107T0000.parquet",
                            "rows": rows, "bytes": 1, "key_min": "2025-01-06T00:00:00+00:00",
                            "key_max": "2025-01-06T16:39:00+00:00"}]
        tables.append(entry)
    return Manifest(PAIR, window, KEY, root, tables)


def _ref(i):
    return bqm.table_ref("bqx-ml", "bqx_merge_scratch", f"bqx_merge_{PAIR}_run_{i:03d}")


def test_17038_columns_split_into_two_parts_of_whole_tables_in_order():
    specs = _specs()
    assert 1 + sum(len(s.columns) for s in specs) == 17_038
    parts = bqm.split_parts(specs, KEY)
    assert len(parts) == 2
    for p in parts:
        assert len(p.columns) <= bqm.MAX_COLUMNS and p.columns[0] == KEY
        assert p.tables[0] == 0  # the spine is in every part
    # Whole tables, each in exactly one part, in order; columns concatenate to the file's.
    feature_tables = [i for p in parts for i in p.tables[1:]]
    assert feature_tables == list(range(1, len(specs)))
    for p in parts:
        expected = [KEY] + (specs[0].output_names if p.index == 0 else [])
        for i in p.tables[1:]:
            expected += specs[i].output_names
        assert p.columns == expected
    whole = [KEY] + [c for s in specs for c in s.output_names]
    assert parts[0].columns + [c for p in parts[1:] for c in p.columns[1:]] == whole


def test_split_respects_the_table_and_length_limits():
    specs = _specs(3_000)
    parts = bqm.split_parts(specs, KEY, max_tables=10)
    assert all(len(p.tables) <= 10 for p in parts) and len(parts) > 1
    parts = bqm.split_parts(specs, KEY, max_chars=40_000)
    for p in parts:
        sql = bqm.export_sql(bqm.select_sql(p, specs, KEY, _ref), "gs://b/o/part/data-*.parquet")
        assert len(sql) <= 40_000
    big = specs[:1] + [TableSpec("d", "huge", "pair", False, "huge",
                                 tuple(Column(f"c{j}", f"huge_{j}", "FLOAT64") for j in range(10_000)))]
    with pytest.raises(PipelineError, match="huge"):
        bqm.split_parts(big, KEY)


def test_sql_parses_quotes_identifiers_and_left_joins_onto_the_targets():
    odd = TableSpec("bqx_ml_v3_features_v2", "select_eurusd", "pair", False, "select",
                    (Column("from", "select_from", "FLOAT64"), Column("x", "select_order", "INT64")))
    specs = _specs(400)[:3] + [odd]
    parts = bqm.split_parts(specs, KEY)
    assert len(parts) == 1
    select = bqm.select_sql(parts[0], specs, KEY, _ref)
    sql = bqm.export_sql(select, "gs://bqx-test/out/training_eurusd/part-00/data-*.parquet")
    tree = sqlglot.parse_one(sql, read="bigquery")
    assert isinstance(tree, exp.Export)
    query = tree.this
    assert query.args["from_"].this.name == f"bqx_merge_{PAIR}_run_000"  # the targets spine
    joins = query.args["joins"]
    assert [j.side for j in joins] == ["LEFT"] * 3
    for j in joins:
        on = j.args["on"]
        assert isinstance(on, exp.EQ)
        assert {on.this.name, on.expression.name} == {KEY}
        assert on.expression.table == "t000"
    assert [e.alias_or_name for e in query.expressions] == parts[0].columns
    assert "`select_from`" in sql and "`bqx-ml`.`bqx_merge_scratch`" in sql
    assert query.args["order"].expressions[0].this.name == KEY
    options = tree.args["options"].sql(dialect="bigquery")
    assert "uri='gs://bqx-test/out/training_eurusd/part-00/data-*.parquet'" in options
    assert "'PARQUET'" in options

def test_sql_of_a_full_pair_stays_within_bigquerys_limits():
    specs = _specs()
    plan = bqm.make_plan(_manifest(specs), "gs://bqx-test/out", "external", "scratch", "bqx-ml")
    statements = plan.statements("bqx-ml")
    assert len(statements) == 2
    for part, _select, sql in statements:
        assert len(sql) <= bqm.MAX_QUERY_CHARS < bqm.BIGQUERY_MAX_QUERY_CHARS
        assert len(part.tables) <= bqm.MAX_TABLES_PER_QUERY < bqm.BIGQUERY_MAX_TABLES
        assert isinstance(sqlglot.parse_one(sql, read="bigquery"), exp.Export)


def test_dry_run_report_shows_sql_bytes_and_cost():
    specs = _specs(400)
    plan = bqm.make_plan(_manifest(specs, rows=100_000), "gs://bqx-test/out", "external",
                         "scratch", "bqx-ml")
    statements = plan.statements("bqx-ml")
    text = bqm.dry_run_report(plan, statements, [123_456_789])
    assert "EXPORT DATA OPTIONS" in text and "LEFT JOIN" in text
    assert "123,456,789" in text
    est = plan.estimated_bytes()
    # Every column once (399 FLOAT64), plus each table's key (read for the join).
    assert est == 100_000 * 8 * (399 + len(specs))
    assert f"{est:,}" in text
    billed = max(123_456_789, est, plan.minimum_billed())
    assert f"${billed / 2**40 * 6.25:.4f}" in text


def test_external_table_request():
    specs = _specs(100)
    manifest = _manifest(specs)
    plan = bqm.make_plan(manifest, "gs://bqx-test/out", "external", "scratch", "bqx-ml")
    expires = dt.datetime(2026, 1, 1, tzinfo=UTC)
    t = bqm.external_table(plan.table_id(1, "bqx-ml"), specs[1], KEY, plan.uris(1), plan.labels,
                           expires)
    api = t.to_api_repr()
    ext = api["externalDataConfiguration"]
    assert ext["sourceFormat"] == "PARQUET"
    assert ext["sourceUris"] == [f"gs://bqx-test/ck/pairs/{PAIR}/{specs[1].table}/"
                                 "20250106T0000-20250107T0000.parquet"]
    fields = api["schema"]["fields"]
    assert fields[0] == {"name": KEY, "type": "TIMESTAMP", "mode": "REQUIRED"}
    assert [f["name"] for f in fields[1:]] == specs[1].output_names
    assert api["labels"] == plan.labels and api["expirationTime"]
    cfg = bqm.load_config(specs[1], KEY, plan.labels).to_api_repr()["load"]
    assert cfg["writeDisposition"] == "WRITE_APPEND" and cfg["sourceFormat"] == "PARQUET"
    assert cfg["createDisposition"] == "CREATE_NEVER" and len(cfg["schema"]["fields"]) == len(fields)


def test_refuses_local_paths_and_dry_run_for_other_methods(tmp_path):
    manifest = _manifest(_specs(100))
    with pytest.raises(PipelineError, match="gs://"):
        bqm.make_plan(manifest, str(tmp_path), "load", "scratch", None)
    local = _manifest(_specs(100), root=str(tmp_path))
    with pytest.raises(PipelineError, match="checkpoint root"):
        bqm.make_plan(local, "gs://b/out", "load", "scratch", None)
    from pipelines.merge import job
    with pytest.raises(PipelineError, match="--dry-run"):
        job.run(["eurusd", "--method", "polars", "--dry-run"])


def _write_set(folder, table, parts, layout_extra=None, shuffle_part=None, drop_row_part=None):
    """A training set in parts, the way the bigquery merge lays it out."""
    os.makedirs(folder, exist_ok=True)
    doc = {"format": 1, "layout": "bqx.training.parts", "method": "bigquery", "pair": PAIR,
           "key": KEY, "spine_rows": table.num_rows, "targets": ["target_a"],
           "tables": [{"table": "reg_eurusd", "stem": "reg", "group": "pair", "columns": 2},
                      {"table": "csi_eur", "stem": "csi_eur", "group": "csi", "columns": 1}],
           "parts": []}
    for k, cols in enumerate(parts):
        t = table.select([KEY] + cols)
        if k == shuffle_part:
            t = t.take(pa.array(list(range(t.num_rows))[::-1]))
        if k == drop_row_part:
            t = t.slice(1)
        os.makedirs(os.path.join(folder, f"part-{k:02d}"))
        half = t.num_rows // 2
        pq.write_table(t.slice(0, half), os.path.join(folder, f"part-{k:02d}", "data-000000000000.parquet"))
        pq.write_table(t.slice(half), os.path.join(folder, f"part-{k:02d}", "data-000000000001.parquet"),
                       row_group_size=7)
        doc["parts"].append({"index": k, "path": f"part-{k:02d}", "columns": [KEY] + cols,
                             "rows": table.num_rows})
    doc.update(layout_extra or {})
    with open(os.path.join(folder, "_layout.json"), "w") as fh:
        json.dump(doc, fh)


def _small_table(rows=40):
    import numpy as np

    keys = pa.array(1736121600_000_000 + 60_000_000 * np.arange(rows), pa.int64()).cast(
        pa.timestamp("us", tz="UTC"))
    vals = [float(i) if i % 5 else None for i in range(rows)]
    return pa.table({KEY: keys, "target_a": vals, "reg_x": vals, "reg_y": list(range(rows)),
                     "csi_eur_z": [float("inf")] + vals[1:]})


def test_validate_reads_parts_as_one_training_set(tmp_path):
    from pipelines.validate import validate_file

    table = _small_table()
    single = tmp_path / "single.parquet"
    pq.write_table(table, single)
    _write_set(str(tmp_path / "ok"), table, [["target_a"], ["reg_x", "reg_y"], ["csi_eur_z"]],
               shuffle_part=1)
    r = validate_file(str(tmp_path / "ok") + "/", columns_per_batch=1)
    assert r.ok, r.hard_failures
    assert r.rows == 40 and r.columns == 5 and len(r.parts) == 3
    assert r.families["pair"]["nulls"] == 8 and r.infinities["total"] == 1
    assert any("same row order" in w for w in r.warnings)
    assert r.key_digest == validate_file(str(single)).key_digest

    _write_set(str(tmp_path / "bad"), table, [["target_a"], ["reg_x", "reg_y"], ["csi_eur_z"]],
               drop_row_part=2)
    r = validate_file(str(tmp_path / "bad"))
    assert not r.ok and any("part-02" in f for f in r.hard_failures)

    _write_set(str(tmp_path / "notarget"), table.drop(["target_a"]).append_column(
        "target_b", table.column("target_a")), [["target_b"], ["reg_x", "reg_y"], ["csi_eur_z"]])
    r = validate_file(str(tmp_path / "notarget"))
    assert not r.ok and any("target_a" in f for f in r.hard_failures)


# --------------------------------------------------------------------------- emulators

@pytest.fixture(scope="module")
def committed(tmp_path_factory, gcs_emulator, bq_emulator):
    """A small extraction of eurusd in gs://bqx-test/ck, and its polars merge (local)."""
    from pipelines import storage
    from pipelines.sample import build_warehouse

    base = tmp_path_factory.mktemp("bqmerge")
    warehouse = str(base / "w.duckdb")
    build_warehouse(warehouse, [PAIR], rows=1500, seed=11, tables_per_group=1)
    root = str(base / "ck")
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", root, "--shard-days", "1")
    assert proc.returncode == 0, proc.stderr
    for path in storage.list_files(root):
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        with open(path, "rb") as fh:
            storage.write_bytes(f"gs://bqx-test/ck/{rel}", fh.read())
    polars = str(base / "polars.parquet")
    proc = run_module("pipelines.merge", "--pair", PAIR, "--method", "polars",
                      "--checkpoint-root", root, "--output", polars)
    assert proc.returncode == 0, proc.stderr
    return {"local_root": root, "root": "gs://bqx-test/ck", "polars": polars,
            "objects": gcs_emulator["objects_dir"]}


def _bq():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    return bigquery.Client(project="bqx-ml", credentials=AnonymousCredentials(),
                           client_options={"api_endpoint": os.environ["BQX_BIGQUERY_ENDPOINT"]})


def _scratch_tables(dataset=bqm.DEFAULT_DATASET):
    from google.api_core.exceptions import NotFound

    try:
        return [t.table_id for t in _bq().list_tables(f"bqx-ml.{dataset}")]
    except NotFound:
        return []


def _read_parts(folder: str, layout: dict) -> pa.Table:
    """The parts side by side after sorting each by key (files read one at a time)."""
    columns = {}
    for part in layout["parts"]:
        pdir = os.path.join(folder, part["path"])
        files = sorted(f for f in os.listdir(pdir) if f.endswith(".parquet"))
        assert files and all(f.startswith("data-") for f in files)
        t = pa.concat_tables(pq.read_table(os.path.join(pdir, f)) for f in files)
        t = t.take(pc.sort_indices(t, [(KEY, "ascending")]))
        for name in t.column_names:
            if name == KEY and KEY in columns:
                assert t.column(KEY).equals(columns[KEY])
                continue
            columns[name] = t.column(name)
    return pa.table(columns)


def test_bigquery_merge_through_load_staging_equals_the_polars_merge(committed):
    # Small parts so that the sample (237 columns) is exported in several parts too.
    out = "gs://bqx-test/out"
    proc = run_module("pipelines.merge", "--pair", PAIR, "--method", "bigquery",
                      "--staging", "load", "--checkpoint-root", committed["root"],
                      "--output", out, env={"BQX_MERGE_MAX_COLUMNS": "100"})
    assert proc.returncode == 0, proc.stderr
    folder = os.path.join(committed["objects"], "bqx-test", "out", f"training_{PAIR}")
    layout = json.load(open(os.path.join(folder, "_layout.json")))
    assert layout["layout"] == "bqx.training.parts" and len(layout["parts"]) >= 3
    assert all(len(p["columns"]) <= 100 for p in layout["parts"])

    polars = pq.read_table(committed["polars"])
    merged = _read_parts(folder, layout)
    assert merged.column_names == polars.column_names
    assert merged.num_rows == polars.num_rows == layout["spine_rows"]
    for name in polars.column_names:
        a, b = merged.column(name), polars.column(name)
        assert a.type == b.type, name
        assert a.null_count == b.null_count, name
        assert a.equals(b), name
    assert sum(c.null_count for c in polars.columns) > 0, "the sample has NULLs to compare"
    assert _scratch_tables() == []

    # pipelines.validate reads the folder as one training set.
    proc = run_module("pipelines.validate", folder + "/")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout and "part-02" in proc.stdout
    report = json.load(open(folder + ".validation.json"))
    assert report["rows"] == polars.num_rows and report["columns"] == polars.num_columns
    polars_report = json.load(open(committed["polars"][:-len(".parquet")] + ".validation.json"))
    assert report["key_digest"] == polars_report["key_digest"]
    assert report["families"] == polars_report["families"]

    # ... also from the bucket (gs://, read with ranged reads). The GCS emulator does not
    # see objects the BigQuery emulator writes to its folder, so register them first.
    from pipelines import storage
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            if f.endswith(".parquet"):
                rel = os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/")
                with open(os.path.join(dirpath, f), "rb") as fh:
                    storage.write_bytes(f"{out}/training_{PAIR}/{rel}", fh.read())
    proc = run_module("pipelines.validate", f"{out}/training_{PAIR}/", "--quiet")
    assert proc.returncode == 0 and "PASS" in proc.stdout, proc.stdout + proc.stderr

    # A second run without --overwrite is refused before anything is staged.
    proc = run_module("pipelines.merge", "--pair", PAIR, "--method", "bigquery",
                      "--staging", "load", "--checkpoint-root", committed["root"],
                      "--output", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr


@pytest.mark.parametrize("where", ["load", "export"])
def test_a_failed_job_shows_bigquerys_error_and_leaves_no_scratch_table(committed, monkeypatch,
                                                                        where, capsys):
    manifest = checkpoints.load_manifest(committed["root"], PAIR)
    if where == "load":
        real = bqm.Plan.uris
        monkeypatch.setattr(bqm.Plan, "uris", lambda self, i: real(self, i) + (
            ["gs://bqx-test/ck/missing.parquet"] if i == 2 else []))
    else:
        monkeypatch.setattr(bqm, "export_sql", lambda select, uri: bqm_export_bad(select, uri))
    with pytest.raises(PipelineError) as info:
        bqm.merge_bigquery(manifest, f"gs://bqx-test/fail-{where}", staging="load")
    message = str(info.value)
    assert ("load job" if where == "load" else "export of") in message
    assert ("missing.parquet" in message) if where == "load" else ("format" in message.lower())
    assert _scratch_tables() == []
    assert not os.path.exists(os.path.join(committed["objects"], "bqx-test", f"fail-{where}",
                                           f"training_{PAIR}", "_layout.json"))


def bqm_export_bad(select, uri):
    """An EXPORT DATA the emulator rejects (an unknown format)."""
    return f"EXPORT DATA OPTIONS (uri = '{uri}', format = 'NOPE') AS\n{select}"


def test_dry_run_with_external_tables_prints_sql_bytes_cost_and_cleans_up(committed):
    proc = run_module("pipelines.merge", "--pair", PAIR, "--method", "bigquery", "--dry-run",
                      "--checkpoint-root", committed["root"], "--output", "gs://bqx-test/dry",
                      "--scratch-dataset", "bqx_merge_dry")
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "EXPORT DATA OPTIONS" in text and "LEFT JOIN" in text
    assert "BigQuery dry run:" in text and "estimated cost at $6.25/TiB" in text
    assert "staging: external" in text
    sql = text[text.index("EXPORT DATA"):].split(";\n")[0]
    assert isinstance(sqlglot.parse_one(sql, read="bigquery"), exp.Export)
    assert _scratch_tables("bqx_merge_dry") == []
    assert not os.path.exists(os.path.join(committed["objects"], "bqx-test", "dry"))
