"""``python -m bench.soak [--trials 10] [--seed 0] [--target local|gcs|both] [--json PATH]``

A soak test of interrupted runs (issue #5). On a small sample warehouse it makes one
uninterrupted reference run (extract, then merge), then runs trials: each trial starts
the extract job as a subprocess, SIGKILLs it at a seeded random moment, re-runs it
(killing again, as many times as the trial drew) until a run exits 0, then does the same
for the merge job. The moments cover the whole run: a random time, the start of each
logged stage (plus a random delay), after a random number of commit records, the instant
the manifest appears, while the output is written, the instant it is published, and
between publishing and writing the report.

While the jobs run, a watcher thread polls the trial's checkpoint root and output folder
and checks every file visible under a final name (temporaries carry
``storage.TEMP_MARK``): it must be byte-identical to the reference run's file of the same
name and valid on its own (parquet read whole with page checksums, commit records equal
to their shard's size, CRC32C and rows, JSON parses, the success marker only after its
manifest, the training file passes ``pipelines.validate``). Every trial must end with
checkpoints and a training file identical to the reference. ``--target gcs`` does the
same in an emulated bucket (``gs://bqx-test/soak/...``; the emulator is started as the
tests start it, tests/emulator_procs.py).

Prints the figures at the end (and writes them as JSON with ``--json``): kills per job
and moment, resumes, work redone (shards kept or redone at a resume, names published
again, merges restarted), watcher checks, temporaries left behind, violations and
mismatches; exits 0 only when there were no violations, no mismatches and no run failed
without being killed. The default run (10 trials per target, 2-3 kills of each job per
trial, extra trials until each job was killed 20 times per target) takes about 15
minutes on 2 cores; the logs of trials with findings are kept under
``{workdir}/findings/``. Not part of the quick test run (tests/test_soak.py runs a few
trials).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable

import google_crc32c

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR = "eurusd"
WAREHOUSE_SEED = 3
# One UTC day per merge window (the floor of 256 rows applies; a day is 1,440 rows), so
# the training file is written as several row groups and a kill can land between them.
MEMORY_BUDGET = "410MiB"
TRAINING = f"out/training_{PAIR}.parquet"
REPORT = f"out/training_{PAIR}.validation.json"
# Kill moments and their weights: most of an extraction's time (and all its writes) is
# the Beam stage, most of a merge's the join and write.
EXTRACT_MOMENTS = {"timed": 2, "discover": 1, "resume-check": 1, "beam-start": 1, "records": 3,
                   "verify": 1, "manifest": 1}
MERGE_MOMENTS = {"timed": 2, "preflight": 1, "merge-start": 1, "writing": 2, "validate": 1,
                 "published": 1, "report": 1}
# Log lines (pipelines.cli.stage) that mark where a moment starts.
STAGE_LINES = {
    "discover": "[discover] start", "resume-check": "[resume-check] start",
    "beam-start": "[extract] start", "verify": "[verify] start",
    "preflight": "[preflight] start", "merge-start": "[merge] start",
    "validate": "[validate] start", "report": "[merge] done",
}
RESUME_LINE = re.compile(r"\[resume-check\] done in \S+ done_before=(\d+) to_do=(\d+)")


def temp_mark() -> str:
    """The marker of temporary names (pipelines.storage.TEMP_MARK)."""
    from pipelines.storage import TEMP_MARK

    return TEMP_MARK


def crc_hex(data: bytes) -> str:
    """CRC32C of ``data`` as 8 hex digits, as pipelines.storage writes it."""
    return google_crc32c.Checksum(data).digest().hex()


# --------------------------------------------------------------------------- places

class LocalPlace:
    """A local folder seen as relative names -> identities (inode, size, mtime)."""

    kind = "local"

    def __init__(self, root: str):
        self.root = root

    def location(self) -> str:
        """The root itself."""
        return self.root

    def path(self, rel: str) -> str:
        """The full path of ``rel``."""
        return os.path.join(self.root, *rel.split("/"))

    def list(self) -> dict[str, tuple]:
        """Every file under the root (temporaries included) with its identity."""
        out = {}
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                full = os.path.join(folder, name)
                with contextlib.suppress(FileNotFoundError):
                    st = os.stat(full)
                    rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                    out[rel] = (st.st_ino, st.st_size, st.st_mtime_ns)
        return out

    def read(self, rel: str) -> tuple[tuple, bytes] | None:
        """(identity, bytes) of the file now under ``rel``, or None if it is gone.

        The identity comes from the open file, so it names exactly the bytes read even
        when the name is replaced meanwhile (a rename never changes an open file)."""
        try:
            with open(self.path(rel), "rb") as fh:
                st = os.fstat(fh.fileno())
                return (st.st_ino, st.st_size, st.st_mtime_ns), fh.read()
        except FileNotFoundError:
            return None

    def remove(self) -> None:
        """Delete everything under the root."""
        shutil.rmtree(self.root, ignore_errors=True)


class GcsPlace:
    """A ``gs://`` prefix seen as relative names -> identities (generation, size, CRC32C)."""

    kind = "gcs"

    def __init__(self, url: str):
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage as gcs

        self.url = url.rstrip("/")
        self.bucket_name, _, prefix = self.url[len("gs://"):].partition("/")
        self.prefix = prefix + "/"
        self._client_args = dict(project=os.environ.get("GOOGLE_CLOUD_PROJECT", "bqx-ml"),
                                 credentials=AnonymousCredentials())
        self._gcs = gcs
        self._local = threading.local()

    def _bucket(self):
        # One client per thread: the watcher thread and the trial loop poll at once.
        if getattr(self._local, "bucket", None) is None:
            self._local.bucket = self._gcs.Client(**self._client_args).bucket(self.bucket_name)
        return self._local.bucket

    def location(self) -> str:
        """The prefix itself."""
        return self.url

    def path(self, rel: str) -> str:
        """The full ``gs://`` path of ``rel``."""
        return f"{self.url}/{rel}"

    def list(self) -> dict[str, tuple]:
        """Every object under the prefix with its identity."""
        blobs = self._bucket().client.list_blobs(self.bucket_name, prefix=self.prefix)
        return {b.name[len(self.prefix):]: (b.generation, b.size, b.crc32c) for b in blobs}

    def read(self, rel: str) -> tuple[tuple, bytes] | None:
        """(identity, bytes) of the object's current generation, or None if it is gone.

        The download names the generation listed just before it, so the bytes are
        exactly that version's (a replaced generation is gone: None)."""
        from google.api_core import exceptions

        blob = self._bucket().get_blob(self.prefix + rel)
        if blob is None:
            return None
        try:
            data = self._bucket().blob(blob.name, generation=blob.generation).download_as_bytes()
        except exceptions.NotFound:
            return None
        return (blob.generation, blob.size, blob.crc32c), data

    def remove(self) -> None:
        """Delete every object under the prefix."""
        for blob in self._bucket().client.list_blobs(self.bucket_name, prefix=self.prefix):
            with contextlib.suppress(Exception):
                blob.delete()


