"""python -m pipelines.prune: the checkpoints of dropped windows go, whatever a kept window
of any pair lists stays, and nothing else is touched."""
import datetime as dt
import os
import uuid

import pytest

from conftest import PAIR, extract_window, file_states, run_module
from emulators import BUCKET, gcs_emulator, upload_tree  # noqa: F401 (fixture)
from pipelines import checkpoints, storage
from pipelines.errors import PipelineError
from pipelines.prune import PrunePlan, parse_window, plan_prune
from pipelines.window import UTC, window_from_dates

OTHER = "gbpusd"


def _listed(root, pair, window):
    """Every file a committed window consists of: shards, records, manifest, marker."""
    manifest = checkpoints.load_manifest(root, pair, window)
    paths = {checkpoints.manifest_path(root, pair, window), checkpoints.success_path(root, pair, window)}
    for entry in manifest.tables:
        for path in manifest.shard_files(entry):
            paths.update((path, checkpoints.record_path(path)))
    return paths


def _prune(root, *args):
    proc = run_module("pipelines.prune", "--checkpoint-root", root, *args)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_prune_removes_a_dropped_window_but_what_another_pair_needs(warehouse, tmp_path):
    root = str(tmp_path / "ck")
    # eurusd was extracted up to the 6th, then again a day later; gbpusd only up to the 6th.
    extract_window(warehouse, root, "2025-01-06", "2025-01-06", shard_days=28)
    extract_window(warehouse, root, "2025-01-06", "2025-01-07", shard_days=28)
    extract_window(warehouse, root, "2025-01-06", "2025-01-06", pair=OTHER, shard_days=28)
    old = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 6))
    new = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 7))
    dropped, kept = _listed(root, PAIR, old), _listed(root, PAIR, new) | _listed(root, OTHER, old)
    assert dropped & kept, "the shared tables' shards of the dropped window are the other pair's too"
    # Files that are not the layout's are never touched.
    foreign = [os.path.join(root, "notes.txt"), os.path.join(root, "pairs", PAIR, "manifests", "readme.json")]
    for path in foreign:
        storage.write_bytes(path, b"mine")
    before = file_states(root)

    # Fresh files stay by default; without --delete nothing changes.
    assert "0 manifest file(s) of dropped windows and 0 shard file(s)" in _prune(root)
    out = _prune(root, "--min-age-hours", "0")
    assert "would be removed (pass --delete" in out and file_states(root) == before

    out = _prune(root, "--min-age-hours", "0", "--delete")
    after = file_states(root)
    assert set(before) - set(after) == dropped - kept
    assert all(after[p] == before[p] for p in after) and all(p in after for p in foreign)
    assert f"2 manifest file(s) of dropped windows and {len(dropped - kept) - 2} shard file(s)" in out
    for pair in (PAIR, OTHER):  # what is kept is still a whole, mergeable extraction
        assert not checkpoints.verify_checkpoints(checkpoints.load_manifest(root, pair))
    assert checkpoints.find_windows(root, PAIR) == [new]

    # Again: nothing left to remove.
    assert "0 manifest file(s) of dropped windows and 0 shard file(s)" in _prune(
        root, "--min-age-hours", "0", "--delete")


def test_prune_keeps_the_windows_named_by_keep_dates(warehouse, tmp_path):
    """A long window extracted once with fixed dates (say the full history) beside a
    --days window ending later: the default prune drops the long one, --keep-dates
    keeps it, and a --keep-dates that names no committed window stops the prune."""
    root = str(tmp_path / "ck")
    extract_window(warehouse, root, "2025-01-06", "2025-01-06", shard_days=28)  # "full"
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", root, "--shard-days", "28", "--days", "1")
    assert proc.returncode == 0, proc.stderr
    full = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 6))
    daily = window_from_dates(dt.date(2025, 1, 7), dt.date(2025, 1, 7))
    assert checkpoints.find_windows(root, PAIR) == [full, daily]
    before = file_states(root)

    proc = run_module("pipelines.prune", "--checkpoint-root", root, "--min-age-hours", "0",
                      "--keep-dates", "2025-01-05..2025-01-06", "--delete")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: --keep-dates 2025-01-05..2025-01-06: no pair has that window "
                      f"committed under {root} (committed: {full.id}, {daily.id})"]
    assert file_states(root) == before
    proc = run_module("pipelines.prune", "--checkpoint-root", root, "--min-age-hours", "0",
                      "--keep-dates", "2025-01-06", "--delete")
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        "error: --keep-dates '2025-01-06' is not FIRST..LAST, like 2020-01-01..2025-12-31"]
    assert file_states(root) == before

    out = _prune(root, "--min-age-hours", "0", "--keep-dates", "2025-01-06..2025-01-06", "--delete")
    assert "0 manifest file(s) of dropped windows and 0 shard file(s)" in out
    assert file_states(root) == before
    # Without it, the long window goes: it does not end last.
    dropped = _listed(root, PAIR, full) - _listed(root, PAIR, daily)
    _prune(root, "--min-age-hours", "0", "--delete")
    assert set(before) - set(file_states(root)) == dropped
    assert checkpoints.find_windows(root, PAIR) == [daily]


