"""``python -m bench.read FILE [--columns 50]``: how fast users read a training file.

Times reading ``--columns`` named feature columns (spread evenly over the file, plus the
key) with pyarrow, Polars and DuckDB, each in a fresh process so that no reader profits
from another's parsed footer. Prints the footer size and row groups too: with ~17,000
columns the footer, which every reader parses whole, is what makes a wide file slow to
open. ``bench.merge`` runs this on the merge's output.
"""
from __future__ import annotations

import argparse
import json
import struct
import subprocess
import sys
import time

READERS = ("pyarrow", "polars", "duckdb")


def pick_columns(path: str, n: int) -> list[str]:
    """The key and ``n`` feature columns spread evenly over the file's schema."""
    import pyarrow.parquet as pq

    names = pq.read_schema(path).names
    features = [c for c in names[1:] if not c.startswith("target_")]
    step = max(1, len(features) // n)
    return [names[0]] + features[::step][:n]


def read_once(reader: str, path: str, columns: list[str]) -> float:
    """Seconds for ``reader`` to read ``columns`` of ``path`` into memory."""
    started = time.perf_counter()
    if reader == "pyarrow":
        import pyarrow.parquet as pq
        rows = pq.read_table(path, columns=columns).num_rows
    elif reader == "polars":
        import polars as pl
        rows = pl.read_parquet(path, columns=columns).height
    elif reader == "duckdb":
        import duckdb
        select = ", ".join('"' + c.replace('"', '""') + '"' for c in columns)
        rows = duckdb.execute(f"SELECT {select} FROM read_parquet(?)", [path]).to_arrow_table().num_rows
    else:
        raise ValueError(reader)
    assert rows > 0
    return time.perf_counter() - started


def footer_bytes(path: str) -> int:
    """The parquet footer's length."""
    with open(path, "rb") as fh:
        fh.seek(-8, 2)
        return struct.unpack("<I", fh.read(4))[0]


def measure(path: str, n: int = 50) -> dict:
    """Footer size, row groups and each reader's seconds (own process each)."""
    import pyarrow.parquet as pq

    columns = pick_columns(path, n)
    result = {"footer_bytes": footer_bytes(path), "row_groups": pq.ParquetFile(path).num_row_groups,
              "columns": len(columns) - 1}
    for reader in READERS:
        out = subprocess.run([sys.executable, "-c",
                              "import sys, json; from bench.read import read_once; "
                              "print(read_once(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])))",
                              reader, path, json.dumps(columns)], capture_output=True, text=True)
        result[reader] = float(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else None
    return result


def describe(m: dict) -> str:
    """One line of :func:`measure`'s figures."""
    times = ", ".join(f"{r} {m[r]:.2f} s" if m[r] is not None else f"{r} failed" for r in READERS)
    return (f"read {m['columns']} named columns: {times} (footer {m['footer_bytes'] / 2**20:.1f} MiB, "
            f"{m['row_groups']} row group(s))")


def main(argv=None) -> int:
    """Print the read figures of a file."""
    p = argparse.ArgumentParser(prog="python -m bench.read", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--columns", type=int, default=50)
    args = p.parse_args(argv)
    m = measure(args.file, args.columns)
    print(describe(m))
    print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
