"""What a run costs: BigQuery bytes and both Cloud Run jobs, per pair and for all pairs.

``python -m pipelines.cost [--pairs all|eurusd,...] [--scanned-gb-per-pair 168.89]
[--dry-run-source bigquery://PROJECT]`` prints, for one pair and for the chosen pairs
(default all 28): the bytes BigQuery scans and bills, the vCPU-seconds and GiB-seconds
of the extract and merge jobs, and the money at the given rates.

Defaults come from /work/shared/notes/workload.md: 168.89 GB scanned per pair (a dry run
of the original implementation's extraction queries), extract 4 vCPU / 8 GiB / 70 min,
merge 1 vCPU / 2 GiB / 15 min, Cloud Run $0.000024 per vCPU-second and $0.0000025 per
GiB-second, BigQuery on-demand $6.25 per TiB. Every figure is a flag.

BigQuery on-demand bills at least 10 MB per query (and per table it references). The
extract job issues a read query per (table, time shard) and a count query per batch of
up to 16 consecutive tasks (pipelines/extract/batches.py; a table's 80 shards make 5
batches of that table alone). With about 668 tables x 80 shards per pair over the full
history that floor, not the bytes scanned, sets the BigQuery bill; the estimate bills
``max(scanned, queries x 10 MB)`` per pair and shows both (``--queries-per-pair 0``
turns the floor off).

The arithmetic is in :func:`estimate`, a pure function; where the scanned bytes come
from is its ``scanned_bytes_per_pair`` argument, a number or a function
``scanned_bytes(pair) -> int`` (e.g. a BigQuery dry run of the pair's extraction queries).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import Callable, Sequence, Union

from pipelines.cli import ArgumentParser, run_main
from pipelines.errors import PipelineError
from pipelines.extract.batches import MAX_BATCH_TASKS

GB = 10**9
MIB = 2**20
TIB = 2**40

#: workload.md: "A dry run of the extraction queries estimated 168.89 GB scanned per pair".
WORKLOAD_SCANNED_GB_PER_PAIR = 168.89
#: The 667 feature tables and the targets table of a pair.
TABLES_PER_PAIR = 668
#: Of which shared by every pair (tri_, mkt_, var_, csi_), extracted once per window.
SHARED_TABLES = 411
#: 28-day shards over the full 2020-2025 history (README: about 80 per table).
SHARDS_PER_TABLE = 80
#: The extract job runs a read query per (table, shard) and one count query per batch of
#: MAX_BATCH_TASKS consecutive tasks, each batch one table's (80 shards are 5 batches).
TASKS_PER_PAIR = TABLES_PER_PAIR * SHARDS_PER_TABLE
DEFAULT_QUERIES_PER_PAIR = TASKS_PER_PAIR + -(-TASKS_PER_PAIR // MAX_BATCH_TASKS)
#: BigQuery on-demand bills at least 10 MB (BigQuery's MB: 2**20 bytes) per query.
MIN_BILLED_BYTES_PER_QUERY = 10 * MIB

ScannedBytes = Union[int, float, Callable[[str], int]]


@dataclass(frozen=True)
class JobSize:
    """The resources of one Cloud Run task and how long it runs."""

    vcpu: float
    memory_gib: float
    seconds: float

    @classmethod
    def of(cls, size: "JobSize | tuple[float, float, float]") -> "JobSize":
        """A JobSize from itself or a ``(vcpu, memory_gib, seconds)`` tuple."""
        return size if isinstance(size, JobSize) else cls(*size)

    def describe(self) -> str:
        """``4 vCPU, 8 GiB, 70 min``."""
        return f"{self.vcpu:g} vCPU, {self.memory_gib:g} GiB, {self.seconds / 60:g} min"


EXTRACT_SIZE = JobSize(4, 8, 70 * 60)
MERGE_SIZE = JobSize(1, 2, 15 * 60)


@dataclass(frozen=True)
class Rates:
    """Prices: Cloud Run per vCPU-second and GiB-second, BigQuery on-demand per TiB."""

    vcpu_second: float = 0.000024
    gib_second: float = 0.0000025
    bigquery_tib: float = 6.25


@dataclass(frozen=True)
class JobCost:
    """A Cloud Run job run once per pair: its resource use and price over ``runs`` pairs."""

    size: JobSize
    runs: int
    rates: Rates

    @property
    def vcpu_seconds(self) -> float:
        """vCPU-seconds of all runs."""
        return self.size.vcpu * self.size.seconds * self.runs

    @property
    def gib_seconds(self) -> float:
        """GiB-seconds of all runs."""
        return self.size.memory_gib * self.size.seconds * self.runs

    @property
    def dollars(self) -> float:
        """Price of all runs."""
        return self.vcpu_seconds * self.rates.vcpu_second + self.gib_seconds * self.rates.gib_second


@dataclass(frozen=True)
class BigQueryCost:
    """The extraction's BigQuery use: bytes scanned, queries, and bytes billed on demand."""

    scanned_bytes: int
    queries: int
    billed_bytes: int
    rates: Rates

    @property
    def scanned_dollars(self) -> float:
        """Price of the scanned bytes alone (no per-query minimum)."""
        return self.scanned_bytes / TIB * self.rates.bigquery_tib

    @property
    def dollars(self) -> float:
        """Price of the billed bytes."""
        return self.billed_bytes / TIB * self.rates.bigquery_tib


