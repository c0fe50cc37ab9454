"""``python -m bench.memory --rows 10000 --rows 100000 [--memory-budget 1GiB ...]
[--column-batch-size 48MiB ...] [--cpus 1] [--work DIR] [--keep]``: where a merge's memory goes.

For each row count it writes a full-width synthetic pair (bench/synthetic.py; reused when
``--work`` already holds ``ck{rows}``, the layout ``bench.merge`` uses) and runs one merge
in a fresh process that samples itself every 20 ms:

- RSS, split into file-backed pages (the libraries' code) and anonymous memory;
- bytes allocated from Arrow's memory pool (the merge's tables, shards and encoded
  pieces);
- bytes glibc's allocator holds from the operating system (mallinfo2: in use and free);
- the rest of the anonymous memory: pages Arrow's allocator keeps after they are freed
  (jemalloc returns them after about a second), Polars' and Python's own memory (with
  ``ARROW_DEFAULT_MEMORY_POOL=system`` it was at most 0, since Arrow's allocations are
  then counted in both the arrow and glibc figures: BENCHMARKS.md, "Where the peak
  falls").

It prints those at the RSS peak (where they add up to RSS) and the median of each over
the middle 80% of the merge (taken one by one, so they need not add up), so that peak RSS
at different row counts can be told apart by where it comes from; and the peak RSS of each
of the job's stages (preflight, merge, validate: the innermost one running when a sample
was taken), the peak's own marked with how many seconds into that stage it fell, so that
a peak is put in its stage and told apart as a start-up one or a steady one. It also prints how
long the merge's reading and joining waited for its encoders: when that is a large share
of the merge, the encoders are the slower stage, and the writer's places for pieces are
full. And it prints the merge's CPU time (user and system) and page faults: an allocator
that hands freed memory back to the operating system at once keeps RSS low, and pays
for it in faults, each a page the kernel maps in and zeroes (system time).

Its heading names Arrow's memory pool and every allocator setting in the environment
(``JE_ARROW_MALLOC_CONF``, ``MALLOC_MMAP_THRESHOLD_`` and the like: BENCHMARKS.md, "The
rows' share of the growth depends on the allocator"), since each changes the figures.

With several ``--memory-budget`` values each row count is merged once per budget, which
tells memory that follows the budget from memory that follows the rows; several
``--column-batch-size`` values merge it once per largest column batch (and budget); with
``--row-group-rows`` a pair is merged in smaller row groups, which tells memory that
follows the rows from memory that follows the row group. Row groups are runs of whole
shards, so row groups smaller than the default shard (28 days, 40,320 rows) need the
pair written in shorter shards: ``--shard-days 7`` with ``--row-group-rows 10080`` merges
100,000 rows in eleven row groups of a 10,000-row merge's size or less. With ``--tables N``
the pair has the targets and only the first N feature tables: a narrow pair of many
rows does less work than a full-width one of fewer rows, which tells memory that follows
the rows from memory that follows the work done. With ``--cpus 1`` each merge runs
on one core (its process pinned with ``sched_setaffinity``), as in the 1 vCPU merge job:
there the encoders fall further behind reading.
"""
from __future__ import annotations

import argparse
import ctypes
import itertools
import json
import logging
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

FIELDS = ("rss", "file", "arrow", "glibc", "rest")
SAMPLE_SECONDS = 0.02


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks",
                 "uordblks", "fordblks", "keepcost")]


