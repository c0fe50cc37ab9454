"""A sample warehouse: a DuckDB file laid out like the BigQuery source.

``python -m pipelines.sample --warehouse w.duckdb --pairs eurusd --rows 10000 --seed 0``

The file has the features and targets datasets of the catalog as DuckDB schemas, the
667 feature tables of every generated pair (pair-specific, triangulation, market-wide,
variance, currency strength) with the real column counts, each pair's targets table,
and the defects the real source has (gaps, duplicate keys, NULL runs, 1970 keys), so
extraction and merge can be exercised end to end without BigQuery.

Every table is one ``CREATE TABLE ... AS SELECT ... FROM range(N)`` statement. Values
come from DuckDB's ``hash()`` of the row number plus a per-column salt derived from
(seed, table, column): the same seed gives the same content whatever the thread
count or table order. Column counts, names, types and defect positions depend only on
table names and ``rows``, never on the seed. The exact values depend on DuckDB's hash
function and so may change with the DuckDB version.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import datetime as dt
import hashlib
import logging
import os
import sys
import threading
import time
import zlib
from pathlib import Path
from typing import Callable, Sequence

import duckdb

from pipelines.catalog import Catalog, load_catalog
from pipelines.cli import ArgumentParser
from pipelines.errors import PipelineError

UTC = dt.timezone.utc
DEFAULT_START = dt.datetime(2025, 1, 6, tzinfo=UTC)
DEFAULT_ROWS = 10_000
DEFAULT_SEED = 0

# Bumped whenever the generated content changes, so an old file is not silently mixed
# with tables made by a newer generator.
SAMPLE_VERSION = 1
# Lives in DuckDB's own ``main`` schema, outside both datasets, so table discovery
# never sees it.
METADATA_TABLE = "main.sample_warehouse"

# --- targets -----------------------------------------------------------------------
BQX_WINDOWS = (45, 90, 180, 360, 720, 1440, 2880)
HORIZONS = (15, 30, 45, 60, 75, 90, 105)

# --- pair-specific tables (256 per pair) -------------------------------------------
# Column counts are chosen so that every pair has exactly 4,173 pair-specific feature
# columns (the AUDUSD figure of the real warehouse): 1,509 pair-level + 2,424 cov + 240
# corr. They depend on the kind only, so every pair gets the same total.
LEVEL_KINDS = ("agg", "align", "der", "div", "mom", "mrt", "reg", "rev", "vol")
LEVEL_VARIANTS = ("", "idx", "bqx")
_BIG_LEVEL = {"reg": 232, "agg": 64, "mom": 43, "align": 42, "vol": 31}
_SMALL_LEVEL = (7, 7, 8)  # der, div, mrt, rev: plain, idx, bqx
BASE_COLUMNS = {"base": 7, "base_bqx": 8}
LAG_WINDOWS = (45, 90, 180, 360, 720, 1440, 2880, 5760)
REGIME_WINDOWS = (45, 90, 180, 360)
_REGIME_COLUMNS = (13, 15, 17, 19)
MISC_COLUMNS = {"cyc": 8, "ext": 7, "tmp": 7}
COV_COLUMNS = {
    "agg": 15, "align": 14, "bqx": 13, "corr": 12, "der": 13, "div": 13, "ext": 14,
    "lag": 13, "mom": 14, "mrt": 13, "reg": 15, "regime": 14, "rev": 13, "tmp": 12,
    "vol": 14,
}
ETFS = ("ewa", "ewg", "ewj", "ewu", "gld", "spy", "uup", "vix")
CORR_COLUMNS = {"etf": 7, "etf_idx": 8, "etf_bqx": 7, "etf_ret": 8}

# --- shared tables (411, the same for every pair) ------------------------------------
TRI_KINDS = ("agg", "align", "reg", "mom")
MKT_TABLES = ("session", "breadth", "dispersion", "liquidity", "momentum", "regime",
              "risk", "spread", "trend", "vol")
MKT_SUMMARIES = ("regime", "vol")  # mkt_{x}_summary: discovery must exclude them
VAR_KINDS = ("agg", "align", "corr", "der", "lag", "mom", "reg", "vol")
CSI_KINDS = ("agg", "align", "base", "bqx", "corr", "cyc", "der", "div", "ext", "idx",
             "lag", "mom", "mrt", "reg", "regime", "rev", "tmp", "vol")
# (tables, feature columns, fewest columns, most columns) of the real warehouse.
SHARED_SHAPE = {
    "tri": (194, 6460, 14, 118),
    "mkt": (10, 150, 8, 22),
    "var": (63, 973, 9, 128),
    "csi": (144, 5232, 5, 98),
}
# Tables that match no discovery rule: no pair token, no shared prefix.
DECOY_TABLES = ("tmp_scratch_old", "features_backup_2024")
BOOL_TABLE = "mkt_session"  # holds the warehouse's only BOOLEAN column

# --- column names and types ----------------------------------------------------------
# No stat starts with a table-name word (idx, bqx, etf, a kind, a currency): the
# training file prefixes each column with its table's stem, and such a stat could make
# two tables produce the same output name.
_DOUBLE_STATS = (
    "mean", "std", "slope", "z", "rsi", "ema", "sma", "min", "max", "range", "skew",
    "kurt", "median", "q25", "q75", "iqr", "mad", "pctchg", "logret", "accel", "velo",
    "hurst", "entropy", "acf", "beta", "alpha", "rsq", "resid", "upper", "lower",
    "width", "atr", "macd", "signal", "hist", "stoch", "cci", "willr", "zscore", "drift",
)
_INT_STATS = ("count", "streak", "sign", "rank", "nobs")
_STR_STATS = ("label", "state", "trend")
_STR_VALUES = ("up", "down", "flat")
_STAT_WINDOWS = (5, 15, 30, 45, 60, 90, 120, 180, 240, 360, 720, 1440)
# Double values are integers divided by a power of ten: DuckDB's ALP compression
# stores those in about a third of the space of arbitrary doubles.
_DECIMALS = (4, 5, 6, 7)

# --- defects -------------------------------------------------------------------------
GAP_PREFIXES = ("corr_", "var_", "regime_")  # 5-11% of keys missing per table
EPOCH_PREFIX = "mkt_"  # every mkt table has 1970-01-01 keys (a migration artefact)
EPOCH_ROWS = 20
DUPLICATE_ROWS = 5
_NULL_EVERY = 16  # every 16th feature column has one run of NULLs
_DUP_SALT = 1 << 40  # row-number offsets that keep extra rows' values distinct
_EPOCH_SALT = 1 << 41

# A new file commits several tables per transaction (up to this many cells): fewer,
# larger commits save about a sixth of the build time.
BATCH_CELLS = 16_000_000
# Tables created between two checkpoints (cells); they are held in memory until then.
WAVE_CELLS = 64_000_000

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class _Column:
    name: str
    type: str  # DuckDB type
    salt: int
    decimals: int = 6  # DOUBLE values are k / 10**decimals, |k| <= 10**6
    null_run: tuple[int, int] | None = None  # [first, end) row numbers that are NULL


@dataclasses.dataclass(frozen=True)
class _Table:
    schema: str
    name: str
    family: str  # the progress group it is logged under
    identity: tuple[tuple[str, str], ...]  # constant (column, value) pairs
    n_features: int
    dup_table: bool = False


@dataclasses.dataclass
class _Group:
    """One progress group: the tables to create and the figures to report."""

    name: str
    tables: list[_Table]
    created: int = 0
    skipped: int = 0
    columns: int = 0  # feature columns (no key, no identity) over all planned tables
    seconds: float = 0.0
    features: bool = True  # False for targets and for tables discovery must skip


def build_warehouse(
    path: str | Path,
    pairs: Sequence[str] | str,
    rows: int = DEFAULT_ROWS,
    seed: int = DEFAULT_SEED,
    tables_per_group: int | None = None,
    start: dt.datetime = DEFAULT_START,
    log: Log | logging.Logger | None = None,
    *,
    catalog: Catalog | str | Path | None = None,
    workers: int | None = None,
    batch_cells: int | None = None,
) -> dict:
    """Create (or add to) a sample warehouse DuckDB file and return a summary dict.

    ``pairs`` is a list of pair names or a comma-separated string. Tables that already
    exist are kept, so calling it again for another pair adds only that pair's own
    tables. A new file is built under a temporary name and renamed when complete; when
    adding to an existing file every table is its own transaction. ``tables_per_group``
    caps each kind-group (pair-level, cov, corr per pair; tri, mkt, var, csi) at its
    first K tables for quick tests. ``start`` is the first key (naive means UTC). ``log``
    is a print-like callable or a logging.Logger (default: this module's logger).

    The summary has: path, pairs, rows, seed, start, tables (planned), created, skipped,
    feature_columns, groups ({name: {tables, created, skipped, feature_columns,
    seconds}}), bytes (file size) and seconds.
    """
    began = time.perf_counter()
    say = _logger(log)
    cat = catalog if isinstance(catalog, Catalog) else load_catalog(catalog)
    pair_list = _check_pairs(cat, pairs)
    _check_int("rows", rows, minimum=1)
    _check_int("seed", seed)
    if tables_per_group is not None:
        _check_int("tables_per_group", tables_per_group, minimum=0)
    if workers is not None:
        _check_int("workers", workers, minimum=1)
    start = _check_start(cat, start)
    path = Path(path)
    if path.is_dir():
        raise PipelineError(f"warehouse path {path} is a directory, expected a .duckdb file")

    groups = _plan(cat, pair_list, tables_per_group)
    meta = {"version": str(SAMPLE_VERSION), "rows": str(rows), "seed": str(seed),
            "start": start.isoformat()}
    workers = workers or max(1, min(4, os.cpu_count() or 1))
    batch_cells = BATCH_CELLS if batch_cells is None else batch_cells

    new_file = not path.exists()
    target = path.with_name(f".{path.name}.{os.getpid()}.tmp") if new_file else path
    if new_file:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PipelineError(f"cannot create directory for {path}: {exc}") from None
        _remove_db(target)
    con = _connect(target)
    try:
        _prepare(con, cat, meta, path)
        existing = _existing_tables(con)
        for group in groups:
            _run_group(con, group, existing, rows, start, seed, cat.key, workers,
                       batch_cells if new_file else 0)
            columns = f", {group.columns} feature columns" if group.features else ""
            say(f"{group.name}: {group.created} tables created, {group.skipped} kept"
                f"{columns}, {group.seconds:.1f} s")
        con.close()
    except BaseException:
        con.close()
        if new_file:
            _remove_db(target)
        raise
    if new_file:
        os.replace(target, path)

    created = sum(g.created for g in groups)
    skipped = sum(g.skipped for g in groups)
    return {
        "path": str(path),
        "pairs": list(pair_list),
        "rows": rows,
        "seed": seed,
        "start": start.isoformat(),
        "tables": created + skipped,
        "created": created,
        "skipped": skipped,
        "feature_columns": sum(g.columns for g in groups if g.features),
        "groups": {g.name: {"tables": len(g.tables), "created": g.created,
                            "skipped": g.skipped, "feature_columns": g.columns,
                            "seconds": round(g.seconds, 3)} for g in groups},
        "bytes": path.stat().st_size,
        "seconds": round(time.perf_counter() - began, 3),
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (2 for a PipelineError)."""
    parser = ArgumentParser(
        prog="python -m pipelines.sample",
        description="Write a DuckDB sample warehouse laid out like the BigQuery source.")
    parser.add_argument("--warehouse", required=True, help="the .duckdb file to create or add to")
    parser.add_argument("--pairs", required=True, help="comma-separated pairs, e.g. eurusd,gbpusd")
    parser.add_argument("--rows", type=int, default=DEFAULT_ROWS,
                        help=f"minutes per table (default {DEFAULT_ROWS})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="value seed (default 0)")
    parser.add_argument("--tables-per-group", type=int, default=None, metavar="K",
                        help="at most K tables per kind-group, for quick tests")
    parser.add_argument("--start", default=DEFAULT_START.date().isoformat(),
                        help="first key, a UTC date or ISO timestamp (default 2025-01-06)")
    parser.add_argument("--catalog", default=None, help="catalog TOML (default: the shipped one)")
    parser.add_argument("--workers", type=int, default=None,
                        help="tables created at once (default: CPU count, at most 4)")
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the usage error or the help
        return exc.code if isinstance(exc.code, int) else 2

    def progress(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    try:
        summary = build_warehouse(
            args.warehouse, args.pairs, rows=args.rows, seed=args.seed,
            tables_per_group=args.tables_per_group, start=_parse_start(args.start),
            log=progress, catalog=args.catalog, workers=args.workers)
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"sample warehouse {summary['path']}: {summary['tables']} tables "
          f"({summary['created']} created, {summary['skipped']} kept), "
          f"{summary['feature_columns']} feature columns, {summary['rows']} rows, "
          f"pairs {','.join(summary['pairs'])}, {summary['bytes'] / 1e6:.1f} MB, "
          f"{summary['seconds']:.1f} s")
    return 0


# --- checks --------------------------------------------------------------------------

def _check_pairs(cat: Catalog, pairs: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(pairs, str):
        pairs = pairs.split(",")
    names = [p.strip() for p in pairs if p and p.strip()]
    if not names:
        raise PipelineError("no pair given: pass --pairs, e.g. --pairs eurusd,gbpusd")
    return tuple(dict.fromkeys(cat.check_pair(p) for p in names))


def _check_int(name: str, value: object, minimum: int | None = None) -> None:
    if not isinstance(value, int) or isinstance(value, bool):
        raise PipelineError(f"{name} must be an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise PipelineError(f"{name} must be at least {minimum}, got {value}")


def _check_start(cat: Catalog, start: dt.datetime) -> dt.datetime:
    if not isinstance(start, dt.datetime):
        raise PipelineError(f"start must be a datetime, got {start!r}")
    start = start.replace(tzinfo=UTC) if start.tzinfo is None else start.astimezone(UTC)
    if start.second or start.microsecond:
        raise PipelineError(f"start {start.isoformat()} is not a whole minute")
    floor = dt.datetime.fromisoformat(cat.min_valid_key).replace(tzinfo=UTC)
    if start < floor:
        # Such keys would be dropped as migration artefacts by the pipeline.
        raise PipelineError(f"start {start.isoformat()} is before the catalog's "
                            f"min_valid_key {cat.min_valid_key}")
    return start


def _parse_start(text: str) -> dt.datetime:
    try:
        return dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise PipelineError(f"malformed --start {text!r}: expected e.g. 2025-01-06 "
                            "or 2025-01-06T09:30:00+00:00") from None


def _logger(log: Log | logging.Logger | None) -> Log:
    if log is None:
        return logging.getLogger(__name__).info
    if isinstance(log, logging.Logger):
        return log.info
    return log


# --- the plan: which tables, which columns -------------------------------------------

def _plan(cat: Catalog, pairs: Sequence[str], k: int | None) -> list[_Group]:
    """The progress groups in build order: per pair targets and own tables, then shared."""
    def first(items: list) -> list:
        return items if k is None else items[:k]

    feat, ident = cat.features_dataset, _identity(cat)
    groups = []
    for pair in pairs:
        groups.append(_Group(f"{pair} targets", [_Table(
            cat.targets_dataset, cat.targets_table_for(pair), "targets",
            ident(("pair", pair)), 0)], features=False))
        own = (first(_level_tables(feat, pair, ident)) + first(_cov_tables(cat, pair, ident))
               + first(_corr_tables(feat, pair, ident)))
        groups.append(_Group(f"{pair} pair-specific", own))
    shared = _shared_tables(cat, ident)
    for family in ("tri", "mkt", "var", "csi"):
        groups.append(_Group(family, first(shared[family])))
    groups.append(_Group("excluded (summary, decoy)", shared["excluded"], features=False))
    return groups


def _identity(cat: Catalog):
    # Only columns the catalog calls identity columns, so none leaks into the features.
    def ident(*pairs: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple((c, v) for c, v in pairs if c in cat.identity_columns)
    return ident


def _level_tables(feat: str, pair: str, ident) -> list[_Table]:
    tables = []
    own = ident(("pair", pair))
    for kind in LEVEL_KINDS:
        for variant, small in zip(LEVEL_VARIANTS, _SMALL_LEVEL):
            name = "_".join(x for x in (kind, variant, pair) if x)
            tables.append(_Table(feat, name, "pair", own, _BIG_LEVEL.get(kind, small)))
    tables += [_Table(feat, f"base_{pair}", "pair", own, BASE_COLUMNS["base"]),
               _Table(feat, f"base_bqx_{pair}", "pair", own, BASE_COLUMNS["base_bqx"])]
    tables += [_Table(feat, f"lag_{pair}_{w}", "pair", own, 10 + i % 2)
               for i, w in enumerate(LAG_WINDOWS)]
    tables += [_Table(feat, f"regime_{pair}_{w}", "pair", own, n)
               for w, n in zip(REGIME_WINDOWS, _REGIME_COLUMNS)]
    tables += [_Table(feat, f"{kind}_{pair}", "pair", own, n) for kind, n in MISC_COLUMNS.items()]
    # One pair-level table per pair repeats some keys, as a few real tables do.
    tables[0] = dataclasses.replace(tables[0], dup_table=True)
    return tables


def _partners(cat: Catalog, pair: str) -> list[str]:
    a, b = pair[:3], pair[3:]
    return [p for p in cat.pairs if p != pair and (a in (p[:3], p[3:]) or b in (p[:3], p[3:]))]


def _cov_tables(cat: Catalog, pair: str, ident) -> list[_Table]:
    tables = []
    for kind, n in COV_COLUMNS.items():
        for partner in _partners(cat, pair):
            p1, p2 = sorted((pair, partner))
            tables.append(_Table(cat.features_dataset, f"cov_{kind}_{p1}_{p2}", "cov",
                                 ident(("pair1", p1), ("pair2", p2)), n))
    return tables


def _corr_tables(feat: str, pair: str, ident) -> list[_Table]:
    return [_Table(feat, f"corr_{kind}_{pair}_{etf}", "corr",
                   ident(("fx_pair", pair), ("etf", etf)), n)
            for kind, n in CORR_COLUMNS.items() for etf in ETFS]


def _shared_tables(cat: Catalog, ident) -> dict[str, list[_Table]]:
    feat, cur = cat.features_dataset, cat.currencies
    names = {
        "tri": [(f"tri_{kind}_{a}_{b}_{c}", ident(("base_curr", a), ("quote_curr", b),
                                                   ("cross_curr", c)))
                for kind in TRI_KINDS
                for i, a in enumerate(cur) for j, b in enumerate(cur[i + 1:], i + 1)
                for c in cur[j + 1:]],
        "mkt": [(f"mkt_{x}", ()) for x in MKT_TABLES],
        "var": [(f"var_{kind}_{c}", ident(("currency", c))) for kind in VAR_KINDS for c in cur],
        "csi": [(f"csi_{kind}_{c}", ident(("currency", c))) for kind in CSI_KINDS for c in cur],
    }
    out: dict[str, list[_Table]] = {}
    for family, listed in names.items():
        n_tables, total, lo, hi = SHARED_SHAPE[family]
        listed = listed[:n_tables]
        counts = _spread([n for n, _ in listed], total * len(listed) // n_tables, lo, hi)
        out[family] = [_Table(feat, n, family, idc, counts[n]) for n, idc in listed]
    # The first tri and csi tables repeat some keys (with the pair-level one: 3 per pair).
    for family in ("tri", "csi"):
        if out[family]:
            out[family][0] = dataclasses.replace(out[family][0], dup_table=True)
    out["excluded"] = ([_Table(feat, f"mkt_{x}_summary", "mkt", (), 6) for x in MKT_SUMMARIES]
                       + [_Table(feat, name, "decoy", (), 4) for name in DECOY_TABLES])
    return out


def _crc(text: str) -> int:
    return zlib.crc32(text.encode())


def _spread(names: Sequence[str], total: int, lo: int, hi: int) -> dict[str, int]:
    """Column counts in [lo, hi] summing to ``total`` (when reachable), fixed by name.

    The tables with the largest and smallest name weight get exactly ``hi`` and ``lo``
    so the real range shows up; the rest share the remainder in proportion to squared
    weights, which gives the real skew of a few wide tables among many narrow ones.
    """
    n = len(names)
    if n == 0:
        return {}
    if n == 1:
        return {names[0]: max(lo, min(hi, total))}
    weight = [(1 + _crc(x) % 1000) ** 2 for x in names]
    order = sorted(range(n), key=lambda i: (weight[i], i))
    counts = [lo] * n
    counts[order[-1]] = hi
    rest = order[1:-1]
    cap = hi - lo
    budget = max(0, min(total - hi - lo * (n - 1), cap * len(rest)))
    share = {i: 0.0 for i in rest}
    active, left = set(rest), float(budget)
    while left > 1e-9 and active:  # water-filling: hand out in proportion, cap at hi
        total_w = sum(weight[i] for i in active)
        full = [i for i in active if share[i] + left * weight[i] / total_w >= cap]
        if not full:
            for i in active:
                share[i] += left * weight[i] / total_w
            break
        for i in full:
            left -= cap - share[i]
            share[i] = float(cap)
            active.discard(i)
    whole = {i: int(share[i]) for i in rest}
    short = budget - sum(whole.values())
    for i in sorted(rest, key=lambda i: (whole[i] - share[i], i)):
        if short <= 0:
            break
        if whole[i] < cap:
            whole[i] += 1
            short -= 1
    for i in rest:
        counts[i] = lo + whole[i]
    return dict(zip(names, counts))


def _columns(table: _Table, rows: int, seed: int) -> list[_Column]:
    """The feature columns of ``table``: names and types from the name, salts from the seed."""
    counters = {"DOUBLE": 0, "BIGINT": 0, "VARCHAR": 0}
    cols = []
    for j in range(table.n_features):
        roll = _crc(f"{table.name}/{j}/type") % 100
        ctype = "BIGINT" if roll < 4 else "VARCHAR" if roll < 6 else "DOUBLE"
        if table.name == BOOL_TABLE and j == table.n_features - 1:
            ctype, name = "BOOLEAN", "is_open"
        else:
            stats = {"DOUBLE": _DOUBLE_STATS, "BIGINT": _INT_STATS, "VARCHAR": _STR_STATS}[ctype]
            name = _stat_name(stats, counters[ctype])
            counters[ctype] += 1
        null_run = None
        if j % _NULL_EVERY == _NULL_EVERY // 3:
            length = max(1, rows * (1 + _crc(f"{table.name}/{j}/len") % 8) // 100)
            first = _crc(f"{table.name}/{j}/at") % rows
            null_run = (first, min(rows, first + length))
        cols.append(_Column(name, ctype, _salt(seed, table.name, name),
                            _DECIMALS[_crc(f"{table.name}/{j}/div") % len(_DECIMALS)], null_run))
    return cols


def _stat_name(stats: Sequence[str], k: int) -> str:
    # Window-major, so a narrow table gets several stats of one window.
    w, s = divmod(k, len(stats))
    if w < len(_STAT_WINDOWS):
        return f"{stats[s]}_{_STAT_WINDOWS[w]}"
    return f"{stats[s]}_{_STAT_WINDOWS[-1]}_{w}"  # never reached by the real counts


def _salt(seed: int, table: str, column: str) -> int:
    """A 60-bit per-column offset: hash(row + salt) then differs by column and seed."""
    digest = hashlib.blake2b(f"{seed}/{table}/{column}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 4


# --- SQL -----------------------------------------------------------------------------

def _q(name: str) -> str:
    return '"' + name + '"'


def _minutes_after(value: dt.datetime, minutes: str) -> str:
    """SQL for the TIMESTAMPTZ ``minutes`` after ``value``.

    Epoch seconds through to_timestamp, because TIMESTAMPTZ + INTERVAL goes through
    ICU's calendar for every row.
    """
    return f"to_timestamp({int(value.timestamp())} + ({minutes}) * 60)"


def _value_sql(col: _Column) -> str:
    h = f"hash(r + {col.salt})"
    if col.type == "DOUBLE":
        # A DOUBLE literal (1e4) binds faster than the DECIMAL 10000.0.
        expr = f"((({h} % 2000000)::BIGINT - 1000000) / 1e{col.decimals})"
    elif col.type == "BIGINT":
        expr = f"(({h} % 21)::BIGINT - 10)"
    elif col.type == "VARCHAR":
        cases = " ".join(f"WHEN {i} THEN '{v}'" for i, v in enumerate(_STR_VALUES[:-1]))
        expr = f"(CASE {h} % {len(_STR_VALUES)} {cases} ELSE '{_STR_VALUES[-1]}' END)"
    else:
        expr = f"({h} % 2 = 0)"
    if col.null_run is not None:
        a, b = col.null_run
        # r is the row number for ordinary rows only: extra (duplicate, 1970) rows carry
        # large offsets and so stay outside every NULL run.
        expr = f"CASE WHEN r >= {a} AND r < {b} THEN NULL ELSE {expr} END"
    return f"{expr} AS {_q(col.name)}"


def _source_sql(table: _Table, rows: int, start: dt.datetime) -> str:
    """Rows as (t = key, r = value row number); defects are extra or missing rows."""
    parts = [f"SELECT {_minutes_after(start, 'range')} AS t, range AS r FROM range({rows})"]
    if table.name.startswith(GAP_PREFIXES) and rows > 1:
        pct = 5.0 + (_crc(f"{table.name}/gap") % 61) / 10.0
        missing = min(rows - 1, max(1, round(rows * pct / 100)))
        salt = _salt(0, table.name, "gap")
        # An exact count of scattered minutes, chosen by hash order so it is stable.
        parts[0] += (f" WHERE range NOT IN (SELECT range FROM range({rows}) "
                     f"ORDER BY hash(range + {salt}), range LIMIT {missing})")
    if table.dup_table:
        at = sorted({rows * (k + 1) // (DUPLICATE_ROWS + 1) for k in range(DUPLICATE_ROWS)})
        values = ", ".join(f"({i})" for i in at)
        parts.append(f"SELECT {_minutes_after(start, 'i')}, i + {_DUP_SALT} "
                     f"FROM (VALUES {values}) AS d(i)")
    if table.name.startswith(EPOCH_PREFIX):
        epoch = dt.datetime(1970, 1, 1, tzinfo=UTC)
        parts.append(f"SELECT {_minutes_after(epoch, 'range')}, range + {_EPOCH_SALT} "
                     f"FROM range({EPOCH_ROWS})")
    return " UNION ALL ".join(parts)


def _table_sql(table: _Table, rows: int, start: dt.datetime, seed: int, key: str) -> str:
    if table.family == "targets":
        return _targets_sql(table, rows, start, seed, key)
    select = [f"t AS {_q(key)}"]
    select += [f"'{v}' AS {_q(c)}" for c, v in table.identity]
    select += [_value_sql(c) for c in _columns(table, rows, seed)]
    return (f"CREATE TABLE {_q(table.schema)}.{_q(table.name)} AS SELECT "
            + ", ".join(select) + f" FROM ({_source_sql(table, rows, start)}) AS s")


def _targets_sql(table: _Table, rows: int, start: dt.datetime, seed: int, key: str) -> str:
    inner = [f"{_minutes_after(start, 'range')} AS {_q(key)}"]
    inner += [f"'{v}' AS {_q(c)}" for c, v in table.identity]
    for w in BQX_WINDOWS:
        salt = _salt(seed, table.name, f"bqx_{w}")
        # A w-minute window has no value until w minutes of history exist.
        inner.append(f"CASE WHEN range < {w} THEN NULL ELSE "
                     f"(((hash(range + {salt}) % 2000000)::BIGINT - 1000000) / 1e4) "
                     f"END AS bqx_{w}")
    outer = [_q(key)] + [_q(c) for c, _ in table.identity] + [f"bqx_{w}" for w in BQX_WINDOWS]
    outer += [f"LEAD(bqx_{w}, {h}) OVER w AS target_bqx{w}_h{h}"
              for w in BQX_WINDOWS for h in HORIZONS]
    return (f"CREATE TABLE {_q(table.schema)}.{_q(table.name)} AS SELECT "
            + ", ".join(outer) + " FROM (SELECT " + ", ".join(inner)
            + f" FROM range({rows})) AS b WINDOW w AS (ORDER BY {_q(key)}) "
            f"ORDER BY {_q(key)}")


# --- running -------------------------------------------------------------------------

def _connect(path: Path) -> duckdb.DuckDBPyConnection:
    try:
        con = duckdb.connect(str(path))
    except duckdb.Error as exc:
        raise PipelineError(f"cannot open warehouse {path}: {_one_line(exc)}") from None
    con.execute("SET TimeZone = 'UTC'")
    return con


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def _remove_db(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".wal")):
        try:
            p.unlink()
        except FileNotFoundError:
            pass


def _prepare(con, cat: Catalog, meta: dict[str, str], path: Path) -> None:
    """Create the schemas and record (or check) what the file was built with."""
    for schema in (cat.features_dataset, cat.targets_dataset):
        con.execute(f"CREATE SCHEMA IF NOT EXISTS {_q(schema)}")
    con.execute(f"CREATE TABLE IF NOT EXISTS {METADATA_TABLE} (key VARCHAR, value VARCHAR)")
    old = dict(con.execute(f"SELECT key, value FROM {METADATA_TABLE}").fetchall())
    if not old:
        con.executemany(f"INSERT INTO {METADATA_TABLE} VALUES (?, ?)", list(meta.items()))
        return
    differ = [f"{k}={old.get(k)} (asked {v})" for k, v in meta.items() if old.get(k) != v]
    if differ:
        # Mixing tables of different lengths or seeds would make a warehouse whose
        # pairs silently disagree; refuse rather than add to it.
        raise PipelineError(f"warehouse {path} was built with other settings: "
                            f"{', '.join(differ)}; use the same ones or a new file")


def _existing_tables(con) -> set[tuple[str, str]]:
    return set(con.execute(
        "SELECT table_schema, table_name FROM information_schema.tables").fetchall())


def _cells(table: _Table, rows: int) -> int:
    """Rough size of a table (targets: 1 key + 56 columns)."""
    width = 1 + len(table.identity) + (table.n_features or 56)
    return rows * width


def _chunks(items: list, size, limit: int) -> list[list]:
    """Consecutive runs of ``items`` whose sizes sum to at most ``limit`` (at least one item)."""
    out: list[list] = []
    total = limit
    for item in items:
        if total + size(item) > limit:
            out.append([])
            total = 0
        out[-1].append(item)
        total += size(item)
    return out


def _run_group(con, group: _Group, existing: set[tuple[str, str]], rows: int,
               start: dt.datetime, seed: int, key: str, workers: int,
               batch_cells: int) -> None:
    began = time.perf_counter()
    todo = []
    for table in group.tables:
        group.columns += table.n_features
        if (table.schema, table.name) in existing:
            group.skipped += 1
        else:
            todo.append(table)
    for table in todo:  # a cov table can come up twice when two pairs share it
        existing.add((table.schema, table.name))
    local = threading.local()
    cursors = []
    lock = threading.Lock()

    def create(batch: list[_Table]) -> None:
        cur = getattr(local, "cur", None)
        if cur is None:
            cur = local.cur = con.cursor()
            cur.execute("SET TimeZone = 'UTC'")
            with lock:
                cursors.append(cur)
        table = batch[0]
        try:
            cur.execute("BEGIN TRANSACTION")
            for table in batch:
                cur.execute(_table_sql(table, rows, start, seed, key))
            cur.execute("COMMIT")
        except duckdb.Error as exc:
            try:
                cur.execute("ROLLBACK")
            except duckdb.Error:
                pass  # a failed COMMIT has already ended the transaction
            raise PipelineError(f"creating {table.schema}.{table.name} failed: "
                                f"{_one_line(exc)}") from None

    # DuckDB runs a 10,000-row statement on one thread, so the speed comes from
    # creating several tables at once; values do not depend on the order.
    batches = _chunks(todo, lambda t: _cells(t, rows), batch_cells)
    waves = _chunks(batches, lambda b: sum(_cells(t, rows) for t in b), WAVE_CELLS)
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers)
    try:
        for wave in waves:
            for future in [pool.submit(create, b) for b in wave]:
                future.result()
            # Committed tables stay in memory until a checkpoint writes them out; one
            # per wave bounds memory whatever the number of pairs and rows.
            con.execute("CHECKPOINT")
    finally:
        # After a failure, do not start the tables still queued.
        pool.shutdown(wait=True, cancel_futures=True)
        for cur in cursors:
            cur.close()
    group.created = len(todo)
    group.seconds = time.perf_counter() - began


if __name__ == "__main__":
    sys.exit(main())
