"""An extraction killed mid-run resumes to the same content as an uninterrupted one."""
import os
import time

import pytest

from conftest import commit_records, kill_module_when, manifest_content, run_module
from pipelines import checkpoints, storage

PAIR = "eurusd"


@pytest.fixture(scope="module")
def long_warehouse(tmp_path_factory):
    from pipelines.sample import build_warehouse

    path = str(tmp_path_factory.mktemp("long") / "w.duckdb")
    build_warehouse(path, [PAIR], rows=8 * 1440, seed=3, tables_per_group=2)
    return path


def _extract_args(warehouse, root):
    return ["--pair", PAIR, "--source", f"duckdb://{warehouse}", "--checkpoint-root", root,
            "--shard-days", "1", "--direct_num_workers", "2"]


def _content(root):
    return manifest_content(root, PAIR)


def test_killed_extraction_resumes_to_identical_checkpoints(long_warehouse, tmp_path):
    clean = str(tmp_path / "clean")
    assert run_module("pipelines.extract", *_extract_args(long_warehouse, clean)).returncode == 0
    total = len(commit_records(clean))

    resumed = str(tmp_path / "resumed")
    kill_module_when("pipelines.extract", _extract_args(long_warehouse, resumed),
                     lambda: len(commit_records(resumed)) >= max(3, total // 4))
    done = len(commit_records(resumed))
    assert 0 < done < total, f"the kill should land mid-run ({done}/{total} shards)"
    assert not checkpoints.find_windows(resumed, PAIR), "no success marker before the end"
    # Every shard under a final name is complete: its parquet footer reads.
    import pyarrow.parquet as pq
    for path in storage.list_files(resumed):
        if path.endswith(".parquet"):
            pq.read_metadata(path)

    again = run_module("pipelines.extract", *_extract_args(long_warehouse, resumed))
    assert again.returncode == 0, again.stderr
    assert f"done_before={done}" in again.stderr or "done_before=" in again.stderr
    assert _content(resumed) == [(t, [(p, c, r) for p, c, r in s]) for t, s in _content(clean)]


def test_damaged_shards_are_redone(long_warehouse, tmp_path):
    root = str(tmp_path / "ck")
    assert run_module("pipelines.extract", *_extract_args(long_warehouse, root)).returncode == 0
    reference = _content(root)
    shards = sorted(p for p in storage.list_files(root) if p.endswith(".parquet"))
    with open(shards[0], "r+b") as fh:  # flip bytes in the middle, same size
        fh.seek(storage.size(shards[0]) // 2)
        fh.write(b"\x00\xff\x00\xff")
    os.truncate(shards[1], storage.size(shards[1]) // 2)
    os.unlink(checkpoints.record_path(shards[2]))
    proc = run_module("pipelines.extract", *_extract_args(long_warehouse, root))
    assert proc.returncode == 0, proc.stderr
    assert "to_do=3" in proc.stderr
    assert _content(root) == reference


def test_leftovers_of_killed_runs_are_cleaned(warehouse, extracted, tmp_path):
    """A killed local merge leaves its temporary (a SIGKILL skips every finally): the
    next merge to that output removes it when its process is gone, never a live one's.
    An extract run leaves no scratch folder behind."""
    out = tmp_path / "out" / "training_eurusd.parquet"
    out.parent.mkdir()
    dead = out.parent / f".{out.name}{storage.TEMP_MARK}999999999-0123456789ab"
    live = out.parent / f".{out.name}{storage.TEMP_MARK}{os.getpid()}-0123456789ab"
    dead.write_bytes(b"half a file")
    live.write_bytes(b"someone is writing this")
    proc = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", extracted,
                      "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    assert not dead.exists() and live.exists()
    assert f"removed {dead}" in proc.stderr

    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = run_module("pipelines.extract", *_extract_args(warehouse, str(tmp_path / "ck")),
                      env={"TMPDIR": str(scratch)})
    assert proc.returncode == 0, proc.stderr
    assert not [p for p in os.listdir(scratch) if p.startswith("bqx-")]


def test_report_is_written_before_the_file_is_published(extracted, tmp_path):
    """A merge killed right after publishing its file must not leave the file without
    its report: the report is in place before the file appears."""
    import threading

    out = tmp_path / "training_eurusd.parquet"
    report = tmp_path / "training_eurusd.validation.json"
    seen = []

    def watch():
        while not out.exists():
            time.sleep(0.001)
        seen.append(report.exists())

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    proc = run_module("pipelines.merge", "--pair", PAIR, "--checkpoint-root", extracted,
                      "--output", str(out))
    assert proc.returncode == 0, proc.stderr
    watcher.join(10)
    assert seen == [True]