def _glibc_bytes():
    """A function giving the bytes glibc's malloc holds from the OS, or None off glibc."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
    except (OSError, AttributeError):
        return None

    def held() -> int:
        info = libc.mallinfo2()
        return info.arena + info.hblkhd
    return held


def status_bytes(keys: tuple[str, ...] = ("VmRSS", "RssFile"), pid: int | str = "self") -> dict:
    """The fields ``keys`` of /proc/PID/status in bytes (by default this process's RSS
    and its file-backed part); a field the kernel does not give is left out."""
    values = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in keys:
                values[key] = int(rest.split()[0]) * 1024
    return values


class _WriterWait(logging.Handler):
    """Keeps the merges' figures of their column batches: seconds taken, and seconds
    their reading and joining waited for the encoders."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.seconds: tuple[float, float] | None = None

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"written in ([0-9.]+)s; reading and joining waited ([0-9.]+)s",
                      record.getMessage())
        if m:  # summed over the merges of a process
            taken, waited = self.seconds or (0.0, 0.0)
            self.seconds = (taken + float(m.group(1)), waited + float(m.group(2)))


class _Stages(logging.Handler):
    """Follows the job's stages (``[name] start`` / ``[name] done``, pipelines.cli.stage),
    so that each memory sample can be put in the innermost stage running when it was
    taken: a peak in ``validate`` is not the join's."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.running: list[str] = []
        # When each stage started and ended (time.monotonic()), to place the peak in time.
        self.started: dict[str, float] = {}
        self.ended: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = re.match(r"\[(\w+)\] (start|done)\b", record.getMessage())
        if m and m.group(2) == "start":
            self.started[m.group(1)] = time.monotonic()
            self.running.append(m.group(1))
        elif m and m.group(1) in self.running:
            self.ended[m.group(1)] = time.monotonic()
            self.running.remove(m.group(1))

    def current(self) -> str:
        """The innermost stage running now ("outside" before the first and after the last)."""
        running = self.running[-1:]  # one read: the merge's thread appends meanwhile
        return running[0] if running else "outside"


# Environment variables that change how the measured process allocates: each is read
# once, when the allocator loads, so a run is only comparable with runs that had the same.
ALLOCATOR_VARIABLES = ("ARROW_DEFAULT_MEMORY_POOL", "JE_ARROW_MALLOC_CONF", "_RJEM_MALLOC_CONF",
                       "MIMALLOC_", "MALLOC_", "GLIBC_TUNABLES")


def allocator_settings(environ) -> str:
    """The allocator settings among ``environ``'s variables, as ``NAME=value`` pairs in
    name order ("none" when there are none), for the table's heading."""
    found = sorted(f"{k}={v}" for k, v in environ.items()
                   if k.startswith(ALLOCATOR_VARIABLES))
    return " ".join(found) or "none"


def _merge_options(memory_budget: str | None, row_group_rows: int | None,
                   column_batch_size: str | None = None) -> list[str]:
    """The merge's options for a budget, row-group rows and largest column batch (None:
    the merge's default)."""
    return ((["--memory-budget", memory_budget] if memory_budget else [])
            + (["--row-group-rows", str(row_group_rows)] if row_group_rows else [])
            + (["--column-batch-size", column_batch_size] if column_batch_size else []))


