"""The merge job: manifest -> checks -> windowed join -> validated training file."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import itertools
import logging
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipelines import checkpoints, cli, storage
from pipelines.checkpoints import Manifest
from pipelines.errors import PipelineError
from pipelines.merge import budget as budgets
from pipelines.merge.reader import ShardCursor, has_keys, int_keys, read_ahead
from pipelines.merge.writer import TrainingFileWriter
from pipelines.validate import ColumnCounts, KeyDigest, default_report_path, validate_file
from pipelines.window import as_of_day, utc_today, window_from_options

log = logging.getLogger("pipelines.merge")

METHODS = ("polars", "duckdb", "bigquery")
# Methods that run the window join here; "bigquery" issues BigQuery jobs instead
# (pipelines/merge/bigquery.py).
LOCAL_METHODS = ("polars", "duckdb")
# Reads (tables, or slices of wide ones) run ahead of the one being joined, up to a
# slice's bytes (budget.SLICES_PER_BATCH), on these threads: without them the encoders
# went idle whenever many small tables took longer to read than the columns before them
# to encode.
READ_THREADS = 2


def joiner_class(method: str):
    """The window-join implementation of ``method``."""
    if method == "polars":
        from pipelines.merge.join_polars import PolarsJoin
        return PolarsJoin
    if method == "duckdb":
        from pipelines.merge.join_duckdb import DuckDBJoin
        return DuckDBJoin
    if method == "bigquery":
        raise PipelineError("the bigquery method runs no window join here; "
                            "see pipelines.merge.bigquery")
    raise PipelineError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")


def output_schema(manifest: Manifest) -> pa.Schema:
    """The training file's schema: key, targets, then every feature column in order."""
    fields = [pa.field(manifest.key, pa.timestamp("us", tz="UTC"), nullable=False)]
    for spec in manifest.specs():
        fields += list(checkpoints.output_schema(spec, manifest.key))[1:]
    return pa.schema(fields)


def file_metadata(manifest: Manifest, spine_rows: int, digest: str) -> dict:
    """The ``bqx.training`` metadata that pipelines.validate reads back."""
    specs = manifest.specs()
    return {
        "format": 1, "pair": manifest.pair, "key": manifest.key,
        "window": {"start": manifest.window.start.isoformat(),
                   "end": manifest.window.end.isoformat()},
        "spine_rows": spine_rows, "spine_digest": digest,
        "targets": specs[0].output_names,
        "tables": [{"table": s.table, "stem": s.stem, "group": s.group,
                    "columns": len(s.columns)} for s in specs[1:]],
    }


def default_output(pair: str) -> str:
    """``gs://$GCS_OUTPUT_BUCKET/training/...`` or ``$BQX_DATA_DIR/output/...``."""
    bucket = os.environ.get("GCS_OUTPUT_BUCKET")
    name = f"training_{pair}.parquet"
    if bucket:
        base = bucket if bucket.startswith("gs://") else f"gs://{bucket}/training"
        return storage.join(base, name)
    return os.path.join(os.environ.get("BQX_DATA_DIR", "data"), "output", name)


def default_bigquery_output() -> str:
    """The bigquery method's output prefix: ``gs://$GCS_OUTPUT_BUCKET/training``."""
    bucket = os.environ.get("GCS_OUTPUT_BUCKET")
    if not bucket:
        raise PipelineError("the bigquery merge exports to GCS: give --output gs://BUCKET/PREFIX "
                            "or set GCS_OUTPUT_BUCKET")
    return bucket.rstrip("/") if bucket.startswith("gs://") else f"gs://{bucket}/training"


