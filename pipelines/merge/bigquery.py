"""The ``bigquery`` merge method: the merge as BigQuery jobs; no data passes through here.

The launcher reads the manifest (and writes a small ``_layout.json``); BigQuery does the
rest, so the job fits 1 vCPU / 2 GiB whatever the size of the pair:

1. **Stage** every table of the manifest as a temporary table in a scratch dataset
   (``BQX_MERGE_DATASET``, default ``bqx_merge_scratch``), labelled and with an
   expiration, and always deleted at the end (try/finally), failed or not:

   * ``--staging external`` (the default): an external table over the table's parquet
     shards in GCS (``ExternalConfig("PARQUET")``, source URIs = the manifest's shard
     objects, explicit schema from the manifest). Nothing is copied.
   * ``--staging load``: a native table with the manifest's schema, created empty and
     then filled by one load job (``WRITE_APPEND``) from the same shard objects. Load jobs
     are free; this is what the BigQuery emulator can run (it reads external tables as
     0 rows and does not parse ``CREATE EXTERNAL TABLE``).

2. **Split the columns into parts** of at most 10,000 columns (BigQuery's limit for a
   table or query result), each keyed by ``interval_time``; a table's columns stay in one
   part, column order is kept (key, targets, then features in catalog order), and a part
   also stays below :data:`MAX_TABLES_PER_QUERY` joined tables and
   :data:`MAX_QUERY_CHARS` characters of SQL.

3. **Export** each part with one statement: the targets table is the spine, every
   feature table of the part is ``LEFT JOIN``-ed on ``interval_time``, and ``EXPORT
   DATA`` writes parquet to ``{output}/training_{pair}/part-{k:02d}/data-*.parquet`` (a
   wildcard: one exported file may not exceed 1 GB).

4. **Commit**: the row count BigQuery reports for every part must equal the spine's
   rows from the manifest; then ``{output}/training_{pair}/_layout.json`` is written,
   last, as the success marker. ``python -m pipelines.validate {output}/training_{pair}/``
   validates the parts as one training set.

``--dry-run`` stages the table definitions only (external tables or empty native tables:
no data, no cost), prints the SQL, the bytes BigQuery's dry-run jobs report, an estimate
from the manifest (BigQuery bills logical bytes), the cost at $6.25/TiB, and removes the
definitions again. Errors from BigQuery are shown whole.

Transient errors are retried by the client library with the retry of
:func:`pipelines.sources.bigquery_retry` (and query jobs with
:func:`pipelines.sources.bigquery_job_retry`), and a request left unanswered is abandoned
after :func:`pipelines.sources.bigquery_timeout`; every call is safe to repeat after a
lost response (client-chosen job ids, run-unique table names).
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import sys
import uuid
from typing import Any, Callable, Sequence, TextIO

from sqlglot import exp

from pipelines import cli, storage
from pipelines.catalog import TableSpec
from pipelines.checkpoints import Manifest
from pipelines.errors import PipelineError
from pipelines.sources import bigquery_job_retry, bigquery_retry, bigquery_timeout, wait_for_job

log = logging.getLogger("pipelines.merge.bigquery")

# BigQuery's limits (https://cloud.google.com/bigquery/quotas).
MAX_COLUMNS = 10_000  # columns in a table or query result
BIGQUERY_MAX_TABLES = 1_000  # tables referenced by one query
BIGQUERY_MAX_QUERY_CHARS = 1_024 * 1_024  # "1,024K characters"
# What this module allows itself: well below the limits.
MAX_TABLES_PER_QUERY = 500
MAX_QUERY_CHARS = 900_000
PRICE_PER_TIB = 6.25
TIB = 2 ** 40
MIN_BILLED_BYTES_PER_TABLE = 10 * 2 ** 20  # on-demand minimum per table referenced
# Logical bytes BigQuery bills per value (STRING: 2 + its UTF-8 length; a guess here).
_LOGICAL_BYTES = {"FLOAT64": 8, "INT64": 8, "TIMESTAMP": 8, "BOOL": 1, "STRING": 18}

STAGING_MODES = ("external", "load")
DEFAULT_STAGING = "external"
DEFAULT_DATASET = "bqx_merge_scratch"
TABLE_EXPIRATION = dt.timedelta(hours=24)
LAYOUT_NAME = "_layout.json"
LAYOUT_FORMAT = 1
LAYOUT_KIND = "bqx.training.parts"
PART_FILES = "data-*.parquet"
EXPORT_COMPRESSION = "ZSTD"
LOAD_PARALLELISM = 32


# --------------------------------------------------------------------------- plan

@dataclasses.dataclass
class Part:
    """One exported part: the key plus whole tables' columns."""

    index: int
    tables: list[int]  # indices into the manifest's tables (0 = targets, the spine)
    columns: list[str]  # output column names, the key first

    @property
    def name(self) -> str:
        return f"part-{self.index:02d}"