def make_place(location: str):
    """A LocalPlace or GcsPlace for ``location``."""
    return GcsPlace(location) if location.startswith("gs://") else LocalPlace(location)


def is_final(rel: str) -> bool:
    """True unless ``rel`` is a temporary (storage.TEMP_MARK in its name)."""
    return temp_mark() not in rel.rsplit("/", 1)[-1]


def is_record(rel: str) -> bool:
    """A shard's commit record (a .json under ck/ outside the manifests folder)."""
    return rel.startswith("ck/") and rel.endswith(".json") and "/manifests/" not in rel


# --------------------------------------------------------------------------- reference

@dataclasses.dataclass
class Reference:
    """What an uninterrupted run left: every final file's size and CRC32C, the JSON
    documents parsed, and the expectations the training file is validated against."""

    files: dict[str, tuple[int, str]]
    docs: dict[str, Any]
    spine_rows: int
    spine_digest: str
    shards: int
    columns: int

    @classmethod
    def snapshot(cls, place) -> "Reference":
        """Read every final file under ``place`` (a finished run's trial root)."""
        files, docs = {}, {}
        for rel in sorted(place.list()):
            if not is_final(rel):
                continue
            _ident, data = place.read(rel)
            files[rel] = (len(data), crc_hex(data))
            if rel.endswith((".json", ".SUCCESS")):
                docs[rel] = json.loads(data)
        report = docs[REPORT]
        manifest = next(v for k, v in docs.items() if k.endswith(".json") and "/manifests/" in k)
        return cls(files, docs, spine_rows=report["spine_rows"], spine_digest=report["spine_digest"],
                   shards=manifest["totals"]["shards"], columns=report["columns"])

    def differences(self, other: "Reference") -> list[str]:
        """Files that differ between two snapshots (the validation report's own path
        excepted: it names where the file is)."""
        problems = []
        for rel in sorted(set(self.files) | set(other.files)):
            if rel not in other.files:
                problems.append(f"{rel}: missing")
            elif rel not in self.files:
                problems.append(f"{rel}: not in the reference run")
            elif rel == REPORT:
                differ = report_differences(other.docs[rel], self.docs[rel])
                if differ:
                    problems.append(f"{rel}: report differs from the reference run's in {differ}")
            elif other.files[rel] != self.files[rel]:
                problems.append(f"{rel}: {other.files[rel][0]} bytes CRC32C {other.files[rel][1]}, "
                                f"the reference has {self.files[rel][0]} bytes CRC32C {self.files[rel][1]}")
        return problems


# What a validation report says about the file. Not compared: its own path, and how the
# validation went about it (batch sizes, which columns it read back), which follows from
# the merge's settings rather than from the file.
REPORT_FACTS = ("ok", "hard_failures", "rows", "columns", "pair", "key", "key_min", "key_max",
                "key_nulls", "duplicate_keys", "unordered_keys", "key_digest", "spine_rows",
                "spine_digest", "families", "target_null_rates", "infinities", "all_null_columns")


def report_differences(report: dict, reference: dict) -> list[str]:
    """The REPORT_FACTS on which two validation reports differ."""
    return [k for k in REPORT_FACTS if report.get(k) != reference.get(k)]


# --------------------------------------------------------------------------- the watcher

class Watcher(threading.Thread):
    """Polls a trial's place and checks each new version of every final-named file.

    A version is checked once (identities: inode/size/mtime locally, generation in a
    bucket); every distinct version of a name is counted, so a name published twice
    (a shard redone after a kill, an output replaced by a restarted merge) shows up in
    :meth:`rewrites`. :meth:`poll` may also be called from the trial loop (after each
    run) so the state at each kill is always seen.
    """

    def __init__(self, place, reference: Reference, interval: float, scratch: str, label: str):
        super().__init__(name="soak-watcher", daemon=True)
        self.place, self.reference, self.interval = place, reference, interval
        self.scratch, self.label = scratch, label
        self.versions: dict[str, set] = collections.defaultdict(set)
        self.violations: list[dict] = []
        self.checks = collections.Counter()
        self.polls = 0
        self.vanished = 0
        self.errors: list[str] = []
        # Names published again (which run was going on when the new version was seen).
        self.rewritten: list[dict] = []
        self.trial: int | None = None
        self.current_run = ""
        self._lock = threading.Lock()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            self.poll()

    def stop(self) -> None:
        """Stop polling, then take one last look."""
        self._halt.set()
        self.join()
        self.poll()

    def poll(self) -> None:
        """Check every final-named file whose version was not seen yet."""
        with self._lock:
            try:
                listing = self.place.list()
            except Exception as exc:  # noqa: BLE001 - an emulator hiccup is not a finding
                self.errors.append(f"listing: {exc}")
                return
            self.polls += 1
            for rel, ident in sorted(listing.items()):
                if is_final(rel) and ident not in self.versions[rel]:
                    self._check(rel)

    def _check(self, rel: str) -> None:
        try:
            got = self.place.read(rel)
        except Exception as exc:  # noqa: BLE001
            self.errors.append(f"{rel}: {exc}")
            return
        if got is None:
            self.vanished += 1
            return
        ident, data = got
        if ident in self.versions[rel]:
            return
        if self.versions[rel] and len(self.rewritten) < 200:
            self.rewritten.append({"target": self.label, "trial": self.trial, "path": rel,
                                   "versions": len(self.versions[rel]) + 1,
                                   "during": self.current_run,
                                   "identities": sorted(map(str, self.versions[rel] | {ident})),
                                   "at": time.strftime("%H:%M:%S")})
        self.versions[rel].add(ident)
        self.checks[_kind(rel)] += 1
        for problem in self.problems(rel, data):
            self.violations.append({"target": self.label, "trial": self.trial,
                                    "path": self.place.path(rel), "problem": problem})

    def problems(self, rel: str, data: bytes) -> list[str]:
        """What is wrong with ``data`` seen under the final name ``rel``."""
        expected = self.reference.files.get(rel)
        kind = _kind(rel)
        if expected is None:
            return [f"unexpected file under a final name ({len(data)} bytes)"]
        found = check_content(kind, rel, data, self)
        if rel == REPORT:
            return found  # it names its own path; its content is compared in check_content
        if (len(data), crc_hex(data)) != expected:
            found.append(f"differs from the reference run's file: {len(data)} bytes CRC32C "
                         f"{crc_hex(data)}, expected {expected[0]} bytes CRC32C {expected[1]}")
        return found

    def rewrites(self, predicate: Callable[[str], bool]) -> int:
        """Extra versions seen of the names matching ``predicate``."""
        return sum(len(v) - 1 for k, v in self.versions.items() if v and predicate(k))


