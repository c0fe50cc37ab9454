"""``python -m bench.merge --rows 20000 [--rows 100000] [--methods polars,duckdb]``

For each row count: writes a full-width synthetic pair in checkpoint form (all 667
tables, ~17,000 columns; see bench/synthetic.py), then runs ``python -m pipelines.merge``
once per method, each in its own process, and prints wall time and the peak RSS the
operating system measured for that process (getrusage of the child). Data goes under
``--work`` (default a temporary folder) and is removed afterwards unless ``--keep``.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time


def run_measured(cmd: list[str], timeout: float) -> tuple[int, float, int]:
    """Run ``cmd``; return (exit code, wall seconds, peak RSS bytes) of that process."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return -9, time.monotonic() - started, 0
    wall = time.monotonic() - started
    # wait4 already reaped it through communicate(); RUSAGE_CHILDREN is the max over
    # children so far, so every command runs in a fresh interpreter below.
    if proc.returncode != 0:
        sys.stderr.write(err[-2000:])
    return proc.returncode, wall, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def main(argv=None) -> int:
    """Run the benchmark and print a table."""
    p = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append", help="spine rows (repeatable)")
    p.add_argument("--methods", default="polars,duckdb")
    p.add_argument("--pair", default="eurusd")
    p.add_argument("--memory-budget", default=None, help="passed to the merge (default: its own)")
    p.add_argument("--work", default=None, help="folder for the data (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--timeout", type=float, default=1800)
    args = p.parse_args(argv)
    sizes = args.rows or [20000]
    work = args.work or tempfile.mkdtemp(prefix="bqx-bench-")
    print(f"machine: {platform.platform()}, {os.cpu_count()} cores, python {platform.python_version()}")
    print(f"command: python -m bench.merge {' '.join(sys.argv[1:] if argv is None else argv)}")
    print(f"{'rows':>8} {'method':>8} {'columns':>8} {'wall s':>8} {'peak RSS GiB':>13} {'file GiB':>9}  result")
    try:
        for rows in sizes:
            root = os.path.join(work, f"ck{rows}")
            if not os.path.isdir(root):
                from bench.synthetic import make_checkpoints
                make_checkpoints(root, args.pair, rows, log=lambda *a: None)
            for method in args.methods.split(","):
                out = os.path.join(work, f"out{rows}_{method}.parquet")
                cmd = [sys.executable, "-m", "pipelines.merge", "--pair", args.pair, "--method", method,
                       "--checkpoint-root", root, "--output", out, "--overwrite"]
                if args.memory_budget:
                    cmd += ["--memory-budget", args.memory_budget]
                # A fresh launcher process per run, so RUSAGE_CHILDREN is this run's peak.
                code, wall, rss = _isolated(cmd, args.timeout)
                size = os.path.getsize(out) / 2**30 if os.path.exists(out) else float("nan")
                columns = _columns(out)
                print(f"{rows:>8} {method:>8} {columns:>8} {wall:>8.1f} {rss / 2**30:>13.2f} {size:>9.2f}  "
                      f"{'ok' if code == 0 else f'exit {code}'}", flush=True)
                if os.path.exists(out):
                    os.unlink(out)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def _columns(path: str) -> int:
    if not os.path.exists(path):
        return 0
    import pyarrow.parquet as pq
    return pq.read_metadata(path).num_columns


def _isolated(cmd: list[str], timeout: float) -> tuple[int, float, int]:
    """Measure ``cmd`` from a fresh Python process, so earlier runs don't count."""
    probe = [sys.executable, "-c",
             "import sys, json; from bench.merge import run_measured; "
             "print(json.dumps(run_measured(json.loads(sys.argv[1]), float(sys.argv[2]))))",
             __import__("json").dumps(cmd), str(timeout)]
    out = subprocess.run(probe, capture_output=True, text=True)
    if out.returncode != 0:
        sys.stderr.write(out.stderr)
        return out.returncode, 0.0, 0
    return tuple(__import__("json").loads(out.stdout.strip().splitlines()[-1]))


if __name__ == "__main__":
    sys.exit(main())