def _column_chars(name: str, alias: str) -> int:
    # `tNNN`.`name`, in the select list, with a comma and a space.
    return len(name) + len(alias) + 8


def _join_chars(project_dataset: int, alias: str, key: str) -> int:
    return project_dataset + 2 * len(alias) + 2 * len(key) + 60


def split_parts(specs: Sequence[TableSpec], key: str, max_columns: int = MAX_COLUMNS,
                max_tables: int = MAX_TABLES_PER_QUERY,
                max_chars: int = MAX_QUERY_CHARS, table_ref_chars: int = 120) -> list[Part]:
    """Split ``specs`` (targets first) into parts, in order, each within the limits.

    Every part has the key first; part 0 has the targets next. A table never spans two
    parts; a new part starts when the next table would take the part past
    ``max_columns`` columns (key included), ``max_tables`` joined tables (the spine
    included) or ``max_chars`` characters of SQL (estimated generously).
    """
    if not specs:
        raise PipelineError("the manifest has no tables")
    base_chars = 400 + _join_chars(table_ref_chars, _alias(0), key)
    parts: list[Part] = []

    def new_part(with_targets: bool) -> tuple[Part, int]:
        part = Part(len(parts), [0], [key])
        chars = base_chars + _column_chars(key, _alias(0))
        if with_targets:
            part.columns += specs[0].output_names
            chars += sum(_column_chars(c, _alias(0)) for c in specs[0].output_names)
        parts.append(part)
        return part, chars

    if 1 + len(specs[0].columns) > max_columns:
        raise PipelineError(f"the targets table {specs[0].table} has {len(specs[0].columns)} "
                            f"columns: more than a part can hold ({max_columns - 1} + the key)")
    part, chars = new_part(True)
    for i, spec in enumerate(specs[1:], start=1):
        cols = spec.output_names
        alias = _alias(i)
        need = sum(_column_chars(c, alias) for c in cols) + _join_chars(table_ref_chars, alias, key)
        if 1 + len(cols) > max_columns or base_chars + need > max_chars:
            raise PipelineError(
                f"table {spec.dataset}.{spec.table} has {len(cols)} columns: it cannot fit "
                f"in one part of at most {max_columns} columns (key included) and "
                f"{max_chars:,} characters of SQL")
        if (len(part.columns) + len(cols) > max_columns or len(part.tables) + 1 > max_tables
                or chars + need > max_chars):
            part, chars = new_part(False)
        part.tables.append(i)
        part.columns += cols
        chars += need
    return parts


def _alias(i: int) -> str:
    return f"t{i:03d}"


# --------------------------------------------------------------------------- SQL

def _qcol(name: str, table: str | None = None) -> exp.Column:
    return exp.column(name, table=table, quoted=True)


def select_sql(part: Part, specs: Sequence[TableSpec], key: str,
               table_ref: Callable[[int], exp.Table]) -> str:
    """The part's SELECT: the spine (targets) LEFT JOIN each of its tables on the key.

    ``table_ref(i)`` names the staged table of manifest table ``i``. Identifiers are
    quoted by sqlglot; the result is GoogleSQL.
    """
    spine = _alias(0)
    columns = [_qcol(key, spine)]
    if part.index == 0:
        columns += [_qcol(c, spine) for c in specs[0].output_names]
    for i in part.tables[1:]:
        columns += [_qcol(c, _alias(i)) for c in specs[i].output_names]
    # copy=False throughout: the builder otherwise copies the whole (10,000-column)
    # tree at every join.
    query = exp.Select(expressions=columns).from_(
        exp.alias_(table_ref(0), spine, table=True, quoted=True), copy=False)
    for i in part.tables[1:]:
        alias = _alias(i)
        query = query.join(
            exp.alias_(table_ref(i), alias, table=True, quoted=True),
            on=exp.EQ(this=_qcol(key, alias), expression=_qcol(key, spine)),
            join_type="LEFT", copy=False)
    query = query.order_by(_qcol(key, spine), copy=False)
    return query.sql(dialect="bigquery")