@dataclass(frozen=True)
class Estimate:
    """The cost of extracting and merging ``pairs``."""

    pairs: tuple[str, ...]
    bigquery: BigQueryCost
    extract: JobCost
    merge: JobCost

    @property
    def cloud_run_dollars(self) -> float:
        """Both Cloud Run jobs."""
        return self.extract.dollars + self.merge.dollars

    @property
    def dollars(self) -> float:
        """Everything: BigQuery billed bytes and both jobs."""
        return self.bigquery.dollars + self.cloud_run_dollars


def _check_non_negative(name: str, value: float) -> None:
    if not value >= 0:  # also refuses NaN
        raise PipelineError(f"{name} must be zero or more, not {value!r}")


def estimate(
    pairs: Sequence[str],
    scanned_bytes_per_pair: ScannedBytes,
    extract: JobSize | tuple[float, float, float] = EXTRACT_SIZE,
    merge: JobSize | tuple[float, float, float] = MERGE_SIZE,
    rates: Rates = Rates(),
    queries_per_pair: int = DEFAULT_QUERIES_PER_PAIR,
    min_bytes_per_query: int = MIN_BILLED_BYTES_PER_QUERY,
    shared_fraction: float = 0.0,
) -> Estimate:
    """The cost of one extract and one merge run for each of ``pairs``.

    ``scanned_bytes_per_pair`` is the bytes one pair's extraction scans in BigQuery: a
    number for every pair, or a function ``scanned_bytes(pair) -> int`` (such as a
    BigQuery dry run of the pair's queries). ``extract`` and ``merge`` are
    ``(vcpu, memory_gib, seconds)`` per pair. BigQuery bills each pair
    ``max(scanned, queries_per_pair x min_bytes_per_query)`` at ``rates.bigquery_tib``
    per TiB (2**40 bytes).

    ``shared_fraction`` is the part of a pair's scans and queries that reads the tables
    shared by all pairs, which are extracted once: the first pair pays for all of it,
    every further pair for ``1 - shared_fraction``. The default 0 prices every pair as a
    full extraction (an upper bound, and what workload.md assumed).
    """
    pairs = tuple(pairs)
    if not pairs:
        raise PipelineError("no pairs to estimate")
    if not 0 <= shared_fraction < 1:
        raise PipelineError(f"shared fraction must be in [0, 1), not {shared_fraction!r}")
    extract, merge = JobSize.of(extract), JobSize.of(merge)
    for name, value in [("extract vCPU", extract.vcpu), ("extract memory", extract.memory_gib),
                        ("extract time", extract.seconds), ("merge vCPU", merge.vcpu),
                        ("merge memory", merge.memory_gib), ("merge time", merge.seconds),
                        ("vCPU-second rate", rates.vcpu_second),
                        ("GiB-second rate", rates.gib_second),
                        ("BigQuery TiB rate", rates.bigquery_tib),
                        ("queries per pair", queries_per_pair),
                        ("minimum bytes per query", min_bytes_per_query)]:
        _check_non_negative(name, value)
    per_pair = scanned_bytes_per_pair if callable(scanned_bytes_per_pair) else (
        lambda _pair, n=scanned_bytes_per_pair: n)

    scanned = queries = billed = 0
    for i, pair in enumerate(pairs):
        pair_bytes = per_pair(pair)
        _check_non_negative(f"scanned bytes of {pair}", pair_bytes)
        share = 1.0 if i == 0 else 1.0 - shared_fraction
        pair_scanned = round(pair_bytes * share)
        pair_queries = round(queries_per_pair * share)
        scanned += pair_scanned
        queries += pair_queries
        billed += max(pair_scanned, pair_queries * min_bytes_per_query)
    return Estimate(
        pairs=pairs,
        bigquery=BigQueryCost(scanned, queries, billed, rates),
        extract=JobCost(extract, len(pairs), rates),
        merge=JobCost(merge, len(pairs), rates),
    )