def _kind(rel: str) -> str:
    if rel == TRAINING:
        return "training"
    if rel == REPORT:
        return "report"
    if rel.endswith(".SUCCESS"):
        return "success"
    if "/manifests/" in rel:
        return "manifest"
    if rel.endswith(".parquet"):
        return "shard"
    if is_record(rel):
        return "record"
    return "other"


def check_content(kind: str, rel: str, data: bytes, watcher: Watcher) -> list[str]:
    """Validity checks of one file on its own (and against its commit record)."""
    try:
        if kind == "shard":
            return _check_shard(rel, data, watcher)
        if kind in ("record", "manifest", "success", "report"):
            return _check_json(kind, rel, data, watcher)
        if kind == "training":
            return _check_training(data, watcher)
    except Exception as exc:  # noqa: BLE001 - any failure to read is the finding
        return [f"unreadable {kind}: {type(exc).__name__}: {str(exc)[:300]}"]
    return []


def _parquet_rows(data: bytes) -> int:
    """Read a whole parquet file from memory with page checksums; its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
    table = pf.read()
    if table.num_rows != pf.metadata.num_rows:
        raise ValueError(f"footer says {pf.metadata.num_rows} rows, pages hold {table.num_rows}")
    return table.num_rows


def _check_shard(rel: str, data: bytes, watcher: Watcher) -> list[str]:
    rows = _parquet_rows(data)
    record_rel = rel[: -len(".parquet")] + ".json"
    got = watcher.place.read(record_rel)
    if got is None:
        return []  # not committed yet: it will be checked when its record appears
    record = json.loads(got[1])
    return _record_vs_shard(record, len(data), crc_hex(data), rows)


def _record_vs_shard(record: dict, nbytes: int, crc: str, rows: int) -> list[str]:
    problems = []
    if record.get("bytes") != nbytes:
        problems.append(f"shard has {nbytes} bytes, its commit record says {record.get('bytes')}")
    if record.get("crc32c") != crc:
        problems.append(f"shard CRC32C {crc} differs from its commit record's {record.get('crc32c')}")
    if record.get("rows") != rows:
        problems.append(f"shard holds {rows} rows, its commit record says {record.get('rows')}")
    return problems


def _check_json(kind: str, rel: str, data: bytes, watcher: Watcher) -> list[str]:
    doc = json.loads(data)
    ref = watcher.reference.docs.get(rel)
    if kind == "report":
        problems = [] if doc.get("ok") else [f"validation report says not ok: {doc.get('hard_failures')}"]
        differ = report_differences(doc, ref or {})
        if differ:
            problems.append(f"validation report differs from the reference run's in {differ}")
        return problems
    if kind == "record":
        shard = watcher.place.read(rel[: -len(".json")] + ".parquet")
        if shard is None:
            return ["commit record visible but its shard is not"]
        return _record_vs_shard(doc, len(shard[1]), crc_hex(shard[1]), _parquet_rows(shard[1]))
    if kind == "success":
        manifest = watcher.place.read(rel[: -len(".SUCCESS")] + ".json")
        if manifest is None:
            return ["success marker visible but its manifest is not"]
        if doc.get("manifest_bytes") != len(manifest[1]):
            return [f"success marker names a manifest of {doc.get('manifest_bytes')} bytes, "
                    f"the manifest has {len(manifest[1])}"]
        return _check_committed_shards(json.loads(manifest[1]), watcher)
    return []


def _check_committed_shards(manifest: dict, watcher: Watcher) -> list[str]:
    """Once the success marker is visible every shard of the manifest must be in place."""
    problems = []
    for table in manifest["tables"]:
        for shard in table["shards"]:
            got = watcher.place.read("ck/" + shard["path"])
            if got is None:
                problems.append(f"committed shard {shard['path']} is missing")
                continue
            problems += [f"{shard['path']}: {p}" for p in
                         _record_vs_shard(shard, len(got[1]), crc_hex(got[1]), shard["rows"])]
    return problems


def _check_training(data: bytes, watcher: Watcher) -> list[str]:
    """pipelines.validate's checks on exactly these bytes (a local copy)."""
    from pipelines.validate import validate_file

    with tempfile.NamedTemporaryFile(suffix=".parquet", dir=watcher.scratch) as fh:
        fh.write(data)
        fh.flush()
        report = validate_file(fh.name, expected={
            "spine_rows": watcher.reference.spine_rows,
            "spine_digest": watcher.reference.spine_digest, "pair": PAIR})
    problems = [f"validation: {f}" for f in report.hard_failures]
    if report.rows != watcher.reference.spine_rows:
        problems.append(f"{report.rows} rows, expected {watcher.reference.spine_rows}")
    return problems