def merge(manifest: Manifest, output: str, method: str, memory_budget: int,
          overwrite: bool = False, row_group_rows: int = budgets.ROW_GROUP_ROWS,
          column_batch_size: int | None = None) -> dict:
    """Merge a committed extraction into ``output``; return the validation report dict.

    Row groups hold whole shards up to ``row_group_rows`` rows; each is read, joined and
    written a table at a time, in column batches that fit ``memory_budget`` and hold at
    most ``column_batch_size`` bytes when given (:func:`pipelines.merge.budget.batch_bytes`),
    whose shares bound the reads ahead and the writer's pieces.

    The file appears at ``output`` only after it was written completely and passed
    validation; on any failure nothing is left behind. A local output is written beside
    its final name and renamed; a ``gs://`` output (a full pair is ~9 GB, more than the
    in-memory disk of a Cloud Run job) is streamed to ``{output}.tmp-{uuid}`` in the
    same bucket, validated there, and copied to ``output`` server-side
    (:func:`pipelines.storage.atomic_gcs_object`); the temporary is deleted in every
    case. Leftovers of killed runs are deleted by the next merge to the same output
    (:func:`pipelines.storage.remove_stale_temporaries`).
    """
    joiner_cls = joiner_class(method)
    batch = budgets.batch_bytes(memory_budget, column_batch_size)
    if not storage.is_gcs(output) and os.path.isdir(output):
        raise PipelineError(f"output {output} is a folder; give the training file's path")
    if storage.exists(output) and not overwrite:
        raise PipelineError(f"output {output} already exists; pass --overwrite to replace it")
    with cli.stage("preflight", tables=len(manifest.tables)) as out:
        # Presence, sizes, footers and schemas here; the bytes' CRC32C is checked as
        # each shard is read for the join (reader.ShardCursor), so nothing is read twice.
        problems = checkpoints.verify_checkpoints(manifest, check_content=False)
        if problems:
            for p in problems:
                log.error("checkpoint: %s", p)
            raise PipelineError(f"{len(problems)} checkpoint problem(s), merge refused; "
                                f"first: {problems[0]}")
        out.update(shards=manifest.totals()["shards"])

    schema = output_schema(manifest)
    specs = manifest.specs()
    spine_total = manifest.targets["rows"]
    scratch = storage.temp_dir("bqx-merge-")

    def validated(path: str, written: Written):
        """Validate the merged file at ``path``; raise if it fails.

        The bytes are checked to be the ones written: the size, and in a bucket the
        CRC32C GCS computed on receipt (a local file would only be re-read for it); the
        footer, key column and a sample of columns are read back; NULL and infinity
        counts come from the arrays that were encoded."""
        with cli.stage("validate", path=output) as vout:
            size = storage.size(path)
            if size != written.nbytes:
                raise PipelineError(f"{path} holds {size} bytes, the merge wrote "
                                    f"{written.nbytes}: not published")
            stored_crc = storage.crc32c(path) if storage.is_gcs(path) else written.crc32c
            if stored_crc != written.crc32c:
                raise PipelineError(f"{path} has CRC32C {stored_crc}, the merge wrote "
                                    f"{written.crc32c}: not published")
            # Row groups are whole shards, so the largest may hold more than row_group_rows.
            columns = budgets.validation_columns(written.largest_row_group, batch)
            result = validate_file(path, expected={"spine_rows": spine_total,
                                                   "spine_digest": written.digest,
                                                   "pair": manifest.pair},
                                   columns_per_batch=columns, counted=written.counts)
            vout.update(ok=result.ok, columns_per_read=columns)
        if not result.ok:
            print(result.summary(), file=sys.stderr)
            raise PipelineError(f"the merged file failed validation and was not "
                                f"published: {result.hard_failures[0]}")
        return result

    try:
        with cli.stage("merge", method=method, columns=len(schema), spine_rows=spine_total,
                       row_group_rows=row_group_rows, column_batch_mib=round(batch / 2**20, 1)) as out:
            for stale in storage.remove_stale_temporaries(output):
                log.warning("removed %s, left behind by an earlier run", stale)
            if storage.is_gcs(output):
                with storage.atomic_gcs_object(output, overwrite=overwrite) as staged:
                    log.info("[merge] streaming to %s", staged.path)
                    with staged.open_write() as sink:
                        written = _merge_row_groups(manifest, specs, schema, sink, joiner_cls,
                                                    row_group_rows, memory_budget, batch, scratch)
                    report = validated(staged.path, written)
                    _write_report(report, output)
            else:
                with storage.atomic_local_path(output) as tmp:
                    written = _merge_row_groups(manifest, specs, schema, tmp, joiner_cls,
                                                row_group_rows, memory_budget, batch, scratch)
                    report = validated(tmp, written)
                    _write_report(report, output)
            out.update(output=output, rows=spine_total)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return report


