"""Sources of feature tables: the embedded DuckDB warehouse and BigQuery.

A source answers three things: the columns of every table of a dataset (from
INFORMATION_SCHEMA), a GoogleSQL query as an Arrow table, and a GoogleSQL query as rows.
The DuckDB source translates GoogleSQL with :func:`pipelines.sql.to_duckdb`; the
BigQuery source runs it as it is and reads bulk results through the Storage Read API.

Every BigQuery call retries transient errors through the client libraries, with the
timing of :func:`pipelines.storage.retry_timing` (``BQX_RETRY_SECONDS``): REST calls with
:func:`bigquery_retry`, failed query jobs re-run with :func:`bigquery_job_retry`, Storage
Read API calls with :func:`read_api_retry`. Permanent errors are not retried. Each REST
request that goes unanswered for :func:`bigquery_timeout` seconds is abandoned and sent
again, also while a job is awaited (:func:`wait_for_job`), and so is a Storage Read API
call (:func:`read_stream`).
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import time
import uuid
from typing import Any, Protocol

import pyarrow as pa

from pipelines import cli
from pipelines.errors import PipelineError, first_line
from pipelines.storage import retry_timing

DEFAULT_DATA_DIR = "data"
DEFAULT_SCRATCH_DATASET = "bqx_extract_scratch"
SCRATCH_HOURS = 6  # scratch result tables expire on their own after this
REQUEST_SECONDS_ENV = "BQX_REQUEST_SECONDS"
DEFAULT_REQUEST_SECONDS = 60.0
JOB_POLL_SECONDS = (0.2, 5.0)  # first and longest sleep between polls of a running job
# DuckDB's own memory limit for a warehouse (``duckdb://PATH?memory_limit=...``), shared
# by every connection to that file in one process (DuckDB keeps one database per file).
# Its default, 80% of the machine, let the block cache keep the tables already read,
# each of which is read once: 5.30-6.65 GiB peak RSS extracting a 100,000-row pair
# against 1.43-2.03 with this limit, with no cost in time seen (BENCHMARKS.md, "DuckDB's
# memory limit for the warehouse"). Extraction queries scan one shard each; the largest
# state they keep is the distinct keys of the shards one count query covers (up to 16).
DUCKDB_MEMORY_LIMIT = "512MB"
# DuckDB's memory sizes, as this project accepts them (no quotes reach the SET).
_MEMORY_SIZE = re.compile(r"\d+(\.\d+)?\s*([KMGT]i?)?B", re.IGNORECASE)

log = logging.getLogger(__name__)


def bigquery_retry():
    """Retry of BigQuery REST calls (jobs.insert, getQueryResults, tables, datasets): the
    library's predicate (reasons rateLimitExceeded, backendError, internalError,
    badGateway; 429/500/502/503 and connection errors) with :func:`retry_timing`."""
    from google.cloud.bigquery.retry import DEFAULT_RETRY

    timing = retry_timing()
    return DEFAULT_RETRY.with_timeout(timing.deadline).with_delay(
        initial=timing.initial, maximum=timing.maximum, multiplier=timing.multiplier)


def bigquery_timeout() -> float:
    """Seconds one BigQuery REST request may go unanswered before it is abandoned and
    sent again by :func:`bigquery_retry` (``$BQX_REQUEST_SECONDS``, default 60, the
    per-request default of google-cloud-storage). The BigQuery library sets none on most
    requests, so a connection that stops answering would hang the job for good. Not for
    ``job.result()``, where it also bounds the whole job: see :func:`wait_for_job`."""
    return cli.env_number(REQUEST_SECONDS_ENV, DEFAULT_REQUEST_SECONDS, above=0, unit="seconds")


def wait_for_job(job):
    """``job.result()`` (a query's rows, or the job itself), with each request abandoned
    after :func:`bigquery_timeout` and sent again.

    The library's own wait sets no timeout on its polls, and a timeout given to
    ``result()`` also bounds the whole job. So the job is polled here (``jobs.get``,
    with the back-off of :data:`JOB_POLL_SECONDS`) until it is done, and only then is
    ``result()`` given the timeout. A job that failed goes to ``result()`` without it:
    a query failed for a transient reason is run again there (its job retry), and the
    rerun may take longer than one request."""
    delay, longest = JOB_POLL_SECONDS
    while not job.done(retry=bigquery_retry(), timeout=bigquery_timeout()):
        time.sleep(delay)
        delay = min(2 * delay, longest)
    if job.error_result:
        return job.result(retry=bigquery_retry())
    return job.result(retry=bigquery_retry(), timeout=bigquery_timeout())


def bigquery_job_retry():
    """Retry of a query job that failed for a transient reason (jobRateLimitExceeded,
    jobBackendError, ...): the library re-runs it under a new job id. The library's
    predicate; its deadline is four times the per-call one, as the library's default
    is, because one job retry may follow a whole exhausted call retry."""
    from google.cloud.bigquery.retry import DEFAULT_JOB_RETRY

    timing = retry_timing()
    return DEFAULT_JOB_RETRY.with_timeout(4 * timing.deadline).with_delay(
        initial=timing.initial, maximum=timing.maximum, multiplier=timing.multiplier)


def read_api_retry():
    """Retry of Storage Read API calls (gRPC ``CreateReadSession``, ``ReadRows``):
    UNAVAILABLE and DEADLINE_EXCEEDED as the library's defaults, plus RESOURCE_EXHAUSTED
    (a rate limit on read sessions, which the defaults do not retry), with
    :func:`retry_timing`. A stream broken mid-way is resumed from its offset by the
    library's ``ReadRowsStream``, whose reconnects use this retry too."""
    from google.api_core import exceptions
    from google.api_core import retry as retries

    timing = retry_timing()
    return retries.Retry(
        predicate=retries.if_exception_type(exceptions.ServiceUnavailable,
                                            exceptions.DeadlineExceeded,
                                            exceptions.ResourceExhausted),
        initial=timing.initial, maximum=timing.maximum, multiplier=timing.multiplier,
        timeout=timing.deadline)


def read_stream(reader, name: str):
    """The responses of the Storage Read API stream ``name``, read with ``reader`` (a
    ``BigQueryReadClient``), from its start.

    The library resumes a stream that fails from its offset, but one that sends nothing,
    and no error either, would wait for the call's deadline: a day by default. So each
    call is given :func:`bigquery_timeout` seconds: a call that has not sent its first
    message by then is sent again by :func:`read_api_retry`, and a stream still running
    at its deadline is read on from the rows already received, in a new call. A stream
    that sends no rows in call after call fails once
    :func:`pipelines.storage.retry_timing`'s deadline has passed since its last rows."""
    from google.api_core import exceptions

    seconds, offset = bigquery_timeout(), 0
    last_rows = time.monotonic()
    while True:
        try:
            for response in reader.read_rows(name, offset=offset, retry=read_api_retry(),
                                             timeout=seconds):
                offset += response.row_count
                last_rows = time.monotonic()
                yield response
            return
        except exceptions.DeadlineExceeded as exc:
            silent = time.monotonic() - last_rows
            if silent > retry_timing().deadline:
                raise PipelineError(f"Storage Read API stream {name} sent no rows for "
                                    f"{silent:.0f} s: {first_line(exc)}") from None
            # The offset may equal the stream's row count when the deadline fell after its
            # last message. The API reference ("must be less than the last row read; a
            # larger offset is undefined") leaves that case unclear; the library's own
            # resumption (ReadRowsStream._reconnect) sends the same request after a
            # failure there, so this does what it does. Unverified on real BigQuery.
            log.info("Storage Read API stream %s at its %g s deadline; reading on from row %d",
                     name, seconds, offset)


def default_warehouse_path() -> str:
    """The embedded sample warehouse (``$BQX_DATA_DIR/warehouse.duckdb``)."""
    return os.path.join(os.environ.get("BQX_DATA_DIR", DEFAULT_DATA_DIR), "warehouse.duckdb")


class Source(Protocol):
    """What the extract job needs from a warehouse."""

    url: str
    project: str | None

    def table_columns(self, dataset: str) -> dict[str, list[tuple[str, str]]]:
        """Every table of ``dataset`` with its (column, type) pairs in ordinal order."""

    def query_arrow(self, googlesql: str) -> pa.Table:
        """Run a GoogleSQL query; return its result as Arrow."""

    def query_rows(self, googlesql: str) -> list[dict[str, Any]]:
        """Run a small GoogleSQL query; return its rows as dicts."""

    def close(self) -> None:
        """Release connections."""


class DuckDBSource:
    """A DuckDB file laid out like the BigQuery datasets (one schema per dataset), read
    with at most ``memory_limit`` of DuckDB's memory (DuckDB's syntax, e.g. ``2GB``).
    A query that needs more spills to ``temp_directory`` (DuckDB's default: the file's
    path plus ``.tmp``), which must then be a folder DuckDB can create and write."""

    def __init__(self, path: str, memory_limit: str = DUCKDB_MEMORY_LIMIT,
                 temp_directory: str | None = None):
        import duckdb

        self.path = path
        self.url = duckdb_url(path)
        self.project = None
        self.memory_limit = memory_limit.strip()
        if not _MEMORY_SIZE.fullmatch(self.memory_limit):
            raise PipelineError(f"source {self.url}: memory_limit={memory_limit!r}: not a "
                                f"memory size such as 512MB or 2GB")
        if not os.path.isfile(path):
            raise PipelineError(f"DuckDB warehouse not found: {path}")
        con = None
        try:
            con = duckdb.connect(path, read_only=True)
            con.execute(f"SET memory_limit = '{self.memory_limit}'")
            if temp_directory is not None:
                con.execute("SET temp_directory = ?", [temp_directory])
            self.temp_directory = con.execute(
                "SELECT current_setting('temp_directory')").fetchone()[0]
        except duckdb.Error as exc:
            # A size DuckDB refuses (too large) leaves the file open read-only: closed, so
            # that the process can open it otherwise.
            if con is not None:
                con.close()
            raise PipelineError(f"cannot open DuckDB warehouse {path} with memory_limit="
                                f"{self.memory_limit}: {first_line(exc)}") from None
        self._con = con
        self._con.execute("SET TimeZone = 'UTC'")
        # One connection serves one thread at a time; Beam may call from several.
        self._lock = threading.Lock()

    def table_columns(self, dataset: str) -> dict[str, list[tuple[str, str]]]:
        rows = self._fetch(
            "SELECT table_name, column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = ? ORDER BY table_name, ordinal_position", [dataset])
        out: dict[str, list[tuple[str, str]]] = {}
        for table, column, dtype in rows:
            out.setdefault(table, []).append((column, dtype))
        return out

    def query_arrow(self, googlesql: str) -> pa.Table:
        from pipelines.sql import to_duckdb

        with self._cursor() as cur:
            return cur.execute(to_duckdb(googlesql)).to_arrow_table()

    def query_rows(self, googlesql: str) -> list[dict[str, Any]]:
        from pipelines.sql import to_duckdb

        with self._cursor() as cur:
            cur.execute(to_duckdb(googlesql))
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]

    def _fetch(self, sql: str, params: list[Any]) -> list[tuple]:
        with self._cursor() as cur:
            return cur.execute(sql, params).fetchall()

    @contextlib.contextmanager
    def _cursor(self):
        """A cursor of the connection, closed after use. Running out of DuckDB's memory
        limit becomes a PipelineError that says how to raise it: the limit, not a
        passing fault, is what to change."""
        import duckdb

        with self._lock:
            cur = self._con.cursor()
        try:
            yield cur
        except duckdb.OutOfMemoryException:
            raise PipelineError(
                f"source {self.url}: a query needed more than DuckDB's memory limit "
                f"({self.memory_limit}); raise it with --source "
                f"'{self.url}?memory_limit=SIZE', SIZE above {self.memory_limit}") from None
        except duckdb.IOException as exc:
            # DuckDB names its spill folder in the error; any other I/O error is not ours
            # to explain.
            if not self.temp_directory or self.temp_directory not in str(exc):
                raise
            raise PipelineError(
                f"source {self.url}: a query needed more than DuckDB's memory limit "
                f"({self.memory_limit}) and could not spill to {self.temp_directory} "
                f"({first_line(exc)}); give it a writable folder with --source "
                f"'{self.url}?temp_directory=DIR', or raise memory_limit") from None
        finally:
            cur.close()

    def close(self) -> None:
        self._con.close()