# --------------------------------------------------------------------------- kill moments

class LogTail:
    """The text a job has logged so far (read incrementally from its log file)."""

    def __init__(self, path: str):
        self.path, self.text, self._offset = path, "", 0

    def refresh(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            with open(self.path, "rb") as fh:
                fh.seek(self._offset)
                chunk = fh.read()
            self._offset += len(chunk)
            self.text += chunk.decode("utf-8", errors="replace")
        return self.text


@dataclasses.dataclass
class Moment:
    """When to kill one run: a kind (EXTRACT_MOMENTS / MERGE_MOMENTS) and its draw."""

    kind: str
    delay: float = 0.0      # seconds after the trigger (or after the start: "timed")
    fraction: float = 0.0   # "records": share of the pending shards to wait for

    def describe(self) -> str:
        extra = f" {self.fraction:.0%}" if self.kind == "records" else ""
        return f"{self.kind}{extra} +{self.delay:.2f}s"


class Trigger:
    """Evaluates a Moment against a running job: its log and the trial's files."""

    def __init__(self, moment: Moment, place, log: LogTail, baseline: dict[str, tuple],
                 pending: int):
        self.moment, self.place, self.log = moment, place, log
        self.baseline, self.pending = baseline, pending
        self.started = time.monotonic()
        self.fired_at: float | None = None

    def due(self) -> bool:
        """True once the moment has come (its trigger, then its delay)."""
        now = time.monotonic()
        if self.fired_at is None and self._triggered(now):
            self.fired_at = now
        return self.fired_at is not None and now - self.fired_at >= self._delay()

    def _delay(self) -> float:
        return 0.0 if self.moment.kind == "timed" else self.moment.delay

    def _triggered(self, now: float) -> bool:
        kind = self.moment.kind
        if kind == "timed":
            return now - self.started >= self.moment.delay
        if kind in STAGE_LINES:
            return STAGE_LINES[kind] in self.log.refresh()
        if kind == "writing" and self.place.kind == "gcs":
            # A streamed upload is invisible until finalised: its start is logged.
            return "streaming to" in self.log.refresh()
        listing = self.place.list()
        if kind == "records":
            new = sum(1 for r in listing if is_record(r) and is_final(r) and r not in self.baseline)
            return new >= max(1, round(self.moment.fraction * self.pending))
        if kind == "manifest":
            return any(self._changed(listing, r) for r in listing
                       if "/manifests/" in r and r.endswith(".json") and is_final(r))
        if kind == "writing":
            return any(r.startswith("out/") and not is_final(r) and ".parquet" in r for r in listing)
        if kind == "published":
            return self._changed(listing, TRAINING)
        raise ValueError(f"unknown moment {kind}")

    def _changed(self, listing: dict, rel: str) -> bool:
        return rel in listing and listing[rel] != self.baseline.get(rel)


def draw_moment(rng: random.Random, job: str, est: float, pending_share: float) -> Moment:
    """A seeded kill moment for one run of ``job`` (``est``: its reference seconds)."""
    kinds = EXTRACT_MOMENTS if job == "extract" else MERGE_MOMENTS
    kind = rng.choices(list(kinds), weights=list(kinds.values()))[0]
    if kind == "records" and pending_share <= 0:
        kind = "verify"  # nothing left to extract: the commit is what remains
    if kind == "timed":
        # A resumed extraction does only its pending share of the work.
        scale = est * (0.5 + 0.5 * pending_share) if job == "extract" else est
        return Moment(kind, delay=rng.uniform(0, scale))
    jitter = 0.0 if kind in ("manifest", "published", "report") else rng.uniform(0, 0.1 * est)
    return Moment(kind, delay=jitter, fraction=rng.random())


# --------------------------------------------------------------------------- running jobs

@dataclasses.dataclass
class Run:
    """One run of a job."""

    job: str
    code: int | None
    seconds: float
    killed: bool
    moment: str | None
    log: str
    hung: bool = False
    done_before: int | None = None
    to_do: int | None = None


def start_job(cmd: list[str], env: dict, log_path: str) -> subprocess.Popen:
    """Start a job in its own process group (so the kill reaches all of it)."""
    with open(log_path, "wb") as log:
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)


def kill_job(proc: subprocess.Popen) -> bool:
    """SIGKILL the job's process group; False if it had already exited."""
    if proc.poll() is not None:
        return False
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return True


def run_job(job: str, cmd: list[str], env: dict, log_path: str, trigger: Trigger | None,
            interval: float, timeout: float) -> Run:
    """Run one job to its end, or kill it when ``trigger`` is due (or at ``timeout``)."""
    started = time.monotonic()
    proc = start_job(cmd, env, log_path)
    killed = hung = False
    try:
        while proc.poll() is None:
            if trigger is not None and trigger.due():
                killed = kill_job(proc)
                break
            if time.monotonic() - started > timeout:
                hung = kill_job(proc)
                break
            time.sleep(interval)
    finally:
        kill_job(proc)  # never leave a job behind (e.g. on Ctrl-C)
    run = Run(job, proc.returncode, time.monotonic() - started, killed,
              trigger.moment.describe() if trigger else None, log_path, hung=hung)
    match = RESUME_LINE.search(LogTail(log_path).refresh())
    if match:
        run.done_before, run.to_do = int(match.group(1)), int(match.group(2))
    return run


def log_tail(path: str, lines: int = 15) -> str:
    """The last lines of a job's log."""
    with contextlib.suppress(FileNotFoundError):
        with open(path, encoding="utf-8", errors="replace") as fh:
            return "".join(fh.readlines()[-lines:])
    return ""


# --------------------------------------------------------------------------- a trial

