"""How the benchmarks fold repeated runs into one row (bench/merge.py)."""
from bench.merge import _row, summarize_trials


def _trial(wall, cpu=1.0, rss=100, code=0, killed=None):
    return {"run": "polars", "rows": 10, "code": code, "wall": wall, "cpu": cpu, "rss": rss,
            "killed": killed, "error": "", "file": None}


def test_repeated_runs_give_medians_the_range_and_the_highest_peak():
    r = summarize_trials([_trial(3.0, 2.0, 100), _trial(1.0, 9.0, 300), _trial(2.0, 4.0, 200)])
    assert (r["wall"], r["cpu"], r["rss"], r["walls"]) == (2.0, 4.0, 300, [1.0, 2.0, 3.0])
    assert _row(r).endswith("ok; median of 3, wall 1.0-3.0 s")


def test_a_killed_run_makes_the_row_its_failure():
    r = summarize_trials([_trial(1.0), _trial(9.0, code=-9, killed="killed at 180 s")])
    assert r["code"] == -9 and _row(r).endswith("killed at 180 s")


def test_repeat_below_one_is_refused_with_a_usage_error(capsys):
    import pytest

    from bench import extract, merge

    for main in (merge.main, extract.main):
        with pytest.raises(SystemExit) as exc:
            main(["--repeat", "0"])
        assert exc.value.code == 2 and "--repeat must be at least 1" in capsys.readouterr().err


def test_the_size_comparison_with_polars_is_broken_down_by_column_type(tmp_path):
    """bench.read's size figure: the totals are the sums of the per-type figures, so a
    gap can be traced to the columns it comes from."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.read import describe_size, polars_size

    rng = np.random.default_rng(0)
    table = pa.table({"f": rng.random(5000), "i": rng.integers(0, 1000, 5000),
                      "s": pa.array(np.array(["lo", "hi"])[rng.integers(0, 2, 5000)])})
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path)
    s = polars_size(path, columns_per_batch=2)
    assert set(s["by_type"]) == {"double", "int64", "string"}
    assert s["ours"] == sum(o for o, _ in s["by_type"].values())
    assert s["polars"] == sum(p for _, p in s["by_type"].values())
    assert "by type, ours minus Polars': " in describe_size(s)


def test_the_read_benchmark_times_each_reader_and_gives_its_peak_rss(tmp_path):
    """bench.read: each reader reads the named columns in its own process, and its
    process's peak RSS is given with its time (a footer of many row groups is costly to
    hold, not only to parse). The peak is the reader's own, not the size of the process
    that started it (bench.merge holds ~0.6 GiB by then; getrusage would report that)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from bench.read import READERS, describe, measure

    rng = np.random.default_rng(0)
    table = pa.table({"interval_time": np.arange(4000)} | {f"f{i}": rng.random(4000) for i in range(30)})
    path = str(tmp_path / "t.parquet")
    pq.write_table(table, path, row_group_size=1000)
    held = bytearray(b"\x01") * (768 << 20)  # resident in this process while the readers run
    m = measure(path, 5)
    del held
    assert m["row_groups"] == 4 and m["columns"] == 5 and m["footer_bytes"] > 0
    for reader in READERS:
        assert m[reader] > 0 and 10 * 2**20 < m["peak_rss"][reader] < 512 * 2**20
        assert f"{reader} {m[reader]:.2f} s ({m['peak_rss'][reader] / 2**20:.0f} MiB)" in describe(m)


def test_bad_memory_benchmark_options_are_refused_before_any_data_is_made(capsys, tmp_path):
    """bench.memory checks --memory-budget, --row-group-rows, --column-batch-size, --shard-days, --tables and --cpus first: generating a
    full-width pair takes minutes, and the merge would refuse them only after that."""
    import pytest

    from bench import memory

    work = tmp_path / "work"
    for argv, message in ((["--memory-budget", "1.5GiB", "--memory-budget", "lots"],
                           "--memory-budget 'lots' is not a size like 1GiB or 800MB"),
                          (["--row-group-rows", "0"], "--row-group-rows must be at least 1, not 0"),
                          (["--column-batch-size", "huge"],
                           "--column-batch-size 'huge' is not a size like 1GiB or 800MB"),
                          (["--column-batch-size", "0"], "--column-batch-size must be more than 0"),
                          (["--memory-budget", "100MiB"], "is below the merge's fixed overhead"),
                          (["--shard-days", "0"], "--shard-days must be at least 1, not 0"),
                          (["--tables", "0"], "--tables must be at least 1, not 0"),
                          # Known only from the catalog, but still before anything is written.
                          (["--tables", "100000"], "--tables 100000: eurusd has 667 feature tables"),
                          (["--cpus", "0"], "--cpus must be from 1 to the"),
                          (["--cpus", "100000"], "--cpus must be from 1 to the")):
        with pytest.raises(SystemExit) as exc:
            memory.main(["--rows", "10", "--work", str(work), *argv])
        assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not work.exists()


def test_method_env_reaches_the_methods_processes_only(capsys):
    """bench.merge --method-env NAME=VALUE: the measured command gets the setting (the
    anchors do not: they run with env None, this process's environment); a malformed
    setting is refused before anything runs."""
    import os
    import sys

    import pytest

    from bench import merge

    check = [sys.executable, "-c", "import os, sys; sys.exit(0 if os.environ.get('BQX_PROBE') == '1' else 3)"]
    assert merge.run_isolated(check, 60, 1 << 30, env={"BQX_PROBE": "1"})["code"] == 0
    assert merge.run_isolated(check, 60, 1 << 30)["code"] == 3
    setting = {"BQX_PROBE": "1"}
    assert merge.run_environment("polars", setting)["BQX_PROBE"] == "1"
    assert merge.run_environment("polars", setting)["PATH"] == os.environ["PATH"]
    assert merge.run_environment("floor", setting) is None
    assert merge.run_environment("polars", {}) is None
    with pytest.raises(SystemExit) as exc:
        merge.main(["--method-env", "NOEQUALS", "--rows", "10"])
    assert exc.value.code == 2 and "--method-env 'NOEQUALS': not NAME=VALUE" in capsys.readouterr().err


def test_the_merge_benchmark_names_the_allocator_settings_of_its_runs(monkeypatch):
    """bench.merge's heading names the allocator settings every run inherits and those
    --method-env gives the methods alone."""
    import os

    from bench import memory, merge

    for name in list(os.environ):  # importing Polars sets _RJEM_MALLOC_CONF, for one
        if name.startswith(memory.ALLOCATOR_VARIABLES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("MALLOC_ARENA_MAX", "2")
    line = merge.describe_machine({"ARROW_DEFAULT_MEMORY_POOL": "system"})
    assert line.endswith("allocator settings of every run: MALLOC_ARENA_MAX=2, and of the "
                         "methods': ARROW_DEFAULT_MEMORY_POOL=system")
    assert "cores" in merge.describe_machine({})
