"""The extract job: plan, run the Beam pipeline over the pending tasks, verify, commit."""
from __future__ import annotations

import logging
import os
import shutil
import sys

import apache_beam as beam
from apache_beam.options.pipeline_options import DirectOptions, PipelineOptions, StandardOptions

from pipelines import checkpoints, cli, storage
from pipelines.catalog import load_catalog
from pipelines.errors import PipelineError
from pipelines.checkpoints import default_checkpoint_root
from pipelines.extract.batches import make_batches
from pipelines.extract.options import ExtractOptions
from pipelines.extract.plan import ExtractionPlan, make_plan
from pipelines.extract.transforms import FAILED, ExtractShards
from pipelines.extract.verify import ExtractionIncomplete, commit_manifest
from pipelines.sources import default_warehouse_path, duckdb_url, open_source
from pipelines.window import Window, as_of_day, utc_today, window_from_options

log = logging.getLogger("pipelines.extract")


def build_pipeline(p: beam.Pipeline, tasks, source_url: str, key: str, policy: str,
                   workers: int = 1):
    """Add the extraction to pipeline ``p``; return its (records, failed) PCollections.

    The tasks go in batches (:mod:`pipelines.extract.batches`), enough of them for
    ``workers`` to share.
    """
    outputs = (
        p
        | "Tasks" >> beam.Create(make_batches(tasks, workers), reshuffle=False)
        | "ExtractShards" >> ExtractShards(source_url, key, policy)
    )
    return outputs.records, outputs[FAILED]


class _Collect(beam.DoFn):
    """Remember lines in a local file (DirectRunner only): the failures for the final
    report, the shards written for the verification."""

    def __init__(self, sink_path: str):
        self.sink_path = sink_path

    def process(self, line: str):
        with open(self.sink_path, "a", encoding="utf-8") as fh:
            fh.write(line.replace("\n", " ") + "\n")
        yield line


def _written_line(record: dict) -> str:
    """``{fingerprint} {crc32c}`` of a commit record this run wrote."""
    return f"{record['fingerprint']} {record['crc32c']}"


def _with_runner_defaults(argv: list[str]) -> list[str]:
    """Use every core on the DirectRunner unless the user chose otherwise."""
    argv = list(argv)
    given = " ".join(argv)
    if "--runner" not in given or "DirectRunner" in given:
        if "--direct_num_workers" not in given:
            workers = cli.env_number("EXTRACTION_WORKERS", os.cpu_count() or 1, int, minimum=1)
            argv.append(f"--direct_num_workers={workers}")
        if "--direct_running_mode" not in given:
            argv.append("--direct_running_mode=multi_threading")
    return argv


def resolve_source(opts: ExtractOptions, catalog_path: str | None, pair: str) -> str:
    """The source URL; the embedded sample warehouse is created (or given the pair) on
    first use."""
    if opts.source:
        return opts.source
    path = default_warehouse_path()
    from pipelines import sample

    with cli.stage("sample", warehouse=path, pair=pair, rows=opts.sample_rows):
        sample.build_warehouse(path, [pair], rows=opts.sample_rows)
    return duckdb_url(path)


def pending_tasks(plan: ExtractionPlan) -> list:
    """Tasks whose shard is not already proven done by its commit record (in a bucket,
    several tasks at once: two requests each, mostly waiting)."""
    done = storage.map_under(plan.root, checkpoints.shard_is_done, plan.tasks)
    return [t for t, finished in zip(plan.tasks, done) if not finished]


def print_help() -> None:
    """The job's own options; Beam's parser would print only ``--help``."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m pipelines.extract",
        description="Extract a pair's feature tables and targets into parquet checkpoints.",
        epilog="Beam's own flags work alongside: --runner, --direct_num_workers (default: "
               "one per core, or EXTRACTION_WORKERS), --direct_running_mode (default "
               "multi_threading), and the DataflowRunner's (--project, --region, "
               "--temp_location, --setup_file, ...).")
    ExtractOptions._add_argparse_args(parser)
    parser.print_help()


def run(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.extract``; returns the exit code."""
    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        print_help()
    else:
        extract(argv)
    return cli.EXIT_OK


def check_job_options(argv: list[str]) -> None:
    """Refuse a malformed job option (``--days abc``, ``--on-duplicate-keys eror``) in
    one line: Beam's parser would print its whole usage first. Beam's own flags are left
    to Beam."""
    parser = cli.ArgumentParser(prog="python -m pipelines.extract", add_help=False,
                                allow_abbrev=False)  # as Beam's parser: no abbreviations
    ExtractOptions._add_argparse_args(parser)
    parser.parse_known_args(argv)