@dataclasses.dataclass
class Setup:
    """Everything a trial needs: the warehouse, the options and the reference."""

    warehouse: str
    method: str
    reference: Reference | None
    est: dict[str, float]     # job -> seconds of the uninterrupted run on this target
    env: dict
    interval: float           # trigger polling
    watch_interval: float
    scratch: str
    tmpdir: str
    logs: str
    findings: str
    kills: tuple[int, int]


def job_command(job: str, setup: Setup, trial_root: str) -> list[str]:
    """The command line of ``job`` for a trial rooted at ``trial_root``."""
    from pipelines.sources import duckdb_url

    ck = f"{trial_root}/ck"
    if job == "extract":
        return [sys.executable, "-m", "pipelines.extract", "--pair", PAIR,
                "--source", duckdb_url(setup.warehouse), "--checkpoint-root", ck,
                "--shard-days", "1", "--direct_num_workers", "2"]
    # --overwrite as the deployed merge job passes it: a merge killed after publishing
    # (before its report) must be able to run again.
    return [sys.executable, "-m", "pipelines.merge", "--pair", PAIR, "--method", setup.method,
            "--checkpoint-root", ck, "--output", f"{trial_root}/{TRAINING}",
            "--memory-budget", MEMORY_BUDGET, "--overwrite"]


@dataclasses.dataclass
class JobStats:
    """Figures of one job over the trials of one target."""

    runs: int = 0
    kills: int = 0
    missed_kills: int = 0
    resumes: int = 0
    failed_runs: int = 0
    kills_by_moment: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    missed_by_moment: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    shards_kept_at_resume: int = 0
    shards_pending_at_resume: int = 0
    seconds: float = 0.0
    # When each kill landed, in seconds since the run's start / the uninterrupted run's.
    kill_points: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["kills_by_moment"] = dict(sorted(self.kills_by_moment.items()))
        out["missed_by_moment"] = dict(sorted(self.missed_by_moment.items()))
        out["seconds"] = round(self.seconds, 1)
        out["kill_points"] = sorted(self.kill_points)
        return out


def run_until_success(job: str, setup: Setup, trial_root: str, place, rng: random.Random,
                      watcher: Watcher, stats: JobStats, failures: list, tag: str) -> bool:
    """Run ``job`` with the trial's kills until a run exits 0; False if it never does."""
    planned = rng.randint(*setup.kills)
    killed = 0
    for attempt in range(planned + 3):
        log_path = os.path.join(setup.logs, f"{tag}-{job}-{attempt}.log")
        baseline = place.list()
        pending = setup.reference.shards
        if job == "extract":
            pending -= sum(1 for r in baseline if is_record(r) and is_final(r))
        moment = trigger = None
        if killed < planned:
            moment = draw_moment(rng, job, setup.est[job], max(pending, 0) / setup.reference.shards)
            trigger = Trigger(moment, place, LogTail(log_path), baseline, pending)
        watcher.current_run = os.path.basename(log_path)
        run = run_job(job, job_command(job, setup, trial_root), setup.env, log_path, trigger,
                      setup.interval, timeout=60 + 20 * setup.est[job])
        watcher.poll()  # the state this run left, whether it was killed or not
        _count_run(run, stats, killed > 0, moment, setup.est[job])
        if run.killed:
            killed += 1
            continue
        if run.code == 0:
            return True
        failures.append({"target": watcher.label, "trial": watcher.trial, "job": job,
                         "attempt": attempt, "code": run.code, "after_kills": killed,
                         "hung": run.hung, "log": log_tail(run.log)})
    return False


def _count_run(run: Run, stats: JobStats, after_kill: bool, moment: Moment | None,
               est: float) -> None:
    stats.runs += 1
    stats.seconds += run.seconds
    if run.killed:
        stats.kills += 1
        stats.kills_by_moment[moment.kind] += 1
        stats.kill_points.append(round(run.seconds / est, 3))
    elif moment is not None:
        stats.missed_kills += 1  # the run ended before its moment came
        stats.missed_by_moment[moment.kind] += 1
    if after_kill:
        stats.resumes += 1
        stats.shards_kept_at_resume += run.done_before or 0
        stats.shards_pending_at_resume += run.to_do or 0
    if not run.killed and run.code != 0:
        stats.failed_runs += 1


