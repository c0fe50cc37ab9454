"""``python -m bench.latency --rows 10000 [--latency-ms 0,25,50] [--cpus 1] [--work DIR] [--keep]``:
what a bucket's latency costs a merge.

Cloud Storage answers each request after some tens of milliseconds, and a merge makes
thousands of requests of its checkpoints (~18,000 at 100,000 rows: BENCHMARKS.md, "A
bucket's latency"). That latency cannot be measured here (no network); what it costs a merge
can. This writes a full-width synthetic pair (bench/synthetic.py; reused when ``--work``
holds ``ck{rows}``, as ``bench.merge`` leaves it), uploads it to the local GCS emulator
(started as the tests start it), and merges it from the bucket through an HTTP proxy
(tests/faultproxy.py) that holds every request for a fixed time before forwarding it:
once per ``--latency-ms``, and once from the local folder. Each merge is
``python -m pipelines.merge`` (``polars``) in a process of its own, writing a local file,
pinned to ``--cpus`` cores (default 1, as the 1 vCPU merge job); the emulator and the
proxy run on the other cores, as a bucket's work is not the job's.

Prints, per run: wall and CPU seconds, peak RSS, the requests the proxy saw, and for a
latency above 0 the time those requests would wait one after another (requests x
latency) against the wall time the latency added over the 0 ms run (the rest was
overlapped: with reading ahead, fetching a read's shards at once, and the encoding);
last, the seconds of the merge's preflight (every shard checked before the first
column is read), from the merge's own log. The
emulator is a Python process on this machine; the 0 ms run measures its cost and the
proxy's, which the added time excludes.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bench.merge import run_isolated
from bench.phases import clean_up
from bench.soak import gcs_emulator

PREFIX = "latency/ck"


def merge_command(root: str, pair: str, out: str) -> list[str]:
    """The merge job's command line for one run."""
    return [sys.executable, "-m", "pipelines.merge", "--pair", pair, "--method", "polars",
            "--checkpoint-root", root, "--output", out, "--overwrite"]


def latency_row(name: str, r: dict, requests: int | None, latency: float | None,
                base_wall: float | None) -> str:
    """One line of the table: a run's figures and, with a latency, its waiting."""
    cells = [f"{name:>10}", f"{r['wall']:8.1f}", f"{r['cpu']:7.1f}", f"{r['rss'] / 2**30:8.2f}",
             f"{requests if requests is not None else '-':>9}"]
    if latency and requests and base_wall is not None:
        in_turn = requests * latency
        added = r["wall"] - base_wall
        cells += [f"{in_turn:9.1f}", f"{added:8.1f}", f"{1 - added / in_turn:8.0%}"]
    else:
        cells += [f"{'-':>9}", f"{'-':>8}", f"{'-':>8}"]
    preflight = r.get("stages", {}).get("preflight")
    cells.append(f"{preflight:10.1f}" if preflight is not None else f"{'-':>10}")
    status = "ok" if r["code"] == 0 else (r["killed"] or f"exit {r['code']}: {r['error']}")
    return " ".join(cells) + f"  {status}"


HEADER = (f"{'run':>10} {'wall s':>8} {'CPU s':>7} {'peak GiB':>8} {'requests':>9} "
          f"{'in turn s':>9} {'added s':>8} {'hidden':>8} {'preflight':>10}")


