"""The end of an extraction: verify every shard, then commit the manifest and marker."""
from __future__ import annotations

import json
import logging
from typing import Mapping

from pipelines import checkpoints, storage
from pipelines.checkpoints import Manifest
from pipelines.errors import PipelineError
from pipelines.extract.plan import ExtractionPlan

log = logging.getLogger(__name__)


class ExtractionIncomplete(PipelineError):
    """Some tasks have no sound checkpoint; ``problems`` names each."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__(f"extraction incomplete: {len(problems)} problem(s); first: {problems[0]}")


def check_task(task: checkpoints.ShardTask, key: str,
               written_crc: str | None = None) -> tuple[dict | None, list[str]]:
    """The task's commit record if its shard is sound, else the problems found.

    ``written_crc``: the CRC32C this run computed from the bytes it wrote for the task.
    When the record states that same CRC32C the shard is not read again to recompute
    it (size, footer, rows and schema are still checked).
    """
    record = checkpoints.read_json(task.record_path)
    if record is None:
        return None, [f"{task.label}: no checkpoint ({task.record_path} missing)"]
    if record.get("fingerprint") != task.fingerprint:
        return None, [f"{task.label}: checkpoint is from another query or schema"]
    expected = checkpoints.output_schema(task.spec, key)
    fresh = written_crc is not None and record.get("crc32c") == written_crc
    problems = list(checkpoints.verify_shard(task.path, record, expected, check_content=not fresh))
    if not problems and record["rows"] != record["source_keys"]:
        problems.append(
            f"{task.label}: checkpoint has {record['rows']} rows but the source has "
            f"{record['source_keys']} distinct keys in the shard")
    return (None if problems else record), problems


def commit_manifest(plan: ExtractionPlan, source_url: str,
                    written: Mapping[str, str] | None = None) -> Manifest:
    """Verify every task's shard and write the manifest, then the success marker.

    ``written``: fingerprint -> CRC32C of the shards this run wrote, as its tasks
    reported them (computed from the bytes written). A shard whose commit record says
    the same is not checksummed again (:func:`check_task`); every other shard (left by
    an earlier run, or rewritten by another since) is checked whole.

    Raises ExtractionIncomplete listing every missing or unsound shard; nothing is
    committed then, and an older success marker for this window is removed.
    """
    problems: list[str] = []
    tables = []
    written = written or {}
    by_spec = plan.tasks_by_spec()
    tasks = [task for spec in plan.specs for task in by_spec[(spec.dataset, spec.table)]]
    checked = iter(storage.map_under(
        plan.root, lambda task: check_task(task, plan.key, written.get(task.fingerprint)), tasks))
    for spec in plan.specs:
        shards = []
        for task in by_spec[(spec.dataset, spec.table)]:
            record, found = next(checked)
            problems.extend(found)
            if record is not None:
                shards.append({**record, "path": checkpoints.relative(plan.root, task.path)})
        entry = checkpoints.spec_to_json(spec)
        entry["rows"] = sum(s["rows"] for s in shards)
        entry["shards"] = shards
        tables.append(entry)
    success = checkpoints.success_path(plan.root, plan.pair, plan.window)
    if problems:
        storage.delete(success)
        raise ExtractionIncomplete(problems)
    _refuse_empty_tables(plan, by_spec, tables, success)
    manifest = Manifest(plan.pair, plan.window, plan.key, plan.root, tables,
                        source=source_url, shard_days=plan.shard_days)
    body = json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode()
    storage.write_bytes(checkpoints.manifest_path(plan.root, plan.pair, plan.window), body)
    storage.write_bytes(success, json.dumps(
        {"manifest_bytes": len(body), "totals": manifest.totals()}, sort_keys=True).encode())
    return manifest


def _refuse_empty_tables(plan: ExtractionPlan, by_spec: dict, tables: list[dict], success: str) -> None:
    """Refuse to commit when a table has no rows in the whole window.

    An empty targets table would make an empty training file, an empty feature table
    columns that are entirely NULL: both are broken input, not data. The commit records
    of the empty tables' shards are removed (their files stay: another pair's manifest
    may list a shared one) so that the next run reads them again instead of trusting
    what was empty.
    """
    empty = [(spec, entry) for spec, entry in zip(plan.specs, tables) if entry["rows"] == 0]
    if not empty:
        return
    storage.delete(success)
    for spec, _entry in empty:
        log.error("empty: %s.%s has no rows in window %s", spec.dataset, spec.table,
                  plan.window.id)
        for task in by_spec[(spec.dataset, spec.table)]:
            storage.delete(task.record_path)
    spec = empty[0][0]
    if spec.group == "targets":
        consequence = "the training file would have no rows"
    else:
        consequence = f"its {len(spec.columns)} column(s) would be entirely NULL"
    more = f" ({len(empty)} empty tables)" if len(empty) > 1 else ""
    raise PipelineError(
        f"table {spec.dataset}.{spec.table} has no rows in window {plan.window.id}{more}: "
        f"{consequence}; load it or choose a window it covers (nothing committed)")
