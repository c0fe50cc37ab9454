"""Transient and permanent faults, against the emulators behind fault-injecting proxies.

* 10% of the requests failing (429, 500, 503, connections dropped before or after the
  upstream did the work; UNAVAILABLE / RESOURCE_EXHAUSTED / broken streams on the Storage
  Read API): the extract and both merges still succeed, through the client libraries'
  own retries (pipelines.storage.gcs_retry, pipelines.sources.bigquery_retry, ...).
* Permanent errors (403, 404, a deleted bucket) fail fast: one ``error:`` line naming the
  culprit, exit 2, no retries (the proxies count every request), nothing half-written.
  These run with the production retry deadline (120 s), so the time bound proves that
  nothing waited for a retry to run out.
* A BigQuery request left unanswered (a connection that stops answering): abandoned
  after ``BQX_REQUEST_SECONDS`` and sent again, by the extract's and the merge's clients.
* A disk that fills up during a local merge: one error line, no file, no temporary
  (a real 256 KiB tmpfs; RLIMIT_FSIZE, giving EFBIG, where mounting is not permitted).

The jobs run as subprocesses that talk to the emulators through the proxies
(``proxies.env``); this process checks results on the emulators directly (the tests of
unanswered requests run the clients in this process, through the proxies). Three answers
come from the proxy because the emulator cannot give them: BigQuery's 409 for a job id
used twice (the emulator runs the job again; tests/faultproxy.py), BigQuery's 404 for a
table deleted between discovery and extraction, and a job still RUNNING when its insert
is answered (the emulator finishes every job first).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
import types

import pyarrow.parquet as pq
import pytest

from bigquery_warehouse import PAIR, bq_warehouse  # noqa: F401 (fixture)
from conftest import ROOT, run_module
from emulators import BUCKET, PROJECT, bq_emulator, gcs_emulator  # noqa: F401 (fixtures)
from faultproxy import HTTP_FAULTS, fault_proxies, proxies  # noqa: F401 (fixtures)
from pipelines import checkpoints, storage
from pipelines.validate import validate_file

CK = f"gs://{BUCKET}/faults/ck"
OUT = f"gs://{BUCKET}/faults/out/training_{PAIR}.parquet"
RATE = 0.10
# Transient-fault runs: short back-offs keep the test quick; the deadline is generous.
RETRY_FAST = {"BQX_RETRY_SECONDS": "60", "BQX_RETRY_INITIAL_SECONDS": "0.1"}
# Under the production retry deadline (120 s), so a run that waited out its retries
# fails; loose enough for a loaded 2-core CI machine (an extraction that fails one table
# takes 7-19 s here). The request counts checked beside it prove nothing was retried.
FAIL_FAST_SECONDS = 90
DOOMED = "bqx-doomed"


# --------------------------------------------------------------------------- helpers

def _timed(module: str, *args: str, env: dict) -> tuple[subprocess.CompletedProcess, float]:
    started = time.monotonic()
    proc = run_module(module, *args, env=env, timeout=600)
    return proc, time.monotonic() - started


def _extract_args(source: str, root: str, *more: str) -> list[str]:
    return ["--pair", PAIR, "--source", source, "--checkpoint-root", root, "--shard-days", "1",
            "--direct_num_workers", "2", *more]


def _raw_names(prefix: str) -> list[str]:
    """Every object under ``prefix`` as the emulator lists it (temporaries included)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    bucket, _, name = prefix[len("gs://"):].partition("/")
    client = gcs.Client(project=PROJECT, credentials=AnonymousCredentials())
    return sorted(b.name for b in client.list_blobs(bucket, prefix=name))


def _scratch_tables(dataset: str = "bqx_merge_scratch") -> list[str]:
    from google.api_core.exceptions import NotFound
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery

    client = bigquery.Client(project=PROJECT, credentials=AnonymousCredentials(),
                             client_options={"api_endpoint": os.environ["BQX_BIGQUERY_ENDPOINT"]})
    try:
        return [t.table_id for t in client.list_tables(f"{PROJECT}.{dataset}")]
    except NotFound:
        return []