def export_sql(select: str, uri: str) -> str:
    """``EXPORT DATA`` of ``select`` as parquet to the wildcard ``uri``."""
    if uri.count("*") != 1:
        raise ValueError(f"export URI needs exactly one '*' wildcard: {uri}")
    options = ", ".join([
        f"uri = {exp.Literal.string(uri).sql(dialect='bigquery')}",
        "format = 'PARQUET'",
        f"compression = '{EXPORT_COMPRESSION}'",
        "overwrite = true",
    ])
    return f"EXPORT DATA OPTIONS ({options}) AS\n{select}"


def table_ref(project: str | None, dataset: str, table: str) -> exp.Table:
    """A quoted ``project.dataset.table`` reference."""
    return exp.table_(table, db=dataset, catalog=project, quoted=True)


def check_query_limits(sql: str, tables: int, columns: int, what: str) -> None:
    """Refuse a statement that BigQuery would reject for its size."""
    if len(sql) > BIGQUERY_MAX_QUERY_CHARS:
        raise PipelineError(f"{what}: SQL of {len(sql):,} characters exceeds BigQuery's "
                            f"{BIGQUERY_MAX_QUERY_CHARS:,}")
    if tables > BIGQUERY_MAX_TABLES:
        raise PipelineError(f"{what}: {tables} tables exceed BigQuery's {BIGQUERY_MAX_TABLES} "
                            "per query")
    if columns > MAX_COLUMNS:
        raise PipelineError(f"{what}: {columns} columns exceed BigQuery's {MAX_COLUMNS}")


# --------------------------------------------------------------------------- layout

def training_prefix(output: str, pair: str) -> str:
    """``{output}/training_{pair}`` (no trailing slash)."""
    return storage.join(output.rstrip("/"), f"training_{pair}")


def part_uri(prefix: str, part: Part) -> str:
    """The wildcard URI a part is exported to."""
    return f"{prefix}/{part.name}/{PART_FILES}"


def layout_document(manifest: Manifest, parts: Sequence[Part], specs: Sequence[TableSpec],
                    stats: Sequence[dict[str, int]], staging: str) -> dict[str, Any]:
    """The ``_layout.json`` of a finished export (read by pipelines.validate)."""
    spine = manifest.targets
    shard_min = [s.get("key_min") for s in spine["shards"] if s.get("key_min")]
    shard_max = [s.get("key_max") for s in spine["shards"] if s.get("key_max")]
    return {
        "format": LAYOUT_FORMAT, "layout": LAYOUT_KIND, "method": "bigquery",
        "staging": staging, "pair": manifest.pair, "key": manifest.key,
        "window": {"start": manifest.window.start.isoformat(),
                   "end": manifest.window.end.isoformat()},
        "spine_rows": spine["rows"],
        # The digest would need the spine's keys, and this job reads no data.
        "spine_digest": None,
        "spine_key_min": min(shard_min) if shard_min else None,
        "spine_key_max": max(shard_max) if shard_max else None,
        "targets": specs[0].output_names,
        "tables": [{"table": s.table, "stem": s.stem, "group": s.group,
                    "columns": len(s.columns)} for s in specs[1:]],
        "parts": [{"index": p.index, "path": p.name, "files": PART_FILES,
                   "file_count": st.get("files"), "rows": st.get("rows"),
                   "tables": [specs[i].table for i in p.tables[1:]],
                   "columns": p.columns} for p, st in zip(parts, stats)],
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }


# --------------------------------------------------------------------------- BigQuery