def _write_report(report, output: str) -> None:
    """Write the report beside ``output`` before the file is published there: a run
    killed after publishing must not leave a file without its report."""
    report.path = output
    report.write_json(default_report_path(output))


@dataclasses.dataclass
class Written:
    """What the merge knows of the file it wrote, for its validation."""

    digest: str            # of the spine keys
    nbytes: int            # the file's size
    crc32c: str            # of every byte written
    counts: ColumnCounts   # NULLs and infinities per column, and columns to read back
    largest_row_group: int  # rows of the largest row group


def _count_values(table: pa.Table, first: int, nulls: np.ndarray, infs: np.ndarray) -> None:
    """Add ``table``'s NULLs and infinities per column at positions ``first``... ."""
    for i, column in enumerate(table.columns, start=first):
        nulls[i] += column.null_count
        if pa.types.is_floating(column.type) and column.null_count < len(column):
            infs[i] += pc.sum(pc.is_inf(column)).as_py() or 0


@contextlib.contextmanager
def _without_cyclic_gc():
    """Pause Python's cyclic garbage collector: decoding the encoded pieces' footers and
    the per-column calls make enough short-lived objects to trigger collections over
    and over, and the merge makes no reference cycles for them to find."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@_without_cyclic_gc()
def _merge_row_groups(manifest: Manifest, specs, schema: pa.Schema, path, joiner_cls,
                      row_group_rows: int, memory_budget: int, batch_bytes: float,
                      scratch: str) -> Written:
    """Stream every row group, a column batch (at most ``batch_bytes``) at a time,
    through the join into ``path`` (a local path or a writable binary stream)."""
    key = manifest.key
    listed_in = checkpoints.manifest_path(manifest.root, manifest.pair, manifest.window)
    cursors = [
        ShardCursor(f"{s.dataset}.{s.table}", list(zip(manifest.shard_files(entry), entry["shards"])),
                    checkpoints.output_schema(s, key), listed_in)
        for s, entry in zip(specs, manifest.tables)
    ]
    shard_rows = [shard["rows"] for shard in manifest.targets["shards"]]
    # A row group is a run of whole shards: every table has the same shards.
    groups = budgets.pack(shard_rows, row_group_rows)
    bounds = np.cumsum([0] + groups)
    largest = max((sum(shard_rows[a:b]) for a, b in zip(bounds[:-1], bounds[1:])), default=0)
    # Batch b of a row group joins the column runs batches[b], (table, start, stop) of
    # the tables' own columns (table 0, the spine, owns the targets; the key is written
    # first, from the spine keys), and a wide table comes in slices, the spine's too; a
    # batch's size, not the row group's, is what the budget bounds.
    own_columns = [list(c.schema)[1:] for c in cursors]
    per_row = [[budgets.column_bytes(f) for f in fields] for fields in own_columns]
    batches = budgets.column_batches(per_row, largest, batch_bytes)
    key_bytes = budgets.column_bytes(schema.field(0))
    # The digest goes in the footer; computing it first from the key column alone
    # (8 bytes a row: 17.6 MB for the full history's 2.2M rows) lets the footer be
    # written in one go.
    spine_keys = _spine_keys(manifest, specs[0])
    # Each row group's keys are cut from them by the manifest's row counts.
    row_starts = np.cumsum([0] + shard_rows).tolist()
    if len(spine_keys) != row_starts[-1]:
        raise PipelineError(f"spine of {manifest.pair} changed since the preflight: its shards hold "
                            f"{len(spine_keys)} keys, the manifest {row_starts[-1]}")
    digest = KeyDigest().update(spine_keys)
    writer = TrainingFileWriter(path, schema, file_metadata(manifest, len(spine_keys), digest.hexdigest()),
                                piece_bytes=batch_bytes / budgets.PIECES_PER_BATCH)
    joiner = joiner_cls(key, schema, memory_budget, scratch)
    progress = cli.Progress("merge", len(groups) * len(batches), "column batches")
    sliced = {t for b in batches for t, a, z in b if _features(own_columns[t], a, z)}
    table_bytes = [sum(shard["bytes"] for shard in entry["shards"]) for entry in manifest.tables]
    log.info("[merge] %d row group(s) of up to %d rows, %d column batches each "
             "(%d wide table(s) read in slices of columns: %.2f of %.2f GiB of checkpoints)",
             len(groups), largest, len(batches), len(sliced),
             sum(table_bytes[t] for t in sliced) / 2**30, sum(table_bytes) / 2**30)
    done = 0
    merging = time.monotonic()
    nulls = np.zeros(len(schema), dtype=np.int64)
    infs = np.zeros(len(schema), dtype=np.int64)
    # Output position of each table's first own column (the key is column 0), and the
    # first and last column of every batch: reading those back decodes every piece the
    # writer assembled.
    starts = np.concatenate([[1], 1 + np.cumsum([len(c) for c in own_columns])]).tolist()
    check_columns = sorted({schema.names[p] for b in batches
                            for p in (starts[b[0][0]] + b[0][1], starts[b[-1][0]] + b[-1][2] - 1)},
                           key=schema.names.index)
    # Each table is handed to the writer as soon as it is joined; the writer encodes and
    # writes behind the main thread (pyarrow releases the GIL) and holds a fixed number of
    # bytes (TrainingFileWriter), so reading, joining and encoding overlap at the same
    # memory whatever the row count.
    readers = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="merge-reader")
    try:
        for first, count in zip(bounds[:-1].tolist(), groups):
            group_rows = row_starts[first + count] - row_starts[first]
            if group_rows == 0:  # no targets there: a LEFT JOIN keeps nothing
                continue
            keys = pa.table({key: spine_keys.slice(row_starts[first], group_rows)})
            expected_keys = int_keys(keys.column(0))
            writer.begin_row_group(group_rows)
            _count_values(keys, 0, nulls, infs)
            writer.write_columns(keys)
            # One stream of reads for the whole row group: the reads of a batch's first
            # tables run while the batch before is still being joined, so small batches
            # leave no gap in reading at their boundaries. The spine's targets are read in
            # slices like any table's, each checked to hold the keys written.
            with contextlib.closing(read_ahead(readers, (
                    (functools.partial(_read_run, cursors[table], first, count,
                                       _features(own_columns[table], a, b),
                                       expected_keys if table == 0 else None),
                     (key_bytes + sum(per_row[table][a:b])) * group_rows)
                    for batch in batches for table, a, b in batch),
                    batch_bytes / budgets.SLICES_PER_BATCH)) as parts:
                position = 1
                for batch in batches:
                    for table in joiner.join(keys, itertools.islice(parts, len(batch))):
                        _count_values(table, position, nulls, infs)
                        writer.write_columns(table)
                        position += table.num_columns
                        del table
                    done += 1
                    progress.update(done)
            writer.end_row_group()
        writer.close()
    finally:
        readers.shutdown(wait=True, cancel_futures=True)
        writer.discard()
        joiner.close()
        progress.close()
    # Which stage was the slower: a large share waited means the encoders were.
    log.info("[merge] %d column batches written in %.1fs; reading and joining waited "
             "%.1fs of it for the encoders", done, time.monotonic() - merging, writer.waited)
    return Written(digest.hexdigest(), writer.nbytes, writer.crc32c,
                   ColumnCounts(nulls, infs, check_columns), largest)


def _features(columns: list, start: int, stop: int) -> range | None:
    """The feature positions ``ShardCursor.read_shards`` reads for the run ``start:stop``
    of a table's ``columns``: None for all of them, a range for a slice."""
    return None if (start, stop) == (0, len(columns)) else range(start, stop)