def assert_fails_fast(proc: subprocess.CompletedProcess, seconds: float, *names: str) -> str:
    """Exit 2, exactly one ``error:`` line naming every one of ``names``, no traceback,
    within :data:`FAIL_FAST_SECONDS`; returns the line."""
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for name in names:
        assert name in lines[0], lines[0]
    assert seconds < FAIL_FAST_SECONDS, f"took {seconds:.1f}s: {lines[0]}"
    return lines[0]


def _report(label: str, seconds: float, proxies_or_line) -> None:
    print(f"\n[faults] {label}: {seconds:.1f}s; {proxies_or_line}")


# --------------------------------------------------------------------------- transient

@pytest.fixture(scope="module")
def faulty_extract(bq_warehouse, fault_proxies):
    """The extract bigquery:// -> gs:// with 10% of all requests failing."""
    fault_proxies.reset()
    fault_proxies.inject(RATE, seed=5)
    try:
        proc, seconds = _timed("pipelines.extract", *_extract_args(bq_warehouse["source"], CK),
                               env={**fault_proxies.env, **RETRY_FAST})
        seen = {p.name: (dict(p.counts), list(p.injected)) for p in fault_proxies.all}
        summary = fault_proxies.summary()
    finally:
        fault_proxies.reset()
    _report("extract at 10%", seconds, summary)
    return {"proc": proc, "seconds": seconds, "seen": seen}


def test_extract_succeeds_with_ten_percent_of_requests_failing(faulty_extract):
    proc = faulty_extract["proc"]
    assert proc.returncode == 0, proc.stderr[-5000:]
    seen = faulty_extract["seen"]
    # Faults really happened, on every endpoint and of every kind.
    for name in ("gcs", "bigquery", "storage-read"):
        counts, injected = seen[name]
        assert injected, f"no fault injected on {name}: {counts}"
        assert len(injected) <= 0.25 * counts["requests"], counts
    http_kinds = {kind for name in ("gcs", "bigquery") for kind, _m, _p in seen[name][1]}
    assert http_kinds == set(HTTP_FAULTS)
    # Committed and complete; nothing partial left behind.
    manifest = checkpoints.load_manifest(CK, PAIR)
    assert not checkpoints.verify_checkpoints(manifest)
    assert not [n for n in _raw_names(CK) if storage.TEMP_MARK in n]
    assert not _scratch_tables("bqx_extract_scratch")


def test_polars_merge_into_a_bucket_succeeds_with_ten_percent_of_requests_failing(
        faulty_extract, proxies, tmp_path):
    assert faulty_extract["proc"].returncode == 0
    proxies.gcs.inject(RATE, seed=7)
    # And for sure (the merge reads on several threads, so which request meets which
    # random fault varies): the upload session is opened but the response is lost.
    proxies.gcs.lose(method="POST", path=r"^/upload/", times=1)
    # Column batches that cut the wider tables into slices of columns: the later slices'
    # ranged reads (Arrow's GCS client, not google-cloud-storage) go through the faulty
    # proxy too. Not smaller: that client retries on its own schedule (pyarrow's
    # GcsFileSystem takes only a time limit, not BQX_RETRY_INITIAL_SECONDS), and slices
    # of 12 KB (a 401MiB budget, up to 2c13359) made 3,462 requests and 299 s of this test.
    proc, seconds = _timed("pipelines.merge", "--pair", PAIR, "--method", "polars",
                           "--checkpoint-root", CK, "--output", OUT, "--column-batch-size", "4MiB",
                           env={**proxies.env, **RETRY_FAST})
    _report("polars merge at 10%", seconds, proxies.summary())
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert re.search(r"\([1-9][0-9]* wide table\(s\) read in slices", proc.stderr), proc.stderr[-2000:]
    # Faults met the checkpoint downloads and the output's upload or publication.
    paths = [p for _kind, _method, p in proxies.gcs.injected]
    assert any("alt=media" in p for p in paths), paths
    assert any("uploadType" in p or "rewriteTo" in p for p in paths), paths
    local = str(tmp_path / "training.parquet")
    with open(local, "wb") as fh:
        fh.write(storage.read_bytes(OUT))
    report = validate_file(local)
    assert report.ok, report.summary()
    assert pq.read_metadata(local).num_rows == checkpoints.load_manifest(CK, PAIR).targets["rows"]
    assert not [n for n in _raw_names(OUT) if storage.TEMP_MARK in n]


