"""How many spine rows a merge window holds, from the memory budget."""
from __future__ import annotations

import re

import pyarrow as pa

from pipelines.errors import PipelineError

DEFAULT_BUDGET = "1.5GiB"
# Interpreter, pyarrow, polars or duckdb and the open checkpoint readers.
FIXED_OVERHEAD = 400 << 20
# Peak memory per byte of a window's joined result: the window being written, the next
# one being joined, one table's input and the writer's column chunk, allocator slack.
# Measured without the overlap: a 5,760-row full-width window (775 MB) peaked at 1.72 GB
# RSS with the Polars join (1.75 copies); the overlap adds one window.
WINDOW_COPIES = 3.0
MIN_WINDOW, MAX_WINDOW = 256, 65536

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20,
          "mb": 1000 ** 2, "mib": 1 << 20, "g": 1 << 30, "gb": 1000 ** 3, "gib": 1 << 30}


def parse_size(text: str) -> int:
    """Parse sizes like ``1.5GiB``, ``800MB``, ``2G`` or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not m or m.group(2).lower() not in _UNITS:
        raise PipelineError(f"--memory-budget {text!r} is not a size like 1GiB or 800MB")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def row_bytes(schema: pa.Schema) -> int:
    """Approximate in-memory bytes of one row of ``schema``."""
    total = 0
    for field in schema:
        # Strings: offsets plus a short value; booleans count as a byte.
        fixed = pa.types.is_primitive(field.type) and not pa.types.is_boolean(field.type)
        total += field.type.bit_width // 8 if fixed else 24
    return total


def window_rows(schema: pa.Schema, budget: int) -> int:
    """Spine rows per window so that a merge of ``schema`` stays within ``budget``."""
    usable = budget - FIXED_OVERHEAD
    if usable <= 0:
        raise PipelineError(f"--memory-budget {budget} bytes is below the merge's fixed "
                            f"overhead of {FIXED_OVERHEAD >> 20} MiB")
    rows = int(usable // (row_bytes(schema) * WINDOW_COPIES))
    return int(max(MIN_WINDOW, min(MAX_WINDOW, rows)))
