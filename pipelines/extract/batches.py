"""Tasks travel and are counted in batches.

Two costs grow with the number of tasks, not with the data, and batches cut both:

- Beam embeds a ``Create``'s elements in the pipeline graph, which it pickles and
  compresses with bz2 (level 9) several times while translating it, and a task is
  mostly its SQL text. A :class:`TaskBatch` holds its tasks as one zlib-compressed
  pickle, where the repeated SQL compresses well.
- Every task's counts are a query of their own: a round trip to DuckDB, a query job on
  BigQuery. :func:`batch_counts` asks a batch's counts in one query, each task's own
  count query being one of its subqueries (:func:`pipelines.sql.count_batch`), so
  each count stays an independent question to the source about its shard.
"""
from __future__ import annotations

import logging
import pickle
import zlib
from typing import Sequence

from pipelines.checkpoints import ShardTask
from pipelines.errors import PipelineError
from pipelines.sql import BATCH_TASK, count_batch

log = logging.getLogger(__name__)

# At most this many tasks per batch: one count query answers them, and a BigQuery
# query of this many count subqueries stays far below its size and table limits.
MAX_BATCH_TASKS = 16
# At least this many batches per worker, so that the runner can balance the work.
BATCHES_PER_WORKER = 4


class TaskBatch:
    """Consecutive tasks (plan order: a table's shards are neighbours), packed small."""

    def __init__(self, tasks: Sequence[ShardTask]):
        self.size = len(tasks)
        self._packed = zlib.compress(pickle.dumps(list(tasks), protocol=pickle.HIGHEST_PROTOCOL), 6)

    def tasks(self) -> list[ShardTask]:
        """The tasks, unpacked."""
        return pickle.loads(zlib.decompress(self._packed))

    def __len__(self) -> int:
        return self.size


def make_batches(tasks: Sequence[ShardTask], workers: int) -> list[TaskBatch]:
    """``tasks`` cut into consecutive batches: at most MAX_BATCH_TASKS each, and small
    enough that every one of ``workers`` gets BATCHES_PER_WORKER of them."""
    per_batch = max(1, min(MAX_BATCH_TASKS, len(tasks) // (BATCHES_PER_WORKER * max(workers, 1))))
    return [TaskBatch(tasks[i:i + per_batch]) for i in range(0, len(tasks), per_batch)]


def count_query(tasks: Sequence[ShardTask]):
    """The one query that asks every task's counts (:func:`pipelines.sql.count_batch`)."""
    return count_batch([(t.count_sql, t.counts_bad_keys) for t in tasks])


def batch_counts(source, tasks: Sequence[ShardTask], ask) -> list[dict[str, int] | None]:
    """Each task's counts (``n_rows``, ``n_keys`` and, where it counts them, ``n_bad``)
    from one query; None for all of them when the source refuses that query (a table
    changed since discovery), so that each task asks alone and its own error names it.

    ``ask(query, sql, label)`` runs a query and turns a refusal into a PipelineError
    (transforms._ask); other errors propagate, and the runner retries the bundle.
    """
    if len(tasks) < 2:
        return [None] * len(tasks)
    query = count_query(tasks)
    try:
        rows = ask(source.query_rows, query, f"the counts of {len(tasks)} shards")
    except PipelineError as exc:
        log.warning("%s; counting each shard alone", exc)
        return [None] * len(tasks)
    found: list[dict[str, int] | None] = [None] * len(tasks)
    for row in rows:
        counts = {"n_rows": row["n_rows"], "n_keys": row["n_keys"]}
        if tasks[row[BATCH_TASK]].counts_bad_keys:
            counts["n_bad"] = row["n_bad"]
        found[row[BATCH_TASK]] = counts
    return found