def test_bigquery_merge_succeeds_with_ten_percent_of_requests_failing(
        faulty_extract, proxies, gcs_emulator):
    assert faulty_extract["proc"].returncode == 0
    proxies.gcs.inject(RATE, seed=11)
    proxies.bq.inject(RATE, seed=13)
    # And for sure: the first load job is created but the response is lost.
    proxies.bq.lose(method="POST", path=r"/jobs\b", body='"load"', times=1)
    out = f"gs://{BUCKET}/faults/bqout"
    proc, seconds = _timed("pipelines.merge", "--pair", PAIR, "--method", "bigquery",
                           "--staging", "load", "--checkpoint-root", CK, "--output", out,
                           env={**proxies.env, **RETRY_FAST})
    _report("bigquery merge at 10%", seconds, proxies.summary())
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert proxies.bq.faults > 1 and proxies.gcs.faults > 0
    # The retried insert found its job (409) and used it: the load ran once (the row
    # counts above would show a second run: the staging tables are appended to).
    assert proxies.bq.counts["409-job-exists"] >= 1, proxies.bq.summary()
    layout_path = os.path.join(gcs_emulator["objects_dir"], BUCKET, "faults", "bqout",
                               f"training_{PAIR}", "_layout.json")
    layout = json.load(open(layout_path))
    spine = checkpoints.load_manifest(CK, PAIR).targets["rows"]
    assert layout["spine_rows"] == spine
    assert [p["rows"] for p in layout["parts"]] == [spine] * len(layout["parts"])
    assert _scratch_tables() == []


# --------------------------------------------------------------------------- unanswered

def _through_proxies(monkeypatch, proxies, request_seconds: str = "2") -> None:
    """This process's clients go through the proxies, abandoning a BigQuery request
    after ``request_seconds``."""
    for name, value in {**proxies.env, **RETRY_FAST,
                        "BQX_REQUEST_SECONDS": request_seconds}.items():
        monkeypatch.setenv(name, value)


def test_an_unanswered_bigquery_request_of_the_extract_is_sent_again(bq_warehouse, proxies,
                                                                     monkeypatch):
    """A connection that stops answering (no error, no response) must not hang the
    extract: the request is abandoned after BQX_REQUEST_SECONDS and the library's retry
    sends it again. Without the timeout this query waits for the proxy's 120 s."""
    from pipelines.sources import open_source

    _through_proxies(monkeypatch, proxies)
    proxies.bq.stall(method="POST", path=r"/jobs\b", times=1, seconds=120)
    source = open_source(bq_warehouse["source"])
    started = time.monotonic()
    assert source.query_rows("SELECT 1 AS one") == [{"one": 1}]
    seconds = time.monotonic() - started
    _report("extract query, jobs.insert unanswered", seconds, proxies.bq.summary())
    assert proxies.bq.counts["stall"] == proxies.bq.wait_for_count("stall-abandoned", 1) == 1, \
        proxies.bq.summary()
    assert seconds < 60


