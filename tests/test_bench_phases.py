"""The in-process profilers of a merge: bench.phases times the merge's own functions (they
must still be there, and be put back); bench.memory splits its RSS into parts."""
import os

import pytest

from bench import phases
from pipelines.merge import writer


def test_every_phase_is_timed_and_the_originals_are_restored(extracted, tmp_path):
    emit = writer.TrainingFileWriter._emit
    totals, wall, cpu, rss = phases.profile_merge(extracted, "eurusd", str(tmp_path / "t.parquet"))
    assert (tmp_path / "t.parquet").exists() and wall > 0 and cpu > 0 and rss > 0
    assert {label for *_, label, _thread in phases.PHASES} == set(totals)
    assert all(calls > 0 for calls, _wall, _cpu in totals.values())
    assert writer.TrainingFileWriter._emit is emit


def test_the_memory_benchmark_splits_rss_into_its_parts(extracted, tmp_path):
    """bench.memory: at the peak RSS is the sum of its parts (medians are taken part by
    part, so they need not add up), and the merge's own tables (Arrow's pool) are among
    them."""
    from bench import memory

    r = memory.sample_merge(extracted, "eurusd", str(tmp_path / "t.parquet"))
    assert (tmp_path / "t.parquet").exists() and r["samples"] > 0
    peak = r["peak"]
    assert peak["rss"] == pytest.approx(sum(peak[f] for f in memory.FIELDS[1:]))
    assert peak["file"] > 0 and r["median"]["rss"] > 0
    assert r["peak"]["rss"] >= r["median"]["rss"]
    assert max(r["peak"]["arrow"], r["median"]["arrow"]) > 0
    # The merge's own figure of its stages, read from its log line.
    assert r["batches"] > 0 and 0 <= r["waited"] <= r["batches"]
    # Every sample is put in the job's stage running then; the peak is its stage's peak.
    # (A short stage may fall between two samples: only the merge is sure to be seen.)
    assert "merge" in r["stage_peaks"]
    assert set(r["stage_peaks"]) <= {"outside", "preflight", "merge", "validate"}
    assert r["stage_peaks"][r["stage"]] == peak["rss"] == max(r["stage_peaks"].values())
    if r["stage"] != "outside":  # and the peak is placed in time within its stage
        into, length = r["peak_at"]
        assert 0 <= into <= length
    assert r["row_groups"] == 1 and r["footer"] > 0
    assert r["pool"] in ("jemalloc", "mimalloc", "system")
    user, system = r["cpu"]
    assert user > 0 and system >= 0 and r["faults"] > 0
    table = memory._table({(2000, "1.5GiB", "budget's"): r})
    assert f"CPU {user:.1f} user + {system:.1f} system s, {r['faults'] / 1e6:.2f}M page faults; " in table
    assert f"{r['stage']} {peak['rss'] / 2**20:.0f}*" in table
    assert f"1 row group(s), footer {r['footer'] / 2**20:.1f} MiB" in table
    assert r["stage"] == "outside" or "s into its stage of" in table