def _client(project: str | None, location: str | None):
    """A BigQuery client: the emulator (anonymous) when BQX_BIGQUERY_ENDPOINT is set, else
    the default credentials. The same construction as pipelines.sources.BigQuerySource,
    which keeps it in a method (``_make_client``) and not in a reusable function."""
    from google.cloud import bigquery

    project = project or os.environ.get("BQX_BIGQUERY_PROJECT") or None
    location = location or os.environ.get("BQX_BIGQUERY_LOCATION") or None
    endpoint = os.environ.get("BQX_BIGQUERY_ENDPOINT")
    if endpoint:
        from google.auth.credentials import AnonymousCredentials

        return bigquery.Client(project=project or os.environ.get("GOOGLE_CLOUD_PROJECT"),
                               location=location, credentials=AnonymousCredentials(),
                               client_options={"api_endpoint": endpoint})
    return bigquery.Client(project=project, location=location)


def bigquery_error_text(exc: BaseException, job: Any = None) -> str:
    """Everything BigQuery said about a failure, uncut: the message, then every error
    entry (of the exception and of the job) that the message does not already contain."""
    head = f"{type(exc).__name__}: {getattr(exc, 'message', None) or exc}"
    lines = [head]
    entries = list(getattr(exc, "errors", None) or [])
    if job is not None:
        entries += [e for e in (getattr(job, "errors", None) or []) if e not in entries]
    for e in entries:
        text = (", ".join(f"{k}={v}" for k, v in e.items()) if isinstance(e, dict) else str(e))
        message = e.get("message") if isinstance(e, dict) else None
        if message and message in head and (e.get("reason") or "") in head:
            continue
        lines.append(f"  {text}")
    return "\n".join(lines)


class _BigQueryFailed(PipelineError):
    pass


def _fail(what: str, exc: BaseException, job: Any = None) -> _BigQueryFailed:
    text = bigquery_error_text(exc, job)
    log.error("%s failed; BigQuery said:\n%s", what, text)
    return _BigQueryFailed(f"{what} failed: {' | '.join(text.splitlines())}")


def schema_fields(spec: TableSpec, key: str) -> list:
    """The staged table's schema: the key (REQUIRED TIMESTAMP), then its columns."""
    from google.cloud import bigquery

    fields = [bigquery.SchemaField(key, "TIMESTAMP", mode="REQUIRED")]
    fields += [bigquery.SchemaField(c.output, c.type, mode="NULLABLE") for c in spec.columns]
    return fields


def external_table(table_id: str, spec: TableSpec, key: str, uris: list[str],
                   labels: dict[str, str], expires: dt.datetime):
    """An external table over ``uris`` (parquet), with an explicit schema."""
    from google.cloud import bigquery

    table = bigquery.Table(table_id, schema=schema_fields(spec, key))
    config = bigquery.ExternalConfig("PARQUET")
    config.source_uris = list(uris)
    config.autodetect = False
    table.external_data_configuration = config
    table.labels = dict(labels)
    table.expires = expires
    table.description = f"bqx merge staging of {spec.dataset}.{spec.table} (temporary)"
    return table


def native_table(table_id: str, spec: TableSpec, key: str, labels: dict[str, str],
                 expires: dt.datetime):
    """An empty native table with the manifest's schema (filled by a load job)."""
    from google.cloud import bigquery

    table = bigquery.Table(table_id, schema=schema_fields(spec, key))
    table.labels = dict(labels)
    table.expires = expires
    table.description = f"bqx merge staging of {spec.dataset}.{spec.table} (temporary)"
    return table


def load_config(spec: TableSpec, key: str, labels: dict[str, str]):
    """Load parquet shards into an existing table (explicit schema, append)."""
    from google.cloud import bigquery

    return bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET,
        schema=schema_fields(spec, key),
        write_disposition=bigquery.WriteDisposition.WRITE_APPEND,
        create_disposition=bigquery.CreateDisposition.CREATE_NEVER,
        autodetect=False,
        labels=dict(labels),
    )