def test_an_unanswered_poll_of_a_running_job_is_sent_again(bq_warehouse, proxies, monkeypatch):
    """A poll of a running job (jobs.get) left unanswered is abandoned and sent again
    too: the library's own wait sets no timeout on its polls. (The query's results,
    jobs.getQueryResults, get the library's floor of 120 s whatever is asked.)"""
    from pipelines.sources import open_source

    _through_proxies(monkeypatch, proxies)
    proxies.bq.report_running()  # so that the client polls the job (jobs.get)
    proxies.bq.stall(method="GET", path=r"/jobs/[^/?]+", times=1, seconds=120)
    started = time.monotonic()
    assert open_source(bq_warehouse["source"]).query_rows("SELECT 2 AS two") == [{"two": 2}]
    seconds = time.monotonic() - started
    _report("extract query, job polls unanswered", seconds, proxies.bq.summary())
    assert proxies.bq.counts["reported-running"] == 1, proxies.bq.summary()
    assert proxies.bq.counts["stall"] == proxies.bq.wait_for_count("stall-abandoned", 1) == 1, \
        proxies.bq.summary()
    assert seconds < 60


def test_an_unanswered_bigquery_request_of_the_merge_is_sent_again(bq_emulator, proxies,
                                                                   monkeypatch):
    """The same for the bigquery merge's requests (here its scratch dataset's creation,
    its query's jobs.insert and a poll of that job)."""
    from pipelines.merge import bigquery as bqm

    _through_proxies(monkeypatch, proxies)
    proxies.bq.stall(method="POST", path=r"/jobs\b", times=1, seconds=120)
    proxies.bq.stall(method="POST", path=r"/datasets\b", times=1, seconds=120)
    proxies.bq.report_running()
    proxies.bq.stall(method="GET", path=r"/jobs/[^/?]+", times=1, seconds=120)
    client = bqm._client(PROJECT, None)
    plan = types.SimpleNamespace(dataset="bqx_stall_test")  # all _ensure_dataset reads
    started = time.monotonic()
    bqm._ensure_dataset(client, plan, None)
    job = bqm._run_query(client, "SELECT 1 AS one", "a query", {"bqx-job": "merge"})
    seconds = time.monotonic() - started
    _report("merge requests unanswered", seconds, proxies.bq.summary())
    assert [dict(row.items()) for row in job.result()] == [{"one": 1}]
    assert proxies.bq.counts["stall"] == proxies.bq.wait_for_count("stall-abandoned", 3) == 3, \
        proxies.bq.summary()
    assert seconds < 60
    client.delete_dataset(f"{PROJECT}.bqx_stall_test", not_found_ok=True)


def _read_targets_through_proxies(bq_warehouse) -> float:
    """Read the pair's targets table from the BigQuery emulator through the proxies
    (Storage Read API) and check it holds each of the warehouse's rows once; returns
    the seconds the read took."""
    from pipelines.catalog import load_catalog
    from pipelines.sources import DuckDBSource, open_source

    dataset = load_catalog(None).targets_dataset
    query = f"SELECT * FROM `{PROJECT}`.`{dataset}`.`targets_{PAIR}`"
    want = DuckDBSource(bq_warehouse["duckdb"]).query_arrow(query.replace(f"`{PROJECT}`.", ""))
    started = time.monotonic()
    got = open_source(bq_warehouse["source"]).query_arrow(query)
    seconds = time.monotonic() - started
    order = [(want.schema.names[0], "ascending")]
    assert got.num_rows == want.num_rows > 0
    assert got.sort_by(order).equals(want.cast(got.schema).sort_by(order))
    return seconds


def _read_through_stalled_grpc(bq_warehouse, proxies, monkeypatch, method: str, after: int = 0):
    """:func:`_read_targets_through_proxies` while the proxy leaves the first call of
    ``method`` unanswered (a stream: silent after ``after`` messages); returns (seconds
    taken, proxy summary)."""
    _through_proxies(monkeypatch, proxies)
    proxies.grpc.stall(method=method, times=1, seconds=120, after=after)
    seconds = _read_targets_through_proxies(bq_warehouse)
    assert proxies.grpc.counts["stall"] == proxies.grpc.wait_for_count("stall-abandoned", 1) == 1, \
        proxies.grpc.summary()
    return seconds, proxies.grpc.summary()


def test_an_unanswered_read_session_request_is_sent_again(bq_warehouse, proxies, monkeypatch):
    """CreateReadSession left unanswered is abandoned after BQX_REQUEST_SECONDS and sent
    again; the library's own deadline for it is 600 s."""
    seconds, summary = _read_through_stalled_grpc(bq_warehouse, proxies, monkeypatch,
                                                  "CreateReadSession")
    _report("extract read, CreateReadSession unanswered", seconds, summary)
    assert seconds < 60


