"""bigquery:// -> gs:// checkpoints -> gs:// training file, against the local emulators.

The same GoogleSQL run on the BigQuery emulator and on the embedded DuckDB warehouse must
give the same checkpoints and the same training file.
"""
import pyarrow.parquet as pq
import pytest

from bigquery_warehouse import PAIR, bq_warehouse  # noqa: F401 (fixture)
from conftest import commit_records, kill_module_when, manifest_content, run_module
from emulators import BUCKET, bq_emulator, gcs_emulator  # noqa: F401 (fixtures)
from pipelines import checkpoints, storage
from pipelines.validate import validate_file

CK = f"gs://{BUCKET}/ck"
OUT = f"gs://{BUCKET}/out/training_{PAIR}.parquet"


def _extract_args(source, root):
    return ["--pair", PAIR, "--source", source, "--checkpoint-root", root,
            "--shard-days", "1", "--direct_num_workers", "2"]


def _content(root):
    return manifest_content(root, PAIR)


def _raw_names(prefix):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="bqx-ml", credentials=AnonymousCredentials())
    return [b.name for b in client.list_blobs(BUCKET, prefix=prefix[len(f"gs://{BUCKET}/"):])]


@pytest.fixture(scope="module")
def cloud_extracted(bq_warehouse):
    proc = run_module("pipelines.extract", *_extract_args(bq_warehouse["source"], CK))
    assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture(scope="module")
def duckdb_reference(bq_warehouse, tmp_path_factory):
    """The same warehouse extracted and merged through the embedded DuckDB path."""
    root = str(tmp_path_factory.mktemp("duck") / "ck")
    out = str(tmp_path_factory.mktemp("duckout") / f"training_{PAIR}.parquet")
    proc = run_module("pipelines.extract", *_extract_args(f"duckdb://{bq_warehouse['duckdb']}", root))
    assert proc.returncode == 0, proc.stderr
    proc = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", root, "--output", out)
    assert proc.returncode == 0, proc.stderr
    return {"root": root, "output": out}


def test_extract_into_bucket_commits_and_rerun_skips(cloud_extracted, bq_warehouse):
    (window,) = checkpoints.find_windows(CK, PAIR)
    assert storage.exists(checkpoints.manifest_path(CK, PAIR, window))
    assert storage.exists(checkpoints.success_path(CK, PAIR, window))
    assert "to_do=" in cloud_extracted.stderr and "to_do=0" not in cloud_extracted.stderr
    assert not [n for n in _raw_names(CK) if storage.TEMP_MARK in n]

    again = run_module("pipelines.extract", *_extract_args(bq_warehouse["source"], CK))
    assert again.returncode == 0, again.stderr
    assert "to_do=0" in again.stderr


def test_bigquery_checkpoints_and_training_file_equal_the_duckdb_ones(
        cloud_extracted, duckdb_reference, tmp_path):
    cloud = checkpoints.load_manifest(CK, PAIR)
    local = checkpoints.load_manifest(duckdb_reference["root"], PAIR)
    assert cloud.window == local.window
    assert [(t["table"], t["rows"]) for t in cloud.tables] == \
        [(t["table"], t["rows"]) for t in local.tables]
    assert cloud.totals() == local.totals()
    # Same rows, same schema, same writer: the very same bytes.
    assert _content(CK) == _content(duckdb_reference["root"])
    assert not checkpoints.verify_checkpoints(cloud)

    proc = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", CK,
                      "--output", OUT, "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert storage.exists(OUT)
    assert storage.exists(OUT[: -len(".parquet")] + ".validation.json")
    downloaded = str(tmp_path / "training.parquet")
    with open(downloaded, "wb") as fh:
        fh.write(storage.read_bytes(OUT))
    report = validate_file(downloaded)
    assert report.ok, report.summary()
    got, want = pq.read_table(downloaded), pq.read_table(duckdb_reference["output"])
    assert got.num_rows == want.num_rows > 0
    assert got.schema.equals(want.schema, check_metadata=True)
    assert got.equals(want)


def test_killed_extraction_in_bucket_resumes(cloud_extracted, bq_warehouse):
    root = f"gs://{BUCKET}/ck-killed"
    total = len(commit_records(CK))
    kill_module_when("pipelines.extract", _extract_args(bq_warehouse["source"], root),
                     lambda: len(commit_records(root)) >= 3, poll=0.05)
    done = len(commit_records(root))
    assert 0 < done < total, f"the kill should land mid-run ({done}/{total} shards)"
    assert not checkpoints.find_windows(root, PAIR), "no success marker before the end"
    # Nothing partial under a final name: no temporary objects, every shard reads whole.
    names = _raw_names(root)
    assert not [n for n in names if storage.TEMP_MARK in n]
    for path in storage.list_files(root):
        if path.endswith(".parquet"):
            with storage.open_input(path) as source:
                pq.read_metadata(source)

    again = run_module("pipelines.extract", *_extract_args(bq_warehouse["source"], root))
    assert again.returncode == 0, again.stderr
    assert f"done_before={done}" in again.stderr or "done_before=" in again.stderr
    # Manifest paths are relative to the root: the resumed run equals the uninterrupted one.
    assert _content(root) == _content(CK)