@dataclasses.dataclass
class Plan:
    """Everything decided before BigQuery is asked for anything."""

    manifest: Manifest
    specs: list[TableSpec]
    parts: list[Part]
    project: str | None
    dataset: str
    run_id: str
    staging: str
    output_prefix: str

    @property
    def labels(self) -> dict[str, str]:
        return {"bqx-job": "merge", "bqx-pair": self.manifest.pair, "bqx-run": self.run_id}

    def table_name(self, i: int) -> str:
        return f"bqx_merge_{self.manifest.pair}_{self.run_id}_{i:03d}"

    def table_id(self, i: int, project: str) -> str:
        return f"{project}.{self.dataset}.{self.table_name(i)}"

    def ref(self, project: str) -> Callable[[int], exp.Table]:
        return lambda i: table_ref(project, self.dataset, self.table_name(i))

    def uris(self, i: int) -> list[str]:
        return self.manifest.shard_files(self.manifest.tables[i])

    def statements(self, project: str) -> list[tuple[Part, str, str]]:
        """(part, SELECT, EXPORT DATA) per part, checked against BigQuery's limits."""
        out = []
        for part in self.parts:
            select = select_sql(part, self.specs, self.manifest.key, self.ref(project))
            export = export_sql(select, part_uri(self.output_prefix, part))
            check_query_limits(export, len(part.tables), len(part.columns), part.name)
            out.append((part, select, export))
        return out

    def estimated_bytes(self) -> int:
        """Logical bytes the exports scan, from the manifest (every column of every
        table once; the key once per part it is joined in)."""
        key_bytes = _LOGICAL_BYTES["TIMESTAMP"]
        total = 0
        for part in self.parts:
            for i in part.tables:
                entry = self.manifest.tables[i]
                width = key_bytes + (sum(_LOGICAL_BYTES.get(c[2], 8) for c in entry["columns"])
                                     if i != 0 or part.index == 0 else 0)
                total += entry["rows"] * width
        return total

    def minimum_billed(self) -> int:
        """BigQuery's on-demand floor: 10 MB per table referenced per query."""
        return sum(len(p.tables) for p in self.parts) * MIN_BILLED_BYTES_PER_TABLE


def make_plan(manifest: Manifest, output: str, staging: str, dataset: str,
              project: str | None) -> Plan:
    """Check the inputs and split the columns; touches nothing."""
    if staging not in STAGING_MODES:
        raise PipelineError(f"unknown --staging {staging!r}; choose one of "
                            f"{', '.join(STAGING_MODES)}")
    if not storage.is_gcs(manifest.root):
        raise PipelineError(f"the bigquery merge reads checkpoints from GCS; checkpoint "
                            f"root {manifest.root} is not a gs:// path")
    if not storage.is_gcs(output):
        raise PipelineError(f"the bigquery merge exports to GCS; --output {output} is not "
                            "a gs:// prefix (the training set is written as "
                            "{output}/training_{pair}/part-NN/data-*.parquet)")
    if output.endswith(".parquet"):
        raise PipelineError(f"--output {output}: the bigquery merge writes a folder of "
                            "parts; give a gs:// prefix, not a .parquet file name")
    specs = manifest.specs()
    if specs[0].group != "targets":
        raise PipelineError(f"manifest of {manifest.pair}: the first table is not the targets")
    # Smaller parts on request, never beyond BigQuery's limits.
    max_columns = cli.env_number("BQX_MERGE_MAX_COLUMNS", MAX_COLUMNS, int, minimum=2,
                                 maximum=MAX_COLUMNS)
    max_tables = cli.env_number("BQX_MERGE_MAX_TABLES", MAX_TABLES_PER_QUERY, int, minimum=2,
                                maximum=BIGQUERY_MAX_TABLES)
    parts = split_parts(specs, manifest.key, max_columns=max_columns, max_tables=max_tables)
    run_id = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S") + uuid.uuid4().hex[:6]
    return Plan(manifest, specs, parts, project, dataset, run_id, staging,
                training_prefix(output, manifest.pair))


