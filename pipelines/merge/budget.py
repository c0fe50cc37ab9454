"""The merge's shape from its memory budget: row-group rows and column batches."""
from __future__ import annotations

import re

import pyarrow as pa

from pipelines.errors import PipelineError

DEFAULT_BUDGET = "1.5GiB"
# Interpreter, pyarrow, polars or duckdb and the open checkpoint readers.
FIXED_OVERHEAD = 400 << 20
# Rows per row group of the training file (whole shards up to this many). Large on
# purpose: the footer grows by ~1.3 MiB per row group at 17,000 columns, and readers
# parse all of it; 131,072 float64 rows make 1 MiB column chunks.
ROW_GROUP_ROWS = 131_072
# Memory budget per byte of one column batch. Measured for the earlier writer, which took
# a whole batch at a time: 4.0 gave 1.67 GiB peak RSS for a 1.5 GiB budget (100,000 rows,
# full width, polars), 4.6 batches being alive at the peak. The streaming writer holds
# pieces, not batches, and peaked at 473-485 MiB with this value and the default
# budget (BENCHMARKS.md, "Streaming writer"), so it is now a wide margin.
BATCH_COPIES = 5.5
# A table larger than this share of a batch is read in slices of columns of at most it,
# and reads run ahead of the join by as many bytes: a slice read, decoded and joined
# exists up to three times at once, so its size is what reading costs in memory.
SLICES_PER_BATCH = 16
# Pieces of a batch's bytes that the writer encodes at once (TrainingFileWriter's
# piece_bytes); it holds a fixed number of them, so they bound what it holds.
PIECES_PER_BATCH = 24

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1000 ** 2, "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_size(text: str, option: str = "--memory-budget") -> int:
    """Parse sizes like ``1.5GiB``, ``800MB``, ``2G`` or a plain byte count (the value
    of ``option``, which an error names)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PipelineError(f"{option} {text!r} is not a size like 1GiB or 800MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def column_bytes(field: pa.Field) -> int:
    """Approximate in-memory bytes of one value of ``field``."""
    # Strings: offsets plus a short value; booleans count as a byte.
    fixed = pa.types.is_primitive(field.type) and not pa.types.is_boolean(field.type)
    return field.type.bit_width // 8 if fixed else 24


def _usable(budget: int) -> int:
    usable = budget - FIXED_OVERHEAD
    if usable <= 0:
        raise PipelineError(f"--memory-budget {budget} bytes is below the merge's fixed "
                            f"overhead of {FIXED_OVERHEAD >> 20} MiB")
    return usable


def pack(sizes: list[float], limit: float) -> list[int]:
    """Cut consecutive items into runs whose sizes add up to at most ``limit`` (an item
    larger than that is a run of its own); returns the item count of each run."""
    runs: list[int] = []
    total = 0.0
    for size in sizes:
        if runs and total + size <= limit:
            runs[-1] += 1
            total += size
        else:
            runs.append(1)
            total = size
    return runs


def column_batches(tables: list[list[int]], rows: int, limit: float) -> list[list[tuple[int, int, int]]]:
    """Cut the tables' columns into column batches of at most ``limit`` bytes (see
    :func:`batch_bytes`) for ``rows`` rows.

    ``tables[i]`` holds the bytes per row of each column table ``i`` adds to the output
    (table 0, the spine, adds its targets; the others their features; the key column
    is not among them). A batch is a list of runs ``(table, start, stop)``, the table's
    columns ``start:stop``, in output order.

    A table larger than a slice (:data:`SLICES_PER_BATCH`) is cut into slices of at
    most that: read whole, a wide table (232 columns, 186 MB at 100,000 rows) landed
    that much memory at once, and reading's memory followed the row count. The spine is
    cut too: read whole, it was the one read not bounded by a slice (49 targets, 40 MB at
    100,000 rows); a column larger than a slice is a slice of its own."""
    runs: list[tuple[int, int, int]] = []
    sizes: list[float] = []
    for table, columns in enumerate(tables):
        bytes_ = [per_row * rows for per_row in columns]
        # A table without columns of its own is still read: its shards are checked.
        counts = pack(bytes_, limit / SLICES_PER_BATCH) or [0]
        start = 0
        for count in counts:
            runs.append((table, start, start + count))
            sizes.append(sum(bytes_[start:start + count]))
            start += count
    batches, first = [], 0
    for count in pack(sizes, limit):
        batches.append(runs[first:first + count])
        first += count
    return batches


def batch_bytes(budget: int, largest: int | None = None) -> float:
    """The bytes of one column batch of a merge within ``budget``, at most ``largest``
    (the merge's --column-batch-size) when given. Slices, reads ahead and the writer's
    pieces are shares of it (:data:`SLICES_PER_BATCH`, :data:`PIECES_PER_BATCH`)."""
    if largest is not None and largest <= 0:
        raise PipelineError(f"--column-batch-size must be more than 0 bytes, not {largest}")
    usable = _usable(budget) / BATCH_COPIES
    return usable if largest is None else min(usable, largest)


def validation_columns(rows: int, limit: float) -> int:
    """Columns per read when validating row groups of ``rows`` rows: a slice's worth
    (:data:`SLICES_PER_BATCH`) of a column batch of ``limit`` bytes (see
    :func:`batch_bytes`), by :func:`pipelines.validate.columns_per_read`. A whole batch's
    worth made the validation the merge's peak at 100,000 rows (``python -m
    bench.memory`` puts each peak in its stage)."""
    from pipelines.validate import columns_per_read

    return columns_per_read(rows, limit / SLICES_PER_BATCH)
