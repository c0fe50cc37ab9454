"""The cost estimate (pipelines/cost.py): its arithmetic, checked against workload.md."""
from __future__ import annotations

import pytest

from bigquery_warehouse import bq_warehouse  # noqa: F401 (fixture)
from emulators import bq_emulator, gcs_emulator  # noqa: F401 (fixtures)

from conftest import run_module
from pipelines import cost
from pipelines.errors import PipelineError

WORKLOAD_BYTES = round(168.89 * cost.GB)


def one_pair(**kw) -> cost.Estimate:
    return cost.estimate(["eurusd"], WORKLOAD_BYTES, **kw)


def test_cloud_run_job_costs_at_workload_rates():
    e = one_pair()
    # Job 1: 4 vCPU x 4,200 s and 8 GiB x 4,200 s.
    assert e.extract.vcpu_seconds == 16_800
    assert e.extract.gib_seconds == 33_600
    assert e.extract.dollars == pytest.approx(16_800 * 0.000024 + 33_600 * 0.0000025)
    assert e.extract.dollars == pytest.approx(0.4872)
    # Job 2: 1 vCPU x 900 s and 2 GiB x 900 s.
    assert e.merge.vcpu_seconds == 900
    assert e.merge.gib_seconds == 1_800
    assert e.merge.dollars == pytest.approx(0.0261)


def test_workload_md_job_figures_do_not_follow_from_its_own_rates():
    """workload.md's "Costs" section says Job 1 (4 vCPU / 8 GiB / 70 min) = $0.34 and
    Job 2 (1 vCPU / 2 GiB / 15 min) = $0.01 at $0.000024/vCPU-s and $0.0000025/GiB-s.

    Reproducing its arithmetic gives $0.49 and $0.03 instead, and no pair of rates can
    give both stated figures: job 1 uses exactly 280/15 times job 2's vCPU-seconds *and*
    GiB-seconds, so its price is 18.67 times job 2's whatever the rates, and $0.34 / 18.67
    rounds to $0.02, not $0.01. The estimate keeps the computed figures.
    """
    e = one_pair()
    stated_job1, stated_job2 = 0.34, 0.01
    assert round(e.extract.dollars, 2) == 0.49 != stated_job1
    assert round(e.merge.dollars, 2) == 0.03 != stated_job2

    ratio = e.extract.vcpu_seconds / e.merge.vcpu_seconds
    assert ratio == pytest.approx(280 / 15)
    assert e.extract.gib_seconds / e.merge.gib_seconds == pytest.approx(ratio)
    for rates in (cost.Rates(1, 0), cost.Rates(0, 1), cost.Rates(0.000018, 0.000002)):
        r = one_pair(rates=rates)
        assert r.extract.dollars == pytest.approx(ratio * r.merge.dollars)
    # Any job 1 price that rounds to $0.34 puts job 2 at $0.018 or more: $0.02.
    assert round(0.335 / ratio, 2) == round(0.345 / ratio, 2) == 0.02

    # What does follow: $0.34 + $0.01 + $0.50 (the never measured BigQuery merge) per
    # pair, times 28.
    assert round(stated_job1 + stated_job2 + 0.50, 2) == 0.85
    assert round(28 * 0.85, 2) == 23.80


def test_bigquery_scanned_bytes_are_priced_per_tib():
    """168.89 GB (10^9 bytes) at $6.25 per TiB (2^40 bytes) is $0.96. workload.md's
    "about $1.06" is 168.89 / 1000 TB x $6.25, decimal terabytes at the per-TiB price."""
    e = one_pair(queries_per_pair=0)
    assert e.bigquery.scanned_bytes == e.bigquery.billed_bytes == WORKLOAD_BYTES
    assert e.bigquery.dollars == pytest.approx(WORKLOAD_BYTES / 2**40 * 6.25)
    assert round(e.bigquery.dollars, 2) == 0.96
    assert round(168.89 / 1000 * 6.25, 2) == 1.06
    assert e.dollars == pytest.approx(e.bigquery.dollars + e.extract.dollars + e.merge.dollars)


def test_the_per_query_minimum_sets_the_bill_when_queries_are_small():
    e = one_pair()
    floor = cost.DEFAULT_QUERIES_PER_PAIR * 10 * 2**20
    assert cost.DEFAULT_QUERIES_PER_PAIR == 668 * 80 + 668 * 80 // 16  # reads, batched counts
    assert e.bigquery.queries == cost.DEFAULT_QUERIES_PER_PAIR
    assert e.bigquery.billed_bytes == max(WORKLOAD_BYTES, floor) == floor
    assert e.bigquery.scanned_dollars == pytest.approx(WORKLOAD_BYTES / 2**40 * 6.25)
    # Few queries over many bytes: the bytes set the bill.
    big = cost.estimate(["eurusd"], 10**13, queries_per_pair=10)
    assert big.bigquery.billed_bytes == 10**13


def test_all_pairs_are_28_times_one_without_reuse():
    one = one_pair()
    every = cost.estimate(list(cost_pairs()), WORKLOAD_BYTES)
    assert len(every.pairs) == 28
    assert every.extract.dollars == pytest.approx(28 * one.extract.dollars)
    assert every.merge.dollars == pytest.approx(28 * one.merge.dollars)
    assert every.bigquery.billed_bytes == 28 * one.bigquery.billed_bytes
    assert every.dollars == pytest.approx(28 * one.dollars)


