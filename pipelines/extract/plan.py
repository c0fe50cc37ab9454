"""Discovery and planning: which (table, shard) tasks an extraction consists of."""
from __future__ import annotations

import dataclasses
import datetime as dt
import logging

from pipelines import checkpoints, sql
from pipelines.catalog import Catalog, TableSpec, plan_tables
from pipelines.checkpoints import ShardTask
from pipelines.errors import PipelineError
from pipelines.window import UTC, Window, last_days, shards, utc_today, window_covering

log = logging.getLogger(__name__)


@dataclasses.dataclass
class ExtractionPlan:
    """Everything an extraction of one pair in one window will do."""

    pair: str
    window: Window
    key: str
    root: str
    shard_days: int
    specs: list[TableSpec]
    tasks: list[ShardTask]

    def tasks_by_spec(self) -> dict[tuple[str, str], list[ShardTask]]:
        """Every table's tasks in time order, by (dataset, table), in one pass over the
        tasks."""
        out: dict[tuple[str, str], list[ShardTask]] = {(s.dataset, s.table): [] for s in self.specs}
        for task in self.tasks:
            out[(task.spec.dataset, task.spec.table)].append(task)
        return out


def min_valid_key(catalog: Catalog) -> dt.datetime:
    """The earliest key that is kept (older keys are migration artefacts)."""
    return dt.datetime.combine(dt.date.fromisoformat(catalog.min_valid_key), dt.time(), UTC)


def discover(source, catalog: Catalog, pair: str) -> list[TableSpec]:
    """Read INFORMATION_SCHEMA of both datasets and apply the catalog's rules."""
    features = source.table_columns(catalog.features_dataset)
    if not features:
        raise PipelineError(f"dataset {catalog.features_dataset} has no tables in {source.url}")
    targets_name = catalog.targets_table_for(pair)
    targets = source.table_columns(catalog.targets_dataset).get(targets_name)
    if targets is None:
        raise PipelineError(f"targets table {catalog.targets_dataset}.{targets_name} not "
                            f"found in {source.url}: pair {pair} has no targets there")
    return plan_tables(catalog, pair, features, targets)


def default_window(source, catalog: Catalog, pair: str, days: int | None = None,
                   as_of: dt.date | None = None) -> Window:
    """The whole days covered by the pair's targets (valid keys only) up to yesterday
    in UTC (see :func:`pipelines.window.window_covering`), or up to the day before
    ``as_of`` (``--as-of``) when given; with ``days``, only the last ``days`` of them."""
    query = sql.key_range(catalog.targets_dataset, catalog.targets_table_for(pair),
                          catalog.key, min_valid_key(catalog), source.project)
    row = source.query_rows(query)[0]
    if row["first_key"] is None:
        raise PipelineError(f"targets table {catalog.targets_table_for(pair)} has no rows "
                            f"with {catalog.key} after {catalog.min_valid_key}")
    if as_of is None:
        day, name, why = utc_today(), "today", "a day not yet over may still change"
    else:
        day, name, why = as_of, "the --as-of day", "the run's window is worked out as of that day"
    window = window_covering(row["first_key"], row["last_key"], day, name)
    if window.end <= row["last_key"]:
        log.info("window ends with %s, the last whole day before %s (%s, UTC): the targets "
                 "reach %s, and %s (--start-date and --end-date choose another window)",
                 window.last_day, name, day, row["last_key"], why)
    if days is not None and last_days(window, days) != window:
        window = last_days(window, days)
        log.info("window: the last %d days the targets cover, %s .. %s (--days)", days,
                 window.start.date(), window.last_day)
    return window


def build_tasks(catalog: Catalog, pair: str, specs: list[TableSpec], window: Window,
                root: str, shard_days: int, policy: str, project: str | None) -> list[ShardTask]:
    """One task per table and time shard, in catalog then time order."""
    parts = shards(window, shard_days)
    tasks = []
    for spec in specs:
        schema = checkpoints.output_schema(spec, catalog.key)
        for shard in parts:
            select = sql.select_shard(spec, catalog.key, shard, project)
            # The table-wide count of bad keys rides on the window's first shard.
            bad_floor = min_valid_key(catalog) if shard.start == window.start else None
            count = sql.count_shard(spec, catalog.key, shard, bad_floor, project)
            tasks.append(ShardTask(
                spec=spec, shard=shard,
                path=checkpoints.shard_path(root, spec.shared, pair, spec.table, shard),
                select_sql=select, count_sql=count,
                fingerprint=checkpoints.fingerprint(select, count, schema, policy),
                counts_bad_keys=bad_floor is not None,
            ))
    return tasks


def clip_window(window: Window, catalog: Catalog) -> Window:
    """``window`` without the days before the catalog's ``min_valid_key``.

    Keys before it (the 1970-01-01 migration artefacts) are never extracted, so a window
    starting earlier starts there instead; one ending by then holds nothing to extract
    and is refused, naming the date.
    """
    floor = min_valid_key(catalog)
    if window.end <= floor:
        raise PipelineError(
            f"window {window.start:%Y-%m-%d} .. {window.last_day} "
            f"ends before {catalog.min_valid_key}, the catalog's min_valid_key: earlier keys "
            "(1970-01-01 placeholders) are never extracted")
    if window.start < floor:
        log.info("window starts at %s, not %s: keys before the catalog's min_valid_key "
                 "are not extracted", floor.date(), window.start.date())
        return Window(floor, window.end)
    return window


def make_plan(source, catalog: Catalog, pair: str, window: Window | None, root: str,
              shard_days: int, policy: str, days: int | None = None,
              as_of: dt.date | None = None) -> ExtractionPlan:
    """Discover the pair's tables and lay out every task of the extraction (in
    ``window``, or else the default window as of ``as_of``, of the last ``days`` when
    given)."""
    checkpoints.check_root(root)
    if window is not None:
        window = clip_window(window, catalog)
    specs = discover(source, catalog, pair)
    if window is None:
        window = default_window(source, catalog, pair, days, as_of)
    tasks = build_tasks(catalog, pair, specs, window, root, shard_days, policy, source.project)
    return ExtractionPlan(pair, window, catalog.key, root, shard_days, specs, tasks)
