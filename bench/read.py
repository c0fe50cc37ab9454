"""``python -m bench.read FILE [--columns 50]``: how fast users read a training file.

Times reading ``--columns`` named feature columns (spread evenly over the file, plus the
key) with pyarrow, Polars and DuckDB, each in a fresh process so that no reader profits
from another's parsed footer, and gives each process's peak RSS. Prints the footer size
and row groups too: with ~17,000 columns the footer, which every reader parses whole, is
what makes a wide file slow to open, and with many row groups costly to hold. With
``--polars-size`` it also re-encodes the file's columns with Polars' writer (its
defaults), a batch of columns at a time so that memory stays bounded at any row count,
and compares the column data: is the file larger than Polars would write the same frame?
``bench.merge`` runs this on the merge's output.
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


def own_peak_rss() -> int:
    """This process's peak RSS in bytes since it started its program (VmHWM).

    Not ``getrusage``'s ``ru_maxrss``: Linux carries a forked child's starting RSS, which
    is its parent's, into it across exec, so a reader started by a large process (such as
    ``bench.merge`` after generating its data) would report the parent's size."""
    from bench.memory import status_bytes

    return status_bytes(("VmHWM",))["VmHWM"]


def measure(path: str, n: int = 50) -> dict:
    """Footer size, row groups, each reader's seconds and its process's peak RSS in bytes
    (``peak_rss``; own process each)."""
    import pyarrow.parquet as pq

    columns = pick_columns(path, n)
    result = {"footer_bytes": footer_bytes(path), "row_groups": pq.ParquetFile(path).num_row_groups,
              "columns": len(columns) - 1, "peak_rss": {}}
    for reader in READERS:
        out = subprocess.run([sys.executable, "-c",
                              "import sys, json; from bench.read import read_once, own_peak_rss; "
                              "s = read_once(sys.argv[1], sys.argv[2], json.loads(sys.argv[3])); "
                              "print(json.dumps([s, own_peak_rss()]))",
                              reader, path, json.dumps(columns)], capture_output=True, text=True)
        seconds, rss = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else (None, None)
        result[reader], result["peak_rss"][reader] = seconds, rss
    return result


def column_bytes(metadata) -> int:
    """Compressed bytes of every column chunk of a parquet file's metadata."""
    return sum(chunk_bytes(metadata).values())


def chunk_bytes(metadata) -> dict[str, int]:
    """Compressed bytes of each column of a parquet file's metadata (all row groups)."""
    sizes: dict[str, int] = {}
    for g in range(metadata.num_row_groups):
        group = metadata.row_group(g)
        for c in range(metadata.num_columns):
            name = metadata.schema.column(c).path
            sizes[name] = sizes.get(name, 0) + group.column(c).total_compressed_size
    return sizes


def polars_size(path: str, columns_per_batch: int = 1000) -> dict:
    """Column-chunk bytes of ``path`` against those of Polars' writer (defaults) for the
    same columns and rows, written ``columns_per_batch`` columns at a time, in total and
    per column type (``by_type``: type -> [ours, Polars'])."""
    import io

    import polars as pl
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    names = pf.schema_arrow.names
    types = {f.name: str(f.type) for f in pf.schema_arrow}
    ours = chunk_bytes(pf.metadata)
    by_type: dict[str, list[int]] = {}
    for first in range(0, len(names), columns_per_batch):
        frame = pl.read_parquet(path, columns=names[first:first + columns_per_batch])
        sink = io.BytesIO()
        frame.write_parquet(sink)
        del frame
        theirs = chunk_bytes(pq.ParquetFile(io.BytesIO(sink.getvalue())).metadata)
        for name, size in theirs.items():
            pair = by_type.setdefault(types.get(name, "nested"), [0, 0])
            pair[0] += ours.get(name, 0)
            pair[1] += size
    return {"ours": sum(ours.values()), "polars": sum(p[1] for p in by_type.values()),
            "by_type": by_type}


def describe_size(s: dict) -> str:
    """One line of :func:`polars_size`'s figures."""
    line = (f"column data {s['ours']:,} bytes; Polars' writer makes {s['polars']:,} bytes "
            f"of the same columns (ours is {100 * (s['ours'] / s['polars'] - 1):+.3f}%)")
    if s.get("by_type"):
        # Largest differences first: what a size gap comes from.
        parts = sorted(s["by_type"].items(), key=lambda kv: -abs(kv[1][0] - kv[1][1]))
        line += "; by type, ours minus Polars': " + ", ".join(
            f"{t} {o - p:+,} bytes ({100 * (o / p - 1):+.2f}%)" for t, (o, p) in parts if p)
    return line


def describe(m: dict) -> str:
    """One line of :func:`measure`'s figures."""
    rss = m.get("peak_rss", {})
    times = ", ".join(f"{r} {m[r]:.2f} s" + (f" ({rss[r] / 2**20:.0f} MiB)" if rss.get(r) else "")
                      if m[r] is not None else f"{r} failed" for r in READERS)
    return (f"read {m['columns']} named columns (peak RSS): {times} (footer {m['footer_bytes'] / 2**20:.1f} MiB, "
            f"{m['row_groups']} row group(s))")


def main(argv=None) -> int:
    """Print the read figures of a file."""
    p = argparse.ArgumentParser(prog="python -m bench.read", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("file")
    p.add_argument("--columns", type=int, default=50)
    p.add_argument("--polars-size", action="store_true",
                   help="also compare the column data with Polars' writer's for the same frame")
    args = p.parse_args(argv)
    m = measure(args.file, args.columns)
    print(describe(m))
    if args.polars_size:
        m["size"] = polars_size(args.file)
        print(describe_size(m["size"]))
    print(json.dumps(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
