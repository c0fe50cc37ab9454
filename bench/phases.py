"""``python -m bench.phases --rows 20000 [--count-requests] [--work DIR] [--keep]``: where
a merge's time goes.

Writes a full-width synthetic pair (bench/synthetic.py; reused when ``--work`` already
holds ``ck{rows}``, the layout ``bench.merge`` uses), then runs one ``polars`` merge in
this process with its phases wrapped by timers. For each phase it prints the calls, the
wall time summed over them and the CPU time of the threads that ran them
(``time.thread_time``). Phases overlap: the main thread joins the next table as reader
threads read the tables after it, while the encoding threads compress the pieces of
columns handed over before and the appending thread appends them, so the wall times
add up to more than the run. Work a library does on threads of its own (Polars' join of
the keys) is not in any phase's CPU; it is in the process total.

``--count-requests`` also counts what the merge asks of the checkpoint files (and the
manifest), as a bucket would see it: files opened for ranged reads (opening one of
Arrow's GCS files may cost a metadata request), the reads made of them (each one ranged
request: that file has no read-ahead buffer; and the footer reads of the preflight),
whole downloads, stored-checksum lookups, and size and checksum lookups (one metadata
request each; the preflight's, one a shard). The counting wrapper slows the reads, so times from such a run
are not comparable with others.
"""
from __future__ import annotations

import argparse
import inspect
import os
import resource
import shutil
import tempfile
import threading
import time
from collections import defaultdict

# (module, owner, attribute, label, thread): the calls timed, in the merge's order. The
# "of which" rows run inside the row above them.
PHASES = (
    ("pipelines.checkpoints", None, "verify_checkpoints", "preflight: footers and schemas", "main"),
    ("pipelines.merge.reader", "ShardCursor", "read_shards", "read shards (CRC32C, decode, checks)", "readers"),
    ("pipelines.merge.join_polars", "PolarsJoin", "join", "join, waiting for the reads above", "main"),
    ("pipelines.merge.job", None, "_count_values", "count NULLs and infinities", "main"),
    ("pipelines.merge.writer", "TrainingFileWriter", "write_columns", "hand columns over, wait for a place", "main"),
    ("pipelines.merge.writer", None, "_encode_piece", "encode pieces", "encoders"),
    ("pipelines.merge.writer", None, "read_footer", "  of which: decode their footers", "encoders"),
    ("pipelines.merge.writer", "TrainingFileWriter", "_append_piece", "append pieces, waiting for each", "appender"),
    ("pipelines.merge.writer", "TrainingFileWriter", "_append", "  of which: append pieces", "appender"),
    ("pipelines.merge.writer", "TrainingFileWriter", "_emit", "    of which: write and checksum bytes", "appender"),
    ("pipelines.merge.thrift_compact", None, "encode_value", "    of which: encode footer entries", "appender"),
    ("pipelines.merge.job", None, "validate_file", "validate the file", "main"),
)

_TOTALS_LOCK = threading.Lock()


def _wrap(totals: dict, module: str, owner: str | None, name: str, label: str):
    """Time every call of ``module.owner.name`` into ``totals[label]``; returns a
    function that puts the original back."""
    import importlib

    target = importlib.import_module(module)
    if owner:
        target = getattr(target, owner)
    inner = getattr(target, name)

    def add(wall: float, cpu: float, calls: int) -> None:
        with _TOTALS_LOCK:  # readers and encoders run several at once
            entry = totals[label]
            entry[0] += calls
            entry[1] += wall
            entry[2] += cpu

    def steps(generator):
        # A generator's work is done in its steps, not in the call that makes it.
        while True:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                item = next(generator)
            except StopIteration:
                add(time.perf_counter() - wall, time.thread_time() - cpu, 0)
                return
            add(time.perf_counter() - wall, time.thread_time() - cpu, 0)
            yield item

    def timed(*args, **kwargs):
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            result = inner(*args, **kwargs)
        finally:
            add(time.perf_counter() - wall, time.thread_time() - cpu, 1)
        return steps(result) if inspect.isgenerator(result) else result

    setattr(target, name, timed)
    return lambda: setattr(target, name, inner)


class CountedFile:
    """A file that counts the reads made of it (``reads``, and ``count("ranged reads")``
    when given), around a real one: every read still goes to it."""

    def __init__(self, source, count=None):
        self.source, self.count, self.reads = source, count, 0

    def read(self, nbytes=-1):
        self.reads += 1
        if self.count:
            self.count("ranged reads")
        return self.source.read(nbytes)

    def seek(self, offset, whence=0):
        return self.source.seek(offset, whence)

    def tell(self):
        return self.source.tell()

    def size(self):
        return self.source.size()

    def close(self):
        self.source.close()

    @property
    def closed(self):
        return self.source.closed


REQUEST_KINDS = ("files opened for ranged reads", "ranged reads", "whole downloads",
                 "stored-checksum lookups", "size and checksum lookups")