def test_a_read_stream_that_sends_nothing_is_read_again(bq_warehouse, proxies, monkeypatch):
    """A ReadRows stream that sends nothing (no rows, no error) is abandoned after
    BQX_REQUEST_SECONDS and read again from its offset; the library's own deadline for a
    stream is a day, and it resumes only streams that fail."""
    seconds, summary = _read_through_stalled_grpc(bq_warehouse, proxies, monkeypatch, "ReadRows")
    _report("extract read, ReadRows stream silent", seconds, summary)
    assert seconds < 60


def test_a_read_stream_silent_before_its_end_is_read_on_from_its_offset(bq_warehouse, proxies,
                                                                         monkeypatch):
    """The same when the stream goes silent after its first message (here all of its
    rows) and before its end: the read goes on from the rows received, and none is read
    twice (the table is compared whole; the proxy applies the offset, as BigQuery does)."""
    seconds, summary = _read_through_stalled_grpc(bq_warehouse, proxies, monkeypatch,
                                                  "ReadRows", after=1)
    _report("extract read, ReadRows stream silent before its end", seconds, summary)
    assert seconds < 60


def test_a_read_stream_broken_after_its_rows_is_resumed_without_reading_them_again(
        bq_warehouse, proxies, monkeypatch):
    """A ReadRows call broken (UNAVAILABLE) after its first message: the library
    resumes the stream from its offset, and the read holds each row once (the proxy
    applies the offset, as BigQuery does; the emulator alone sent the rows again, which
    made the extraction's count check fail)."""
    _through_proxies(monkeypatch, proxies)
    proxies.grpc.break_streams(times=1)
    _read_targets_through_proxies(bq_warehouse)
    assert proxies.grpc.counts["reset"] == 1, proxies.grpc.summary()


def test_the_proxy_applies_a_read_offset_inside_a_message():
    """The proxy's stand-in for BigQuery's ReadRows offset (the emulator ignores it, and
    sends one message per stream, so a resumed read never starts inside a message
    there): whole messages before the offset are dropped, the one it falls in is cut."""
    import pyarrow as pa
    from google.cloud.bigquery_storage_v1 import types as read_types

    from faultproxy import GrpcFaultProxy

    proxy = GrpcFaultProxy("127.0.0.1:9")  # nothing is forwarded here
    try:
        schema = pa.schema([("x", pa.int64())])
        proxy._schemas["s"] = schema.serialize().to_pybytes()
        messages = []
        for first in (0, 4, 8):
            batch = pa.record_batch([pa.array(range(first, first + 4))], schema=schema)
            messages.append(read_types.ReadRowsResponse.serialize(read_types.ReadRowsResponse(
                row_count=4, arrow_record_batch={"serialized_record_batch": batch.serialize().to_pybytes()})))
        request = read_types.ReadRowsRequest.serialize(read_types.ReadRowsRequest(read_stream="s", offset=5))
        forwarded, drop_rows = proxy._from_offset(request)
        assert read_types.ReadRowsRequest.deserialize(forwarded).offset == 0
        rows, counts = [], []
        for message in drop_rows(iter(messages)):
            response = read_types.ReadRowsResponse.deserialize(message)
            batch = pa.ipc.read_record_batch(
                pa.py_buffer(response.arrow_record_batch.serialized_record_batch), schema)
            rows += batch.column(0).to_pylist()
            counts.append(response.row_count)
        assert rows == list(range(5, 12)) and counts == [3, 4]
    finally:
        proxy.stop()