def test_the_memory_benchmark_runs_a_merge_on_the_cores_it_is_given(extracted, tmp_path):
    """bench.memory --cpus 1: the measured merge's process may use one core (the 1 vCPU
    merge job), and still merges."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "bench.memory", "--one", extracted,
                          str(tmp_path / "t.parquet"), "--cpus", "1"],
                         stdout=subprocess.PIPE, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["cpus"] == 1 and result["batches"] > 0
    assert (tmp_path / "t.parquet").exists()


def test_the_memory_benchmark_makes_short_shards_and_narrow_pairs(tmp_path, capsys):
    """bench.memory --shard-days: the pair is generated in shards of that many days, so
    that --row-group-rows can cut a merge into row groups smaller than a default shard
    (row groups are runs of whole shards); the table says how many were written.
    --tables: the pair has the targets and only that many feature tables."""
    import json

    from bench import memory

    work = tmp_path / "work"
    assert memory.main(["--rows", "2000", "--shard-days", "1", "--row-group-rows", "1440",
                        "--tables", "4", "--work", str(work), "--keep"]) == 0
    out = capsys.readouterr().out
    assert "shards of 1 days" in out and "2 row group(s), footer" in out
    assert "the targets and 4 feature table(s)" in out
    assert "Arrow's pool: " in out and "; allocator settings: " in out
    # Kept under its own name: the default pair's folder (ck2000) is another pair.
    manifest, = (work / "ck2000-1d-4t" / "pairs" / "eurusd" / "manifests").glob("*.json")
    data = json.loads(manifest.read_text())
    assert data["shard_days"] == 1 and len(data["tables"]) == 5
    assert data["tables"][0]["group"] == "targets"
    assert [s["rows"] for s in data["tables"][0]["shards"]] == [1440, 560]


def test_the_memory_benchmark_names_the_allocator_settings_it_ran_with():
    """bench.memory's heading names every environment variable that changes how the
    measured process allocates (they are read once, when the allocator loads), so that
    runs with different settings are not compared as one."""
    from bench.memory import allocator_settings

    assert allocator_settings({"PATH": "/bin", "HOME": "/root"}) == "none"
    assert allocator_settings({"PATH": "/bin", "MALLOC_MMAP_THRESHOLD_": "65536",
                               "ARROW_DEFAULT_MEMORY_POOL": "system",
                               "JE_ARROW_MALLOC_CONF": "oversize_threshold:262144"}) == (
        "ARROW_DEFAULT_MEMORY_POOL=system JE_ARROW_MALLOC_CONF=oversize_threshold:262144 "
        "MALLOC_MMAP_THRESHOLD_=65536")


def test_the_memory_benchmark_repeats_a_merge_in_one_process(extracted, tmp_path):
    """bench.memory --merges 2: the same merge twice in one process, with the process's
    peak RSS after each (it can only grow), and the column batches of both counted."""
    from bench import memory

    once = memory.sample_merge(extracted, "eurusd", str(tmp_path / "a.parquet"))
    twice = memory.sample_merge(extracted, "eurusd", str(tmp_path / "b.parquet"), merges=2)
    first, second = twice["peak_after"]
    assert 0 < first <= second and len(once["peak_after"]) == 1
    assert (tmp_path / "b.parquet").exists()
    table = memory._table({(2000, "1.5GiB", "budget's"): twice})
    assert f"peak RSS after each merge: {first / 2**20:.0f} / {second / 2**20:.0f}" in table
    assert "after each merge" not in memory._table({(2000, "1.5GiB", "budget's"): once})
    # Each merge's line of its column batches adds to the figures.
    import logging

    wait = memory._WriterWait()
    for taken, waited in ((2.5, 0.5), (3.0, 1.0)):
        wait.emit(logging.LogRecord("m", logging.INFO, "", 0, "[merge] 7 column batches written "
                                    f"in {taken}s; reading and joining waited {waited}s of it "
                                    "for the encoders", None, None))
    assert wait.seconds == (5.5, 1.5)


def test_the_checkpoint_requests_of_a_merge_are_counted_and_storage_restored(extracted, tmp_path):
    from pipelines import storage

    originals = (storage.open_input, storage.read_buffer, storage.crc32c, storage.stat,
                 storage.read_range)
    requests = {}
    phases.profile_merge(extracted, "eurusd", str(tmp_path / "t.parquet"), requests)
    assert set(requests) == set(phases.REQUEST_KINDS)
    # The small pair's tables are read whole: one download a shard, and the manifest's
    # (the spine's keys are read first, through ranged reads); none is sliced.
    shards = sum(1 for _d, _s, files in os.walk(extracted) for f in files if f.endswith(".parquet"))
    assert requests["whole downloads"] == shards + 1
    assert requests["files opened for ranged reads"] > 0 and requests["ranged reads"] > shards
    # The preflight: one lookup and one read of the footer a shard.
    assert requests["size and checksum lookups"] == shards
    assert (storage.open_input, storage.read_buffer, storage.crc32c, storage.stat,
            storage.read_range) == originals


def test_the_latency_benchmark_merges_from_a_bucket_behind_a_delay(tmp_path, capsys):
    """bench.latency on a narrow pair: the local merge, then merges from the emulated
    bucket through a proxy with no delay and with 50 ms a request; each succeeds, and
    the delayed run's line says how much of the waiting it overlapped."""
    from bench import latency

    cores = os.sched_getaffinity(0)
    work = tmp_path / "work"
    assert latency.main(["--rows", "500", "--tables", "3", "--latency-ms", "50",
                         "--work", str(work)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line.split()[0] + (" ms" if line.split()[1] == "ms" else ""): line for line in lines
            if line.strip().startswith(("local", "0 ms", "50 ms"))}
    assert set(rows) == {"local", "0 ms", "50 ms"} and all(r.endswith("ok") for r in rows.values())
    # (Not equal from run to run: the client's background bucket lookups, one per
    # thread, depend on how many threads a run happened to start.)
    requests = int(rows["50 ms"].split()[5])
    assert requests > 0 and int(rows["0 ms"].split()[5]) > 0
    assert rows["50 ms"].split()[6] == f"{requests * 0.05:.1f}"  # their waiting, in turn
    assert all(float(r.split()[-2]) >= 0 for r in rows.values())  # the preflight, from its log
    assert not os.listdir(work)  # the generated pair is removed without --keep
    assert os.sched_getaffinity(0) == cores  # and this process has its cores back
