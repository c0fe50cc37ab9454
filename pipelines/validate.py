"""Validate a training parquet file and report its NULL rates, key health and layout.

``python -m pipelines.validate PATH [--report PATH] [--quiet]``

``python -m pipelines.validate A --compare B`` instead compares two parquet files'
content (columns, types, rows, every value, the ``bqx.training`` metadata), streaming
both row group by row group in column batches, and prints ``identical`` or the first
difference (column, row group and row): exit 0 same content, 1 different, 2 bad input.

The training file is too wide to load (about 100K rows x 17K columns, ~13 GB dense), so
it is read one row group at a time and, inside a row group, in batches of columns: by
default as many as :data:`READ_BYTES` of float64 values hold (:func:`columns_per_read`),
or ``columns_per_batch``. Everything kept between batches is a few integers per column,
so memory stays at one batch whatever the size of the file.

The merge writes ``bqx.training`` JSON into the parquet key-value metadata (pair, window,
spine row count and digest, target names, feature tables in output order); the checks
compare the file against it. :class:`KeyDigest` is the one definition of the spine
digest, so the merge imports it from here instead of re-implementing it.

Exit status: 0 pass, 1 hard failure, 2 file missing/unreadable/not parquet.
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import struct
import sys
from collections import defaultdict
from typing import Any, Iterable

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.cli import ArgumentParser
from pipelines.errors import PipelineError, first_line

METADATA_KEY = b"bqx.training"
METADATA_FORMAT = 1
DEFAULT_KEY = "interval_time"
TARGET_PREFIX = "target_"
TARGETS_FAMILY = "targets"
# Columns past the metadata's tables (count mismatch) still get counted somewhere.
UNASSIGNED_FAMILY = "unassigned"
NULL_WARN_RATE = 0.10
# Decoded bytes per read (a batch of columns of one row group) unless a column count is
# given. A fixed 2,000 columns were 1.6 GB per read in a 100,000-row file and took the
# validator to 3.1 GiB peak RSS, past the 2 GiB merge job; 16 columns took it to 0.22
# GiB and were faster (BENCHMARKS.md, "Where the peak falls").
READ_BYTES = 16 << 20
MAX_COLUMNS_PER_READ = 2000
# Migration leftovers showed up as 1970-01-01 keys; nothing real predates this.
_PLAUSIBLE_KEY_START = dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc)
_EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.timezone.utc)
_EXPECTED_KEYS = {"spine_rows", "spine_digest", "pair"}
# A training set exported in parts (pipelines/merge/bigquery.py): a folder (or gs://
# prefix) with part-NN/*.parquet and a _layout.json written last.
PARTS_LAYOUT = "bqx.training.parts"
LAYOUT_FILE = "_layout.json"
# How many names a single warning/failure line lists before summarising the rest.
_MAX_NAMES = 10


# --------------------------------------------------------------------------- digest

class KeyDigest:
    """CRC32C of the key column: int64 microseconds, little-endian, in row order.

    Feed it the key arrays in file order (one call per batch or row group); the result
    does not depend on how the rows were split. NULL keys are hashed as 0 (a file with
    NULL keys fails validation anyway).
    """

    def __init__(self) -> None:
        self._crc = google_crc32c.Checksum()
        self.rows = 0

    def update(self, keys: pa.Array | pa.ChunkedArray) -> "KeyDigest":
        """Add a timestamp array (any unit; converted to microseconds) and return self."""
        micros = key_micros(keys)
        self._crc.update(micros.astype("<i8", copy=False).tobytes())
        self.rows += len(micros)
        return self

    def hexdigest(self) -> str:
        """The digest so far as 8 lower-case hex characters."""
        return self._crc.hexdigest().decode("ascii")


def key_digest(state: KeyDigest | None, key_array: pa.Array | pa.ChunkedArray) -> KeyDigest:
    """Functional form of :class:`KeyDigest`: ``state = key_digest(state, keys)``.

    Pass None the first time; read the result with ``state.hexdigest()``.
    """
    if state is None:
        state = KeyDigest()
    return state.update(key_array)


def key_micros(keys: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The key values as an int64 numpy array of microseconds since the epoch (NULL -> 0).

    Raises TypeError for a non-timestamp array, because a digest over some other
    encoding would silently never match the merge's.
    """
    if not pa.types.is_timestamp(keys.type):
        raise TypeError(f"key must be a timestamp array, got {keys.type}")
    if keys.type.unit != "us":
        # Truncating ns is deliberate: the contract is microseconds, as BigQuery stores.
        keys = pc.cast(keys, pa.timestamp("us", tz=keys.type.tz), safe=False)
    ints = pc.cast(keys, pa.int64())
    if ints.null_count:
        ints = pc.fill_null(ints, 0)
    if isinstance(ints, pa.ChunkedArray):
        ints = ints.combine_chunks() if ints.num_chunks != 1 else ints.chunk(0)
    return ints.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)


# --------------------------------------------------------------------------- report