class _ScriptedReader:
    """Stands in for ``BigQueryReadClient`` in the two tests below: a stream of several
    messages cut at its deadline, and one silent for longer than the retry deadline,
    which the emulator (one message per stream) and the proxy cannot give quickly. Call i
    yields ``script[i]``'s row counts as messages, then ends, or fails with
    DEADLINE_EXCEEDED (after ``pause`` seconds of ``clock``) when the script says so."""

    def __init__(self, script, pause: float = 0.0, clock=None):
        self.script, self.pause, self.clock, self.offsets = script, pause, clock, []

    def read_rows(self, name, offset, retry, timeout):
        from google.api_core import exceptions

        rows, fails = self.script[min(len(self.offsets), len(self.script) - 1)]
        self.offsets.append(offset)
        for count in rows:
            yield types.SimpleNamespace(row_count=count)
        if fails:
            if self.clock is not None:
                self.clock.now += self.pause
            raise exceptions.DeadlineExceeded("Deadline Exceeded")


def test_a_read_stream_at_its_deadline_is_read_on_from_its_offset():
    from pipelines.sources import read_stream

    reader = _ScriptedReader([([3, 2], True), ([], True), ([4], False)])
    assert [m.row_count for m in read_stream(reader, "s")] == [3, 2, 4]
    assert reader.offsets == [0, 5, 5]


