"""Two runs on the same inputs give the same bytes, and ``pipelines.validate --compare``
tells two training files apart (or not) by their content.

* extract: a second extraction of the session's warehouse into another root writes
  every checkpoint, commit record, manifest and success marker byte for byte as the
  first (the manifest stores paths relative to the root, so it is identical too);
* merge: both local methods, each run on both extractions, give one and the same file.
"""
import os

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from conftest import PAIR, ROWS, run_module
from pipelines import checkpoints

METHODS = ("polars", "duckdb")


def _committed_files(root: str) -> list[str]:
    """Paths (relative to ``root``) of everything the pair's extraction committed."""
    window = checkpoints.find_windows(root, PAIR)[0]
    manifest = checkpoints.load_manifest(root, PAIR, window)
    paths = [checkpoints.manifest_path(root, PAIR, window),
             checkpoints.success_path(root, PAIR, window)]
    for entry in manifest.tables:
        for shard in manifest.shard_files(entry):
            paths += [shard, checkpoints.record_path(shard)]
    return sorted(os.path.relpath(p, root) for p in paths)


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def second_extraction(warehouse, tmp_path_factory) -> str:
    """The same extraction as the session's ``extracted``, into a root of its own."""
    root = str(tmp_path_factory.mktemp("ck-again"))
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", root, "--shard-days", "1")
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture(scope="module")
def merges(extracted, second_extraction, tmp_path_factory) -> dict:
    """{(method, 'first'|'second'): training file} for both methods on both roots."""
    out = tmp_path_factory.mktemp("merges")
    paths = {}
    for method in METHODS:
        for name, root in (("first", extracted), ("second", second_extraction)):
            path = str(out / f"{method}-{name}.parquet")
            proc = run_module("pipelines.merge", "--pair", PAIR, "--method", method,
                              "--checkpoint-root", root, "--output", path)
            assert proc.returncode == 0, proc.stderr
            paths[(method, name)] = path
    return paths


def test_extraction_is_byte_identical(extracted, second_extraction):
    files = _committed_files(second_extraction)
    assert files == _committed_files(extracted)
    on_disk = sorted(os.path.relpath(os.path.join(d, f), second_extraction)
                     for d, _dirs, names in os.walk(second_extraction) for f in names)
    assert on_disk == files, "the extraction left something besides what it committed"
    for rel in files:
        first, second = os.path.join(extracted, rel), os.path.join(second_extraction, rel)
        assert _read(first) == _read(second), rel


def test_each_merge_method_is_byte_identical_across_runs(merges):
    for method in METHODS:
        assert _read(merges[(method, "first")]) == _read(merges[(method, "second")]), method


def test_both_methods_write_the_same_bytes(merges):
    assert _read(merges[("polars", "first")]) == _read(merges[("duckdb", "first")])


# --------------------------------------------------------------------------- --compare

def _compare(a: str, b: str, *extra: str):
    return run_module("pipelines.validate", a, "--compare", b, *extra)


def _rewrite(src: str, dst: str, change=lambda t: t, row_group_size: int | None = None) -> str:
    """``src`` with ``change`` applied to its table, written to ``dst`` with the same
    key-value metadata."""
    table = change(pq.read_table(src))
    # The schema's metadata (bqx.training) goes into the footer's key-value metadata.
    pq.write_table(table, dst, row_group_size=row_group_size or table.num_rows)
    assert pq.read_metadata(dst).metadata[b"bqx.training"] == table.schema.metadata[b"bqx.training"]
    return dst


def _set_value(table: pa.Table, name: str, row: int, value) -> pa.Table:
    i = table.schema.get_field_index(name)
    values = table.column(i).to_pylist()
    values[row] = value
    return table.set_column(i, table.schema.field(i), pa.array(values, table.schema.field(i).type))


@pytest.fixture(scope="module")
def training(merges) -> str:
    return merges[("polars", "first")]