def describe_limits(plan: Plan) -> list[str]:
    """Lines saying how the plan sits within BigQuery's limits."""
    total_cols = 1 + sum(len(s.columns) for s in plan.specs)
    lines = [f"{plan.manifest.pair}: {len(plan.specs)} tables ({len(plan.specs) - 1} feature "
             f"tables), {total_cols:,} columns, {plan.manifest.targets['rows']:,} spine rows "
             f"-> {len(plan.parts)} part(s) under {plan.output_prefix}/"]
    for p in plan.parts:
        lines.append(f"  {p.name}: {len(p.columns):,} columns (limit {MAX_COLUMNS:,}), "
                     f"{len(p.tables)} tables joined (limit {BIGQUERY_MAX_TABLES:,}; "
                     f"this job allows {MAX_TABLES_PER_QUERY})")
    return lines


def _preflight_objects(plan: Plan) -> None:
    """Every shard object the manifest names exists (one listing per table folder)."""
    missing = []
    listed: dict[str, set[str]] = {}
    for entry in plan.manifest.tables:
        for path in plan.manifest.shard_files(entry):
            folder = path.rsplit("/", 1)[0]
            if folder not in listed:
                try:
                    listed[folder] = set(storage.list_files(folder))
                except FileNotFoundError:
                    listed[folder] = set()
            if path not in listed[folder]:
                missing.append(path)
    if missing:
        raise PipelineError(f"{len(missing)} checkpoint object(s) missing, merge refused; "
                            f"first: {missing[0]}")


class _Staged:
    """The temporary tables of one run; removes every one of them on close."""

    def __init__(self, client, plan: Plan):
        self.client, self.plan = client, plan
        self.project = client.project
        self.ids: list[str] = []

    def create_all(self, load: bool) -> None:
        plan, key = self.plan, self.plan.manifest.key
        expires = dt.datetime.now(dt.timezone.utc) + TABLE_EXPIRATION
        for i, spec in enumerate(plan.specs):
            table_id = plan.table_id(i, self.project)
            self.ids.append(table_id)  # before the call: a lost response still gets cleaned
            if plan.staging == "external":
                table = external_table(table_id, spec, key, plan.uris(i), plan.labels, expires)
            else:
                table = native_table(table_id, spec, key, plan.labels, expires)
            try:
                # exists_ok: the name is unique to this run, so a table that exists is
                # ours, created by a call whose response was lost and that was retried.
                self.client.create_table(table, exists_ok=True, retry=bigquery_retry(),
                                         timeout=bigquery_timeout())
            except Exception as exc:
                raise _fail(f"creating staging table {table_id} for {spec.dataset}.{spec.table}",
                            exc) from None
        if load and plan.staging == "load":
            self._load_all()

    def _load_all(self) -> None:
        plan = self.plan
        pending = list(enumerate(plan.specs))
        running: list[tuple[int, Any]] = []
        while pending or running:
            while pending and len(running) < LOAD_PARALLELISM:
                i, spec = pending.pop(0)
                try:
                    job = self._start_load(i, spec)
                except Exception as exc:
                    raise _fail(f"starting the load of {spec.dataset}.{spec.table}", exc) from None
                running.append((i, job))
            i, job = running.pop(0)
            spec = plan.specs[i]
            try:
                wait_for_job(job)
            except Exception as exc:
                raise _fail(f"load job {job.job_id} of {spec.dataset}.{spec.table}", exc,
                            job) from None
            want = plan.manifest.tables[i]["rows"]
            if job.output_rows is not None and job.output_rows != want:
                raise PipelineError(f"load of {spec.dataset}.{spec.table} wrote "
                                    f"{job.output_rows} rows, the manifest says {want}")

    def _start_load(self, i: int, spec: TableSpec):
        """Start the load job of manifest table ``i`` under a job id chosen here.

        The library retries ``jobs.insert`` after a lost response; for a load job (unlike
        a query) it does not pick up the job that the first attempt created, and the
        retry fails with 409. With our own id that job is fetched instead: it ran once.
        """
        from google.api_core import exceptions

        plan = self.plan
        job_id = f"bqx_merge_load_{plan.run_id}_{i:03d}_{uuid.uuid4().hex[:8]}"
        try:
            return self.client.load_table_from_uri(
                plan.uris(i), plan.table_id(i, self.project), job_id=job_id,
                job_config=load_config(spec, plan.manifest.key, plan.labels),
                retry=bigquery_retry(), timeout=bigquery_timeout())
        except exceptions.Conflict:
            log.info("load job %s already exists (a retried request): using it", job_id)
            return self.client.get_job(job_id, retry=bigquery_retry(), timeout=bigquery_timeout())

    def close(self) -> list[str]:
        """Delete every staged table; return the ids that could not be deleted."""
        left = []
        for table_id in self.ids:
            try:
                self.client.delete_table(table_id, not_found_ok=True, retry=bigquery_retry(),
                                         timeout=bigquery_timeout())
            except Exception as exc:  # keep going: delete all the others
                log.error("could not delete staging table %s: %s", table_id,
                          bigquery_error_text(exc))
                left.append(table_id)
        self.ids = left
        return left