def test_a_read_stream_silent_past_the_retry_deadline_fails_in_one_line(monkeypatch):
    from pipelines.errors import PipelineError
    from pipelines.sources import read_stream

    from pipelines import sources

    # A clock that moves only when a call waits, so the count of calls does not depend
    # on how late the machine wakes a sleeping thread.
    clock = types.SimpleNamespace(now=0.0)
    monkeypatch.setattr(sources, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setenv("BQX_RETRY_SECONDS", "25")
    reader = _ScriptedReader([([7], True), ([], True)], pause=10, clock=clock)
    with pytest.raises(PipelineError, match=r"^Storage Read API stream projects/p/s sent no rows "
                                            r"for 30 s: 504 Deadline Exceeded$"):
        list(read_stream(reader, "projects/p/s"))
    assert reader.offsets == [0, 7, 7]  # silent for 10, 20 (read on), then 30 s (> 25)


def test_a_bad_request_timeout_is_one_clear_error_before_any_request(bq_warehouse, proxies,
                                                                      monkeypatch):
    from pipelines.errors import PipelineError
    from pipelines.sources import open_source

    _through_proxies(monkeypatch, proxies, request_seconds="abc")
    with pytest.raises(PipelineError, match=r"^BQX_REQUEST_SECONDS='abc' is not a number of seconds$"):
        open_source(bq_warehouse["source"]).query_rows("SELECT 1 AS one")
    assert proxies.bq.counts["requests"] == 0


# --------------------------------------------------------------------------- permanent

def test_forbidden_everywhere_fails_the_merge_fast(faulty_extract, proxies):
    proxies.gcs.fail(403)
    proc, seconds = _timed("pipelines.merge", "--pair", PAIR, "--checkpoint-root", CK,
                           "--output", OUT, "--overwrite", env=proxies.env)
    line = assert_fails_fast(proc, seconds, "403", f"gs://{BUCKET}/faults/")
    _report("merge, 403 everywhere", seconds, f"{proxies.gcs.summary()}; {line}")
    # Not retried: the first request was refused and the job stopped.
    assert proxies.gcs.counts["requests"] == proxies.gcs.counts["403"] <= 2


def test_forbidden_bigquery_fails_the_extract_fast(bq_warehouse, proxies):
    proxies.bq.fail(403, message="Access Denied: Project bqx-ml: User does not have "
                                 "bigquery.jobs.create permission in project bqx-ml.")
    root = f"gs://{BUCKET}/faults/ck-403"
    proc, seconds = _timed("pipelines.extract", *_extract_args(bq_warehouse["source"], root),
                           env=proxies.env)
    line = assert_fails_fast(proc, seconds, "403", "bqx_ml_v3_", "bigquery.jobs.create")
    _report("extract, 403 on BigQuery", seconds, f"{proxies.bq.summary()}; {line}")
    assert proxies.bq.counts["requests"] == proxies.bq.counts["403"] <= 2
    assert _raw_names(root) == []


def test_forbidden_read_api_fails_every_shard_fast(bq_warehouse, proxies):
    import grpc

    proxies.grpc.fail(grpc.StatusCode.PERMISSION_DENIED, method="CreateReadSession",
                      message="request failed: the user does not have "
                              "'bigquery.readsessions.create' permission for 'projects/bqx-ml'")
    root = f"gs://{BUCKET}/faults/ck-403-read"
    proc, seconds = _timed("pipelines.extract", *_extract_args(
        bq_warehouse["source"], root, "--start-date", "2025-01-06", "--end-date", "2025-01-06"),
        env=proxies.env)
    line = assert_fails_fast(proc, seconds, "403", "bigquery.readsessions.create", "bqx_ml_v3_")
    _report("extract, PERMISSION_DENIED on the Storage Read API", seconds,
            f"{proxies.grpc.summary()}; {line}")
    tasks = proc.stderr.count("ERROR failed:")
    assert tasks > 1 and proxies.grpc.counts["PERMISSION_DENIED"] == tasks  # none retried
    assert not checkpoints.find_windows(root, PAIR)
    assert not [n for n in _raw_names(root) if n.endswith(".parquet")]
    assert _scratch_tables("bqx_extract_scratch") == []  # deleted although the read failed


def test_forbidden_upload_fails_the_merge_and_publishes_nothing(faulty_extract, proxies):
    # Reads are allowed, writing objects is not (a service account without
    # storage.objects.create on the output bucket).
    proxies.gcs.fail(403, method="POST", path=r"^/upload/",
                     message="bqx-merge@bqx-ml.iam.gserviceaccount.com does not have "
                             "storage.objects.create access to the Google Cloud Storage object.")
    out = f"gs://{BUCKET}/faults/out-403/training_{PAIR}.parquet"
    proc, seconds = _timed("pipelines.merge", "--pair", PAIR, "--checkpoint-root", CK,
                           "--output", out, env=proxies.env)
    line = assert_fails_fast(proc, seconds, out, "403", "storage.objects.create")
    _report("merge, 403 on upload", seconds, f"{proxies.gcs.summary()}; {line}")
    assert proxies.gcs.counts["403"] == 1, proxies.gcs.injected
    assert _raw_names(out) == []


def test_missing_checkpoint_object_refuses_the_merge(faulty_extract, proxies):
    manifest = checkpoints.load_manifest(CK, PAIR)
    shard = manifest.shard_files(manifest.tables[1])[0]
    name = shard[len(f"gs://{BUCKET}/"):]
    proxies.gcs.fail(404, path=f"/o/{name}")  # metadata and media of that object
    proc, seconds = _timed("pipelines.merge", "--pair", PAIR, "--checkpoint-root", CK,
                           "--output", OUT, "--overwrite", env=proxies.env)
    line = assert_fails_fast(proc, seconds, shard)
    _report("merge, 404 on a checkpoint", seconds, f"{proxies.gcs.summary()}; {line}")
    assert proxies.gcs.counts["404"] == 1


def test_missing_source_table_fails_its_shards_and_commits_nothing(bq_warehouse, proxies):
    table = sorted(bq_warehouse["loaded"]["bqx_ml_v3_features_v2"])[0]
    # What BigQuery answers for a table deleted after discovery; the emulator cannot
    # drop a table between the two, so the proxy answers for it.
    proxies.bq.fail(404, method="POST", path=r"/jobs\b", body=f"`{table}`",
                    message=f"Not found: Table {PROJECT}:bqx_ml_v3_features_v2.{table} was "
                            "not found in location US")
    root = f"gs://{BUCKET}/faults/ck-404"
    proc, seconds = _timed("pipelines.extract", *_extract_args(
        bq_warehouse["source"], root, "--start-date", "2025-01-06", "--end-date", "2025-01-06"),
        env=proxies.env)
    line = assert_fails_fast(proc, seconds, "404", f"bqx_ml_v3_features_v2.{table}")
    _report("extract, 404 on a table", seconds, f"{proxies.bq.summary()}; {line}")
    assert proxies.bq.counts["404"] == 1  # one shard in the window, asked once
    assert not checkpoints.find_windows(root, PAIR)  # no success marker
    names = _raw_names(root)
    assert not [n for n in names if storage.TEMP_MARK in n or "/manifests/" in n]
    assert not [n for n in names if f"/{table}/" in n]


@pytest.fixture
def deleted_bucket(gcs_emulator):
    """A bucket that existed and was deleted (by the emulator itself, not the proxy)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project=PROJECT, credentials=AnonymousCredentials())
    bucket = client.create_bucket(DOOMED)
    bucket.blob("ck/placeholder").upload_from_string(b"x")
    bucket.blob("ck/placeholder").delete()
    bucket.delete()
    return f"gs://{DOOMED}"


@pytest.mark.parametrize("where", ["merge output", "merge checkpoints", "extract checkpoints"])
def test_deleted_bucket_fails_fast_naming_it(where, deleted_bucket, faulty_extract, bq_warehouse,
                                            proxies):
    if where == "merge output":
        args = ["pipelines.merge", "--pair", PAIR, "--checkpoint-root", CK,
                "--output", f"{deleted_bucket}/out/training_{PAIR}.parquet"]
    elif where == "merge checkpoints":
        args = ["pipelines.merge", "--pair", PAIR, "--checkpoint-root", f"{deleted_bucket}/ck",
                "--output", OUT, "--overwrite"]
    else:
        args = ["pipelines.extract", *_extract_args(bq_warehouse["source"], f"{deleted_bucket}/ck")]
    proc, seconds = _timed(*args, env=proxies.env)
    line = assert_fails_fast(proc, seconds, deleted_bucket, "does not exist")
    _report(f"deleted bucket ({where})", seconds, f"{proxies.gcs.summary()}; {line}")
    assert "[extract] start" not in proc.stderr  # refused before any shard was extracted


# --------------------------------------------------------------------------- disk full

@contextlib.contextmanager
def _small_disk(size_kib: int):
    """A folder on a tmpfs of ``size_kib`` KiB; yields (folder, None). Where mounting is
    not permitted, yields (folder, preexec) where ``preexec`` caps the size of any file
    the child writes (RLIMIT_FSIZE: EFBIG, standing in for ENOSPC)."""
    folder = tempfile.mkdtemp(prefix="bqx-small-disk-")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kib}k", "tmpfs", folder],
                             capture_output=True).returncode == 0
    try:
        if mounted:
            yield folder, None
        else:
            limit = size_kib * 1024
            yield folder, lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    finally:
        if mounted:
            subprocess.run(["umount", folder], check=False)
        with contextlib.suppress(OSError):
            os.rmdir(folder)


@pytest.fixture(scope="module")
def local_checkpoints(faulty_extract, tmp_path_factory) -> str:
    """The faulty extraction's checkpoints, copied to a local folder."""
    root = str(tmp_path_factory.mktemp("faults-ck"))
    for path in storage.list_files(CK):
        local = os.path.join(root, *path[len(CK) + 1:].split("/"))
        os.makedirs(os.path.dirname(local), exist_ok=True)
        with open(local, "wb") as fh:
            fh.write(storage.read_bytes(path))
    return root


def test_a_full_disk_fails_the_local_merge_and_leaves_nothing(local_checkpoints):
    with _small_disk(256) as (folder, preexec):
        output = os.path.join(folder, f"training_{PAIR}.parquet")
        started = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.merge", "--pair", PAIR, "--checkpoint-root",
             local_checkpoints, "--output", output], cwd=ROOT,
            capture_output=True, text=True, timeout=300, preexec_fn=preexec)
        seconds = time.monotonic() - started
        what = "no space left on the disk" if preexec is None else "file too large"
        line = assert_fails_fast(proc, seconds, output, what)
        _report("local merge, full disk" + (" (RLIMIT_FSIZE)" if preexec else " (tmpfs)"),
                seconds, line)
        assert os.listdir(folder) == []  # no file at the final name, no temporary