def leftovers(place, tmpdir: str) -> collections.Counter:
    """Temporaries a trial left: under its root, and in the jobs' TMPDIR (then cleared)."""
    found = collections.Counter()
    for rel, ident in place.list().items():
        if not is_final(rel):
            kind = "checkpoint_temporaries" if rel.startswith("ck/") else "output_temporaries"
            found[kind] += 1
            found[f"{kind}_bytes"] += ident[1]
    for name in os.listdir(tmpdir):
        # bqx-* are the pipelines' own (bqx-extract-, bqx-merge-, bqx-upload-); beam-*
        # and tmp* are Apache Beam's and other libraries'.
        kind = name.rsplit("-", 1)[0] if name.startswith(("bqx-", "beam-")) else "other"
        found[f"tmpdir:{kind}"] += 1
        full = os.path.join(tmpdir, name)
        if os.path.isdir(full):
            shutil.rmtree(full, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                os.unlink(full)
    return found


def compare_final(place, reference: Reference) -> list[str]:
    """How a finished trial differs from the reference: the manifest's per-shard
    CRC32C and rows, every final file's bytes, and the checkpoints' verification."""
    from pipelines import checkpoints

    problems = []
    ck = place.path("ck")
    try:
        manifest = checkpoints.load_manifest(ck, PAIR)
    except Exception as exc:  # noqa: BLE001
        return [f"{ck}: no committed manifest: {exc}"]
    ref_manifest = next(v for k, v in reference.docs.items()
                        if "/manifests/" in k and k.endswith(".json"))
    shards = [(t["table"], [(s["path"], s["crc32c"], s["rows"]) for s in t["shards"]])
              for t in manifest.tables]
    ref_shards = [(t["table"], [(s["path"], s["crc32c"], s["rows"]) for s in t["shards"]])
                  for t in ref_manifest["tables"]]
    if shards != ref_shards:
        problems.append(f"{ck}: manifest shards (path, CRC32C, rows) differ from the reference")
    problems += [f"{ck}: {p}" for p in checkpoints.verify_checkpoints(manifest)]
    problems += [f"{place.location()}/{p}" for p in reference.differences(Reference.snapshot(place))]
    return problems


def run_trial(index: int, setup: Setup, place, seed: int, label: str, totals: dict) -> None:
    """One trial: extract with kills until it succeeds, merge likewise, then compare."""
    rng = random.Random(f"{seed}:{label}:{index}")
    place.remove()
    watcher = Watcher(place, setup.reference, setup.watch_interval, setup.scratch, label)
    watcher.trial = index
    watcher.start()
    tag = f"{label}-{index}"
    before = len(totals["violations"]) + len(totals["mismatches"]) + len(totals["failures"])
    ok = True
    try:
        for job in ("extract", "merge"):
            if ok:
                ok = run_until_success(job, setup, place.location(), place, rng,
                                       watcher, totals[job], totals["failures"], tag)
                if not ok:
                    totals["failures"].append({"target": label, "job": job, "trial": index,
                                               "problem": "never recovered"})
    finally:
        watcher.stop()
    totals["violations"] += watcher.violations
    totals["watch"]["polls"] += watcher.polls
    totals["watch"]["checks"].update(watcher.checks)
    totals["watch"]["vanished"] += watcher.vanished
    totals["watch"]["errors"] += watcher.errors
    totals["shards_rewritten"] += watcher.rewrites(lambda r: r.startswith("ck/") and r.endswith(".parquet"))
    totals["records_rewritten"] += watcher.rewrites(is_record)
    totals["outputs_replaced"] += watcher.rewrites(lambda r: r == TRAINING)
    totals["rewritten"] += watcher.rewritten
    if ok:
        totals["mismatches"] += [{"target": label, "trial": index, "problem": p}
                                 for p in compare_final(place, setup.reference)]
    totals["leftovers"].update(leftovers(place, setup.tmpdir))
    totals["trials"] += 1
    findings = len(totals["violations"]) + len(totals["mismatches"]) + len(totals["failures"])
    if findings > before:
        keep_logs(setup, tag)


def keep_logs(setup: Setup, tag: str) -> None:
    """Copy a trial's job logs to {workdir}/findings/ (the logs folder is cleared)."""
    dest = os.path.join(setup.findings, tag)
    os.makedirs(dest, exist_ok=True)
    for name in os.listdir(setup.logs):
        if name.startswith(tag + "-"):
            shutil.copy(os.path.join(setup.logs, name), dest)


def new_totals() -> dict:
    """Empty figures of one target."""
    return {"trials": 0, "extract": JobStats(), "merge": JobStats(), "failures": [],
            "violations": [], "mismatches": [], "shards_rewritten": 0, "records_rewritten": 0,
            "outputs_replaced": 0, "rewritten": [], "leftovers": collections.Counter(),
            "watch": {"polls": 0, "checks": collections.Counter(), "vanished": 0, "errors": []},
            "seconds": 0.0}


# --------------------------------------------------------------------------- reference runs

def build_warehouse(workdir: str, days: int, tables_per_group: int) -> str:
    """The small warehouse (reused when it already exists with these settings)."""
    from pipelines.sample import build_warehouse as build

    path = os.path.join(workdir, f"warehouse-{PAIR}-{days}d-{tables_per_group}t.duckdb")
    build(path, [PAIR], rows=days * 1440, seed=WAREHOUSE_SEED,
          tables_per_group=tables_per_group, log=lambda *a, **k: None)
    return path


def reference_run(setup: Setup, place, label: str) -> tuple[Reference, dict[str, float]]:
    """One uninterrupted extract + merge; its snapshot and each job's seconds."""
    place.remove()
    est = {}
    for job in ("extract", "merge"):
        log_path = os.path.join(setup.logs, f"{label}-reference-{job}.log")
        run = run_job(job, job_command(job, setup, place.location()), setup.env,
                      log_path, None, setup.interval, timeout=1800)
        if run.code != 0:
            raise SystemExit(f"soak: the reference {job} on {label} failed ({run.code}):\n"
                             f"{log_tail(log_path, 40)}")
        est[job] = run.seconds
    leftovers(place, setup.tmpdir)  # clears the jobs' TMPDIR
    return Reference.snapshot(place), est


@contextlib.contextmanager
def gcs_emulator(workdir: str):
    """Start the GCS emulator the way the tests do; point this process at it."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from emulator_procs import PROJECT, environ, gcs_emulator_process

    data = os.path.join(workdir, "gcs")
    shutil.rmtree(data, ignore_errors=True)
    with gcs_emulator_process(data) as emulator:
        try:
            with environ(STORAGE_EMULATOR_HOST=emulator["host"], GOOGLE_CLOUD_PROJECT=PROJECT):
                yield emulator
        finally:
            shutil.rmtree(data, ignore_errors=True)


def emulator_errors(emulator: dict) -> dict:
    """Requests the emulator failed (Python's server prints each traceback to its log):
    the client library retries them, and the emulator ignores upload preconditions, so
    a retried upload publishes the same bytes again (counted as rewrites)."""
    with open(os.path.join(emulator["data_dir"], "emulator.log"), errors="replace") as fh:
        text = fh.read()
    errors = text.count("Exception occurred during processing of request")
    kinds = collections.Counter(
        line.split(":", 1)[0] + ": " + line.split(":", 1)[1].strip()[:80]
        for line in text.splitlines() if re.match(r"[A-Za-z_.]*(Error|Exception)\b.*:", line))
    return {"failed_requests": errors, "exceptions": dict(kinds.most_common(5))}


# --------------------------------------------------------------------------- the soak

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[1])
    p.add_argument("--trials", type=int, default=10, help="trials per target (default 10)")
    p.add_argument("--gcs-trials", type=int, default=None,
                   help="trials on the emulated bucket (default: --trials)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target", choices=("local", "gcs", "both"), default="both")
    p.add_argument("--method", choices=("polars", "duckdb"), default="polars")
    p.add_argument("--workdir", default=os.path.join(ROOT, "data", "soak"),
                   help="warehouse (reused), reference, trials and logs (default data/soak)")
    p.add_argument("--kills", default="2-3",
                   help="kills of each job per trial: N or LO-HI, drawn per trial (default 2-3)")
    p.add_argument("--min-kills", type=int, default=20,
                   help="extra trials (up to as many again) until each job was killed this "
                        "often on each target (default 20)")
    p.add_argument("--days", type=int, default=4, help="days of rows: shards per table (default 4)")
    p.add_argument("--tables-per-group", type=int, default=2, help="sample tables per group (default 2)")
    p.add_argument("--no-gcs-reference", action="store_true",
                   help="with --target both: no uninterrupted run in the bucket (quicker; the "
                        "bucket's trials are compared with the local reference run)")
    p.add_argument("--json", help="also write the figures as JSON here")
    p.add_argument("--keep", action="store_true", help="keep the last trial's files and the logs")
    args = p.parse_args(argv)
    lo, _, hi = args.kills.partition("-")
    args.kills = (int(lo), int(hi or lo))
    if args.kills[0] < 0 or args.kills[1] < args.kills[0]:
        p.error("--kills: N or LO-HI with 0 <= LO <= HI")
    if args.gcs_trials is None:
        args.gcs_trials = args.trials
    return args


def make_setup(args, workdir: str, warehouse: str, label: str) -> Setup:
    """Folders and environment of one target's runs."""
    tmpdir = os.path.join(workdir, "tmp", label)
    logs = os.path.join(workdir, "logs", label)
    scratch = os.path.join(workdir, "scratch")
    for folder in (tmpdir, logs, scratch):
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder)
    # The jobs' own temporaries go to a folder of ours, so leftovers can be counted.
    env = {**os.environ, "TMPDIR": tmpdir, "PYTHONUNBUFFERED": "1"}
    gcs = label == "gcs"
    return Setup(warehouse=warehouse, method=args.method, reference=None, est={}, env=env,
                 interval=0.02 if gcs else 0.005, watch_interval=0.1 if gcs else 0.05,
                 scratch=scratch, tmpdir=tmpdir, logs=logs,
                 findings=os.path.join(workdir, "findings"), kills=args.kills)


# Without its own reference run, a bucket run is timed as the local one times these
# (measured on the emulator: its requests are slow, a merge reads ranges of every shard).
GCS_SLOWDOWN = {"extract": 1.8, "merge": 4.0}


def soak_target(args, label: str, workdir: str, warehouse: str, reference: Reference | None,
                figures: dict) -> Reference:
    """The reference run on this target, then its trials; figures go into ``figures``.

    With a ``reference`` (the local one) a bucket's own uninterrupted run must equal it;
    ``--no-gcs-reference`` skips that run (the trials are compared with the local one
    all the same)."""
    setup = make_setup(args, workdir, warehouse, label)
    base = f"gs://bqx-test/soak/{args.seed}" if label == "gcs" else os.path.join(workdir, "runs")
    ref_place = make_place(f"{base}/reference")
    started = time.monotonic()
    totals = new_totals()
    if reference is not None and args.no_gcs_reference:
        local = figures["local"]["reference_seconds"]
        setup.est = {job: local[job] * GCS_SLOWDOWN[job] for job in local}
    else:
        own, setup.est = reference_run(setup, ref_place, label)
        if reference is not None:  # the bucket's uninterrupted run must equal the local one
            totals["mismatches"] += [{"target": label, "trial": "reference", "problem": p}
                                     for p in reference.differences(own)]
        reference = reference or own
    setup.reference = reference
    trial_place = make_place(f"{base}/trial")
    trials = args.gcs_trials if label == "gcs" else args.trials
    i = 0
    while i < trials or (i < 2 * trials and _short_of_kills(totals, args.min_kills)):
        run_trial(i, setup, trial_place, args.seed, label, totals)
        i += 1
        print(f"soak: {label} trial {i}/{trials}: kills extract {totals['extract'].kills} "
              f"merge {totals['merge'].kills}, violations {len(totals['violations'])}, "
              f"mismatches {len(totals['mismatches'])}", file=sys.stderr, flush=True)
    totals["seconds"] = time.monotonic() - started
    totals["reference_seconds"] = {k: round(v, 2) for k, v in setup.est.items()}
    totals["own_reference_run"] = not (label == "gcs" and args.no_gcs_reference and "local" in figures)
    if not args.keep:
        trial_place.remove()
        ref_place.remove()
        shutil.rmtree(setup.logs, ignore_errors=True)
    figures[label] = totals
    return setup.reference


def _short_of_kills(totals: dict, minimum: int) -> bool:
    """True while a job has fewer kills than ``minimum`` (a kill's moment can come after
    the run ended: then that trial has one kill less than it drew)."""
    return min(totals["extract"].kills, totals["merge"].kills) < minimum


def summary(args, figures: dict, reference: Reference, wall: float, warehouse: str) -> dict:
    """The figures as JSON."""
    targets = {}
    for label, t in figures.items():
        targets[label] = {
            "trials": t["trials"], "seconds": round(t["seconds"], 1),
            "reference_seconds": t["reference_seconds"],
            "own_reference_run": t["own_reference_run"],
            "extract": t["extract"].to_json(), "merge": t["merge"].to_json(),
            "work_redone": {"shards_rewritten": t["shards_rewritten"],
                            "committed_records_rewritten": t["records_rewritten"],
                            "merges_restarted": t["merge"].resumes,
                            "outputs_replaced": t["outputs_replaced"],
                            "names_published_again": t["rewritten"][:100]},
            "watcher": {"polls": t["watch"]["polls"], "checks": sum(t["watch"]["checks"].values()),
                        "checks_by_kind": dict(sorted(t["watch"]["checks"].items())),
                        "vanished_between_list_and_read": t["watch"]["vanished"],
                        "errors": t["watch"]["errors"][:20]},
            "leftovers": dict(sorted(t["leftovers"].items())),
            "violations": t["violations"], "mismatches": t["mismatches"],
            "failures": t["failures"],
        }
        if "emulator_errors" in t:
            targets[label]["emulator_errors"] = t["emulator_errors"]
    bad = sum(len(t["violations"]) + len(t["mismatches"]) + len(t["failures"])
              for t in figures.values())
    return {
        "command": "python -m bench.soak " + " ".join(sys.argv[1:]),
        "seed": args.seed, "method": args.method, "kills_per_trial": list(args.kills),
        "warehouse": {"path": warehouse, "days": args.days,
                      "tables_per_group": args.tables_per_group},
        "reference": {"shards": reference.shards, "training_rows": reference.spine_rows,
                      "training_columns": reference.columns,
                      "training_bytes": reference.files[TRAINING][0]},
        "targets": targets,
        "violations": sum(len(t["violations"]) for t in figures.values()),
        "mismatches": sum(len(t["mismatches"]) for t in figures.values()),
        "failed_runs": sum(len(t["failures"]) for t in figures.values()),
        "wall_seconds": round(wall, 1), "ok": bad == 0,
    }


def print_figures(s: dict) -> None:
    """The figures, for people."""
    ref = s["reference"]
    print(f"soak: seed {s['seed']}, method {s['method']}, {s['kills_per_trial'][0]}-"
          f"{s['kills_per_trial'][1]} kills per job per trial; reference: {ref['shards']} shards, "
          f"training file {ref['training_rows']} rows x {ref['training_columns']} columns "
          f"({ref['training_bytes']:,} bytes)")
    for label, t in s["targets"].items():
        e, m, w, r = t["extract"], t["merge"], t["watcher"], t["work_redone"]
        timing = "uninterrupted" if t["own_reference_run"] else "estimated from the local run"
        print(f"[{label}] {t['trials']} trials in {t['seconds']:.0f} s ({timing}: extract "
              f"{t['reference_seconds']['extract']:.1f} s, merge {t['reference_seconds']['merge']:.1f} s)")
        for job, j in (("extract", e), ("merge", m)):
            moments = ", ".join(f"{k} {v}" for k, v in j["kills_by_moment"].items())
            print(f"  {job:7} runs {j['runs']:3}  kills {j['kills']:3}  missed {j['missed_kills']}  "
                  f"resumes {j['resumes']:3}  failed {j['failed_runs']}  kill points "
                  f"{_spread(j['kill_points'])}")
            missed = ", ".join(f"{k} {v}" for k, v in j["missed_by_moment"].items())
            print(f"          kills by moment: {moments}" + (f"; missed: {missed}" if missed else ""))
        print(f"  work redone: shards kept at resume {e['shards_kept_at_resume']}, pending at resume "
              f"{e['shards_pending_at_resume']}, shards written again {r['shards_rewritten']}, "
              f"committed records written again {r['committed_records_rewritten']}; merges "
              f"restarted {r['merges_restarted']}, published outputs replaced {r['outputs_replaced']}")
        kinds = ", ".join(f"{k} {v}" for k, v in w["checks_by_kind"].items())
        print(f"  watcher: {w['polls']} polls, {w['checks']} file versions checked [{kinds}], "
              f"{w['vanished_between_list_and_read']} vanished before read, {len(w['errors'])} errors")
        if "emulator_errors" in t:
            print(f"  emulator: {t['emulator_errors']['failed_requests']} requests failed "
                  f"(retried by the client): {t['emulator_errors']['exceptions']}")
        left = ", ".join(f"{k} {v}" for k, v in t["leftovers"].items()) or "none"
        print(f"  temporaries left behind: {left}")
        print(f"  violations {len(t['violations'])}, mismatches {len(t['mismatches'])}, "
              f"failed runs {len(t['failures'])}")
        for item in (t["violations"] + t["mismatches"] + t["failures"])[:20]:
            print(f"    ! {json.dumps(item)[:1500]}")
    kills = {job: sum(t[job]["kills"] for t in s["targets"].values()) for job in ("extract", "merge")}
    print(f"total: kills extract {kills['extract']}, merge {kills['merge']}; violations "
          f"{s['violations']}, mismatches {s['mismatches']}, failed runs {s['failed_runs']}; "
          f"wall time {s['wall_seconds']:.0f} s; {'PASS' if s['ok'] else 'FAIL'}")


def _spread(points: list[float]) -> str:
    """Where kills landed, as shares of the uninterrupted run's time: min/median/max."""
    if not points:
        return "-"
    return f"{points[0]:.2f}/{points[len(points) // 2]:.2f}/{points[-1]:.2f} of a full run"


def main(argv: list[str] | None = None) -> int:
    """Entry point; 0 only when nothing was violated, mismatched or failed."""
    args = parse_args(argv)
    started = time.monotonic()
    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    shutil.rmtree(os.path.join(workdir, "findings"), ignore_errors=True)  # a former run's
    warehouse = build_warehouse(workdir, args.days, args.tables_per_group)
    labels = ["local", "gcs"] if args.target == "both" else [args.target]
    figures: dict = {}
    reference = None
    if "local" in labels:
        reference = soak_target(args, "local", workdir, warehouse, None, figures)
    if "gcs" in labels:
        with gcs_emulator(workdir) as emulator:
            reference = soak_target(args, "gcs", workdir, warehouse, reference, figures)
            figures["gcs"]["emulator_errors"] = emulator_errors(emulator)
    if not args.keep:
        for folder in ("tmp", "scratch", "logs", "runs"):
            shutil.rmtree(os.path.join(workdir, folder), ignore_errors=True)
    s = summary(args, figures, reference, time.monotonic() - started, warehouse)
    print_figures(s)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(s, fh, indent=1, sort_keys=False)
            fh.write("\n")
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
