"""The extraction transforms: pure Arrow functions, and the DoFn that applies them.

Per (table, shard): count on the source, read, sort by key, drop duplicate keys
deterministically, conform to the checkpoint schema, write the shard, then its commit
record. The DoFn's only side effects are those two files, written atomically under
names derived from the task, so a retried bundle rewrites the same content.

The DoFn takes tasks one at a time or in a :class:`TaskBatch`, whose counts are asked in
one query (each task's own count query, as a subquery) before its reads.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import logging
from typing import Any, Iterator

import apache_beam as beam
import numpy as np
import pyarrow as pa

from pipelines import checkpoints
from pipelines.checkpoints import ShardTask
from pipelines.errors import PipelineError, first_line
from pipelines.extract.batches import TaskBatch, batch_counts

log = logging.getLogger(__name__)

FAILED = "failed"
# Writer threads per DoFn instance (see ExtractShardFn).
WRITERS = 2


def key_values(table: pa.Table, key: str) -> np.ndarray:
    """The key column as int64 microseconds (zero-copy where Arrow allows)."""
    column = table.column(key).combine_chunks()
    return column.cast(pa.int64()).to_numpy(zero_copy_only=False)


def sort_and_dedupe(table: pa.Table, key: str, policy: str, label: str) -> tuple[pa.Table, int]:
    """Sort ``table`` by key and drop rows whose key repeats; return it and the drop count.

    Which row of a repeated key survives does not depend on the order the source
    returned them in: rows are ordered by every column and the first is kept. With
    ``policy == "error"`` a repeated key raises a PipelineError naming ``label``.
    """
    keys = key_values(table, key)
    if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):
        # Already in strict key order (as the warehouse usually answers): the sort would
        # be the identity. One chunk, as the sort's output is, so that the parquet bytes
        # do not depend on how the source chunked its answer. (NULL keys compare False
        # here and take the sort path; conform() refuses them.)
        return table.combine_chunks(), 0
    table = table.sort_by([(key, "ascending")])
    keys = key_values(table, key)
    repeats = np.flatnonzero(keys[1:] == keys[:-1]) + 1
    if len(repeats) == 0:
        return table, 0
    if policy == "error":
        first = table.column(key)[int(repeats[0])].as_py()
        raise PipelineError(f"{label}: {len(repeats)} duplicate {key} values "
                            f"(first {first.isoformat()}); --on-duplicate-keys=error")
    order = [(key, "ascending")] + [(n, "ascending") for n in table.schema.names if n != key]
    table = table.sort_by(order)
    keys = key_values(table, key)
    keep = np.ones(len(keys), dtype=bool)
    keep[1:] = keys[1:] != keys[:-1]
    return table.filter(pa.array(keep)), int(len(keys) - keep.sum())


def conform(table: pa.Table, schema: pa.Schema, label: str) -> pa.Table:
    """Give ``table`` exactly the checkpoint ``schema`` (names, order, types)."""
    if table.schema.names != schema.names:
        missing = [n for n in schema.names if n not in table.schema.names]
        extra = [n for n in table.schema.names if n not in schema.names]
        raise PipelineError(f"{label}: schema drift: missing {missing[:5]}, unexpected "
                            f"{extra[:5]} (the table changed since discovery)")
    if table.column(0).null_count:
        raise PipelineError(f"{label}: NULL {schema.names[0]} values")
    try:
        return table.cast(schema)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        # Name the columns that cannot be cast, not every type that is spelled
        # differently (a key in 'Etc/UTC' casts to 'UTC' without loss).
        changed = [f"{f.name} is {table.schema.field(f.name).type}, expected {f.type}"
                   for f in schema if not _casts(table.column(f.name), f.type)]
        first = first_line(exc)
        raise PipelineError(f"{label}: column type changed: {'; '.join(changed[:3])} "
                            f"({first})") from None


def _casts(column: pa.ChunkedArray, to: pa.DataType) -> bool:
    """True when ``column`` casts to ``to`` (safely)."""
    try:
        column.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    return True


def key_range(table: pa.Table, key: str):
    """First and last key of a sorted table (None, None when empty)."""
    if table.num_rows == 0:
        return None, None
    return table.column(key)[0].as_py(), table.column(key)[-1].as_py()


def _refused_query(exc: Exception) -> bool:
    """True for a source error that retrying cannot fix: the query names a table or
    column the source no longer has, or of another type (the table changed since
    discovery). BigQuery errors already arrive as PipelineErrors from the source."""
    try:
        import duckdb
    except ImportError:  # pragma: no cover - duckdb is a dependency
        return False
    return isinstance(exc, (duckdb.BinderException, duckdb.CatalogException,
                            duckdb.ConversionException, duckdb.ParserException))


def _ask(query, sql: str, label: str):
    """``query(sql)``, with a refused query turned into a PipelineError naming ``label``,
    and the source's own PipelineErrors (which do not know the task) prefixed with it."""
    try:
        return query(sql)
    except PipelineError as exc:
        raise PipelineError(f"{label}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - re-raised unless it is a refusal
        if not _refused_query(exc):
            raise
        first = first_line(exc)
        raise PipelineError(f"{label}: the source refused the query, did the table change "
                            f"since discovery? ({first})") from None


@dataclasses.dataclass
class PreparedShard:
    """A task's rows, ready to write: sorted, deduplicated, conformed, with its counts."""

    table: pa.Table
    counts: dict[str, int]
    duplicates: int


def prepare_shard(source, task: ShardTask, key: str, policy: str,
                  counts: dict[str, int] | None = None) -> PreparedShard:
    """Count (unless ``counts`` already answer the task's count query) and read one
    task's shard, then sort, deduplicate and conform it.

    The read must return as many rows as the count found (both have the same WHERE): a
    table changed in between, or a read that lost or repeated rows (a stream resumed at
    the wrong offset, say), fails the shard instead of being hidden by the dropping of
    repeated keys."""
    if counts is None:
        counts = _ask(source.query_rows, task.count_sql, task.label)[0]
    raw = _ask(source.query_arrow, task.select_sql, task.label)
    if raw.num_rows != counts["n_rows"]:
        raise PipelineError(f"{task.label}: read {raw.num_rows} rows, but the count query found "
                            f"{counts['n_rows']}: the table changed while it was extracted, or "
                            f"the read lost or repeated rows; run the extraction again to redo the shard")
    table, duplicates = sort_and_dedupe(raw, key, policy, task.label)
    table = conform(table, checkpoints.output_schema(task.spec, key), task.label)
    return PreparedShard(table, counts, duplicates)


def commit_shard(task: ShardTask, prepared: PreparedShard, key: str) -> dict:
    """Write a prepared shard, then its commit record; return the record."""
    table = prepared.table
    nbytes, crc = checkpoints.write_shard(table, task.path)
    lo, hi = key_range(table, key)
    record = checkpoints.make_record(task, table.num_rows, prepared.counts,
                                     prepared.duplicates, lo, hi, nbytes, crc)
    checkpoints.write_record(task.record_path, record)
    return record


def extract_shard(source, task: ShardTask, key: str, policy: str,
                  counts: dict[str, int] | None = None) -> dict:
    """Do one task against an open source; return its commit record.

    ``counts`` are the answer to the task's count query when it was asked already (in
    a batch); otherwise it is asked here.
    """
    return commit_shard(task, prepare_shard(source, task, key, policy, counts), key)


class ExtractShardFn(beam.DoFn):
    """Extracts the task (a ShardTask) or tasks (a TaskBatch) of each element and emits
    their commit records.

    Problems with the data (a PipelineError) go to the ``failed`` output as one line
    each, so one bad table does not stop the others; anything else fails the bundle and
    the runner retries it.

    Within an element, shards are written (encoded, checksummed, fsynced: mostly
    outside the GIL) by WRITERS threads per instance while the next ones are read from
    the source. At most WRITERS shards
    wait to be written, records are emitted in task order, and every write has ended
    when ``process`` returns, so a bundle's side effects are complete when it is.
    """

    def __init__(self, source_url: str, key: str, policy: str):
        self.source_url = source_url
        self.key = key
        self.policy = policy
        self._source = None
        self._writer = None

    def setup(self):
        from pipelines.sources import open_source

        self._source = open_source(self.source_url)
        self._writer = concurrent.futures.ThreadPoolExecutor(WRITERS, thread_name_prefix="shard-writer")

    # The return hint keeps Beam from inferring the records' type from the bytecode
    # (and picking a coder for it).
    def process(self, element: ShardTask | TaskBatch) -> Iterator[Any]:
        tasks = element.tasks() if isinstance(element, TaskBatch) else [element]
        counts = batch_counts(self._source, tasks, _ask)
        writing: collections.deque[concurrent.futures.Future] = collections.deque()
        try:
            for task, task_counts in zip(tasks, counts):
                try:
                    prepared = prepare_shard(self._source, task, self.key, self.policy, task_counts)
                except PipelineError as exc:
                    yield beam.pvalue.TaggedOutput(FAILED, str(exc))
                    continue
                if len(writing) == WRITERS:
                    yield _outcome(writing.popleft())
                writing.append(self._writer.submit(commit_shard, task, prepared, self.key))
            while writing:
                yield _outcome(writing.popleft())
        finally:
            concurrent.futures.wait(writing)  # failing: let the writes in progress end first

    def teardown(self):
        if self._writer is not None:
            self._writer.shutdown(wait=True)
        if self._source is not None:
            self._source.close()


def _outcome(written: concurrent.futures.Future):
    """A finished write's commit record, or its PipelineError as a ``failed`` line
    (anything else is raised)."""
    try:
        return written.result()
    except PipelineError as exc:
        return beam.pvalue.TaggedOutput(FAILED, str(exc))


class ExtractShards(beam.PTransform):
    """PCollection[ShardTask | TaskBatch] -> tagged outputs: commit records (main) and
    ``failed``."""

    def __init__(self, source_url: str, key: str, policy: str):
        super().__init__()
        self.source_url, self.key, self.policy = source_url, key, policy

    def expand(self, tasks):
        return (
            tasks
            # Break fusion with the Create so that runners spread the tasks over workers.
            | "Spread" >> beam.Reshuffle()
            | "Extract" >> beam.ParDo(
                ExtractShardFn(self.source_url, self.key, self.policy)).with_outputs(
                    FAILED, main="records")
        )