def _ensure_dataset(client, plan: Plan, location: str | None) -> None:
    from google.cloud import bigquery

    ds = bigquery.Dataset(f"{client.project}.{plan.dataset}")
    if location:
        ds.location = location
    ds.labels = {"bqx-job": "merge"}
    ds.description = "Temporary tables of the bqx bigquery merge (removed after each run)"
    try:
        client.create_dataset(ds, exists_ok=True, retry=bigquery_retry(), timeout=bigquery_timeout())
    except Exception as exc:
        raise _fail(f"creating scratch dataset {client.project}.{plan.dataset}", exc) from None


def _run_query(client, sql: str, what: str, labels: dict[str, str], dry_run: bool = False):
    from google.cloud import bigquery

    config = bigquery.QueryJobConfig(labels=dict(labels), use_query_cache=False,
                                     dry_run=dry_run)
    job = None
    try:
        job = client.query(sql, job_config=config, retry=bigquery_retry(),
                           job_retry=bigquery_job_retry(), timeout=bigquery_timeout())
        if not dry_run:
            wait_for_job(job)
    except Exception as exc:
        raise _fail(what, exc, job) from None
    return job


def _export_statistics(job) -> dict[str, int]:
    stats = (job._properties.get("statistics") or {}).get("query") or {}
    export = stats.get("exportDataStatistics") or {}
    out = {}
    if "rowCount" in export:
        out["rows"] = int(export["rowCount"])
    if "fileCount" in export:
        out["files"] = int(export["fileCount"])
    out["bytes_processed"] = int(stats.get("totalBytesProcessed") or 0)
    out["bytes_billed"] = int(stats.get("totalBytesBilled") or 0)
    return out


def _remove_previous_output(prefix: str, overwrite: bool) -> None:
    layout = storage.join(prefix, LAYOUT_NAME)
    if storage.exists(layout):
        if not overwrite:
            raise PipelineError(f"output {prefix}/ already exists ({layout}); pass --overwrite "
                                "to replace it")
        storage.delete(layout)  # first: the set is never marked complete while replaced
    try:
        old = storage.list_files(prefix)
    except FileNotFoundError:
        old = []
    for path in old:
        storage.delete(path)


def dry_run_report(plan: Plan, statements, dry_bytes: list[int | None]) -> str:
    """What ``--dry-run`` prints: the SQL, bytes and cost."""
    est = plan.estimated_bytes()
    floor = plan.minimum_billed()
    lines = ["-- bqx bigquery merge: dry run (nothing was exported, nothing billed)"]
    lines += ["-- " + line for line in describe_limits(plan)]
    lines.append(f"-- staging: {plan.staging} tables in dataset {plan.dataset} "
                 f"(labels {plan.labels}, expire after {TABLE_EXPIRATION}, removed at the end)")
    for (part, _select, export), nbytes in zip(statements, dry_bytes):
        shown = "unknown" if nbytes is None else f"{nbytes:,} bytes"
        lines.append(f"\n-- {part.name}: {len(export):,} characters of SQL "
                     f"(limit {BIGQUERY_MAX_QUERY_CHARS:,}); BigQuery dry run: {shown}")
        lines.append(export + ";")
    known = sum(b for b in dry_bytes if b is not None)
    billed = max(known, est, floor)
    lines.append("")
    lines.append(f"-- bytes scanned, BigQuery dry run: {known:,} ({known / TIB:.6f} TiB)"
                 + (" (some parts unknown)" if None in dry_bytes else ""))
    lines.append(f"-- bytes scanned, manifest estimate (logical bytes): {est:,} "
                 f"({est / TIB:.6f} TiB)")
    lines.append(f"-- on-demand minimum: {floor:,} bytes (10 MB x "
                 f"{sum(len(p.tables) for p in plan.parts)} table references)")
    lines.append(f"-- estimated cost at ${PRICE_PER_TIB}/TiB: ${billed / TIB * PRICE_PER_TIB:.4f} "
                 f"(on the largest of the three)")
    return "\n".join(lines)


