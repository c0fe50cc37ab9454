"""A few trials of the interrupted-runs soak (``python -m bench.soak``, issue #5).

Each trial SIGKILLs the extract and the merge job at seeded random moments and re-runs
them until they succeed, while a watcher checks every file visible under a final name;
the soak itself fails on any partial or wrong file, any difference from the
uninterrupted reference run, or a run that fails without being killed. Here: two trials
on a local folder and one in the emulated bucket (compared with the local reference run),
one kill of each job per trial, on a two-day warehouse with one table per group; the
full soak is ``python -m bench.soak``.
"""
import json
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

from conftest import ROOT, run_module

if ROOT not in sys.path:  # bench/ is not an installed package
    sys.path.insert(0, ROOT)
from bench.soak import LocalPlace, Reference, Watcher, crc_hex  # noqa: E402


def test_killed_jobs_never_show_partial_files_and_end_like_an_uninterrupted_run(tmp_path):
    figures = tmp_path / "soak.json"
    proc = run_module("bench.soak", "--target", "both", "--trials", "2", "--gcs-trials", "1",
                      "--no-gcs-reference", "--kills", "1", "--min-kills", "0", "--days", "2",
                      "--tables-per-group", "1", "--seed", "5", "--workdir", str(tmp_path / "soak"),
                      "--json", str(figures), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    s = json.loads(figures.read_text())
    assert s["ok"] and (s["violations"], s["mismatches"], s["failed_runs"]) == (0, 0, 0)
    assert set(s["targets"]) == {"local", "gcs"}
    assert s["targets"]["local"]["trials"] == 2 and s["targets"]["gcs"]["trials"] == 1
    for label, t in s["targets"].items():
        # One kill was planned per job and trial; the job may finish before a late moment.
        for job in ("extract", "merge"):
            assert t[job]["kills"] + t[job]["missed_kills"] == t["trials"], (label, job, t[job])
            assert t[job]["runs"] == t[job]["kills"] + t["trials"], (label, job, t[job])
        assert t["watcher"]["checks"] > 0 and t["watcher"]["checks_by_kind"]["training"] >= 1
    assert sum(t[j]["kills"] for t in s["targets"].values() for j in ("extract", "merge")) >= 3
    assert "PASS" in proc.stdout


def test_the_watcher_flags_partial_or_wrong_files_under_final_names_only(tmp_path):
    """The soak's watcher is not vacuous: a truncated shard under its final name is a
    violation naming the path; a temporary being written is not looked at."""
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"interval_time": pa.array([0, 60_000_000], pa.timestamp("us", tz="UTC")),
                             "v": [1.0, 2.0]}), sink)
    shard = sink.getvalue().to_pybytes()
    record = json.dumps({"bytes": len(shard), "crc32c": crc_hex(shard), "rows": 2}).encode()
    folder = tmp_path / "trial" / "ck" / "shared" / "t"
    folder.mkdir(parents=True)
    reference = Reference(
        files={"ck/shared/t/s.parquet": (len(shard), crc_hex(shard)),
               "ck/shared/t/s.json": (len(record), crc_hex(record))},
        docs={"ck/shared/t/s.json": json.loads(record)}, spine_rows=2, spine_digest="",
        shards=1, columns=2)
    watcher = Watcher(LocalPlace(str(tmp_path / "trial")), reference, 0.05, str(tmp_path), "local")

    (folder / ".s.parquet.tmp-0123456789ab").write_bytes(shard[:100])  # a write in progress
    watcher.poll()
    (folder / "s.parquet").write_bytes(shard)
    (folder / "s.json").write_bytes(record)
    watcher.poll()
    assert watcher.violations == [] and sum(watcher.checks.values()) == 2

    (folder / "half").write_bytes(shard[: len(shard) // 2])
    os.replace(folder / "half", folder / "s.parquet")  # a partial file under the final name
    watcher.poll()
    problems = [v["problem"] for v in watcher.violations]
    assert all(v["path"] == str(folder / "s.parquet") for v in watcher.violations)
    assert any("unreadable shard" in p for p in problems), problems
    assert any("differs from the reference" in p for p in problems), problems
    assert watcher.rewrites(lambda rel: rel.endswith(".parquet")) == 1