def extract(argv: list[str]) -> Window:
    """Run the extract job with the command-line arguments ``argv``; return the window
    it committed (a failure raises)."""
    check_job_options(argv)
    argv = _with_runner_defaults(argv)
    options = PipelineOptions(argv)
    opts = options.view_as(ExtractOptions)
    cli.setup_logging(opts.verbose)
    catalog = load_catalog(opts.catalog)
    pair = catalog.check_pair(opts.pair)
    root = storage.resolve_local(opts.checkpoint_root or default_checkpoint_root())
    window = window_from_options(opts.start_date, opts.end_date, opts.days)
    as_of = as_of_day(opts.as_of, utc_today(), window is not None)
    source_url = resolve_source(opts, opts.catalog, pair)

    with cli.stage("discover", pair=pair, source=source_url) as out:
        source = open_source(source_url)
        try:
            plan = make_plan(source, catalog, pair, window, root, opts.shard_days,
                             opts.on_duplicate_keys, opts.days, as_of)
        finally:
            source.close()
        groups: dict[str, int] = {}
        for spec in plan.specs:
            groups[spec.group] = groups.get(spec.group, 0) + 1
        out.update(tables=len(plan.specs), groups=groups, window=plan.window.id,
                   shards_per_table=len(plan.tasks) // max(len(plan.specs), 1))

    with cli.stage("resume-check", tasks=len(plan.tasks)) as out:
        todo = pending_tasks(plan)
        out.update(done_before=len(plan.tasks) - len(todo), to_do=len(todo))

    written: dict[str, str] = {}
    if todo:
        failures, written = _run_beam(options, plan, todo, source_url)
        if failures:
            for line in failures:
                log.error("failed: %s", line)
            raise PipelineError(f"{len(failures)} shard(s) failed; first: {failures[0]}")

    with cli.stage("verify", tasks=len(plan.tasks)) as out:
        try:
            manifest = commit_manifest(plan, source_url, written)
        except ExtractionIncomplete as exc:
            for problem in exc.problems:
                log.error("missing: %s", problem)
            raise
        totals = manifest.totals()
        out.update(**totals)
    log.info("[extract] committed %s", checkpoints.manifest_path(root, pair, plan.window))
    return plan.window


def _run_beam(options: PipelineOptions, plan: ExtractionPlan, todo: list,
              source_url: str) -> tuple[list[str], dict[str, str]]:
    """Run the Beam pipeline over ``todo``; return the failure lines it reported and
    the CRC32C of every shard it wrote, by fingerprint (both only on the DirectRunner:
    elsewhere no failure lines, and verification checks every shard whole)."""
    runner = options.view_as(StandardOptions).runner or "DirectRunner"
    folder = storage.temp_dir("bqx-extract-") if "Direct" in runner else None
    try:
        failures = _run_and_collect(options, plan, todo, source_url, runner, folder)
        if folder is None:
            return failures, {}
        written = dict(line.split(" ", 1) for line in _lines(os.path.join(folder, "written.txt")))
        return failures, written
    finally:
        if folder:
            shutil.rmtree(folder, ignore_errors=True)


def _lines(path: str) -> list[str]:
    """The non-empty lines of a local file (none if it does not exist)."""
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as fh:
        return [line.rstrip("\n") for line in fh if line.strip()]


def _parallelism(options: PipelineOptions) -> int:
    """How many workers will share the tasks: the DirectRunner's, or Dataflow's most."""
    from apache_beam.options.pipeline_options import WorkerOptions

    direct = options.view_as(DirectOptions).direct_num_workers
    if "Direct" in (options.view_as(StandardOptions).runner or "DirectRunner"):
        return max(1, direct or os.cpu_count() or 1)  # 0: one per core
    workers = options.view_as(WorkerOptions)
    return max(1, workers.max_num_workers or workers.num_workers or 1)


def _run_and_collect(options: PipelineOptions, plan: ExtractionPlan, todo: list, source_url: str,
                     runner: str, folder: str | None) -> list[str]:
    workers = _parallelism(options)
    with cli.stage("extract", runner=runner, workers=workers, tasks=len(todo)):
        p = beam.Pipeline(options=options)
        records, failed = build_pipeline(p, todo, source_url, plan.key,
                                         options.view_as(ExtractOptions).on_duplicate_keys,
                                         workers)
        if folder:
            failed | "CollectFailures" >> beam.ParDo(_Collect(os.path.join(folder, "failures.txt")))
            (records | "WrittenLines" >> beam.Map(_written_line)
             | "CollectWritten" >> beam.ParDo(_Collect(os.path.join(folder, "written.txt"))))
        progress = cli.Progress("extract", len(todo), "shards")
        # One listing per poll in a bucket, not one request per pending task.
        record_paths = [t.record_path for t in todo]
        with cli.watch(progress, lambda: storage.count_existing(record_paths)):
            result = p.run()
            result.wait_until_finish()
    return _lines(os.path.join(folder, "failures.txt")) if folder else []