def _raise_on_sigterm() -> Callable[[], None]:
    """Turn SIGTERM (Cloud Run stopping the task) into an exception, so that the finally
    block still removes the staging tables; returns the undo."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handler(signum, frame):
        raise PipelineError("terminated (SIGTERM); staging tables are being removed")

    previous = signal.signal(signal.SIGTERM, handler)
    return lambda: signal.signal(signal.SIGTERM, previous)


def merge_bigquery(manifest: Manifest, output: str, staging: str = DEFAULT_STAGING,
                   dataset: str | None = None, dry_run: bool = False,
                   overwrite: bool = False, project: str | None = None,
                   location: str | None = None, client=None,
                   out: TextIO | None = None) -> dict[str, Any]:
    """Run (or dry-run) the merge of ``manifest`` as BigQuery jobs.

    Returns the layout document (or, for a dry run, a dict with the SQL and bytes).
    """
    out = out or sys.stdout
    dataset = dataset or os.environ.get("BQX_MERGE_DATASET") or DEFAULT_DATASET
    plan = make_plan(manifest, output, staging, dataset, project)
    for line in describe_limits(plan):
        log.info("[plan] %s", line)
    with cli.stage("preflight", tables=len(plan.specs)):
        _preflight_objects(plan)
        if not dry_run:
            _remove_previous_output(plan.output_prefix, overwrite)
    client = client or _client(project, location)
    statements = plan.statements(client.project)  # limits checked before any job
    _ensure_dataset(client, plan, location)
    staged = _Staged(client, plan)
    restore = _raise_on_sigterm()
    try:
        with cli.stage("stage", mode=plan.staging, tables=len(plan.specs),
                       dataset=plan.dataset) as st:
            staged.create_all(load=not dry_run)
            st.update(run=plan.run_id)
        if dry_run:
            dry_bytes: list[int | None] = []
            for part, select, _export in statements:
                # The SELECT, not the EXPORT: same bytes, and no chance of writing.
                job = _run_query(client, select, f"dry run of {part.name}", plan.labels,
                                 dry_run=True)
                dry_bytes.append(job.total_bytes_processed)
            text = dry_run_report(plan, statements, dry_bytes)
            print(text, file=out)
            return {"dry_run": True, "sql": [s[2] for s in statements],
                    "bytes": dry_bytes, "estimated_bytes": plan.estimated_bytes(),
                    "parts": len(plan.parts)}
        stats = []
        spine_rows = manifest.targets["rows"]
        for part, _select, export in statements:
            with cli.stage("export", part=part.name, columns=len(part.columns),
                           tables=len(part.tables)) as st:
                job = _run_query(client, export, f"export of {part.name} ({part_uri(plan.output_prefix, part)})",
                                 plan.labels)
                s = _export_statistics(job)
                st.update(**s)
            if s.get("rows") is not None and s["rows"] != spine_rows:
                raise PipelineError(f"{part.name} exported {s['rows']:,} rows, the spine has "
                                    f"{spine_rows:,}: the join multiplied or lost rows")
            stats.append(s)
    finally:
        restore()
        left = staged.close()
        if left:
            log.error("staging tables left behind (they expire in %s): %s", TABLE_EXPIRATION,
                      ", ".join(left))
    layout = layout_document(manifest, plan.parts, plan.specs, stats, plan.staging)
    layout["bytes_processed"] = sum(s.get("bytes_processed", 0) for s in stats)
    layout["bytes_billed"] = sum(s.get("bytes_billed", 0) for s in stats)
    storage.write_bytes(storage.join(plan.output_prefix, LAYOUT_NAME),
                        json.dumps(layout, indent=1).encode())
    return layout
