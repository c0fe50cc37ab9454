"""A gs:// training file: streamed to a temporary object, validated there, copied into place.

The merge never stages a gs:// output on the local disk (on Cloud Run the disk is memory
and a pair's file is ~9 GB): it uploads to ``{output}.tmp-{uuid}`` in the bucket, validates
that object, copies it to ``output`` server-side and deletes the temporary.

These tests run their own GCS emulator, the one of tests/emulators.py started with a
thread per connection: ``pyarrow``'s ``GcsFileSystem.open_input_file`` (storage.open_input,
which validation reads the object through) starts a whole-object download that it never
drains, and the single-threaded emulator then blocks on it and answers nothing else
once the object is larger than the socket buffers (a 5.6 MB training file already
times out). Real GCS serves requests concurrently.
"""
import json
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from conftest import PAIR, ROOT, run_module
from emulators import BUCKET, PROJECT, gcs_emulator, upload_tree  # noqa: F401 (fixture)
from pipelines import checkpoints, storage
from pipelines.errors import PipelineError
from pipelines.merge import budget as budgets
from pipelines.merge import job

OUT = f"gs://{BUCKET}/out/training_{PAIR}.parquet"


def _client():
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    return gcs.Client(project=PROJECT, credentials=AnonymousCredentials())


def _names(prefix: str) -> list[str]:
    """Every object name under ``prefix`` as the bucket lists it (no filtering)."""
    bucket, _, name = prefix[len("gs://"):].partition("/")
    return sorted(b.name for b in _client().list_blobs(bucket, prefix=name))


def _report_path(output: str) -> str:
    return output[: -len(".parquet")] + ".validation.json"


@pytest.fixture(scope="module")
def gcs(gcs_emulator):
    """The emulated bucket's host (tests/emulators.py; one thread per connection)."""
    return gcs_emulator["host"]


@pytest.fixture(scope="module")
def cloud_ck(extracted, gcs):
    """The conftest's small committed extraction, uploaded to the emulated bucket."""
    root = f"gs://{BUCKET}/merge-output-{uuid.uuid4().hex[:8]}/ck"
    assert upload_tree(extracted, root) > 0
    return root


@pytest.fixture(scope="module")
def local_training(extracted, tmp_path_factory):
    """The same checkpoints merged into a local file (the reference)."""
    out = str(tmp_path_factory.mktemp("local-out") / f"training_{PAIR}.parquet")
    proc = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", extracted,
                      "--output", out)
    assert proc.returncode == 0, proc.stderr
    return out


def test_gs_output_equals_the_local_merge_and_leaves_no_temporary(cloud_ck, local_training):
    assert not _names(f"gs://{BUCKET}/out/")

    proc = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", cloud_ck,
                      "--output", OUT)
    assert proc.returncode == 0, proc.stderr
    assert f"streaming to {OUT}{storage.TEMP_MARK}" in proc.stderr
    assert storage.read_bytes(OUT) == open(local_training, "rb").read()
    assert storage.crc32c(OUT) == storage.crc32c(local_training)
    names = _names(f"gs://{BUCKET}/out/")
    assert not [n for n in names if storage.TEMP_MARK in n], names
    report = json.loads(storage.read_bytes(_report_path(OUT)))
    assert report["ok"] and report["path"] == OUT and report["rows"] > 0
    generation = _client().bucket(BUCKET).get_blob(f"out/training_{PAIR}.parquet").generation

    again = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", cloud_ck,
                       "--output", OUT)
    assert again.returncode == 2 and "already exists" in again.stderr, again.stderr
    assert _client().bucket(BUCKET).get_blob(f"out/training_{PAIR}.parquet").generation == generation

    replaced = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", cloud_ck,
                          "--output", OUT, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert _client().bucket(BUCKET).get_blob(f"out/training_{PAIR}.parquet").generation != generation
    assert storage.crc32c(OUT) == storage.crc32c(local_training)
    assert not [n for n in _names(f"gs://{BUCKET}/out/") if storage.TEMP_MARK in n]


def test_tables_read_in_slices_from_the_bucket_give_the_same_rows(cloud_ck, local_training, tmp_path):
    """A budget small enough to cut tables into slices of columns: the first slice of
    a table downloads its shards whole, the later ones read byte ranges of them."""
    import pyarrow.parquet as pq

    out = str(tmp_path / "sliced.parquet")
    proc = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", cloud_ck,
                      "--output", out, "--memory-budget", "401MiB")
    assert proc.returncode == 0, proc.stderr
    assert re.search(r"\([1-9][0-9]* wide table\(s\) read in slices", proc.stderr), proc.stderr
    assert pq.read_table(out).equals(pq.read_table(local_training))


def test_failed_validation_leaves_neither_final_nor_temporary_object(cloud_ck, monkeypatch):
    prefix = f"gs://{BUCKET}/out-invalid-{uuid.uuid4().hex[:8]}"
    output = f"{prefix}/training_{PAIR}.parquet"
    manifest = checkpoints.load_manifest(cloud_ck, PAIR)
    real = job.validate_file
    seen = []

    def failing(path, expected=None, **kwargs):
        # A correct merge of good checkpoints passes validation, and no emulator fault
        # makes it fail: the failure is injected here, in-process, after the real
        # validation of the temporary object.
        report = real(path, expected, **kwargs)
        seen.append({"path": path, "exists": storage.exists(path), "ok": report.ok,
                     "final_exists": storage.exists(output)})
        report.hard_failures.append("injected by the test")
        report.ok = False
        return report

    monkeypatch.setattr(job, "validate_file", failing)
    with pytest.raises(PipelineError, match="failed validation and was not published"):
        job.merge(manifest, output, "polars", budgets.parse_size(budgets.DEFAULT_BUDGET))
    (call,) = seen
    assert call["path"].startswith(output + storage.TEMP_MARK)
    assert call["exists"] and call["ok"] and not call["final_exists"]
    assert _names(prefix) == []