def sample_merge(root: str, pair: str, output: str, method: str = "polars",
                 memory_budget: str | None = None, row_group_rows: int | None = None,
                 column_batch_size: str | None = None, merges: int = 1) -> dict:
    """Merge ``root``'s extraction of ``pair`` into ``output`` in this process while
    sampling its memory; returns the sample at the RSS peak and the medians over the
    middle 80% of the run (bytes), the stage running at the peak and each stage's peak
    RSS (``stage``, ``stage_peaks``), the file's row groups and footer bytes
    (``row_groups``, ``footer``), Arrow's memory pool (``pool``), the peak's seconds into its stage and that stage's
    seconds (``peak_at``; None outside the stages), the sample count, and the seconds the column
    batches took and waited for the encoders (``batches``, ``waited``), and the merge's
    user and system CPU seconds (``cpu``, with this sampler's own, which reads two small
    figures every 20 ms) and page faults (``faults``: minor ones, each a page the kernel
    mapped in and zeroed). With ``merges`` above 1 the same merge runs that many times
    in a row in this process, every figure covers them all, and ``peak_after`` holds
    the process's peak RSS (VmHWM) after each."""
    import pyarrow as pa

    from pipelines.merge import job

    glibc = _glibc_bytes()
    samples: list[dict] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            status = status_bytes()
            s = {"t": time.monotonic(), "rss": status["VmRSS"], "file": status.get("RssFile", 0),
                 "arrow": pa.total_allocated_bytes(), "glibc": glibc() if glibc else 0,
                 "stage": stages.current()}
            s["rest"] = s["rss"] - s["file"] - s["arrow"] - s["glibc"]
            samples.append(s)
            stop.wait(SAMPLE_SECONDS)

    sampler = threading.Thread(target=sample, daemon=True)
    wait, stages = _WriterWait(), _Stages()
    job.log.addHandler(wait)
    logging.getLogger("pipelines").addHandler(stages)
    sampler.start()
    before = resource.getrusage(resource.RUSAGE_SELF)
    peak_after = []
    try:
        for _ in range(merges):
            code = job.run(["--pair", pair, "--method", method, "--checkpoint-root", root,
                            "--output", output, "--overwrite"]
                           + _merge_options(memory_budget, row_group_rows, column_batch_size))
            if code != 0:
                break
            peak_after.append(status_bytes(("VmHWM",))["VmHWM"])
    finally:
        after = resource.getrusage(resource.RUSAGE_SELF)
        stop.set()
        sampler.join()
        job.log.removeHandler(wait)
        logging.getLogger("pipelines").removeHandler(stages)
    if code != 0:
        raise SystemExit(f"the merge exited {code}")
    pool = pa.default_memory_pool().backend_name  # the merge chose it (job.use_jemalloc)
    import pyarrow.parquet as pq

    # Read after the last sample: parsing a footer of many row groups costs memory too.
    written = pq.read_metadata(output)
    first, last = samples[0]["t"], samples[-1]["t"]
    middle = [s for s in samples if 0.1 <= (s["t"] - first) / max(last - first, 1e-9) <= 0.9] or samples
    peak = max(samples, key=lambda s: s["rss"])
    stage_peaks: dict[str, int] = {}
    for s in samples:
        stage_peaks[s["stage"]] = max(stage_peaks.get(s["stage"], 0), s["rss"])
    # Where in its stage the peak fell: at the start of the merge (a row group's first
    # reads) or in its steady state are different stories.
    at = None
    if peak["stage"] in stages.started:
        start = stages.started[peak["stage"]]
        length = stages.ended.get(peak["stage"], last) - start
        # A sample's clock and its stage are read one after the other, so a stage that
        # starts (or ends) between the two puts it a few ms outside: clamped.
        at = (min(max(peak["t"] - start, 0.0), length), length)
    return {"peak": {f: peak[f] for f in FIELDS}, "stage": peak["stage"], "stage_peaks": stage_peaks,
            "peak_at": at,
            "median": {f: statistics.median(s[f] for s in middle) for f in FIELDS},
            "row_groups": written.num_row_groups, "footer": written.serialized_size,
            "pool": pool,
            # Every page of a new mapping is a fault the kernel must serve (and zero):
            # what returning freed memory to the operating system costs in time.
            "cpu": (after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime),
            "faults": after.ru_minflt - before.ru_minflt,
            "samples": len(samples), "peak_after": peak_after,
            "batches": wait.seconds and wait.seconds[0],
            "waited": wait.seconds and wait.seconds[1]}


