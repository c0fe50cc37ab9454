"""``python -m bench.extract --rows 10000 [--workers 1,2] [--memory-limits 512MB,19GB] [--repeat 3]``

Builds a sample warehouse of one pair (all 667 tables) at ``--rows``, then times, each
in its own process:

- the extract job (``python -m pipelines.extract``, Beam DirectRunner, multi-threading)
  with each ``--direct_num_workers`` in ``--workers``, into a fresh checkpoint folder,
  once per DuckDB memory limit in ``--memory-limits`` (the warehouse source's
  ``?memory_limit=``; by default the source's own);
- the bare loop it is measured against: the same GoogleSQL queries (one per table and
  shard, translated for DuckDB) run as ``COPY (query) TO 'x.parquet'`` by the same
  number of threads, with nothing else (no counts, dedupe, records or verification), on
  DuckDB's defaults.

Prints wall time, CPU time (user + system) and the cores it kept busy on average (CPU
over wall), peak RSS, and the ratio of each extract run to the bare loop with the same
number of workers. A run that keeps every core busy with one worker cannot gain from a
second. With ``--repeat``, rounds of every run take turns and medians follow.
"""
from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor


def copy_loop(warehouse: str, pair: str, out: str, workers: int) -> None:
    """The bare baseline: every extraction query as a DuckDB COPY, ``workers`` at a time."""
    import duckdb

    from pipelines import sql
    from pipelines.catalog import load_catalog
    from pipelines.extract.plan import make_plan
    from pipelines.sources import DuckDBSource

    source = DuckDBSource(warehouse)
    plan = make_plan(source, load_catalog(), pair, None, out, 28, "drop")
    source.close()
    con = duckdb.connect(warehouse, read_only=True)
    os.makedirs(out, exist_ok=True)

    def run(i_task):
        i, task = i_task
        cur = con.cursor()
        cur.execute("SET TimeZone = 'UTC'")
        cur.execute(f"COPY ({sql.to_duckdb(task.select_sql)}) TO '{out}/{i}.parquet' (FORMAT PARQUET)")
        cur.close()

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, enumerate(plan.tasks)))


def _trial(kind: str, workers: int, limit: str | None, warehouse: str, work: str, args) -> dict:
    """One measured run of the copy loop or the extract job (reading the warehouse with
    DuckDB's memory ``limit``, or the source's default), into a folder removed after."""
    from bench.merge import run_isolated
    from pipelines.sources import duckdb_url

    out = os.path.join(work, f"{kind}{workers}")
    if kind == "copy":
        cmd = [sys.executable, "-m", "bench.extract", "--copy-loop", warehouse, args.pair, out,
               str(workers)]
    else:
        cmd = [sys.executable, "-m", "pipelines.extract", "--pair", args.pair,
               "--source", duckdb_url(warehouse) + (f"?memory_limit={limit}" if limit else ""),
               "--checkpoint-root", out,
               f"--direct_num_workers={workers}", f"--direct_running_mode={args.running_mode}"]
    r = run_isolated(cmd, args.cap_seconds, 1 << 40)
    shutil.rmtree(out, ignore_errors=True)
    return r


def _line(kind: str, workers: int, limit: str | None, r: dict, base: dict | None) -> str:
    """A run's row; its ratio to ``base`` (a copy loop with as many workers) when given."""
    name = f"copy loop, {workers} threads" if kind == "copy" else f"extract, {workers} workers"
    if limit:
        name += f", {limit}"
    ratio = f"{r['wall'] / base['wall']:.2f}" if base and base["wall"] and r["code"] == 0 else "-"
    return f"{name:>30} {_figures(r)} {ratio:>12}  {'ok' if r['code'] == 0 else r['error']}"


def _figures(r: dict) -> str:
    """Wall, CPU, cores busy and peak RSS columns of one measured run."""
    cores = r["cpu"] / r["wall"] if r["wall"] else 0.0
    return f"{r['wall']:>8.1f} {r['cpu']:>7.1f} {cores:>6.2f} {r['rss'] / 2**30:>13.2f}"


def main(argv=None) -> int:
    """Run the extraction benchmark and print the figures."""
    p = argparse.ArgumentParser(prog="python -m bench.extract", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10000)
    p.add_argument("--workers", default="1,2")
    p.add_argument("--pair", default="eurusd")
    p.add_argument("--work", default=None)
    p.add_argument("--cap-seconds", type=float, default=3600)
    p.add_argument("--running-mode", default="multi_threading",
                   choices=("multi_threading", "multi_processing", "in_memory"),
                   help="the DirectRunner's --direct_running_mode for the extract runs")
    p.add_argument("--runs", default="copy,extract",
                   help="comma list of copy (the bare COPY loop) and extract")
    p.add_argument("--memory-limits", default="",
                   help="comma list of DuckDB memory limits for the extract runs' warehouse "
                        "(each is run); default: the source's own (sources.DUCKDB_MEMORY_LIMIT). "
                        "19GB is about DuckDB's own default (80%% of memory) on a 24 GiB machine")
    p.add_argument("--repeat", type=int, default=1,
                   help="rounds of every run, taken in turns; medians are printed after")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    from bench.merge import summarize_trials
    from pipelines.sample import build_warehouse

    work = args.work or tempfile.mkdtemp(prefix="bqx-bench-extract-")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"command: python -m bench.extract {' '.join(sys.argv[1:] if argv is None else argv)}")
    try:
        warehouse = os.path.join(work, "w.duckdb")
        if not os.path.exists(warehouse):
            started = time.monotonic()
            build_warehouse(warehouse, [args.pair], rows=args.rows, seed=0)
            print(f"sample warehouse: {args.rows} rows, {time.monotonic() - started:.0f} s")
        print(f"extract runs: DirectRunner, {args.running_mode}")
        header = (f"{'run':>30} {'wall s':>8} {'CPU s':>7} {'cores':>6} {'peak RSS GiB':>13} "
                  f"{'x copy loop':>12}  result")
        print(header, flush=True)
        kinds = [k for k in ("copy", "extract") if k in args.runs.split(",")]
        limits = [m for m in args.memory_limits.split(",") if m] or [None]
        trials: dict[tuple[str, int, str | None], list[dict]] = {}
        # Rounds taken in turns, so that a slow spell of a shared machine falls on all.
        for _ in range(args.repeat):
            for workers in [int(w) for w in args.workers.split(",")]:
                for kind, limit in [(k, m) for k in kinds for m in (limits if k == "extract" else [None])]:
                    r = _trial(kind, workers, limit, warehouse, work, args)
                    trials.setdefault((kind, workers, limit), []).append(r)
                    base = trials.get(("copy", workers, None), [None])[-1]
                    print(_line(kind, workers, limit, r, base), flush=True)
        if args.repeat > 1:
            print(f"\nmedians of {args.repeat} runs each (peak RSS: the highest)\n{header}")
            for (kind, workers, limit), runs in trials.items():
                copies = trials.get(("copy", workers, None))
                base = summarize_trials(copies) if copies else None
                print(_line(kind, workers, limit, summarize_trials(runs), base), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--copy-loop":
        copy_loop(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]))
    else:
        sys.exit(main())