def test_compare_equal_files(merges):
    proc = _compare(merges[("polars", "first")], merges[("duckdb", "second")])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("identical: ") and f"{ROWS:,} rows" in proc.stdout


def test_compare_ignores_row_groups_and_treats_nan_as_nan(training, tmp_path):
    """Same content in 500-row row groups, with a NaN in the same place in both."""
    column = pq.read_schema(training).names[60]

    def with_nan(t):
        return _set_value(t, column, 3, float("nan"))
    a = _rewrite(training, str(tmp_path / "a.parquet"), with_nan)
    b = _rewrite(training, str(tmp_path / "b.parquet"), with_nan, row_group_size=500)
    proc = _compare(a, b, "--columns-per-batch", "50")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "(1 and 4 row groups)" in proc.stdout


def test_compare_names_the_first_differing_column_row_group_and_row(training, tmp_path):
    names = pq.read_schema(training).names
    later, earlier = names[300], names[200]

    def changed(t):
        t = _set_value(t, later, 1234, 42.0)
        return _set_value(t, earlier, 1500, None)
    b = _rewrite(training, str(tmp_path / "b.parquet"), changed, row_group_size=500)
    proc = _compare(b, training, "--columns-per-batch", "64")
    assert proc.returncode == 1, proc.stderr
    # Row group by row group: row 1234 (row group 2 of 500-row groups) comes first,
    # although its column is further right.
    assert proc.stdout.startswith(f"different: column {later!r} differs first in row group 2 "
                                  "of the first file (rows 1,000..1,499), at row 1,234: 42.0 vs")


def test_compare_different_column_sets(training, tmp_path):
    dropped = pq.read_schema(training).names[-1]
    b = _rewrite(training, str(tmp_path / "b.parquet"), lambda t: t.drop_columns([dropped]))
    proc = _compare(training, b)
    assert proc.returncode == 1
    assert proc.stdout.startswith("different: the column sets differ")
    assert f"only in the first: {dropped}" in proc.stdout


def test_compare_different_types(training, tmp_path):
    name = pq.read_schema(training).names[60]

    def as_float32(t):
        i = t.schema.get_field_index(name)
        return t.set_column(i, pa.field(name, pa.float32()), pc.cast(t.column(i), pa.float32()))
    b = _rewrite(training, str(tmp_path / "b.parquet"), as_float32)
    proc = _compare(training, b)
    assert proc.returncode == 1
    assert f"column {name!r} is double in the first, float in the second" in proc.stdout


def test_compare_different_row_counts(training, tmp_path):
    b = _rewrite(training, str(tmp_path / "b.parquet"), lambda t: t.slice(0, ROWS - 1))
    proc = _compare(training, b)
    assert proc.returncode == 1
    assert proc.stdout.strip() == f"different: the first has {ROWS:,} rows, the second {ROWS - 1:,}"


def test_compare_different_metadata(training, tmp_path):
    def other_pair(t):
        meta = dict(t.schema.metadata)
        meta[b"bqx.training"] = meta[b"bqx.training"].replace(b'"eurusd"', b'"gbpusd"')
        return t.replace_schema_metadata(meta)
    b = _rewrite(training, str(tmp_path / "b.parquet"), other_pair)
    proc = _compare(training, b)
    assert proc.returncode == 1
    assert "the bqx.training metadata differs in 'pair'" in proc.stdout


@pytest.mark.parametrize("other", ["missing.parquet", "not-parquet.parquet"])
def test_compare_bad_input_exits_2(training, tmp_path, other):
    path = tmp_path / other
    if other.startswith("not"):
        path.write_bytes(b"not parquet at all")
    proc = _compare(training, str(path))
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error: ")] == [
        f"error: {path}: " + ("no such file" if other.startswith("missing")
                              else "not a parquet file (no PAR1 magic bytes)")]
    assert os.listdir(tmp_path) == ([] if other.startswith("missing") else [other])