def _count_requests(requests: dict):
    """Count into ``requests`` what ``pipelines.storage`` is asked for (see
    ``--count-requests``); returns a function that puts the originals back."""
    import pyarrow as pa

    from pipelines import storage

    lock = threading.Lock()
    real = {name: getattr(storage, name)
            for name in ("open_input", "read_buffer", "crc32c", "stat", "read_range")}

    def count(kind: str) -> None:
        with lock:  # reader threads count at once
            requests[kind] += 1

    def open_input(path):
        count("files opened for ranged reads")
        return pa.PythonFile(CountedFile(real["open_input"](path), count), mode="r")

    def read_buffer(path):
        count("whole downloads")
        return real["read_buffer"](path)

    def crc32c(path):
        count("stored-checksum lookups")
        return real["crc32c"](path)

    def stat(path, checksum=False):
        count("size and checksum lookups")
        return real["stat"](path, checksum)

    def read_range(path, start, length):
        count("ranged reads")
        return real["read_range"](path, start, length)

    for name, counted in (("open_input", open_input), ("read_buffer", read_buffer),
                          ("crc32c", crc32c), ("stat", stat), ("read_range", read_range)):
        setattr(storage, name, counted)
    return lambda: [setattr(storage, name, f) for name, f in real.items()]


def profile_merge(root: str, pair: str, output: str,
                  requests: dict | None = None) -> tuple[dict, float, float, float]:
    """Merge ``root``'s extraction of ``pair`` into ``output`` with the phases timed;
    returns {label: [calls, wall s, CPU s]}, the run's wall and CPU seconds and its peak
    RSS in bytes. With ``requests`` (a dict), also counts into it what the merge asks of
    the checkpoint files (:data:`REQUEST_KINDS`)."""
    from pipelines.merge import job

    totals: dict = defaultdict(lambda: [0, 0.0, 0.0])
    restore = [_wrap(totals, module, owner, name, label)
               for module, owner, name, label, _thread in PHASES]
    if requests is not None:
        requests.update({kind: 0 for kind in REQUEST_KINDS})
        restore.append(_count_requests(requests))
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        started = time.perf_counter()
        code = job.run(["--pair", pair, "--method", "polars", "--checkpoint-root", root,
                        "--output", output, "--overwrite"])
        wall = time.perf_counter() - started
        after = resource.getrusage(resource.RUSAGE_SELF)
    finally:
        for undo in restore:
            undo()
    if code != 0:
        raise SystemExit(f"the merge exited {code}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return dict(totals), wall, cpu, after.ru_maxrss * 1024


def main(argv=None) -> int:
    """Generate (or reuse) the data, profile one merge, print the phases."""
    p = argparse.ArgumentParser(prog="python -m bench.phases", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=20000, help="spine rows (default 20000)")
    p.add_argument("--pair", default="eurusd")
    p.add_argument("--work", help="folder for the data (default: a temp folder)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    p.add_argument("--count-requests", action="store_true",
                   help="count the reads of checkpoint files as a bucket would see them "
                        "(slows the reads)")
    args = p.parse_args(argv)
    work = args.work or tempfile.mkdtemp(prefix="bqx-bench-phases-")
    root = os.path.join(work, f"ck{args.rows}")
    output = os.path.join(work, f"phases{args.rows}.parquet")
    try:
        if not os.path.isdir(root):
            from bench.synthetic import make_checkpoints
            make_checkpoints(root, args.pair, args.rows, log=lambda *a: None)
        requests = {} if args.count_requests else None
        totals, wall, cpu, rss = profile_merge(root, args.pair, output, requests)
        print(f"\nmerge of {args.rows} rows: {wall:.1f} s wall, {cpu:.1f} CPU s "
              f"({cpu / wall:.2f} cores busy), peak RSS {rss / 2**30:.2f} GiB")
        print(f"{'phase':<42} {'thread':>8} {'calls':>7} {'wall s':>8} {'CPU s':>7}")
        for _module, _owner, _name, label, thread in PHASES:
            calls, phase_wall, phase_cpu = totals.get(label, (0, 0.0, 0.0))
            print(f"{label:<42} {thread:>8} {calls:>7} {phase_wall:>8.2f} {phase_cpu:>7.2f}")
        if requests is not None:
            shards = sum(1 for _d, _s, files in os.walk(root) for f in files if f.endswith(".parquet"))
            print(f"\ncheckpoint requests, as a bucket would see them ({shards} shards): "
                  + ", ".join(f"{requests[kind]} {kind}" for kind in REQUEST_KINDS)
                  + f"; {sum(requests.values())} in all")
    finally:
        clean_up(output, root, work, args.keep, args.work is not None)
    return 0


def clean_up(output: str, root: str, work: str, keep: bool, work_given: bool) -> None:
    """Remove a benchmark's training file and its report, and, unless ``keep``, the
    generated checkpoints ``root`` (the whole ``work`` folder when it was a temporary one)."""
    from pipelines.validate import default_report_path

    for leftover in (output, default_report_path(output)):
        if os.path.exists(leftover):
            os.unlink(leftover)
    if not keep:
        shutil.rmtree(root if work_given else work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