def main(argv=None) -> int:
    """Generate (or reuse) the data, merge it locally and from the bucket at each latency."""
    from pipelines.cli import ArgumentParser

    p = ArgumentParser(prog="python -m bench.latency", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=10000, help="spine rows (default 10000)")
    p.add_argument("--latency-ms", default="0,25,50",
                   help="comma-separated latencies per request, ms (default 0,25,50; 0 is "
                        "always run, as the base)")
    p.add_argument("--cpus", type=int, default=1, help="cores of each merge (default 1)")
    p.add_argument("--pair", default="eurusd")
    p.add_argument("--tables", type=int,
                   help="feature tables of the generated pair (the first N of the catalog's); "
                        "default all")
    p.add_argument("--cap-seconds", type=float, default=3600, help="wall-clock cap per merge")
    p.add_argument("--work", help="folder for the data (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    args = p.parse_args(argv)
    try:
        latencies = sorted({0.0} | {float(ms) / 1000 for ms in args.latency_ms.split(",") if ms.strip()})
    except ValueError:
        p.error(f"--latency-ms {args.latency_ms!r}: give milliseconds like 0,25,50")
    if min(latencies) < 0:
        p.error("--latency-ms: a latency cannot be negative")
    if args.tables is not None and args.tables < 1:
        p.error(f"--tables must be at least 1, not {args.tables}")
    cores = sorted(os.sched_getaffinity(0))
    if not 1 <= args.cpus <= len(cores):
        p.error(f"--cpus must be from 1 to the {len(cores)} core(s) this process may use")
    merge_cores = cores[:args.cpus]
    try:
        # The emulator and the proxy's threads inherit this thread's cores when they start.
        os.sched_setaffinity(0, cores[args.cpus:] or cores)
        return _run(args, p, latencies, merge_cores, len(cores[args.cpus:]) or len(cores))
    finally:
        os.sched_setaffinity(0, cores)


def _run(args, p, latencies: list[float], merge_cores: list[int], other_cores: int) -> int:
    """The runs of :func:`main`, from its parsed arguments."""
    work = args.work or tempfile.mkdtemp(prefix="bqx-bench-latency-")
    # bench.merge's folder name for the full width, so that either reuses the other's.
    root = os.path.join(work, f"ck{args.rows}" + ("" if args.tables is None else f"-{args.tables}t"))
    out = os.path.join(work, f"latency{args.rows}.parquet")
    try:
        if not os.path.isdir(root):
            from bench.synthetic import make_checkpoints
            from pipelines.errors import PipelineError
            started = time.monotonic()
            try:
                make_checkpoints(root, args.pair, args.rows, log=lambda *a: None, tables=args.tables)
            except PipelineError as exc:  # raised before anything is written
                p.error(str(exc))
            print(f"{args.rows} rows: synthetic checkpoints in {time.monotonic() - started:.0f} s",
                  flush=True)
        with gcs_emulator(work) as emulator:
            tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
            if tests not in sys.path:
                sys.path.insert(0, tests)
            from emulators import upload_tree
            from faultproxy import HttpFaultProxy

            bucket_root = f"gs://{emulator['bucket']}/{PREFIX}"
            started = time.monotonic()
            files = upload_tree(root, bucket_root)
            print(f"uploaded {files} files to the emulator in {time.monotonic() - started:.0f} s",
                  flush=True)
            proxy = HttpFaultProxy(emulator["host"], name="gcs")
            os.sched_setaffinity(0, merge_cores)  # the merges' processes start from here
            env = dict(os.environ, STORAGE_EMULATOR_HOST=proxy.url)
            width = "full width" if args.tables is None else f"the targets and {args.tables} table(s)"
            print(f"\nmerges of {args.rows} rows ({width}), each pinned to {args.cpus} "
                  f"core(s); emulator and proxy on {other_cores}")
            print(HEADER)
            r = run_isolated(merge_command(root, args.pair, out), args.cap_seconds, 1 << 40)
            print(latency_row("local", r, None, None, None), flush=True)
            base = None
            failed = r["code"] != 0
            for latency in latencies:
                proxy.reset()
                proxy.delay(latency)
                r = run_isolated(merge_command(bucket_root, args.pair, out), args.cap_seconds,
                                 1 << 40, env)
                requests = proxy.counts["requests"]
                if latency == 0:
                    base = r["wall"]
                print(latency_row(f"{latency * 1000:.0f} ms", r, requests, latency, base), flush=True)
                failed |= r["code"] != 0
            proxy.stop()
        return 1 if failed else 0
    finally:
        clean_up(out, root, work, args.keep, args.work is not None)


if __name__ == "__main__":
    raise SystemExit(main())