def bigquery_dry_run(source: str) -> Callable[[str], int]:
    """The hook for ``--dry-run-source``: a function ``scanned_bytes(pair) -> int``
    that plans the pair's extraction on ``source`` (discovery, default window) and sums
    the ``totalBytesProcessed`` of dry runs of every query it would run."""
    if not source.startswith("bigquery://"):
        raise PipelineError(f"--dry-run-source {source!r}: dry runs need a bigquery://PROJECT "
                            "source (only BigQuery reports the bytes a query would scan)")

    def scanned_bytes(pair: str) -> int:
        from pipelines.catalog import load_catalog
        from pipelines.extract.batches import MAX_BATCH_TASKS, count_query
        from pipelines.extract.plan import make_plan
        from pipelines.sources import open_source
        from pipelines.window import DEFAULT_SHARD_DAYS

        bq = open_source(source)
        try:
            plan = make_plan(bq, load_catalog(), pair, None, "gs://dry-run/unused",
                             DEFAULT_SHARD_DAYS, "drop")
            tasks = plan.tasks
            # The job asks counts one query per batch of tasks (pipelines.extract.batches;
            # MAX_BATCH_TASKS each for a full pair), so one dry run per batch, not per
            # task: the bytes are the sum of the subqueries' either way.
            return (sum(bq.dry_run_bytes(t.select_sql) for t in tasks)
                    + sum(bq.dry_run_bytes(count_query(tasks[i:i + MAX_BATCH_TASKS]))
                          for i in range(0, len(tasks), MAX_BATCH_TASKS)))
        finally:
            bq.close()

    return scanned_bytes


def _money(x: float) -> str:
    return f"${x:,.2f}" if x >= 1 else f"${x:.4f}"


def _rate(x: float) -> str:
    return "$" + (f"{x:.10f}".rstrip("0").rstrip(".") or "0")


def _bytes(n: float) -> str:
    return f"{n / GB:,.2f} GB ({n / TIB:,.3f} TiB)"