class BigQuerySource:
    """BigQuery datasets of one project (``bigquery://PROJECT``).

    Small results (counts, key ranges, INFORMATION_SCHEMA) come back as REST rows. A
    shard's rows are written by the query into a scratch table (dataset
    ``$BQX_SCRATCH_DATASET``, default ``bqx_extract_scratch``, in the source's location,
    created if missing; every table expires after a few hours and is deleted right after
    reading, also on failure) and read as Arrow through the BigQuery Storage Read API.

    ``BQX_BIGQUERY_ENDPOINT`` (REST, e.g. ``http://127.0.0.1:9050``) and
    ``BQX_BIGQUERY_GRPC`` (Storage Read API, ``host:port``, plaintext) point both clients
    at an emulator with anonymous credentials; without them the default credentials and
    Google endpoints are used. One instance per thread (Beam: one per DoFn ``setup()``).
    """

    def __init__(self, project: str, scratch_dataset: str | None = None,
                 location: str | None = None):
        if not project:
            raise PipelineError("bigquery:// source needs a project: bigquery://PROJECT")
        self.project = project
        self.url = f"bigquery://{project}"
        # Given in the URL (bigquery://P?scratch_dataset=D&location=L) they reach Dataflow
        # workers too, which do not see the launcher's environment.
        self.scratch_dataset = (scratch_dataset or os.environ.get("BQX_SCRATCH_DATASET")
                                or DEFAULT_SCRATCH_DATASET)
        self.location = location or os.environ.get("BQX_BIGQUERY_LOCATION") or None
        self._endpoint = os.environ.get("BQX_BIGQUERY_ENDPOINT") or None
        self._grpc = os.environ.get("BQX_BIGQUERY_GRPC") or None
        if self._endpoint and not self._grpc:
            raise PipelineError("BQX_BIGQUERY_ENDPOINT is set but BQX_BIGQUERY_GRPC (the "
                                "Storage Read API address, host:port) is not")
        self._client = self._make_client()
        self._read_client = None
        self._locations: dict[tuple[str, str], str] = {}
        self._scratch_ready: set[str] = set()

    # ------------------------------------------------------------------ clients
    def _make_client(self):
        from google.cloud import bigquery

        if self._endpoint:
            from google.auth.credentials import AnonymousCredentials

            return bigquery.Client(project=self.project, credentials=AnonymousCredentials(),
                                   client_options={"api_endpoint": self._endpoint})
        from google.auth import exceptions as auth_errors

        try:
            return bigquery.Client(project=self.project)
        except auth_errors.GoogleAuthError as exc:
            raise PipelineError(f"source {self.url}: no Google credentials for BigQuery "
                                f"({exc})") from None

    def _reader(self):
        if self._read_client is None:
            from google.cloud.bigquery_storage_v1 import BigQueryReadClient

            if self._grpc:
                import grpc
                from google.cloud.bigquery_storage_v1.services.big_query_read.transports import (
                    BigQueryReadGrpcTransport)

                channel = grpc.insecure_channel(self._grpc)
                self._read_client = BigQueryReadClient(
                    transport=BigQueryReadGrpcTransport(channel=channel))
            else:
                self._read_client = BigQueryReadClient()
        return self._read_client

    # ------------------------------------------------------------------ interface
    def table_columns(self, dataset: str) -> dict[str, list[tuple[str, str]]]:
        from pipelines.sql import quote_all

        project, ds = quote_all([self.project, dataset])
        rows = self.query_rows(
            f"SELECT table_name, column_name, data_type FROM {project}.{ds}"
            ".INFORMATION_SCHEMA.COLUMNS ORDER BY table_name, ordinal_position",
            what=f"listing the columns of dataset {self.project}.{dataset}")
        out: dict[str, list[tuple[str, str]]] = {}
        for row in rows:
            out.setdefault(row["table_name"], []).append((row["column_name"], row["data_type"]))
        return out

    def query_rows(self, googlesql: str, what: str | None = None) -> list[dict[str, Any]]:
        from google.api_core import exceptions

        try:
            job = self._client.query(googlesql, retry=bigquery_retry(),
                                     job_retry=bigquery_job_retry(), timeout=bigquery_timeout())
            return [dict(row.items()) for row in wait_for_job(job)]
        except exceptions.GoogleAPIError as exc:
            raise self._error(exc, googlesql, what) from None

    def dry_run_bytes(self, googlesql: str) -> int:
        """Bytes BigQuery would scan for ``googlesql`` (a free dry-run job)."""
        from google.api_core import exceptions as api_errors
        from google.cloud import bigquery

        config = bigquery.QueryJobConfig(dry_run=True, use_query_cache=False)
        try:
            job = self._client.query(str(googlesql), job_config=config, location=self.location,
                                     retry=bigquery_retry(), job_retry=bigquery_job_retry(),
                                     timeout=bigquery_timeout())
        except api_errors.GoogleAPIError as exc:
            raise self._error(exc, googlesql, "dry run") from None
        return int(job.total_bytes_processed or 0)

    def query_arrow(self, googlesql: str) -> pa.Table:
        from google.api_core import exceptions

        tables = _tables_of(googlesql, self.project)
        try:
            location = self._location(tables)
            dataset = self._scratch(location)
            stem = "_".join(t[2] for t in tables[:1]) or "query"
            name = f"{stem[:900]}_{uuid.uuid4().hex[:16]}"
            target = f"`{self.project}`.`{dataset}`.`{name}`"
            ddl = (f"CREATE TABLE {target} OPTIONS(expiration_timestamp = TIMESTAMP_ADD("
                   f"CURRENT_TIMESTAMP(), INTERVAL {SCRATCH_HOURS} HOUR)) AS\n{googlesql}")
        except exceptions.GoogleAPIError as exc:
            raise self._error(exc, googlesql, None) from None
        try:
            wait_for_job(self._client.query(ddl, location=location, retry=bigquery_retry(),
                                            job_retry=bigquery_job_retry(),
                                            timeout=bigquery_timeout()))
            return self._read_table(dataset, name)
        except exceptions.GoogleAPIError as exc:
            raise self._error(exc, googlesql, None) from None
        finally:
            try:
                self._client.delete_table(f"{self.project}.{dataset}.{name}", not_found_ok=True,
                                          retry=bigquery_retry(), timeout=bigquery_timeout())
            except exceptions.GoogleAPIError as exc:  # it expires anyway
                log.warning("could not delete scratch table %s.%s: %s", dataset, name, exc)

    def close(self) -> None:
        self._client.close()
        if self._read_client is not None:
            self._read_client.transport.close()

    # ------------------------------------------------------------------ helpers
    def _read_table(self, dataset: str, table: str) -> pa.Table:
        """A whole table as Arrow through the Storage Read API (one stream)."""
        from google.cloud.bigquery_storage_v1 import types

        reader = self._reader()
        session = reader.create_read_session(
            parent=f"projects/{self.project}",
            read_session=types.ReadSession(
                table=f"projects/{self.project}/datasets/{dataset}/tables/{table}",
                data_format=types.DataFormat.ARROW),
            max_stream_count=1, retry=read_api_retry(), timeout=bigquery_timeout())
        schema = pa.ipc.read_schema(pa.py_buffer(session.arrow_schema.serialized_schema))
        batches = []
        for stream in session.streams:
            for response in read_stream(reader, stream.name):
                data = response.arrow_record_batch.serialized_record_batch
                if data:
                    batches.append(pa.ipc.read_record_batch(pa.py_buffer(data), schema))
        result = pa.Table.from_batches(batches, schema=schema)
        # Drop server field metadata; names and types are what the query gave.
        clean = pa.schema([f.remove_metadata() for f in schema])
        return pa.Table.from_arrays(result.columns, schema=clean)

    def _location(self, tables: list[tuple[str, str, str]]) -> str | None:
        """Where the query runs: the configured location or its first dataset's."""
        fixed = self.location
        if fixed or not tables:
            return fixed or None
        project, dataset = tables[0][0], tables[0][1]
        if (project, dataset) not in self._locations:
            self._locations[(project, dataset)] = self._client.get_dataset(
                f"{project}.{dataset}", retry=bigquery_retry(), timeout=bigquery_timeout()).location
        return self._locations[(project, dataset)]

    def _scratch(self, location: str | None) -> str:
        """The scratch dataset (created if missing) in ``location``."""
        from google.cloud import bigquery

        dataset = self.scratch_dataset
        if dataset in self._scratch_ready:
            return dataset
        spec = bigquery.Dataset(f"{self.project}.{dataset}")
        spec.location = location
        spec.default_table_expiration_ms = SCRATCH_HOURS * 3600 * 1000
        spec.description = "Temporary query results of the BQX extract job (expire on their own)"
        found = self._client.create_dataset(spec, exists_ok=True, retry=bigquery_retry(),
                                            timeout=bigquery_timeout())
        if location and found.location and found.location.lower() != location.lower():
            raise PipelineError(
                f"scratch dataset {self.project}.{dataset} is in {found.location}, the source "
                f"tables in {location}; set BQX_SCRATCH_DATASET to a dataset in {location}")
        self._scratch_ready.add(dataset)
        return dataset

    def _error(self, exc: Exception, googlesql: str, what: str | None) -> PipelineError:
        tables = _tables_of(googlesql, self.project)
        if what is None:
            what = ("query on table " + ", ".join(".".join(t) for t in tables)) if tables else "query"
        return PipelineError(f"BigQuery {what} failed ({self.url}): {exc}")


