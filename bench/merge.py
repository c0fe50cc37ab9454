"""``python -m bench.merge --rows 10000 --rows 20000 [--runs ...] [--report BENCHMARKS.md]``

For each row count, writes a full-width synthetic pair in checkpoint form (all 667
tables, ~17,000 columns; see bench/synthetic.py), then runs, each in its own process:
the project's merge methods (``polars``, ``duckdb``) and the anchors of bench/anchors.py
(``floor``, ``polars_eager``, ``polars_lazy``, ``duckdb_one_plan``). For each run it
records the wall time and the peak RSS the operating system measured for that process
(getrusage of the child); a run is killed at ``--cap-seconds`` or when its RSS passes
``--cap-rss``. Prints a table per size with ratios to the floor, and with ``--report``
writes a Markdown report (plus a PNG chart next to it when matplotlib is installed).
Data goes under ``--work`` (default a temporary folder), removed afterwards unless
``--keep``. ``--method-env NAME=VALUE`` sets a variable for the project's methods only,
so that a setting read at start-up (an allocator's, say) is measured against the floor
of the same run, which keeps the machine's defaults.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

METHODS = ("polars", "duckdb")
ANCHORS = ("floor", "polars_eager", "polars_lazy", "duckdb_one_plan")


def _rss(pid: int) -> int:
    from bench.memory import status_bytes

    try:
        return status_bytes(("VmRSS",), pid).get("VmRSS", 0)
    except OSError:  # the process has just ended
        return 0


def run_measured(cmd: list[str], cap_seconds: float, cap_rss: int) -> dict:
    """Run ``cmd`` (from a fresh process: RUSAGE_CHILDREN then covers only it); return
    its exit code, wall seconds, CPU seconds (user + system), peak RSS, whether a cap
    killed it, and the seconds of each stage a job logged as done (``stages``)."""
    started = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    killed = None
    while proc.poll() is None:
        if time.monotonic() - started > cap_seconds:
            killed = f"killed at {cap_seconds:.0f} s"
        elif _rss(proc.pid) > cap_rss:
            killed = f"killed at {cap_rss / 2**30:.0f} GiB"
        if killed:
            proc.kill()
            break
        time.sleep(0.2)
    err = proc.communicate()[1]
    wall = time.monotonic() - started
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss * 1024
    lines = err.strip().splitlines()
    errors = [line for line in lines if "Error" in line or line.startswith("error:")]
    return {"code": proc.returncode, "wall": wall, "rss": peak, "killed": killed,
            "cpu": usage.ru_utime + usage.ru_stime,
            "stages": {name: float(s) for name, s in re.findall(r"\[(\w+)\] done in ([0-9.]+)s", err)},
            "error": "" if proc.returncode == 0 or killed else (errors or lines or [""])[-1][:200]}


def run_isolated(cmd: list[str], cap_seconds: float, cap_rss: int,
                 env: dict[str, str] | None = None) -> dict:
    """:func:`run_measured` in a fresh process of its own, so that the peak RSS it reads
    (getrusage of its children) is ``cmd``'s alone; ``env`` (default this process's
    environment) is ``cmd``'s environment."""
    probe = [sys.executable, "-c",
             "import sys, json; from bench.merge import run_measured; "
             "print(json.dumps(run_measured(json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3]))))",
             json.dumps(cmd), str(cap_seconds), str(cap_rss)]
    out = subprocess.run(probe, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"code": out.returncode, "wall": 0.0, "cpu": 0.0, "rss": 0, "killed": None,
                "error": out.stderr[-500:]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def command_for(run: str, root: str, pair: str, out: str, budget: str | None) -> list[str]:
    """The command line of one run."""
    if run in METHODS:
        cmd = [sys.executable, "-m", "pipelines.merge", "--pair", pair, "--method", run,
               "--checkpoint-root", root, "--output", out, "--overwrite"]
        return cmd + (["--memory-budget", budget] if budget else [])
    return [sys.executable, "-m", "bench.anchors", run, root, pair, out]


def run_environment(run: str, method_env: dict[str, str]) -> dict[str, str] | None:
    """The environment of ``run``'s process: this one's, with ``method_env`` on top for
    the project's methods (None: this process's own, as the anchors always get)."""
    return dict(os.environ, **method_env) if run in METHODS and method_env else None


def describe_machine(method_env: dict[str, str]) -> str:
    """The machine, its load, and the allocator settings of every run and of the
    methods' runs (``method_env``): they change every figure and are read once per
    process, so runs under different ones must not be compared as one. Called before
    anything imports Polars, which puts its own ``_RJEM_MALLOC_CONF`` in the
    environment."""
    from bench.memory import allocator_settings

    return (f"{platform.platform()}, {os.cpu_count()} cores, {_memory()} RAM, Python "
            f"{platform.python_version()}; load average at start {os.getloadavg()[0]:.1f} "
            "(above 0.5 means other jobs shared the cores and times are upper bounds); "
            f"allocator settings of every run: {allocator_settings(os.environ)}"
            + (f", and of the methods': {allocator_settings(method_env)}" if method_env else ""))


def main(argv=None) -> int:
    """Run the benchmark; print the figures; optionally write the report."""
    p = argparse.ArgumentParser(prog="python -m bench.merge", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append", help="spine rows (repeatable); default 20000")
    p.add_argument("--runs", default="floor,polars,duckdb",
                   help=f"comma list of {', '.join(METHODS + ANCHORS)}")
    p.add_argument("--pair", default="eurusd")
    p.add_argument("--memory-budget", default=None, help="passed to the merge (default: its own)")
    p.add_argument("--cap-seconds", type=float, default=900)
    p.add_argument("--cap-rss", default="20GiB")
    p.add_argument("--work", default=None, help="folder for the data (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--report", default=None, help="write a Markdown report here (and a PNG beside it)")
    p.add_argument("--method-env", action="append", default=[], metavar="NAME=VALUE",
                   help="an environment setting of the project's methods only, not of the "
                        "anchors (repeatable): an allocator setting, say, against the same floor")
    p.add_argument("--repeat", type=int, default=1,
                   help="runs of each method and anchor per size, taken in turns; the "
                        "median wall and CPU time are reported, with the range")
    args = p.parse_args(argv)
    if args.repeat < 1:
        p.error("--repeat must be at least 1")
    for setting in args.method_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", setting):
            p.error(f"--method-env {setting!r}: not NAME=VALUE")
    args.method_env = dict(setting.split("=", 1) for setting in args.method_env)
    from pipelines.merge.budget import parse_size

    cap_rss = parse_size(args.cap_rss)
    sizes = args.rows or [20000]
    runs = [r for r in args.runs.split(",") if r]
    unknown = set(runs) - set(METHODS + ANCHORS)
    if unknown:
        p.error(f"unknown runs: {', '.join(sorted(unknown))}")
    work = args.work or tempfile.mkdtemp(prefix="bqx-bench-")
    command = "python -m bench.merge " + " ".join(sys.argv[1:] if argv is None else argv)
    machine = describe_machine(args.method_env)
    print(f"machine: {machine}\ncommand: {command}", flush=True)
    results = []
    try:
        for rows in sizes:
            root = os.path.join(work, f"ck{rows}")
            if not os.path.isdir(root):
                from bench.synthetic import make_checkpoints
                started = time.monotonic()
                make_checkpoints(root, args.pair, rows, log=lambda *a: None)
                print(f"\n{rows} rows: synthetic checkpoints in {time.monotonic() - started:.0f} s, "
                      f"{_du(root) / 2**30:.2f} GiB on disk", flush=True)
            print(HEADER, flush=True)
            trials: dict[str, list[dict]] = {run: [] for run in runs}
            # Runs taken in turns, so that a slow spell of a shared machine falls on all.
            for _ in range(args.repeat):
                for run in runs:
                    if trials[run] and trials[run][-1]["code"] != 0:
                        continue  # killed or failed once: no point repeating it
                    r = _trial(run, rows, root, work, args, cap_rss, measure_output=not trials[run])
                    trials[run].append(r)
                    if args.repeat > 1:
                        print(f"{'':>16} {run} run {len(trials[run])}: {r['wall']:.1f} s", flush=True)
            floor_wall = None
            for run in runs:
                r = summarize_trials(trials[run])
                if run == "floor" and r["code"] == 0:
                    floor_wall = r["wall"]
                r["ratio"] = r["wall"] / floor_wall if floor_wall and r["code"] == 0 else None
                results.append(r)
                print(_row(r), flush=True)
                for line in _details(r):
                    print(f"{'':>16} {line}", flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.report:
        write_report(args.report, results, machine, command)
    return 0


def _trial(run: str, rows: int, root: str, work: str, args, cap_rss: int,
           measure_output: bool) -> dict:
    """One measured run; with ``measure_output``, also its output's read speed and size."""
    out = os.path.join(work, f"out{rows}_{run}.parquet")
    # The cap stops anchors that never finish; the project's methods must.
    cap = args.cap_seconds if run in ANCHORS else max(args.cap_seconds, 7200)
    r = run_isolated(command_for(run, root, args.pair, out, args.memory_budget), cap, cap_rss,
                     run_environment(run, args.method_env))
    r.update(rows=rows, run=run, file=os.path.getsize(out) if os.path.exists(out) else None)
    if measure_output and run in METHODS and r["code"] == 0:
        from bench.read import measure, polars_size
        r["read"] = measure(out)
        if run == METHODS[0]:  # the methods write the same bytes (tests/test_determinism.py)
            r["size"] = polars_size(out)
    from pipelines.validate import default_report_path
    for leftover in (out, default_report_path(out)):
        if os.path.exists(leftover):
            os.unlink(leftover)
    return r


def summarize_trials(trials: list[dict]) -> dict:
    """One row from a run's trials: median wall and CPU time, highest peak RSS; a failed
    or killed trial makes the row that failure."""
    failed = [t for t in trials if t["code"] != 0]
    if failed:
        return dict(failed[0], trials=len(trials))
    walls = sorted(t["wall"] for t in trials)
    r = dict(trials[0], trials=len(trials), walls=walls,
             wall=statistics.median(walls), cpu=statistics.median(t["cpu"] for t in trials),
             rss=max(t["rss"] for t in trials))
    return r


def _details(r: dict) -> list[str]:
    """The lines under a method's row: its output's read speed and size."""
    from bench.read import describe, describe_size
    lines = []
    if r.get("read"):
        lines.append(describe(r["read"]))
    if r.get("size"):
        lines.append(describe_size(r["size"]))
    return lines


HEADER = (f"{'run':>16} {'wall s':>8} {'x floor':>8} {'CPU s':>7} {'peak RSS GiB':>13} "
          f"{'file GiB':>9}  result")


def _row(r: dict) -> str:
    ratio = f"{r['ratio']:.2f}" if r.get("ratio") else "-"
    size = f"{r['file'] / 2**30:.2f}" if r.get("file") else "-"
    if r["code"] != 0:
        result = r["killed"] or f"exit {r['code']} {r['error']}"
    elif r["trials"] > 1:
        result = f"ok; median of {r['trials']}, wall {r['walls'][0]:.1f}-{r['walls'][-1]:.1f} s"
    else:
        result = "ok"
    return (f"{r['run']:>16} {r['wall']:>8.1f} {ratio:>8} {r.get('cpu', 0.0):>7.1f} "
            f"{r['rss'] / 2**30:>13.2f} {size:>9}  {result}")


def _memory() -> str:
    try:
        with open("/proc/meminfo") as fh:
            return f"{int(fh.readline().split()[1]) / 2**20:.0f} GiB"
    except OSError:
        return "?"


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def write_report(path: str, results: list[dict], machine: str, command: str) -> None:
    """Markdown tables per size, and a chart of time and peak memory against rows."""
    lines = ["# Merge benchmarks", "", f"Machine: {machine}.", "", f"Command: `{command}`", "",
             "Each run is its own process; peak RSS is the operating system's figure for it "
             "(getrusage). `x floor` is wall time over the floor's (read every checkpoint + "
             "write one file of the output's shape with Polars, no join). Data: a full-width "
             "synthetic pair (bench/synthetic.py: the sample's 667 tables; values shaped like "
             "features, compressing to about half of raw). The floor's file is not the "
             "output's frame (its NULLs sit elsewhere); `polars_eager` writes the same frame "
             "with Polars, and each method's output size line compares its column data with "
             "Polars' writer's for the same columns. CPU s is user + system time. With "
             "`--repeat`, runs take turns and wall and CPU are medians; peak RSS is the "
             "highest.", ""]
    for rows in sorted({r["rows"] for r in results}):
        lines += [f"## {rows:,} rows", "",
                  "| run | wall s | x floor | CPU s | peak RSS GiB | file GiB | result |",
                  "|---|---:|---:|---:|---:|---:|---|"]
        for r in (r for r in results if r["rows"] == rows):
            cells = _row(r).split(None, 6)
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        for r in (r for r in results if r["rows"] == rows):
            lines.extend(f"- `{r['run']}` output: {line}." for line in _details(r))
        lines.append("")
    chart = os.path.splitext(path)[0] + ".png"
    if _chart(chart, results):
        lines += [f"![time and peak memory against rows]({os.path.basename(chart)})", ""]
    with open(path, "w") as fh:
        fh.write("\n".join(lines))


def _chart(path: str, results: list[dict]) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    for run in dict.fromkeys(r["run"] for r in results):
        pts = [r for r in results if r["run"] == run and r["code"] == 0]
        if pts:
            a.plot([r["rows"] for r in pts], [r["wall"] for r in pts], marker="o", label=run)
            b.plot([r["rows"] for r in pts], [r["rss"] / 2**30 for r in pts], marker="o", label=run)
    a.set(xlabel="rows", ylabel="wall seconds", title="time")
    b.set(xlabel="rows", ylabel="peak RSS GiB", title="peak memory")
    a.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return True


if __name__ == "__main__":
    sys.exit(main())
