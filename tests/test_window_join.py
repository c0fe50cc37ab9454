"""The two window joins give the same LEFT JOIN, with and without the aligned fast path.

Parts cover the three cases a checkpoint can be in against the spine's keys: exactly the
spine's keys (no join needed), some keys missing (NULLs there), and keys the spine does
not have (dropped). The expected result is computed independently with a dict lookup.
"""
import numpy as np
import pyarrow as pa
import pytest

from pipelines.merge.job import joiner_class

KEY = "interval_time"


def _keys(values) -> pa.Array:
    return pa.array(np.asarray(values, dtype=np.int64) * 60_000_000).cast(pa.timestamp("us", "UTC"))


def _part(name: str, keys) -> pa.Table:
    keys = list(keys)
    return pa.table({KEY: _keys(keys), name: pa.array([float(k) * 10 for k in keys], pa.float64()),
                     f"{name}_n": pa.array([k % 3 for k in keys], pa.int64()),
                     f"{name}_s": pa.array([f"s{k}" for k in keys], pa.string()),
                     f"{name}_b": pa.array([k % 2 == 0 for k in keys], pa.bool_())})


def _expected(spine_keys, parts) -> pa.Table:
    columns = {KEY: _keys(spine_keys), "target": pa.array([float(k) for k in spine_keys])}
    for part in parts:
        rows = {k: i for i, k in enumerate(part.column(0).cast(pa.int64()).to_pylist())}
        for name in part.schema.names[1:]:
            values = part.column(name).to_pylist()
            columns[name] = pa.array([values[rows[k * 60_000_000]] if k * 60_000_000 in rows else None
                                      for k in spine_keys], part.schema.field(name).type)
    return pa.table(columns)


@pytest.mark.parametrize("method", ["polars", "duckdb"])
def test_left_join_of_aligned_sparse_and_extra_keys(tmp_path, method):
    spine_keys = list(range(100, 160))
    spine = pa.table({KEY: _keys(spine_keys), "target": pa.array([float(k) for k in spine_keys])})
    parts = [
        _part("aligned", spine_keys),
        _part("sparse", [k for k in spine_keys if k % 7]),
        _part("aligned2", spine_keys),
        _part("extra", list(range(90, 100)) + spine_keys[::2] + list(range(160, 170))),
        _part("sparse2", spine_keys[5:40]),
        # Read from several shards: one chunk per shard.
        pa.concat_tables([_part("chunked", spine_keys[:20:3]), _part("chunked", spine_keys[30::2])]),
        _part("empty", []),
        _part("disjoint", range(200, 210)),
    ]
    joiner = joiner_class(method)(KEY, None, 1 << 30, str(tmp_path))
    try:
        joined = list(joiner.join(spine.select([KEY]), iter(parts)))
    finally:
        joiner.close()
    columns = [c for t in [spine] + joined for c in t.columns]
    result = pa.Table.from_arrays(columns, names=[n for t in [spine] + joined for n in t.schema.names])
    expected = _expected(spine_keys, parts)
    assert result.schema.names == expected.schema.names
    assert result.cast(expected.schema).equals(expected)