def _table(results: dict[tuple[int, str, str], dict]) -> str:
    lines = [f"{'rows':>8} {'budget':>8} {'batch':>8} {'':>6} "
             + " ".join(f"{f + ' MiB':>10}" for f in FIELDS)
             + "  waited for the encoders  the merge's CPU and page faults; peak RSS MiB by stage (* the peak's)"]
    for (rows, budget, batch), r in results.items():
        for which in ("peak", "median"):
            waited = stages = ""
            if which == "peak" and r.get("waited") is not None:
                waited = f"{r['waited']:.1f} of {r['batches']:.1f} s"
            if which == "peak" and r.get("cpu"):
                stages = (f"CPU {r['cpu'][0]:.1f} user + {r['cpu'][1]:.1f} system s, "
                          f"{r['faults'] / 1e6:.2f}M page faults; ")
            if which == "peak" and r.get("stage_peaks"):
                stages += ", ".join(f"{name} {rss / 2**20:.0f}{'*' if name == r['stage'] else ''}"
                                    for name, rss in r["stage_peaks"].items())
                if r.get("peak_at"):
                    stages += " (the peak {:.1f} s into its stage of {:.1f} s)".format(*r["peak_at"])
                if r.get("row_groups") is not None:
                    stages += (f"; {r['row_groups']} row group(s), footer "
                               f"{r['footer'] / 2**20:.1f} MiB")
                if len(r.get("peak_after") or ()) > 1:
                    stages += ("; peak RSS after each merge: "
                               + " / ".join(f"{b / 2**20:.0f}" for b in r["peak_after"]))
            lines.append((f"{rows:>8,} {budget:>8} {batch:>8} {which:>6} " + " ".join(
                f"{r[which][f] / 2**20:>10.0f}" for f in FIELDS)
                + (f"  {waited:>24}  {stages}" if which == "peak" else "")).rstrip())
    return "\n".join(lines)