@dataclasses.dataclass
class Report:
    """The outcome of :func:`validate_file`; ``to_dict()`` is the JSON report."""

    path: str
    ok: bool = False
    hard_failures: list[str] = dataclasses.field(default_factory=list)
    warnings: list[str] = dataclasses.field(default_factory=list)
    file_bytes: int = 0
    footer_bytes: int = 0
    rows: int = 0
    columns: int = 0
    row_groups: int = 0
    layout: str = "unknown"  # "bqx.training" when the merge's metadata was found
    pair: str | None = None
    method: str | None = None
    window: dict | None = None
    key: str = DEFAULT_KEY
    key_min: str | None = None
    key_max: str | None = None
    key_nulls: int = 0
    duplicate_keys: int = 0
    unordered_keys: int = 0
    key_digest: str | None = None
    spine_rows: int | None = None
    spine_digest: str | None = None
    families: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    target_null_rates: dict[str, float] = dataclasses.field(default_factory=dict)
    infinities: dict[str, Any] = dataclasses.field(
        default_factory=lambda: {"total": 0, "by_family": {}})
    tables: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    all_null_columns: list[str] = dataclasses.field(default_factory=list)
    # How the values were checked: "read" (every column read back) or "counted while
    # writing" (the merge's counts, with a sample of columns read back and compared).
    content_check: str = "read"
    # Multi-part training sets (the bigquery merge): one entry per part.
    parts: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict of every field."""
        return dataclasses.asdict(self)

    def write_json(self, path: str | os.PathLike) -> None:
        """Write the report as JSON, atomically: readers never see a half-written file."""
        from pipelines import storage

        body = json.dumps(self.to_dict(), indent=2) + "\n"
        storage.write_bytes(os.fspath(path), body.encode("utf-8"))

    def summary(self) -> str:
        """A readable multi-line summary ending in PASS or FAIL (failures never cut)."""
        lines = [
            f"{self.path}",
            f"  {self.rows:,} rows x {self.columns:,} columns, {self.row_groups:,} row groups, "
            f"file {_human_bytes(self.file_bytes)}, footer {_human_bytes(self.footer_bytes)}",
        ]
        if self.content_check != "read":
            lines.append(f"  values: {self.content_check}")
        if self.layout in ("bqx.training", PARTS_LAYOUT):
            window = ""
            if self.window:
                window = f", window {self.window.get('start')} .. {self.window.get('end')}"
            method = f", method {self.method}" if self.method else ""
            lines.append(f"  pair {self.pair}{method}{window}")
            for part in self.parts:
                lines.append(f"  {part['path']}: {part['rows']:,} rows x {part['columns']:,} "
                             f"columns in {part['files']} file(s)"
                             f"{'' if part['key_ordered'] else ', not in key order'}")
        else:
            lines.append("  layout unknown (no bqx.training metadata)")
        if self.key_min is not None:
            lines.append(f"  key {self.key}: {self.key_min} .. {self.key_max}, "
                         f"digest {self.key_digest}")
        else:
            lines.append(f"  key {self.key}: no values")

        lines.append("")
        width = max([len("family"), len("total")] + [len(f) for f in self.families])
        lines.append(f"  {'family':<{width}}  {'tables':>6}  {'columns':>9}  {'NULL %':>7}"
                     f"  {'inf':>9}")
        tot_cols = tot_cells = tot_nulls = 0
        for fam, st in self.families.items():
            tables = "-" if st["tables"] is None else f"{st['tables']:,}"
            lines.append(f"  {fam:<{width}}  {tables:>6}  {st['columns']:>9,}  "
                         f"{100 * st['null_rate']:>7.2f}  {st['infinities']:>9,}")
            tot_cols += st["columns"]
            tot_cells += st["cells"]
            tot_nulls += st["nulls"]
        rate = tot_nulls / tot_cells if tot_cells else 0.0
        lines.append(f"  {'total':<{width}}  {'':>6}  {tot_cols:>9,}  {100 * rate:>7.2f}"
                     f"  {self.infinities['total']:>9,}")

        lines.append("")
        worst = sorted(((r, t) for t, r in self.target_null_rates.items() if r > 0),
                       key=lambda x: (-x[0], x[1]))[:5]
        if not self.target_null_rates:
            lines.append("  targets: none found")
        elif not worst:
            lines.append(f"  targets: no NULLs in {len(self.target_null_rates)} targets")
        else:
            lines.append("  targets with the highest NULL rate:")
            for r, t in worst:
                lines.append(f"    {t}  {100 * r:.2f}%")
        worst_tables = sorted((t for t in self.tables if t["null_rate"] > 0),
                              key=lambda t: (-t["null_rate"], t["table"]))[:5]
        if worst_tables:
            lines.append("  tables with the highest NULL rate:")
            for t in worst_tables:
                lines.append(f"    {t['table']} ({t['group']})  {100 * t['null_rate']:.2f}%")
        inf = self.infinities
        if inf["total"]:
            parts = ", ".join(f"{f} {n:,}" for f, n in inf["by_family"].items() if n)
            lines.append(f"  infinities: {inf['total']:,} ({parts})")
        else:
            lines.append("  infinities: 0")

        if self.warnings:
            lines.append("")
            lines.append(f"  warnings ({len(self.warnings)}):")
            lines.extend(f"    - {w}" for w in self.warnings)
        lines.append("")
        lines.append(self.verdict())
        return "\n".join(lines)

    def verdict(self) -> str:
        """``PASS`` or ``FAIL`` followed by every hard failure on its own line."""
        if self.ok:
            return "PASS"
        n = len(self.hard_failures)
        out = [f"FAIL ({n} hard failure{'s' if n != 1 else ''})"]
        out.extend(f"  - {f}" for f in self.hard_failures)
        return "\n".join(out)


# --------------------------------------------------------------------------- layout

@dataclasses.dataclass
class _Layout:
    key: str
    targets: list[str]  # expected target names
    known: bool
    family_of: list[str | None]  # per column position; None for the key
    table_of: list[int | None]  # per column position: index into tables
    tables: list[dict]
    family_tables: dict[str, int | None]


def _read_metadata(pf: pq.ParquetFile, report: Report) -> dict | None:
    kv = pf.metadata.metadata or {}
    raw = kv.get(METADATA_KEY)
    if raw is None:
        return None
    try:
        meta = json.loads(raw)
    except ValueError as e:
        report.hard_failures.append(f"bqx.training metadata is not valid JSON ({e})")
        return None
    problem = _metadata_problem(meta)
    if problem:
        report.hard_failures.append(f"bqx.training metadata is malformed: {problem}")
        return None
    return meta


def _metadata_problem(meta: Any) -> str | None:
    if not isinstance(meta, dict):
        return "not a JSON object"
    if meta.get("format") != METADATA_FORMAT:
        return f"format {meta.get('format')!r}, this validator reads format {METADATA_FORMAT}"
    targets = meta.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return "'targets' is not a list of column names"
    tables = meta.get("tables")
    if not isinstance(tables, list):
        return "'tables' is not a list"
    for i, t in enumerate(tables):
        if (not isinstance(t, dict) or not isinstance(t.get("table"), str)
                or not isinstance(t.get("group"), str)
                or not isinstance(t.get("columns"), int) or t["columns"] < 0):
            return f"tables[{i}] needs 'table', 'group' and a non-negative int 'columns'"
    if "spine_rows" in meta and not isinstance(meta["spine_rows"], int):
        return "'spine_rows' is not an integer"
    return None


def _plan_layout(names: list[str], meta: dict | None, report: Report) -> _Layout:
    key = (meta or {}).get("key") or DEFAULT_KEY
    n = len(names)
    family_of: list[str | None] = [None] * n
    table_of: list[int | None] = [None] * n

    if meta is None:
        targets = [c for c in names if c.startswith(TARGET_PREFIX) and c != key]
        for i, c in enumerate(names):
            if c == key:
                continue
            family_of[i] = TARGETS_FAMILY if c in targets else c.split("_", 1)[0]
        fam_tables: dict[str, int | None] = {f: None for f in family_of if f is not None}
        if targets:
            fam_tables[TARGETS_FAMILY] = 1
        return _Layout(key, targets, False, family_of, table_of, [], fam_tables)

    targets = list(meta["targets"])
    target_set = set(targets)
    tables = meta["tables"]
    fam_tables = {TARGETS_FAMILY: 1}
    for t in tables:
        fam_tables[t["group"]] = fam_tables.get(t["group"], 0) + 1

    feature_pos = []
    for i, c in enumerate(names):
        if c == key:
            continue
        if c in target_set:
            family_of[i] = TARGETS_FAMILY
        else:
            feature_pos.append(i)

    # Features are positional: table i's columns follow table i-1's.
    cursor = 0
    for ti, t in enumerate(tables):
        for pos in feature_pos[cursor:cursor + t["columns"]]:
            family_of[pos] = t["group"]
            table_of[pos] = ti
        cursor += t["columns"]
    for pos in feature_pos[cursor:]:
        family_of[pos] = UNASSIGNED_FAMILY
    if len(feature_pos) > cursor:
        fam_tables[UNASSIGNED_FAMILY] = 0

    expected_cols = 1 + len(targets) + cursor
    if len(names) != expected_cols or len(feature_pos) != cursor:
        report.hard_failures.append(
            f"column count mismatch: the file has {len(names):,} columns "
            f"({len(feature_pos):,} feature columns), the metadata describes {expected_cols:,} "
            f"(key + {len(targets):,} targets + {cursor:,} feature columns in "
            f"{len(tables):,} tables)")
    # Each feature column is named <stem>_<column>, so a column outside its table's
    # prefix pinpoints where the layout first drifts; later tables would all follow.
    start = 0
    for t in tables:
        stem = t.get("stem")
        block = [names[p] for p in feature_pos[start:start + t["columns"]]]
        start += t["columns"]
        if not isinstance(stem, str) or not stem:
            continue
        strays = [c for c in block if not c.startswith(stem + "_")]
        if strays:
            report.hard_failures.append(
                f"columns of table {t['table']} do not follow the metadata: its positions "
                f"hold {_name_list(strays)}, not named {stem + '_*'!r}")
            break

    if targets and names[1:1 + len(targets)] != targets:
        present = [c for c in targets if c in names]
        if present:
            report.warnings.append(
                f"targets are not columns 1..{len(targets)} in the metadata's order")
    return _Layout(key, targets, True, family_of, table_of, tables, fam_tables)


# --------------------------------------------------------------------------- key checks

class _KeyChecker:
    """Streaming order/uniqueness checks over the key, row group by row group."""

    def __init__(self, window: tuple[int, int] | None):
        self.prev: int | None = None
        self.row = 0
        self.nulls = 0
        self.duplicates = 0
        self.unordered = 0
        self.first_duplicate: tuple[int, int] | None = None  # (row, value)
        self.first_unordered: tuple[int, int, int] | None = None  # (row, prev, value)
        self.min: int | None = None
        self.max: int | None = None
        self.window = window
        self.outside_window = 0
        self.implausible = 0
        self.digest = KeyDigest()

    def feed(self, keys: pa.ChunkedArray) -> None:
        self.digest.update(keys)
        vals = key_micros(keys)
        nrows = len(vals)
        if keys.null_count:
            self.nulls += keys.null_count
            valid = np.asarray(pc.is_valid(keys).to_numpy(), dtype=bool)
            idx = np.flatnonzero(valid) + self.row
            vals = vals[valid]
        else:
            idx = np.arange(self.row, self.row + nrows)
        self.row += nrows
        if len(vals) == 0:
            return
        lo, hi = int(vals.min()), int(vals.max())
        self.min = lo if self.min is None else min(self.min, lo)
        self.max = hi if self.max is None else max(self.max, hi)
        if self.window is not None:
            self.outside_window += int(np.count_nonzero(
                (vals < self.window[0]) | (vals >= self.window[1])))
        self.implausible += int(np.count_nonzero(vals < _micros(_PLAUSIBLE_KEY_START)))

        # The previous batch's last key joins the comparison so that a duplicate or
        # step back across a row-group boundary is caught too.
        if self.prev is not None:
            vals = np.concatenate(([self.prev], vals))
            idx = np.concatenate(([idx[0] - 1], idx))
        self.prev = int(vals[-1])
        before, after = vals[:-1], vals[1:]
        dup = after == before
        back = after < before
        nd, nb = int(np.count_nonzero(dup)), int(np.count_nonzero(back))
        if nd:
            self.duplicates += nd
            if self.first_duplicate is None:
                j = int(np.argmax(dup))
                self.first_duplicate = (int(idx[j + 1]), int(after[j]))
        if nb:
            self.unordered += nb
            if self.first_unordered is None:
                j = int(np.argmax(back))
                self.first_unordered = (int(idx[j + 1]), int(before[j]), int(after[j]))


# --------------------------------------------------------------------------- validation

@dataclasses.dataclass
class ColumnCounts:
    """NULLs and infinities per column of a file, counted by its writer from the very
    arrays it encoded, and the columns to read back to check that the file holds them.

    With these, validation need not decode every value again (for a full pair that
    second pass cost as much as a third of the merge): it reads the key column and the
    ``check_columns`` (the merge names the first and last column of every column batch
    it wrote, so every assembled piece of the file is decoded once) and compares.
    """

    nulls: np.ndarray
    infs: np.ndarray
    check_columns: list[str]


def columns_per_read(rows: int, nbytes: float = READ_BYTES) -> int:
    """Columns to decode at once from row groups of ``rows`` rows: as many float64 columns
    as ``nbytes`` hold, 16 at least (fewer makes reads slow) and 2,000 at most."""
    return int(max(16, min(MAX_COLUMNS_PER_READ, nbytes / (max(rows, 1) * 8))))


def _checked_arguments(expected: dict | None, columns_per_batch: int | None) -> dict:
    """The library's arguments checked before any file is opened: ``expected`` as a
    dict of known keys only, and ``columns_per_batch`` None or at least 1 (ValueError)."""
    expected = dict(expected or {})
    unknown = set(expected) - _EXPECTED_KEYS
    if unknown:
        raise ValueError(f"unknown expected keys {sorted(unknown)}; "
                         f"allowed: {sorted(_EXPECTED_KEYS)}")
    if columns_per_batch is not None and columns_per_batch < 1:
        raise ValueError("columns_per_batch must be at least 1")
    return expected


def _columns_per_read(pf: pq.ParquetFile, columns_per_batch: int | None) -> int:
    """``columns_per_batch``, or when None :func:`columns_per_read` for ``pf``'s largest
    row group."""
    if columns_per_batch is not None:
        return columns_per_batch
    meta = pf.metadata
    return columns_per_read(max((meta.row_group(i).num_rows for i in range(meta.num_row_groups)),
                                default=0))


def validate_file(path: str | os.PathLike, expected: dict | None = None,
                  columns_per_batch: int | None = None,
                  counted: ColumnCounts | None = None) -> Report:
    """Validate the training parquet file at ``path`` and return a :class:`Report`.

    Reads one row group at a time, in batches of at most ``columns_per_batch`` columns
    (default: :func:`columns_per_read` of the file's largest row group). ``expected``
    may hold ``spine_rows``, ``spine_digest`` and ``pair``; each takes precedence over
    the file's own ``bqx.training`` metadata. ``counted`` (from the file's writer, see
    :class:`ColumnCounts`) replaces the full read of the values by a read of its check
    columns compared with its counts. Raises PipelineError when
    the file is missing, unreadable or not parquet; problems with its contents are
    hard failures or warnings in the report, never exceptions.
    """
    expected = _checked_arguments(expected, columns_per_batch)
    path = os.fspath(path)
    if is_training_set(path):
        return validate_training_set(path, expected, columns_per_batch)
    report = Report(path=path)
    report.file_bytes, report.footer_bytes = _check_parquet_file(path)
    with _open_parquet(path) as pf:
        return _validate_parquet(pf, path, report, expected, columns_per_batch, counted)


@contextlib.contextmanager
def _open_parquet(path: str):
    """A ParquetFile of the local or ``gs://`` file ``path``; a PipelineError if its
    footer cannot be read."""
    source = None
    try:
        if _is_gcs(path):
            # Ranged reads of an object: pre-buffering coalesces a batch's column chunks
            # into a few requests instead of one per column (17,000 per row group).
            from pipelines import storage

            source = storage.open_input(path)
            pf = pq.ParquetFile(source, pre_buffer=True)
        else:
            pf = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as e:
        if source is not None:
            source.close()
        raise PipelineError(f"{path}: cannot read parquet footer: {first_line(e)}") from None
    try:
        yield pf
    finally:
        pf.close(force=True)


def _validate_parquet(pf: pq.ParquetFile, path: str, report: Report, expected: dict,
                      columns_per_batch: int | None, counted: ColumnCounts | None = None) -> Report:
    """The checks of :func:`validate_file` on the open file ``pf``."""
    columns_per_batch = _columns_per_read(pf, columns_per_batch)
    names = pf.schema_arrow.names
    report.columns = len(names)
    report.rows = pf.metadata.num_rows
    report.row_groups = pf.num_row_groups

    meta = _read_metadata(pf, report)
    if meta is not None:
        report.layout = "bqx.training"
        report.pair = meta.get("pair")
        report.method = meta.get("method")
        report.window = meta.get("window") if isinstance(meta.get("window"), dict) else None
    else:
        report.warnings.append(
            "no bqx.training metadata: layout unknown; families are column-name prefixes "
            "and targets are the columns starting 'target_'")
    layout = _plan_layout(names, meta, report)
    report.key = layout.key
    _check_expectations(report, meta, expected)
    _check_columns(report, names, layout, pf.schema_arrow)

    key_pos = names.index(layout.key) if layout.key in names else None
    key_ok = key_pos is not None and pa.types.is_timestamp(pf.schema_arrow.field(key_pos).type)
    checker = _KeyChecker(_window_micros(report.window))
    nulls = np.zeros(len(names), dtype=np.int64)
    infs = np.zeros(len(names), dtype=np.int64)
    positions: dict[str, list[int]] = defaultdict(list)
    for i, c in enumerate(names):
        positions[c].append(i)
    # Unique names: asking for a duplicated name returns every column that has it.
    if counted is None:
        others = list(dict.fromkeys(c for c in names if c != layout.key))
    else:
        others = list(dict.fromkeys(c for c in counted.check_columns if c != layout.key and c in positions))
    batches = [others[i:i + columns_per_batch]
               for i in range(0, len(others), columns_per_batch)]

    for rg in range(pf.num_row_groups):
        if key_ok:
            keys = _read(pf, rg, [layout.key], path).column(0)
            checker.feed(keys)
            del keys
        _scan_row_group(pf, rg, batches, positions, nulls, infs, path)
    if counted is not None:
        nulls, infs = _compare_counts(report, names, others, positions, nulls, infs, counted)

    if key_ok:
        _key_results(report, checker, expected, meta)
    _aggregate(report, names, layout, nulls, infs)
    report.ok = not report.hard_failures
    return report


# --------------------------------------------------------------------------- training sets in parts

def is_training_set(path: str) -> bool:
    """True when ``path`` is a folder or ``gs://`` prefix holding a ``_layout.json``
    (a training set exported in parts) rather than one parquet file."""
    from pipelines import storage

    path = os.fspath(path)
    if path.endswith(".parquet"):
        return False
    if storage.is_gcs(path):
        return path.endswith("/") or storage.exists(storage.join(path, LAYOUT_FILE))
    return os.path.isdir(path)


def _layout_problem(doc: Any) -> str | None:
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("layout") != PARTS_LAYOUT:
        return f"layout {doc.get('layout')!r}, expected {PARTS_LAYOUT!r}"
    parts = doc.get("parts")
    if not isinstance(parts, list) or not parts:
        return "'parts' is not a non-empty list"
    for i, p in enumerate(parts):
        if (not isinstance(p, dict) or not isinstance(p.get("path"), str)
                or not isinstance(p.get("columns"), list)
                or not all(isinstance(c, str) for c in p["columns"]) or not p["columns"]):
            return f"parts[{i}] needs 'path' and a non-empty list of 'columns'"
    return _metadata_problem(doc)


def validate_training_set(path: str | os.PathLike, expected: dict | None = None,
                          columns_per_batch: int | None = None) -> Report:
    """Validate a training set exported in parts as one training set.

    Layout (pipelines/merge/bigquery.py): ``{path}/_layout.json`` (written last) lists the
    parts in order, each ``{path}/{part}/*.parquet`` with the key first and then its own
    columns; the training set's columns are part 0's followed by every other part's
    columns without the key. Every part must hold the same keys (compared after sorting:
    a part's files need not be in key order, and the parts need not share a row order;
    both are reported as warnings since the parts are joined on the key). Files are read
    one at a time, row group by row group, ``columns_per_batch`` columns at once (default:
    :func:`columns_per_read` of each file's largest row group); what is
    kept between files is the key column of two parts and a few integers per column.
    """
    from pipelines import storage

    expected = _checked_arguments(expected, columns_per_batch)
    root = os.fspath(path)
    root = root.rstrip("/") if root.rstrip("/") else root
    report = Report(path=root + "/")
    layout_path = storage.join(root, LAYOUT_FILE)
    try:
        raw = storage.read_bytes(layout_path)
    except FileNotFoundError:
        raise PipelineError(f"{root}/: no {LAYOUT_FILE} (not a training set in parts, or "
                            "its export did not finish)") from None
    try:
        doc = json.loads(raw)
    except ValueError as e:
        raise PipelineError(f"{layout_path}: not valid JSON ({e})") from None
    problem = _layout_problem(doc)
    if problem:
        raise PipelineError(f"{layout_path}: malformed layout: {problem}")
    report.layout = PARTS_LAYOUT
    report.pair, report.method = doc.get("pair"), doc.get("method")
    report.window = doc.get("window") if isinstance(doc.get("window"), dict) else None
    key = doc.get("key") or DEFAULT_KEY

    # The whole set's columns: part 0's, then each other part's without the key.
    part_docs = doc["parts"]
    names: list[str] = []
    offsets: list[int] = []
    for i, p in enumerate(part_docs):
        cols = p["columns"]
        if cols[0] != key:
            report.hard_failures.append(f"{p['path']}: first column is {cols[0]!r}, not the "
                                        f"key {key!r}")
        offsets.append(len(names) - (0 if i == 0 else 1))
        names += cols if i == 0 else cols[1:]
    report.columns = len(names)

    files_of = []
    for p in part_docs:
        folder = storage.join(root, p["path"])
        try:
            files = [f for f in storage.list_files(folder) if f.endswith(".parquet")]
        except FileNotFoundError:
            files = []
        if not files:
            raise PipelineError(f"{folder}/: no parquet files for part {p['path']}")
        files_of.append(files)

    nulls = np.zeros(len(names), dtype=np.int64)
    infs = np.zeros(len(names), dtype=np.int64)
    fields: list[pa.Field | None] = [None] * len(names)
    base_sorted: np.ndarray | None = None
    base_order: np.ndarray | None = None
    checker = _KeyChecker(_window_micros(report.window))
    for pi, (p, files) in enumerate(zip(part_docs, files_of)):
        cols = p["columns"]
        positions: dict[str, list[int]] = defaultdict(list)
        for j, c in enumerate(cols):
            if j:
                positions[c].append(offsets[pi] + j)
        others = list(dict.fromkeys(c for c in cols[1:]))
        rows = row_groups = 0
        key_chunks: list[pa.Array] = []
        schema_ok = True
        for f in files:
            with storage.open_input(f) as fh:
                try:
                    pf = pq.ParquetFile(fh)
                except (OSError, pa.ArrowException) as e:
                    raise PipelineError(f"{f}: cannot read parquet footer: "
                                        f"{first_line(e)}") from None
                report.file_bytes += storage.size(f)
                report.footer_bytes += pf.metadata.serialized_size
                fnames = pf.schema_arrow.names
                if fnames != cols:
                    report.hard_failures.append(
                        f"{f}: its columns differ from {LAYOUT_FILE}'s for {p['path']} "
                        f"({len(fnames):,} columns, expected {len(cols):,}"
                        f"{'' if len(fnames) != len(cols) else ', other names or order'})")
                    schema_ok = False
                    continue
                for j, fld in enumerate(pf.schema_arrow):
                    pos = 0 if j == 0 else offsets[pi] + j
                    if fields[pos] is None:
                        fields[pos] = fld
                    elif j == 0 and fields[0].type != fld.type:
                        report.hard_failures.append(f"{f}: key type {fld.type} differs "
                                                    f"from {fields[0].type}")
                rows += pf.metadata.num_rows
                row_groups += pf.num_row_groups
                per_read = _columns_per_read(pf, columns_per_batch)
                batches = [others[i:i + per_read] for i in range(0, len(others), per_read)]
                key_is_ts = pa.types.is_timestamp(pf.schema_arrow.field(0).type)
                for rg in range(pf.num_row_groups):
                    if key_is_ts:
                        key_chunks.extend(_read(pf, rg, [key], f).column(0).chunks)
                    _scan_row_group(pf, rg, batches, positions, nulls, infs, f)
        keys = pa.chunked_array(key_chunks, type=fields[0].type if fields[0] is not None
                                and pa.types.is_timestamp(fields[0].type)
                                else pa.timestamp("us", tz="UTC"))
        vals = key_micros(keys) if len(keys) else np.zeros(0, np.int64)
        ordered = bool(keys.null_count == 0 and np.all(vals[1:] > vals[:-1]))
        report.parts.append({"path": p["path"], "files": len(files), "rows": rows,
                             "columns": len(cols), "row_groups": row_groups,
                             "key_ordered": ordered})
        report.row_groups += row_groups
        declared = p.get("rows")
        if isinstance(declared, int) and declared != rows:
            report.hard_failures.append(f"{p['path']} holds {rows:,} rows, {LAYOUT_FILE} "
                                        f"says {declared:,}")
        if pi == 0:
            report.rows = rows
            # The key checks run over part 0's keys in key order (files need not be).
            if ordered or keys.null_count:
                for chunk in keys.chunks:
                    checker.feed(pa.chunked_array([chunk], type=keys.type))
            else:
                checker.feed(pa.chunked_array([pc.take(keys, pc.sort_indices(keys))]))
                report.warnings.append(
                    f"{p['path']} is not in key order (EXPORT DATA does not promise an "
                    "order across files): sort by the key when reading")
            base_order, base_sorted = vals, np.sort(vals)
        elif schema_ok:
            if rows != report.rows:
                report.hard_failures.append(
                    f"{p['path']} has {rows:,} rows, {part_docs[0]['path']} has "
                    f"{report.rows:,}: the parts are not one training set")
            elif not np.array_equal(np.sort(vals), base_sorted):
                differ = int(np.count_nonzero(np.sort(vals) != base_sorted))
                report.hard_failures.append(
                    f"{p['path']} holds other keys than {part_docs[0]['path']} "
                    f"({differ:,} of {rows:,} sorted keys differ)")
            elif not np.array_equal(vals, base_order):
                report.warnings.append(
                    f"{p['path']} is not in the same row order as {part_docs[0]['path']}: "
                    "join the parts on the key, do not place them side by side")
        del keys, key_chunks, vals

    schema = pa.schema([f if f is not None else pa.field(n, pa.null())
                        for f, n in zip(fields, names)])
    meta = {k: doc.get(k) for k in ("format", "pair", "key", "window", "spine_rows",
                                    "spine_digest", "targets", "tables") if k in doc}
    if meta.get("spine_digest") is None:
        meta.pop("spine_digest", None)
    layout = _plan_layout(names, meta, report)
    report.key = layout.key
    _check_expectations(report, meta, expected)
    if "spine_digest" not in meta and "spine_digest" not in expected:
        # The bigquery launcher reads no data, so it cannot digest the spine's keys; the
        # parts are checked against each other, the spine's rows and its key range.
        report.warnings = [w for w in report.warnings if "no spine_digest" not in w]
        report.warnings.append(f"{LAYOUT_FILE} has no spine_digest: keys checked across "
                               "parts and against the spine's row count and key range")
    _check_columns(report, names, layout, schema)
    if fields[0] is not None and pa.types.is_timestamp(fields[0].type):
        _key_results(report, checker, expected, meta)
    for bound, value in (("spine_key_min", report.key_min), ("spine_key_max", report.key_max)):
        want = doc.get(bound)
        if want and value and dt.datetime.fromisoformat(want) != dt.datetime.fromisoformat(value):
            report.hard_failures.append(f"key {bound[6:]} {value} != the spine's {want}")
    _aggregate(report, names, layout, nulls, infs)
    report.ok = not report.hard_failures
    return report


def _compare_counts(report: Report, names: list[str], read: list[str],
                    positions: dict[str, list[int]], nulls: np.ndarray, infs: np.ndarray,
                    counted: ColumnCounts) -> tuple[np.ndarray, np.ndarray]:
    """Check the columns read back against the writer's counts; return the counts."""
    if len(counted.nulls) != len(names) or len(counted.infs) != len(names):
        report.hard_failures.append(f"the writer counted {len(counted.nulls)} columns, the "
                                    f"file has {len(names)}")
        return nulls, infs
    for name in read:
        for pos in positions[name]:
            if (nulls[pos], infs[pos]) != (counted.nulls[pos], counted.infs[pos]):
                report.hard_failures.append(
                    f"column {name}: the file holds {nulls[pos]} NULLs and {infs[pos]} "
                    f"infinities, the merge wrote {counted.nulls[pos]} and {counted.infs[pos]}")
    report.content_check = f"counted while writing; {len(read)} columns read back and compared"
    return np.asarray(counted.nulls, dtype=np.int64), np.asarray(counted.infs, dtype=np.int64)


def _scan_row_group(pf: pq.ParquetFile, rg: int, batches: list[list[str]],
                    positions: dict[str, list[int]], nulls: np.ndarray, infs: np.ndarray,
                    path: str) -> None:
    """Count NULLs and infinities of one row group, ``batches`` of columns at a time,
    into ``nulls``/``infs`` at the columns' ``positions`` (in the whole training set)."""
    for batch in batches:
        table = _read(pf, rg, batch, path)
        seen: dict[str, int] = defaultdict(int)
        for name, col in zip(table.column_names, table.columns):
            pos = positions[name][seen[name]]
            seen[name] += 1
            nulls[pos] += col.null_count
            if pa.types.is_floating(col.type) and len(col) > col.null_count:
                infs[pos] += pc.sum(pc.is_inf(col)).as_py() or 0
        del table


def _is_gcs(path: str) -> bool:
    return str(path).startswith("gs://")


def _gcs_ends(path: str) -> tuple[int, bytes, bytes]:
    """Size, first 4 and last 8 bytes of a ``gs://`` object (two ranged reads)."""
    from pipelines import storage

    try:
        with storage.open_input(path) as f:
            size = f.size()
            head = f.read_at(min(4, size), 0)
            tail = f.read_at(min(8, size), max(size - 8, 0)) if size >= 12 else b""
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such object") from None
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path}: cannot read: {first_line(e)}") from None
    return size, head, tail


def _check_parquet_file(path: str) -> tuple[int, int]:
    """File size and footer length, refusing anything that is not a parquet file."""
    if _is_gcs(path):
        size, head, tail = _gcs_ends(path)
    else:
        size, head, tail = _local_ends(path)
    if size < 12 or head != b"PAR1" or tail[4:] != b"PAR1":
        if head == b"PARE" or tail[4:] == b"PARE":
            raise PipelineError(f"{path}: encrypted parquet is not supported")
        raise PipelineError(f"{path}: not a parquet file (no PAR1 magic bytes)")
    footer = struct.unpack("<I", tail[:4])[0]
    if footer + 12 > size:
        raise PipelineError(f"{path}: truncated parquet file (footer length {footer} "
                            f"exceeds file size {size})")
    return size, footer


def _local_ends(path: str) -> tuple[int, bytes, bytes]:
    """Size, first 4 and last 8 bytes of a local file."""
    if not os.path.exists(path):
        raise PipelineError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise PipelineError(f"{path}: not a regular file")
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(4)
            if size >= 12:
                f.seek(size - 8)
            tail = f.read(8)
    except OSError as e:
        raise PipelineError(f"{path}: cannot read: {e.strerror or e}") from None
    return size, head, tail


def _read(pf: pq.ParquetFile, rg: int, columns: list[str], path: str) -> pa.Table:
    try:
        return pf.read_row_group(rg, columns=columns, use_threads=True)
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path}: cannot read row group {rg}: {first_line(e)}") from None


def _check_expectations(report: Report, meta: dict | None, expected: dict) -> None:
    meta = meta or {}
    spine_rows = expected.get("spine_rows", meta.get("spine_rows"))
    spine_digest = expected.get("spine_digest", meta.get("spine_digest"))
    report.spine_rows = spine_rows
    report.spine_digest = str(spine_digest).lower() if spine_digest is not None else None
    want_pair = expected.get("pair")
    if want_pair is not None:
        if meta.get("pair") is None:
            report.warnings.append(f"cannot confirm the pair is {want_pair!r}: "
                                   f"the file's metadata names none")
        elif meta["pair"] != want_pair:
            report.hard_failures.append(
                f"file is for pair {meta['pair']!r}, expected {want_pair!r}")
    if spine_rows is not None and report.rows != spine_rows:
        report.hard_failures.append(
            f"row count {report.rows:,} != spine_rows {spine_rows:,}")
    if spine_rows is None and report.rows == 0:
        report.hard_failures.append("file has no rows")
    if meta and spine_digest is None:
        report.warnings.append("bqx.training metadata has no spine_digest: key digest "
                               "not checked")


def _check_columns(report: Report, names: list[str], layout: _Layout,
                   schema: pa.Schema) -> None:
    key = layout.key
    if key not in names:
        report.hard_failures.append(f"key column {key!r} is missing")
    else:
        if names[0] != key:
            report.hard_failures.append(
                f"key column {key!r} is column {names.index(key)}, not the first column")
        ktype = schema.field(names.index(key)).type
        if not pa.types.is_timestamp(ktype):
            report.hard_failures.append(
                f"key column {key!r} has type {ktype}, expected timestamp[us, tz=UTC]")
        elif ktype.unit != "us" or ktype.tz not in ("UTC", "+00:00", "Etc/UTC"):
            report.warnings.append(f"key column {key!r} has type {ktype}, "
                                   f"expected timestamp[us, tz=UTC]")

    dups = sorted(c for c, n in _counts(names).items() if n > 1)
    if dups:
        report.hard_failures.append(f"duplicate column names: {_name_list(dups)}")

    if layout.known:
        missing = [t for t in layout.targets if t not in names]
        if missing:
            # Every name, however many: a truncated list hides which ones to fix.
            report.hard_failures.append(
                f"{len(missing)} expected target(s) missing: {', '.join(missing)}")
        if not layout.targets:
            report.hard_failures.append("bqx.training metadata lists no targets")
    elif not layout.targets:
        report.hard_failures.append(f"no target column (none starts {TARGET_PREFIX!r})")

    not_float = [c for c in layout.targets if c in names
                 and not pa.types.is_floating(schema.field(names.index(c)).type)]
    if not_float:
        report.warnings.append(f"targets that are not floating point: {_name_list(not_float)}")


def _key_results(report: Report, ck: _KeyChecker, expected: dict, meta: dict | None) -> None:
    key = report.key
    report.key_nulls = ck.nulls
    report.duplicate_keys = ck.duplicates
    report.unordered_keys = ck.unordered
    report.key_min = _iso(ck.min) if ck.min is not None else None
    report.key_max = _iso(ck.max) if ck.max is not None else None
    report.key_digest = ck.digest.hexdigest()
    if ck.nulls:
        report.hard_failures.append(f"{ck.nulls:,} NULL value(s) in key column {key!r}")
    if ck.duplicates:
        row, value = ck.first_duplicate
        report.hard_failures.append(
            f"{ck.duplicates:,} duplicate key(s) in {key!r}; first at row {row:,}: "
            f"{_iso(value)}")
    if ck.unordered:
        row, prev, value = ck.first_unordered
        report.hard_failures.append(
            f"{ck.unordered:,} key(s) out of ascending order in {key!r}; first at row "
            f"{row:,}: {_iso(value)} after {_iso(prev)}")
    if report.spine_digest is not None:
        want = report.spine_digest.strip().lower().zfill(8)
        if report.key_digest != want:
            report.hard_failures.append(
                f"key digest {report.key_digest} != spine_digest {want}: the keys differ "
                f"from the spine the file was built from")
    if ck.outside_window:
        w = report.window or {}
        report.warnings.append(
            f"{ck.outside_window:,} key(s) outside the window "
            f"[{w.get('start')}, {w.get('end')})")
    if ck.implausible:
        report.warnings.append(f"{ck.implausible:,} key(s) before "
                               f"{_PLAUSIBLE_KEY_START:%Y-%m-%d} (placeholder timestamps?)")


def _aggregate(report: Report, names: list[str], layout: _Layout,
               nulls: np.ndarray, infs: np.ndarray) -> None:
    rows = report.rows
    fams: dict[str, dict[str, Any]] = {}
    # Targets first, then families in file order: the summary reads like the file.
    order = [TARGETS_FAMILY] + [f for f in dict.fromkeys(layout.family_of)
                                if f is not None and f != TARGETS_FAMILY]
    for f in order:
        fams[f] = {"tables": layout.family_tables.get(f), "columns": 0, "cells": 0,
                   "nulls": 0, "null_rate": 0.0, "infinities": 0}
    for pos, f in enumerate(layout.family_of):
        if f is None:
            continue
        st = fams[f]
        st["columns"] += 1
        st["nulls"] += int(nulls[pos])
        st["infinities"] += int(infs[pos])
    for f, st in fams.items():
        st["cells"] = st["columns"] * rows
        st["null_rate"] = st["nulls"] / st["cells"] if st["cells"] else 0.0
        if st["null_rate"] > NULL_WARN_RATE:
            report.warnings.append(
                f"family {f}: {100 * st['null_rate']:.2f}% NULL "
                f"({st['nulls']:,} of {st['cells']:,} cells)")
    if not fams[TARGETS_FAMILY]["columns"] and TARGETS_FAMILY not in layout.family_tables:
        del fams[TARGETS_FAMILY]
    report.families = fams

    for t in layout.targets:
        if t in names:
            n = int(nulls[names.index(t)])
            report.target_null_rates[t] = n / rows if rows else 0.0

    total_inf = int(infs.sum())
    report.infinities = {"total": total_inf,
                         "by_family": {f: st["infinities"] for f, st in fams.items()}}
    if total_inf:
        report.warnings.append(f"{total_inf:,} infinite value(s) in float columns")

    if layout.known:
        per_table = [{"table": t["table"], "group": t["group"], "columns": 0, "nulls": 0,
                      "null_rate": 0.0, "infinities": 0} for t in layout.tables]
        for pos, ti in enumerate(layout.table_of):
            if ti is not None:
                per_table[ti]["columns"] += 1
                per_table[ti]["nulls"] += int(nulls[pos])
                per_table[ti]["infinities"] += int(infs[pos])
        for st in per_table:
            cells = st["columns"] * rows
            st["null_rate"] = st["nulls"] / cells if cells else 0.0
        report.tables = per_table

    if rows:
        report.all_null_columns = [c for pos, c in enumerate(names)
                                   if c != layout.key and nulls[pos] == rows]
        if report.all_null_columns:
            report.warnings.append(
                f"{len(report.all_null_columns):,} column(s) entirely NULL: "
                f"{_name_list(report.all_null_columns)}")


# --------------------------------------------------------------------------- helpers

def _counts(items: Iterable[str]) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for x in items:
        out[x] += 1
    return out


def _name_list(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    rest = len(names) - _MAX_NAMES
    return shown + (f" and {rest:,} more (all in the JSON report)" if rest > 0 else "")


def _micros(t: dt.datetime) -> int:
    return (t - _EPOCH) // dt.timedelta(microseconds=1)


def _iso(micros: int) -> str:
    return (_EPOCH + dt.timedelta(microseconds=int(micros))).isoformat()


def _window_micros(window: dict | None) -> tuple[int, int] | None:
    if not window:
        return None
    try:
        start = dt.datetime.fromisoformat(str(window["start"]))
        end = dt.datetime.fromisoformat(str(window["end"]))
    except (KeyError, ValueError):
        return None
    if start.tzinfo is None or end.tzinfo is None:
        return None
    return _micros(start), _micros(end)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n}"


def default_report_path(path: str | os.PathLike) -> str:
    """``x/training_eurusd.parquet`` -> ``x/training_eurusd.validation.json``."""
    path = os.fspath(path)
    if path.endswith("/") and path.rstrip("/"):
        path = path.rstrip("/")  # a training set folder: the report goes beside it
    stem = path[:-len(".parquet")] if path.endswith(".parquet") else path
    return stem + ".validation.json"


# --------------------------------------------------------------------------- compare

@dataclasses.dataclass
class Comparison:
    """The outcome of :func:`compare_files`: equal content, or the first difference."""

    a: str
    b: str
    equal: bool = False
    rows: int = 0
    columns: int = 0
    row_groups: tuple[int, int] = (0, 0)
    difference: str | None = None  # one line; None when equal
    column: str | None = None  # the first differing column, when values differ
    row_group: int | None = None  # ... in this row group of ``a``
    row: int | None = None  # ... first at this row (0-based, whole file)

    def summary(self) -> str:
        """``identical: ...`` or ``different: <the first difference>``."""
        if self.equal:
            return (f"identical: {self.a} and {self.b} hold the same {self.rows:,} rows x "
                    f"{self.columns:,} columns ({self.row_groups[0]:,} and "
                    f"{self.row_groups[1]:,} row groups)")
        return f"different: {self.difference}"


def compare_files(a: str | os.PathLike, b: str | os.PathLike,
                  columns_per_batch: int | None = None) -> Comparison:
    """Compare the content of two parquet files without loading either.

    Content is the column names in order, their types, the row count, every value (NULL
    equals NULL; floats are compared bit for bit, so NaN equals NaN) and the
    ``bqx.training`` metadata; how rows are split into row groups and how pages are
    encoded are not. Files are read one row group of ``a`` at a time, at most
    ``columns_per_batch`` columns at once (default: :func:`columns_per_read` of ``a``'s
    largest row group), with the matching rows of ``b`` (whatever its row groups).
    Raises PipelineError when either file is missing, not parquet, or a training set in
    parts.
    """
    _checked_arguments(None, columns_per_batch)
    a, b = os.fspath(a), os.fspath(b)
    result = Comparison(a=a, b=b)
    with _opened(a) as pa_file, _opened(b) as pb_file:
        result.row_groups = (pa_file.num_row_groups, pb_file.num_row_groups)
        result.columns = len(pa_file.schema_arrow)
        result.rows = pa_file.metadata.num_rows
        result.difference = (_schema_difference(pa_file.schema_arrow, pb_file.schema_arrow)
                             or _rows_difference(pa_file, pb_file)
                             or _values_difference(pa_file, pb_file, a, b,
                                                   _columns_per_read(pa_file, columns_per_batch),
                                                   result)
                             or _metadata_difference(pa_file, pb_file))
    result.equal = result.difference is None
    return result


@contextlib.contextmanager
def _opened(path: str):
    """A ParquetFile of ``path`` (local or ``gs://``), refusing what is not one file."""
    if is_training_set(path):
        raise PipelineError(f"{path}: --compare takes two parquet files, not a training "
                            "set in parts")
    _check_parquet_file(path)
    with _open_parquet(path) as pf:
        yield pf


def _schema_difference(sa: pa.Schema, sb: pa.Schema) -> str | None:
    """The first difference in column names, order or types."""
    na, nb = sa.names, sb.names
    if na != nb:
        only_a = [c for c in na if c not in set(nb)]
        only_b = [c for c in nb if c not in set(na)]
        if only_a or only_b:
            parts = []
            if only_a:
                parts.append(f"only in the first: {_name_list(only_a)}")
            if only_b:
                parts.append(f"only in the second: {_name_list(only_b)}")
            return (f"the column sets differ ({len(na):,} and {len(nb):,} columns): "
                    + "; ".join(parts))
        if len(na) != len(nb):
            return (f"the column lists have {len(na):,} and {len(nb):,} entries of the same "
                    "names (a name is repeated)")
        i = next(i for i, (x, y) in enumerate(zip(na, nb)) if x != y)
        return (f"same columns in another order: column {i} is {na[i]!r} in the first, "
                f"{nb[i]!r} in the second")
    for fa, fb in zip(sa, sb):
        if fa.type != fb.type:
            return f"column {fa.name!r} is {fa.type} in the first, {fb.type} in the second"
    return None


def _rows_difference(pa_file: pq.ParquetFile, pb_file: pq.ParquetFile) -> str | None:
    ra, rb = pa_file.metadata.num_rows, pb_file.metadata.num_rows
    if ra != rb:
        return f"the first has {ra:,} rows, the second {rb:,}"
    return None


def _metadata_difference(pa_file: pq.ParquetFile, pb_file: pq.ParquetFile) -> str | None:
    """Which entries of the ``bqx.training`` metadata differ (parsed, so key order and
    spacing do not count)."""
    def parsed(pf: pq.ParquetFile) -> Any:
        raw = (pf.metadata.metadata or {}).get(METADATA_KEY)
        if raw is None:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    ma, mb = parsed(pa_file), parsed(pb_file)
    if ma == mb:
        return None
    if isinstance(ma, dict) and isinstance(mb, dict):
        keys = sorted(k for k in set(ma) | set(mb) if ma.get(k) != mb.get(k))
        return f"the bqx.training metadata differs in {', '.join(map(repr, keys))}"
    return "the bqx.training metadata differs (present in one file only, or not JSON)"


def _values_difference(pa_file: pq.ParquetFile, pb_file: pq.ParquetFile, a: str, b: str,
                       columns_per_batch: int, result: Comparison) -> str | None:
    """The first differing value, row group of ``a`` by row group, column batch by
    column batch; fills ``result.column/row_group/row``."""
    names = pa_file.schema_arrow.names
    # Positions, not names: a repeated name would make a by-name read return both.
    batches = [list(range(i, min(i + columns_per_batch, len(names))))
               for i in range(0, len(names), columns_per_batch)]
    b_starts = np.cumsum([0] + [pb_file.metadata.row_group(j).num_rows
                                for j in range(pb_file.num_row_groups)])
    lo = 0
    for rg in range(pa_file.num_row_groups):
        hi = lo + pa_file.metadata.row_group(rg).num_rows
        for batch in batches:
            left = _read_indices(pa_file, [rg], batch, a)
            right = _rows_of(pb_file, b_starts, lo, hi, batch, b)
            for k, pos in enumerate(batch):
                at = _first_difference(left.column(k), right.column(k))
                if at is not None:
                    result.column, result.row_group, result.row = names[pos], rg, lo + at
                    return (f"column {names[pos]!r} differs first in row group {rg} of the "
                            f"first file (rows {lo:,}..{hi - 1:,}), at row {lo + at:,}: "
                            f"{_show(left.column(k), at)} vs {_show(right.column(k), at)}")
            del left, right
        lo = hi
    return None


def _read_indices(pf: pq.ParquetFile, row_groups: list[int], indices: list[int],
                  path: str) -> pa.Table:
    """The columns at ``indices`` (schema positions) of ``row_groups``."""
    schema = pf.schema_arrow
    if not row_groups:
        return pa.schema([schema.field(i) for i in indices]).empty_table()
    try:
        if pf.metadata.num_columns == len(schema):
            # Flat: positions are parquet leaf indices, and a repeated name stays one column.
            return pf.reader.read_row_groups(row_groups, column_indices=indices,
                                             use_threads=True)
        return pf.read_row_groups(row_groups, columns=[schema.names[i] for i in indices])
    except (OSError, pa.ArrowException) as e:
        raise PipelineError(f"{path}: cannot read row group(s) {row_groups}: "
                            f"{first_line(e)}") from None


def _rows_of(pf: pq.ParquetFile, starts: np.ndarray, lo: int, hi: int,
             indices: list[int], path: str) -> pa.Table:
    """Rows ``lo``..``hi - 1`` of ``pf`` for the columns at ``indices``, read from just
    the row groups that hold them."""
    groups = [j for j in range(pf.num_row_groups) if starts[j] < hi and starts[j + 1] > lo]
    table = _read_indices(pf, groups, indices, path)
    first = int(starts[groups[0]]) if groups else 0
    return table.slice(lo - first, hi - lo)


def _first_difference(x: pa.ChunkedArray, y: pa.ChunkedArray) -> int | None:
    """Index of the first position where two equally long arrays differ, or None."""
    if x.equals(y):
        return None
    x, y = x.combine_chunks(), y.combine_chunks()
    x_null = np.asarray(x.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    y_null = np.asarray(y.is_null().to_numpy(zero_copy_only=False), dtype=bool)
    if pa.types.is_floating(x.type) and x.type.bit_width in (32, 64):
        # Bit patterns: NaN equals NaN, and -0.0 is not 0.0.
        view = f"<i{x.type.bit_width // 8}"
        eq = (np.asarray(pc.fill_null(x, 0).to_numpy(zero_copy_only=False)).view(view)
              == np.asarray(pc.fill_null(y, 0).to_numpy(zero_copy_only=False)).view(view))
    else:
        try:
            eq = np.asarray(pc.fill_null(pc.equal(x, y), False).to_numpy(zero_copy_only=False),
                            dtype=bool)
        except (pa.ArrowNotImplementedError, pa.ArrowInvalid):
            eq = np.array([u == v for u, v in zip(x.to_pylist(), y.to_pylist())], dtype=bool)
    same = (x_null & y_null) | (~x_null & ~y_null & eq)
    bad = np.flatnonzero(~same)
    return int(bad[0]) if len(bad) else None


def _show(column: pa.ChunkedArray, i: int) -> str:
    text = repr(column[i].as_py())
    return text if len(text) <= 60 else text[:57] + "..."


# --------------------------------------------------------------------------- CLI

def main(argv: list[str] | None = None) -> int:
    """Command line entry point; returns 0 pass, 1 hard failure, 2 PipelineError."""
    parser = ArgumentParser(
        prog="python -m pipelines.validate",
        description="Validate a training parquet file and write a JSON report beside it.")
    parser.add_argument("path", help="the training parquet file, or a folder / gs:// prefix "
                                     "of a training set in parts (with _layout.json)")
    parser.add_argument("--report", help="where to write the JSON report "
                                         "(default: <file without .parquet>.validation.json)")
    parser.add_argument("--quiet", action="store_true",
                        help="print only PASS/FAIL and the hard failures")
    parser.add_argument("--columns-per-batch", type=int, default=None,
                        help="columns decoded at once per row group (the memory bound; "
                             f"default: as many float64 columns as {READ_BYTES >> 20} MiB hold, "
                             f"16 to {MAX_COLUMNS_PER_READ:,})")
    parser.add_argument("--compare", metavar="OTHER",
                        help="compare PATH's content with the parquet file OTHER instead of "
                             "validating it: exit 0 identical, 1 different (first "
                             "difference printed), 2 bad input; no report is written")
    args = parser.parse_args(argv)
    if args.columns_per_batch is not None and args.columns_per_batch < 1:
        # Checked here for both modes: validate_file's ValueError would be a traceback
        # and exit 1, which means a file that failed validation.
        print(f"error: --columns-per-batch {args.columns_per_batch}: must be at least 1",
              file=sys.stderr)
        return 2
    if args.compare is not None:
        if args.report:
            parser.error("--report does not apply to --compare")
        return _compare_main(args.path, args.compare, args.columns_per_batch)
    report_path = args.report or default_report_path(args.path)
    try:
        report = validate_file(args.path, columns_per_batch=args.columns_per_batch)
        print(report.verdict() if args.quiet else report.summary())
        try:
            report.write_json(report_path)
        except OSError as e:
            raise PipelineError(f"{report_path}: cannot write report: "
                                f"{e.strerror or e}") from None
        if not args.quiet:
            print(f"report: {report_path}")
    except PipelineError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    return 0 if report.ok else 1


def _compare_main(a: str, b: str, columns_per_batch: int | None) -> int:
    """``--compare``: print the verdict line; 0 identical, 1 different, 2 bad input."""
    try:
        result = compare_files(a, b, columns_per_batch=columns_per_batch)
    except PipelineError as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    print(result.summary())
    return 0 if result.equal else 1


if __name__ == "__main__":
    sys.exit(main())