def _tables_of(googlesql: str, project: str) -> list[tuple[str, str, str]]:
    """(project, dataset, table) of every table a query reads, in order of appearance."""
    import sqlglot
    from sqlglot import exp

    try:
        tree = sqlglot.parse_one(googlesql, read="bigquery")
    except sqlglot.errors.ParseError:
        return []
    out = []
    for t in tree.find_all(exp.Table):
        if t.db and "INFORMATION_SCHEMA" not in t.sql(dialect="bigquery").upper():
            item = (t.catalog or project, t.db, t.name)
            if item not in out:
                out.append(item)
    return out


def _url_parameters(url: str, query: str, known: tuple[str, ...]) -> dict[str, str]:
    """The parameters of a source URL's query string, each one of ``known``, given once
    and with a value."""
    from urllib.parse import parse_qsl

    pairs = parse_qsl(query, keep_blank_values=True)
    params = dict(pairs)
    unknown = set(params) - set(known)
    if unknown:
        raise PipelineError(f"source {url}: unknown parameter(s) {', '.join(sorted(unknown))}; "
                            f"known: {', '.join(known)}")
    names = [name for name, _ in pairs]
    for name, value in params.items():
        if not value or names.count(name) > 1:
            raise PipelineError(f"source {url}: parameter {name} must be given once, with a value")
    return params