def _read_run(cursor: ShardCursor, first: int, count: int, features: range | None,
              spine_keys: np.ndarray | None) -> pa.Table:
    """:meth:`ShardCursor.read_shards`; with ``spine_keys`` (a slice of the spine's
    targets) its keys must be those, the keys read at the start and written."""
    part = cursor.read_shards(first, count, features)
    if spine_keys is not None and not has_keys(part, spine_keys):
        raise PipelineError(f"{cursor.label} changed while merging: its keys are no longer "
                            f"the ones read at the start")
    return part


def _spine_keys(manifest: Manifest, spec) -> pa.Array:
    """Every spine key in order, read from the key column of the targets' shards."""
    import pyarrow.parquet as pq

    chunks = []
    for path in manifest.shard_files(manifest.targets):
        with storage.open_input(path) as source:
            table = pq.read_table(source, columns=[manifest.key])
        chunks.extend(table.column(0).chunks)
    return pa.chunked_array(chunks, type=pa.timestamp("us", tz="UTC")).combine_chunks()


def use_jemalloc() -> None:
    """Make Arrow allocate from jemalloc when this pyarrow has it and the user did not
    choose a pool (``ARROW_DEFAULT_MEMORY_POOL``). The merge frees a column batch's
    buffers every second or so, and mimalloc (pyarrow's default) kept more of them: peak
    RSS 0.80 / 1.24 GiB at 10,000 / 100,000 rows against 0.79 / 0.94 GiB with jemalloc
    (BENCHMARKS.md, "Arrow's allocator")."""
    if os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        return
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except NotImplementedError:  # a pyarrow built without jemalloc keeps its default
        pass


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options of ``python -m pipelines.merge``; each has an environment default."""
    p = cli.ArgumentParser(prog="python -m pipelines.merge",
                           description="Merge a pair's checkpoints into one training file.")
    p.add_argument("pair_arg", nargs="?", metavar="PAIR", help="the pair (or --pair / PAIR)")
    p.add_argument("--pair", default=cli.env_default("PAIR"), help="currency pair [PAIR]")
    p.add_argument("--method", default=cli.env_default("MERGE_METHOD", "polars"),
                   help=f"{' | '.join(METHODS)} [MERGE_METHOD] (default polars)")
    p.add_argument("--checkpoint-root", default=None,
                   help="where the extract job wrote [GCS_CHECKPOINT_BUCKET]; default data/checkpoints")
    p.add_argument("--output", default=None,
                   help="training file path [GCS_OUTPUT_BUCKET]; default data/output/training_PAIR.parquet"
                        " (bigquery method: a gs:// prefix, written as PREFIX/training_PAIR/part-NN/)")
    p.add_argument("--memory-budget", default=cli.env_default("MEMORY_BUDGET", budgets.DEFAULT_BUDGET),
                   help=f"peak memory to plan for [MEMORY_BUDGET] (default {budgets.DEFAULT_BUDGET})")
    p.add_argument("--start-date", default=cli.env_default("START_DATE"),
                   help="first day of the window to merge [START_DATE]; without both dates, "
                        "the extracted window that ends last")
    p.add_argument("--end-date", default=cli.env_default("END_DATE"),
                   help="last day of the window to merge (included) [END_DATE]")
    p.add_argument("--days", type=int, metavar="N",
                   default=cli.env_number("WINDOW_DAYS", None, int, minimum=1),
                   help="without dates: the extracted window that ends last among those of "
                        "at most N days, the longest of them (what the extract job's --days N "
                        "commits) [WINDOW_DAYS]")
    p.add_argument("--as-of", metavar="YYYY-MM-DD", default=cli.env_default("AS_OF_DATE"),
                   help="without dates: only windows ending before this day count (what the "
                        "extract job given the same day commits) [AS_OF_DATE]")
    p.add_argument("--catalog", default=cli.env_default("BQX_CATALOG"), help="catalog TOML file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    p.add_argument("--column-batch-size", default=cli.env_default("COLUMN_BATCH_SIZE"),
                   help="the largest column batch [COLUMN_BATCH_SIZE] (default: what "
                        "--memory-budget allows, 206MiB at 1.5GiB); the reads ahead, slices "
                        "and the writer's pieces are shares of it, so smaller ones lower peak "
                        "memory")
    p.add_argument("--row-group-rows", type=int, default=None,
                   help=f"rows per row group of the training file: whole checkpoint shards up to this "
                        f"[ROW_GROUP_ROWS] (default {budgets.ROW_GROUP_ROWS})")
    p.add_argument("--dry-run", action="store_true",
                   help="bigquery method: print the SQL, bytes scanned and cost; export nothing")
    p.add_argument("--staging", default=cli.env_default("BQX_MERGE_STAGING", "external"),
                   choices=("external", "load"),
                   help="bigquery method: external tables over the checkpoints (default) or "
                        "load jobs into native tables (what the emulator runs) [BQX_MERGE_STAGING]")
    p.add_argument("--scratch-dataset", default=cli.env_default("BQX_MERGE_DATASET", "bqx_merge_scratch"),
                   help="bigquery method: dataset of the temporary tables [BQX_MERGE_DATASET]")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.merge``; returns the exit code."""
    from pipelines.catalog import load_catalog

    args = parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)
    use_jemalloc()
    catalog = load_catalog(args.catalog)
    pair = catalog.check_pair(args.pair_arg or args.pair)
    if args.method not in METHODS:
        raise PipelineError(f"unknown merge method {args.method!r}; choose one of {', '.join(METHODS)}")
    if args.method != "bigquery" and args.dry_run:
        raise PipelineError("--dry-run is only for --method bigquery")
    memory_budget = budgets.parse_size(args.memory_budget)
    column_batch_size = (None if args.column_batch_size is None else
                         budgets.parse_size(args.column_batch_size, "--column-batch-size"))
    budgets.batch_bytes(memory_budget, column_batch_size)  # both refused here if unusable
    if args.row_group_rows is None:
        args.row_group_rows = cli.env_number("ROW_GROUP_ROWS", budgets.ROW_GROUP_ROWS, int, minimum=1)
    elif args.row_group_rows < 1:
        raise PipelineError(f"--row-group-rows must be at least 1, not {args.row_group_rows}")
    root = storage.resolve_local(args.checkpoint_root or checkpoints.default_checkpoint_root())
    if args.method == "bigquery":
        output = args.output or default_bigquery_output()
    else:
        output = storage.resolve_local(args.output or default_output(pair))
    window = window_from_options(args.start_date, args.end_date, args.days)
    as_of = as_of_day(args.as_of, utc_today(), window is not None)
    manifest = checkpoints.load_manifest(root, pair, window, args.days, as_of)
    started = time.monotonic()
    if args.method == "bigquery":
        from pipelines.merge import bigquery as bq_merge

        result = bq_merge.merge_bigquery(manifest, output, staging=args.staging,
                                         dataset=args.scratch_dataset, dry_run=args.dry_run,
                                         overwrite=args.overwrite)
        if not args.dry_run:
            prefix = bq_merge.training_prefix(output, pair)
            log.info("[merge] %s/: %d part(s), %d rows x %d columns in %.1fs; validate with "
                     "python -m pipelines.validate %s/", prefix, len(result["parts"]),
                     result["spine_rows"], 1 + len(result["targets"]) + sum(
                         t["columns"] for t in result["tables"]),
                     time.monotonic() - started, prefix)
            print(f"{prefix}/ ({len(result['parts'])} parts, {result['spine_rows']:,} rows; "
                  f"{bq_merge.LAYOUT_NAME} written)")
        return cli.EXIT_OK
    report = merge(manifest, output, args.method, memory_budget, overwrite=args.overwrite,
                   row_group_rows=args.row_group_rows, column_batch_size=column_batch_size)
    print(report.summary())
    log.info("[merge] %s: %d rows x %d columns in %.1fs; report %s", output, report.rows,
             report.columns, time.monotonic() - started, default_report_path(output))
    return cli.EXIT_OK