def report(one: Estimate, all_: Estimate, scanned_source: str, shared_fraction: float) -> str:
    """The printed table: one pair beside all chosen pairs."""
    rates = all_.extract.rates
    head_one = f"1 pair ({one.pairs[0]})"
    head_all = f"{len(all_.pairs)} pair{'s' if len(all_.pairs) != 1 else ''}"
    rows: list[tuple[str, str, str]] = []

    def row(label: str, fn) -> None:
        rows.append((label, fn(one), fn(all_)))

    rows.append(("BigQuery", "", ""))
    row("  scanned", lambda e: _bytes(e.bigquery.scanned_bytes))
    row("  queries", lambda e: f"{e.bigquery.queries:,}")
    row("  billed (>= 10 MB a query)", lambda e: _bytes(e.bigquery.billed_bytes))
    row("  cost of the scanned bytes", lambda e: _money(e.bigquery.scanned_dollars))
    row("  cost billed", lambda e: _money(e.bigquery.dollars))
    for name, attr in (("extract job", "extract"), ("merge job", "merge")):
        size = getattr(one, attr).size
        rows.append((f"{name} ({size.describe()})", "", ""))
        row("  vCPU-seconds", lambda e, a=attr: f"{getattr(e, a).vcpu_seconds:,.0f}")
        row("  GiB-seconds", lambda e, a=attr: f"{getattr(e, a).gib_seconds:,.0f}")
        row("  cost", lambda e, a=attr: _money(getattr(e, a).dollars))
    row("Cloud Run, both jobs", lambda e: _money(e.cloud_run_dollars))
    row("total", lambda e: _money(e.dollars))

    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(head_one), *(len(r[1]) for r in rows))
    w2 = max(len(head_all), *(len(r[2]) for r in rows))
    lines = [
        f"Cost estimate for {head_all}: {' '.join(all_.pairs)}",
        f"rates: Cloud Run {_rate(rates.vcpu_second)} per vCPU-second, "
        f"{_rate(rates.gib_second)} per GiB-second; BigQuery on-demand "
        f"{_rate(rates.bigquery_tib)} per TiB",
        f"scanned bytes: {scanned_source}",
        f"queries: {one.bigquery.queries:,} for a pair's whole extraction (a read per table "
        f"and shard, a count per {MAX_BATCH_TASKS} of them); BigQuery bills at least "
        f"{MIN_BILLED_BYTES_PER_QUERY // MIB} MB per query",
    ]
    if len(all_.pairs) > 1:
        lines.append(
            f"shared tables: {shared_fraction:.0%} of each further pair's extraction reused"
            + (" (none: every pair priced as a full extraction, an upper bound; "
               "--shared-fraction models the reuse)" if shared_fraction == 0 else ""))
    lines.append("")
    lines.append(f"{'':<{w0}}  {head_one:>{w1}}  {head_all:>{w2}}")
    for label, a, b in rows:
        lines.append(f"{label:<{w0}}  {a:>{w1}}  {b:>{w2}}".rstrip())
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """Options of ``python -m pipelines.cost``."""
    p = ArgumentParser(prog="python -m pipelines.cost",
                       description="Estimate the cost of extracting and merging pairs.")
    p.add_argument("--pairs", default="all", help="all (default) or a comma list: eurusd,gbpusd")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--scanned-gb-per-pair", type=float, default=WORKLOAD_SCANNED_GB_PER_PAIR,
                     help=f"GB (10^9 bytes) BigQuery scans per pair (default "
                          f"{WORKLOAD_SCANNED_GB_PER_PAIR}, workload.md's dry-run estimate)")
    src.add_argument("--dry-run-source", metavar="bigquery://PROJECT",
                     help="dry-run each pair's extraction queries there for the scanned bytes")
    p.add_argument("--extract-vcpu", type=float, default=EXTRACT_SIZE.vcpu)
    p.add_argument("--extract-memory-gib", type=float, default=EXTRACT_SIZE.memory_gib)
    p.add_argument("--extract-minutes", type=float, default=EXTRACT_SIZE.seconds / 60)
    p.add_argument("--merge-vcpu", type=float, default=MERGE_SIZE.vcpu)
    p.add_argument("--merge-memory-gib", type=float, default=MERGE_SIZE.memory_gib)
    p.add_argument("--merge-minutes", type=float, default=MERGE_SIZE.seconds / 60)
    p.add_argument("--vcpu-second-rate", type=float, default=Rates.vcpu_second,
                   help="Cloud Run $ per vCPU-second (default %(default)s)")
    p.add_argument("--gib-second-rate", type=float, default=Rates.gib_second,
                   help="Cloud Run $ per GiB-second (default %(default)s)")
    p.add_argument("--bigquery-tib-rate", type=float, default=Rates.bigquery_tib,
                   help="BigQuery on-demand $ per TiB (default %(default)s)")
    p.add_argument("--queries-per-pair", type=int, default=DEFAULT_QUERIES_PER_PAIR,
                   help="query jobs of one pair's extraction (default %(default)s: a read "
                        "per table and shard, 668 x 80, and a count per 16 of them); 0 "
                        "ignores the 10 MB per-query minimum")
    p.add_argument("--shared-fraction", type=float, default=0.0,
                   help="part of each further pair's extraction that reads the shared tables "
                        "and is reused (0 = none, the default; about 0.6 by table count)")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None, dry_run=bigquery_dry_run) -> int:
    """Entry point of ``python -m pipelines.cost``; ``dry_run(source)`` returns the
    ``scanned_bytes(pair)`` function used with ``--dry-run-source``."""
    from pipelines.catalog import load_catalog

    args = parse_args(sys.argv[1:] if argv is None else argv)
    catalog = load_catalog()
    if args.pairs.strip() == "all":
        pairs = list(catalog.pairs)
    else:
        pairs = [catalog.check_pair(p.strip()) for p in args.pairs.split(",") if p.strip()]
    if args.dry_run_source:
        scanned = dry_run(args.dry_run_source)
        scanned_source = f"dry run of each pair's extraction queries on {args.dry_run_source}"
    else:
        _check_non_negative("--scanned-gb-per-pair", args.scanned_gb_per_pair)
        scanned = round(args.scanned_gb_per_pair * GB)
        scanned_source = (f"{args.scanned_gb_per_pair:g} GB per pair" + (
            ", the dry-run estimate in workload.md (not measured here; "
            "--dry-run-source measures it)"
            if args.scanned_gb_per_pair == WORKLOAD_SCANNED_GB_PER_PAIR else ", as given"))
    common = dict(
        extract=JobSize(args.extract_vcpu, args.extract_memory_gib, args.extract_minutes * 60),
        merge=JobSize(args.merge_vcpu, args.merge_memory_gib, args.merge_minutes * 60),
        rates=Rates(args.vcpu_second_rate, args.gib_second_rate, args.bigquery_tib_rate),
        queries_per_pair=args.queries_per_pair,
        shared_fraction=args.shared_fraction,
    )
    one = estimate(pairs[:1], scanned, **common)
    all_ = estimate(pairs, scanned, **common)
    print(report(one, all_, scanned_source, args.shared_fraction))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