def main(argv=None) -> int:
    """Generate (or reuse) the data; sample one merge per row count, each in its own
    process; print the table."""
    from pipelines.window import DEFAULT_SHARD_DAYS

    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, action="append", help="spine rows (repeatable); default 20000")
    p.add_argument("--memory-budget", action="append",
                   help="the merge's --memory-budget (repeatable); default the merge's own")
    p.add_argument("--column-batch-size", action="append",
                   help="the merge's --column-batch-size (repeatable); default the merge's own")
    p.add_argument("--row-group-rows", type=int,
                   help="the merge's --row-group-rows; default the merge's own")
    p.add_argument("--shard-days", type=int, default=DEFAULT_SHARD_DAYS,
                   help="days per checkpoint shard of the generated pair (the extraction's "
                        "--shard-days); default %(default)s")
    p.add_argument("--tables", type=int,
                   help="feature tables of the generated pair (the first N of the catalog's); "
                        "default all of them")
    p.add_argument("--cpus", type=int,
                   help="run each merge on this many cores (pinned); default all of them")
    p.add_argument("--method", default="polars", choices=("polars", "duckdb"))
    p.add_argument("--merges", type=int, default=1,
                   help="merges in a row in each measured process (default 1); above 1 the "
                        "figures cover them all and the table adds the peak after each")
    p.add_argument("--pair", default="eurusd")
    p.add_argument("--work", help="folder for the data (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--one", nargs=2, metavar=("ROOT", "OUTPUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    # Read before anything imports Polars, which puts its own _RJEM_MALLOC_CONF in the
    # environment: the heading names the settings the user gave.
    settings = allocator_settings(os.environ)
    from pipelines.errors import PipelineError
    from pipelines.merge.budget import DEFAULT_BUDGET, batch_bytes, parse_size

    # Checked before any data is generated, which takes minutes at full width, by the
    # merge's own checks of these options.
    try:
        for budget, batch in itertools.product(args.memory_budget or [DEFAULT_BUDGET],
                                               args.column_batch_size or [None]):
            batch_bytes(parse_size(budget), batch and parse_size(batch, "--column-batch-size"))
    except PipelineError as exc:
        p.error(str(exc))
    if args.row_group_rows is not None and args.row_group_rows < 1:
        p.error(f"--row-group-rows must be at least 1, not {args.row_group_rows}")
    if args.shard_days < 1:
        p.error(f"--shard-days must be at least 1, not {args.shard_days}")
    if args.merges < 1:
        p.error(f"--merges must be at least 1, not {args.merges}")
    if args.tables is not None and args.tables < 1:
        p.error(f"--tables must be at least 1, not {args.tables}")
    cores = sorted(os.sched_getaffinity(0))
    if args.cpus is not None and not 1 <= args.cpus <= len(cores):
        p.error(f"--cpus must be from 1 to the {len(cores)} core(s) this process may use, not {args.cpus}")
    if args.one:  # the measured process: one merge, its figures as JSON on stdout's last line
        if args.cpus:
            # Before the merge starts a thread pool: Polars sizes its own by the cores it may use.
            os.sched_setaffinity(0, cores[:args.cpus])
        result = sample_merge(args.one[0], args.pair, args.one[1], args.method,
                              (args.memory_budget or [None])[0], args.row_group_rows,
                              (args.column_batch_size or [None])[0], args.merges)
        result["cpus"] = len(os.sched_getaffinity(0))
        print(json.dumps(result))
        return 0
    work = args.work or tempfile.mkdtemp(prefix="bqx-bench-memory-")
    results: dict[tuple[int, str, str], dict] = {}
    try:
        for rows in args.rows or [20000]:
            # The default shards keep bench.merge's folder name, so either reuses the other's.
            days = "" if args.shard_days == DEFAULT_SHARD_DAYS else f"-{args.shard_days}d"
            width = "" if args.tables is None else f"-{args.tables}t"
            root = os.path.join(work, f"ck{rows}{days}{width}")
            output = os.path.join(work, f"memory{rows}.parquet")
            if not os.path.isdir(root):
                from bench.synthetic import make_checkpoints
                try:
                    make_checkpoints(root, args.pair, rows, log=lambda *a: None,
                                     shard_days=args.shard_days, tables=args.tables)
                except PipelineError as exc:  # raised before anything is written
                    p.error(str(exc))
            for budget, batch in itertools.product(args.memory_budget or [None],
                                                   args.column_batch_size or [None]):
                out = subprocess.run([sys.executable, "-m", "bench.memory", "--one", root, output,
                                      "--pair", args.pair, "--method", args.method,
                                      "--merges", str(args.merges)]
                                     + (["--cpus", str(args.cpus)] if args.cpus else [])
                                     + _merge_options(budget, args.row_group_rows, batch),
                                     stdout=subprocess.PIPE, text=True)
                if out.returncode != 0:
                    at = " and ".join(v for v in (budget, batch and f"batches of {batch}") if v)
                    raise SystemExit(f"the measured merge of {rows} rows"
                                     f"{' at ' + at if at else ''} exited {out.returncode}")
                results[rows, budget or DEFAULT_BUDGET, batch or "budget's"] = (
                    json.loads(out.stdout.strip().splitlines()[-1]))
            from pipelines.validate import default_report_path
            for leftover in (output, default_report_path(output)):
                if os.path.exists(leftover):
                    os.unlink(leftover)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
    finally:
        if not args.keep and not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\n`{args.method}` merge, memory at the RSS peak and medians over the middle 80% "
          f"of the run (file: file-backed pages; arrow: allocated from Arrow's pool; glibc: "
          f"held by malloc; rest: other anonymous memory)"
          + (f"; --row-group-rows {args.row_group_rows}" if args.row_group_rows else "")
          + (f"; shards of {args.shard_days} days" if args.shard_days != DEFAULT_SHARD_DAYS else "")
          + (f"; the targets and {args.tables} feature table(s)" if args.tables is not None else "")
          + (f"; on {args.cpus} core(s)" if args.cpus else "")
          + (f"; {args.merges} merges in a row per process" if args.merges > 1 else ""))
    pools = sorted({r.get("pool", "?") for r in results.values()})
    print(f"Arrow's pool: {', '.join(pools)}; allocator settings: {settings}")
    print(_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