def test_prune_in_a_bucket(gcs_emulator, warehouse, tmp_path):
    """The same in a bucket: one listing gives every object's age and size."""
    local = str(tmp_path / "ck")
    extract_window(warehouse, local, "2025-01-06", "2025-01-06", shard_days=28)
    extract_window(warehouse, local, "2025-01-06", "2025-01-07", shard_days=28)
    old = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 6))
    new = window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 7))
    dropped = {checkpoints.relative(local, p) for p in _listed(local, PAIR, old) - _listed(local, PAIR, new)}
    everything = {checkpoints.relative(local, p) for p in storage.list_files(local)}
    root = f"gs://{BUCKET}/prune-{uuid.uuid4().hex[:8]}/ck"
    assert upload_tree(local, root) == len(everything)

    out = _prune(root, "--min-age-hours", "0", "--delete")
    assert f"2 manifest file(s) of dropped windows and {len(dropped) - 2} shard file(s)" in out
    assert {checkpoints.relative(root, p) for p in storage.list_files(root)} == everything - dropped
    assert not checkpoints.verify_checkpoints(checkpoints.load_manifest(root, PAIR))


def test_prune_refuses_when_a_kept_manifest_is_damaged(extracted, tmp_path):
    import shutil

    root = str(tmp_path / "ck")
    shutil.copytree(extracted, root)
    (window,) = checkpoints.find_windows(root, PAIR)
    storage.write_bytes(checkpoints.manifest_path(root, PAIR, window), b"{not json")
    before = file_states(root)
    proc = run_module("pipelines.prune", "--checkpoint-root", root, "--min-age-hours", "0", "--delete")
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "manifest" in errors[0] and window.id in errors[0], proc.stderr
    assert file_states(root) == before


def test_removal_order_leaves_no_committed_window_without_its_files():
    def info(path):
        return storage.FileInfo(path, 1, dt.datetime(2025, 1, 1, tzinfo=UTC))

    windows = [info("r/pairs/p/manifests/w.json"), info("r/pairs/p/manifests/w.SUCCESS")]
    shards = [info("r/shared/t/s.parquet"), info("r/shared/t/s.json")]
    order = [f.path for f in PrunePlan({}, windows, shards, 0).removals()]
    assert order == ["r/pairs/p/manifests/w.SUCCESS", "r/pairs/p/manifests/w.json",
                     "r/shared/t/s.json", "r/shared/t/s.parquet"]


def test_windows_kept_are_those_ending_on_the_latest_days():
    """--keep-windows N keeps every window ending on one of the N latest end days (the
    merge's choice is N = 1, where two windows ending together are ambiguous)."""
    def days(first, last):
        return window_from_dates(dt.date(2025, 1, first), dt.date(2025, 1, last))

    windows = [days(1, 5), days(3, 5), days(1, 4), days(1, 3)]
    assert checkpoints.windows_ending_last(windows) == [days(1, 5), days(3, 5)]
    assert checkpoints.windows_ending_last(windows, 2) == [days(1, 4), days(1, 5), days(3, 5)]
    assert checkpoints.windows_ending_last(windows, 9) == sorted(windows)
    assert checkpoints.windows_ending_last([]) == []


def test_bad_prune_options(tmp_path):
    import pytest
    from pipelines.errors import PipelineError

    with pytest.raises(PipelineError, match="--keep-windows must be at least 1"):
        plan_prune(str(tmp_path), keep_windows=0)
    with pytest.raises(PipelineError, match="--min-age-hours must not be negative"):
        plan_prune(str(tmp_path), min_age_hours=-1)
    # A root that holds no checkpoints is most likely the wrong one.
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_module("pipelines.prune", "--checkpoint-root", str(tmp_path / "nope"))
    assert proc.returncode == 2 and f"error: no checkpoints under {tmp_path / 'nope'}" in proc.stderr
    with pytest.raises(PipelineError, match="no checkpoints under"):
        plan_prune(str(tmp_path))
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_the_merge_without_dates_chooses_among_the_windows_ending_last():
    """Without --days, every window ending last (two are ambiguous); with --days N, the
    longest of at most N days among those ending last; with --as-of, only windows
    ending before that day."""
    def days(first, last):
        return window_from_dates(dt.date(2025, 1, first), dt.date(2025, 1, last))

    windows = [days(1, 5), days(3, 5), days(5, 5), days(1, 4)]
    assert checkpoints.merge_candidates(windows) == [days(1, 5), days(3, 5), days(5, 5)]
    assert checkpoints.merge_candidates(windows, days=1) == [days(5, 5)]
    assert checkpoints.merge_candidates(windows, days=4) == [days(3, 5)]
    assert checkpoints.merge_candidates(windows, days=5) == [days(1, 5)]
    assert checkpoints.merge_candidates([days(1, 4)], days=2) == []
    assert checkpoints.merge_candidates(windows, as_of=dt.date(2025, 1, 6)) == checkpoints.merge_candidates(windows)
    assert checkpoints.merge_candidates(windows, as_of=dt.date(2025, 1, 5)) == [days(1, 4)]
    assert checkpoints.merge_candidates(windows, days=2, as_of=dt.date(2025, 1, 5)) == []
    assert checkpoints.merge_candidates(windows, days=1, as_of=dt.date(2025, 1, 6)) == [days(5, 5)]


def test_keep_dates_must_be_first_and_last_day():
    assert parse_window("2020-01-01..2025-12-31") == window_from_dates(dt.date(2020, 1, 1),
                                                                       dt.date(2025, 12, 31))
    with pytest.raises(PipelineError, match=r"--keep-dates '2020-01-01' is not FIRST\.\.LAST"):
        parse_window("2020-01-01")
    with pytest.raises(PipelineError, match="not a date"):
        parse_window("2020-01-01..2025-13-01")