def test_shared_tables_are_paid_for_once():
    pairs = ["eurusd", "gbpusd", "audusd"]
    e = cost.estimate(pairs, 1000, queries_per_pair=100, min_bytes_per_query=1,
                      shared_fraction=0.75)
    assert e.bigquery.scanned_bytes == 1000 + 2 * 250
    assert e.bigquery.queries == 100 + 2 * 25
    # Cloud Run is still one run of each job per pair.
    assert e.extract.runs == e.merge.runs == 3


def test_the_scanned_bytes_hook_is_called_once_per_pair():
    seen = []

    def scanned_bytes(pair: str) -> int:
        seen.append(pair)
        return {"eurusd": 3 * cost.GB, "gbpusd": 5 * cost.GB}[pair]

    e = cost.estimate(["eurusd", "gbpusd"], scanned_bytes, queries_per_pair=0)
    assert seen == ["eurusd", "gbpusd"]
    assert e.bigquery.scanned_bytes == 8 * cost.GB


def test_sizes_and_rates_are_parameters():
    e = cost.estimate(["eurusd"], 0, extract=(2, 4, 600), merge=cost.JobSize(1, 1, 60),
                      rates=cost.Rates(vcpu_second=1, gib_second=10, bigquery_tib=0))
    assert e.extract.dollars == 2 * 600 + 4 * 600 * 10
    assert e.merge.dollars == 60 + 60 * 10


@pytest.mark.parametrize("kwargs", [
    {"extract": (-1, 8, 60)},
    {"rates": cost.Rates(vcpu_second=float("nan"))},
    {"shared_fraction": 1.0},
    {"queries_per_pair": -5},
])
def test_impossible_inputs_are_refused(kwargs):
    with pytest.raises(PipelineError):
        one_pair(**kwargs)
    with pytest.raises(PipelineError, match="no pairs"):
        cost.estimate([], 1)


def test_cli_default_says_where_the_scanned_bytes_come_from(capsys):
    assert cost.main([]) == 0
    out = capsys.readouterr().out
    assert "168.89 GB per pair, the dry-run estimate in workload.md" in out
    assert "28 pairs" in out and "1 pair (eurgbp)" in out
    assert "$0.4872" in out and "$0.0261" in out  # job 1, job 2 per pair
    assert "$13.64" in out  # job 1 for 28 pairs


def test_cli_flags_change_the_figures(capsys):
    assert cost.main(["--pairs", "eurusd,gbpjpy", "--extract-minutes", "35",
                      "--vcpu-second-rate", "0.000018", "--queries-per-pair", "0"]) == 0
    out = capsys.readouterr().out
    assert "2 pairs: eurusd gbpjpy" in out
    assert f"${4 * 2100 * 0.000018 + 8 * 2100 * 0.0000025:.4f}" in out


def test_cli_dry_run_source_uses_the_hook(capsys):
    calls = []

    def hook(source):
        calls.append(source)
        return lambda pair: 2 * cost.GB

    assert cost.main(["--pairs", "eurusd", "--dry-run-source", "bigquery://p",
                      "--queries-per-pair", "0"], dry_run=hook) == 0
    out = capsys.readouterr().out
    assert calls == ["bigquery://p"]
    assert "dry run of each pair's extraction queries on bigquery://p" in out
    assert "2.00 GB" in out


def test_cli_errors_are_one_line_and_exit_2():
    proc = run_module("pipelines.cost", "--dry-run-source", "bigquery://bqx-ml", timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "bigquery://bqx-ml" in proc.stderr
    assert proc.stderr.count("\n") == 1
    proc = run_module("pipelines.cost", "--pairs", "eurusd,usdeur", timeout=60)
    assert proc.returncode == 2 and "usdeur" in proc.stderr


def cost_pairs():
    from pipelines.catalog import load_catalog
    return load_catalog().pairs


def test_dry_run_hook_plans_the_pair_on_bigquery(bq_warehouse, capsys, monkeypatch):
    """The real hook against the BigQuery emulator: it discovers the pair, dry-runs every
    extraction query and reports the total (the emulator reports 0 bytes per dry run,
    so only the plumbing is proven here)."""
    from pipelines.cost import bigquery_dry_run
    from pipelines.extract.batches import MAX_BATCH_TASKS
    from pipelines.sources import BigQuerySource

    # Counted, not replaced: every dry run still goes to the emulator.
    asked = []
    original = BigQuerySource.dry_run_bytes
    monkeypatch.setattr(BigQuerySource, "dry_run_bytes",
                        lambda self, sql: asked.append(sql) or original(self, sql))
    scanned = bigquery_dry_run("bigquery://bqx-ml")("eurusd")
    assert isinstance(scanned, int) and scanned >= 0
    # One dry run per shard's SELECT and one per batch of count queries, as the job asks.
    counts = [q for q in asked if "n_rows" in q]
    selects = len(asked) - len(counts)
    assert selects > 1 and len(counts) == -(-selects // MAX_BATCH_TASKS) < selects
    assert cost.main(["--pairs", "eurusd", "--dry-run-source", "bigquery://bqx-ml"]) == 0
    assert "dry run of each pair's extraction queries on bigquery://bqx-ml" in capsys.readouterr().out


def test_dry_run_hook_refuses_other_sources():
    from pipelines.cost import bigquery_dry_run

    with pytest.raises(PipelineError, match="need a bigquery://PROJECT"):
        bigquery_dry_run("duckdb:///x.duckdb")
