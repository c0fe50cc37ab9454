"""A full-width pair straight in checkpoint form, at any row count.

The tables and columns are the sample warehouse's (all 667 tables of the pair, found by
the pipeline's own discovery on a one-day warehouse); the values are generated here with
numpy, so 100,000 rows take seconds per table instead of a full extraction. Some tables
miss 8% of the keys, and the checkpoints are written by the pipeline's own writer.

Float columns are shaped like the real features, so that files compress about as the
real ones do (the workload notes: a 177,748-row training file was 9.27 GB of parquet for
24.2 GB of float64, 0.38 of raw). At 10,000 rows (1.27 GiB of float64) `bench.merge`
measures 0.74 GiB of snappy checkpoints (0.58) and a 0.59 GiB zstd training file (0.46).
15% of float columns hold a few levels (regimes, counts), 40% are price-like random
walks quoted to 5 decimals, the rest noisy indicators to 6 decimals; most start with a
NULL warm-up of a rolling window's length (45 to 2,880 minutes).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import tempfile

import numpy as np
import pyarrow as pa

from pipelines import checkpoints, storage
from pipelines.catalog import load_catalog
from pipelines.errors import PipelineError
from pipelines.extract.plan import discover
from pipelines.sources import DuckDBSource
from pipelines.window import DEFAULT_SHARD_DAYS, UTC, shards, window_from_dates

START = dt.datetime(2025, 1, 6, tzinfo=UTC)
MINUTE_US = 60_000_000


def table_specs(pair: str):
    """The pair's tables as the extract job would discover them in the sample warehouse."""
    from pipelines.sample import build_warehouse

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "layout.duckdb")
        build_warehouse(path, [pair], rows=10, seed=0, log=lambda *a, **k: None)
        source = DuckDBSource(path)
        try:
            return discover(source, load_catalog(), pair)
        finally:
            source.close()


# Warm-up lengths of rolling features (minutes); 0 for features with none.
WARMUPS = np.array([0, 0, 0, 45, 90, 180, 360, 720, 1440, 2880])


def _float_values(rng: np.random.Generator, n: int) -> pa.Array:
    kind = rng.random()
    if kind < 0.15:
        values = rng.integers(0, 8, n).astype(np.float64)
    elif kind < 0.55:
        values = np.round(1.0 + np.cumsum(rng.standard_normal(n)) * 2e-4, 5)
    else:
        values = np.round(rng.standard_normal(n), 6)
    mask = np.zeros(n, dtype=bool)
    mask[:min(n, int(rng.choice(WARMUPS)) * (1 + int(rng.random() < 0.3)) * 2)] = True
    return pa.array(values, mask=mask)


def _column(rng: np.random.Generator, arrow_type: pa.DataType, n: int) -> pa.Array:
    """A column of ``n`` values for a whole table (shards are slices of it, so a
    column keeps its kind across shards)."""
    if pa.types.is_floating(arrow_type):
        return _float_values(rng, n)
    if pa.types.is_integer(arrow_type):
        return pa.array(rng.integers(0, 1000, n), pa.int64())
    if pa.types.is_boolean(arrow_type):
        return pa.array(rng.random(n) < 0.5)
    return pa.array(np.array(["lo", "mid", "hi"])[rng.integers(0, 3, n)], pa.string())


def make_checkpoints(root: str, pair: str, rows: int, seed: int = 0, log=print,
                     shard_days: int = DEFAULT_SHARD_DAYS,
                     tables: int | None = None) -> checkpoints.Manifest:
    """Write a committed extraction of ``pair`` with ``rows`` spine rows under ``root``,
    in shards of ``shard_days`` days (the extraction's ``--shard-days``): the targets and
    every feature table, or the first ``tables`` of them (PipelineError, before anything
    is written, when the pair has fewer)."""
    specs = table_specs(pair)
    if tables is not None:
        if not 0 <= tables <= len(specs) - 1:
            raise PipelineError(f"--tables {tables}: {pair} has {len(specs) - 1} feature tables")
        specs = specs[:1 + tables]  # the targets come first
    days = (rows + 1439) // 1440
    window = window_from_dates(START.date(), (START + dt.timedelta(days=days - 1)).date())
    parts = shards(window, shard_days)
    base = int(START.timestamp() * 1_000_000)
    all_keys = base + np.arange(rows, dtype=np.int64) * MINUTE_US
    rng = np.random.default_rng(seed)
    entries = []
    for n, spec in enumerate(specs):
        schema = checkpoints.output_schema(spec, "interval_time")
        keys = all_keys if spec.group == "targets" or n % 4 else all_keys[rng.random(rows) > 0.08]
        columns = [pa.array(keys).cast(schema.field(0).type)]
        columns += [_column(rng, f.type, len(keys)) for f in list(schema)[1:]]
        whole = pa.Table.from_arrays(columns, schema=schema)
        records = []
        for shard in parts:
            lo = int(shard.start.timestamp() * 1_000_000)
            hi = int(shard.end.timestamp() * 1_000_000)
            first, last = np.searchsorted(keys, [lo, hi])
            table = whole.slice(int(first), int(last - first))
            k = keys[first:last]
            path = checkpoints.shard_path(root, spec.shared, pair, spec.table, shard)
            nbytes, crc = checkpoints.write_shard(table, path)
            records.append({"rows": len(k), "source_rows": len(k), "source_keys": len(k),
                            "duplicates_dropped": 0, "bad_keys_dropped": 0, "bytes": nbytes,
                            "crc32c": crc, "path": checkpoints.relative(root, path)})
        entry = checkpoints.spec_to_json(spec)
        entry.update(shards=records, rows=sum(r["rows"] for r in records))
        entries.append(entry)
        if n % 100 == 0:
            log(f"  synthetic checkpoints: {n + 1}/{len(specs)} tables")
    manifest = checkpoints.Manifest(pair, window, "interval_time", root, entries, source="synthetic",
                                     shard_days=shard_days)
    storage.write_bytes(checkpoints.manifest_path(root, pair, window),
                        json.dumps(manifest.to_json(), sort_keys=True).encode())
    storage.write_bytes(checkpoints.success_path(root, pair, window), b"{}")
    return manifest