def duckdb_url(path: str) -> str:
    """The ``duckdb://`` URL of the warehouse file ``path``, percent-encoded, so that a
    ``?`` or ``%`` in its name is not taken for the URL's parameters or an escape."""
    from urllib.parse import quote

    return "duckdb://" + quote(path)


def open_source(url: str) -> Source:
    """Open a source from its URL:
    ``duckdb:///path/file.duckdb[?memory_limit=2GB&temp_directory=DIR]`` (or a plain path;
    in a URL the path is percent-encoded, as :func:`duckdb_url` writes it, so ``%3F``
    stands for a ``?`` in a file name) or
    ``bigquery://PROJECT[?scratch_dataset=DATASET&location=LOCATION]``."""
    if url.startswith("duckdb://"):
        from urllib.parse import unquote

        path, _, query = url[len("duckdb://"):].partition("?")
        path = unquote(path)
        params = _url_parameters(url, query, ("memory_limit", "temp_directory"))
        return DuckDBSource(path, memory_limit=params.get("memory_limit", DUCKDB_MEMORY_LIMIT),
                            temp_directory=params.get("temp_directory"))
    if url.startswith("bigquery://"):
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        query = _url_parameters(url, parts.query, ("scratch_dataset", "location"))
        return BigQuerySource(parts.netloc or parts.path.strip("/"),
                              scratch_dataset=query.get("scratch_dataset"),
                              location=query.get("location"))
    if url.endswith(".duckdb"):
        return DuckDBSource(url)
    raise PipelineError(f"unknown source {url!r}: expected duckdb:///path/to/file.duckdb "
                        "or bigquery://PROJECT")