def test_failure_while_streaming_cancels_the_upload(cloud_ck, monkeypatch):
    prefix = f"gs://{BUCKET}/out-broken-{uuid.uuid4().hex[:8]}"
    output = f"{prefix}/training_{PAIR}.parquet"
    manifest = checkpoints.load_manifest(cloud_ck, PAIR)
    # Small chunks, so part of the file has reached the upload session when it fails.
    monkeypatch.setattr(storage, "UPLOAD_CHUNK", 256 << 10)

    class Broken(job.TrainingFileWriter):
        def write_columns(self, table):
            super().write_columns(table)
            raise RuntimeError("disk on fire (injected)")

    monkeypatch.setattr(job, "TrainingFileWriter", Broken)
    with pytest.raises(RuntimeError, match="injected"):
        job.merge(manifest, output, "polars", budgets.parse_size(budgets.DEFAULT_BUDGET))
    assert _names(prefix) == []


def test_publish_never_replaces_an_object_another_writer_created(gcs):
    prefix = f"gs://{BUCKET}/publish-{uuid.uuid4().hex[:8]}"
    final = f"{prefix}/x.bin"
    with pytest.raises(PipelineError, match="already exists"):
        with storage.atomic_gcs_object(final, overwrite=False) as staged:
            with staged.open_write() as fh:
                fh.write(b"ours")
            storage.write_bytes(final, b"theirs")  # published by someone else meanwhile
    assert storage.read_bytes(final) == b"theirs"
    assert _names(prefix) == [final[len(f"gs://{BUCKET}/"):]]

    with storage.atomic_gcs_object(final, overwrite=True) as staged:
        with staged.open_write() as fh:
            fh.write(b"ours")
        assert storage.read_bytes(staged.path) == b"ours"
        assert storage.read_bytes(final) == b"theirs"
    assert storage.read_bytes(final) == b"ours"
    assert _names(prefix) == [final[len(f"gs://{BUCKET}/"):]]

    # A killed run's leftover: removed once old enough, never the final object.
    storage.write_bytes(f"{final}{storage.TEMP_MARK}0123456789ab", b"left behind")
    assert storage.remove_stale_temporaries(final) == []  # younger than a day
    assert storage.remove_stale_temporaries(final, min_age_seconds=0) == [
        f"{final}{storage.TEMP_MARK}0123456789ab"]
    assert _names(prefix) == [final[len(f"gs://{BUCKET}/"):]]


# --------------------------------------------------------------------------- memory

def _measured_merge(args: list[str], log: str, max_file_bytes: int | None = None) -> dict:
    """Run a merge in a child process; its exit code, wall time and peak RSS (getrusage)."""
    import resource

    def limit():
        if max_file_bytes is not None:  # any larger local file write fails (SIGXFSZ)
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    started = time.monotonic()
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.merge", *args], cwd=ROOT,
                                stdout=subprocess.DEVNULL,
                                stderr=err, preexec_fn=limit)
        _pid, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    return {"code": proc.returncode, "seconds": time.monotonic() - started,
            "max_rss": usage.ru_maxrss * 1024, "log": log}


def test_gs_output_is_not_staged_locally(gcs, tmp_path):
    """Peak RSS of a merge into gs:// vs into a local file, 3,000 full-width rows."""
    from bench.synthetic import make_checkpoints

    root = str(tmp_path / "ck")
    make_checkpoints(root, PAIR, 3000, seed=3, log=lambda *a: None)
    local_out = str(tmp_path / "out" / f"training_{PAIR}.parquet")
    gs_out = f"gs://{BUCKET}/rss/training_{PAIR}.parquet"
    local = _measured_merge(["--pair", PAIR, "--checkpoint-root", root, "--output", local_out],
                            str(tmp_path / "local.log"))
    assert local["code"] == 0, open(local["log"]).read()[-3000:]
    size = os.path.getsize(local_out)
    assert size > 128 << 20  # well past the 64 MiB file-size limit below

    # No local file may grow past 64 MiB: a staged copy of the output would be killed.
    cloud = _measured_merge(["--pair", PAIR, "--checkpoint-root", root, "--output", gs_out],
                            str(tmp_path / "gs.log"), max_file_bytes=64 << 20)
    assert cloud["code"] == 0, open(cloud["log"]).read()[-3000:]
    assert storage.size(gs_out) == size
    assert storage.crc32c(gs_out) == storage.crc32c(local_out)
    assert not [n for n in _names(f"gs://{BUCKET}/rss/") if storage.TEMP_MARK in n]
    assert storage.exists(_report_path(gs_out))

    mib = 1 << 20
    figures = (f"output {size / mib:.0f} MiB; peak RSS local {local['max_rss'] / mib:.0f} MiB "
               f"in {local['seconds']:.1f}s, gs:// {cloud['max_rss'] / mib:.0f} MiB in "
               f"{cloud['seconds']:.1f}s")
    print(figures)
    # No local copy: the 64 MiB file-size limit above proves it for the disk. For memory
    # (Cloud Run's disk is memory) what counts is the budget: streaming adds upload chunks
    # and, because a slow upload lets the next window be joined meanwhile, up to one more
    # window (the gap to the local merge varies run to run, so it is reported, not bounded).
    assert cloud["max_rss"] < budgets.parse_size(budgets.DEFAULT_BUDGET), figures
