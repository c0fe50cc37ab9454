"""The merge's shape from its budget: runs of shards and column batches."""
import pytest

from pipelines.errors import PipelineError
from pipelines.merge import budget


def test_pack_cuts_runs_at_the_limit_and_keeps_oversized_items_alone():
    assert budget.pack([1, 1, 1, 5, 1], 2) == [2, 1, 1, 1]
    assert budget.pack([], 2) == []


def _columns(batches):
    """Every (table, column) in the order the batches hand them out."""
    return [(t, c) for b in batches for t, start, stop in b for c in range(start, stop)]


def test_column_batches_hold_every_column_once_in_order_within_the_limit():
    tables = [[8, 8]] + [[8]] * 999
    limit = budget.batch_bytes(budget.parse_size("1.5GiB"))
    batches = budget.column_batches(tables, 100_000, limit)
    assert _columns(batches) == [(0, 0), (0, 1)] + [(t, 0) for t in range(1, 1000)]
    assert all(sum((b - a) * 8 * 100_000 for _, a, b in batch) <= limit for batch in batches)
    assert len(batches) == -(-1001 * 8 * 100_000 // int(limit))


def test_wide_tables_come_in_slices_the_spine_too():
    """At 100,000 rows a batch is ~200 MB and a slice a sixteenth of it: a 232-column
    table (186 MB) becomes slices, a 12-column one stays whole, and so does a spine of
    12 targets, but not one of 300. At 10,000 rows the same table needs ten times fewer
    slices."""
    rows, size = 100_000, budget.parse_size("1.5GiB")
    limit = budget.batch_bytes(size)
    tables = [[8] * 300, [8] * 12, [8] * 232, [], [8] * 12]
    batches = budget.column_batches(tables, rows, limit)
    assert _columns(batches) == [(t, c) for t, cols in enumerate(tables) for c in range(len(cols))]
    runs = [run for b in batches for run in b]
    assert (1, 0, 12) in runs and (3, 0, 0) in runs
    assert len([r for r in runs if r[0] == 0]) > 1
    assert (0, 0, 12) in [run for b in budget.column_batches([[8] * 12] + tables[1:], rows, limit)
                          for run in b]
    slices = [(a, b) for t, a, b in runs if t == 2]
    assert len(slices) > 1 and all((b - a) * 8 * rows <= limit / budget.SLICES_PER_BATCH
                                   for a, b in slices)
    runs_10k = [run for b in budget.column_batches(tables, 10_000, limit) for run in b]
    assert (1, 0, 12) in runs_10k and 1 < len([r for r in runs_10k if r[0] == 2]) < len(slices) / 5


def test_a_largest_column_batch_size_makes_smaller_batches_never_larger_ones():
    """--column-batch-size: batches of at most that many bytes, within the budget."""
    size = budget.parse_size("1.5GiB")
    tables = [[8] * 49] + [[8] * 20] * 600
    default = budget.batch_bytes(size)
    assert budget.batch_bytes(size, 48 << 20) == 48 << 20
    assert budget.batch_bytes(size, 16 << 30) == default
    assert budget.batch_bytes(budget.parse_size("500MiB"), 48 << 20) < 48 << 20
    batches = budget.column_batches(tables, 100_000, budget.batch_bytes(size, 48 << 20))
    assert len(batches) > len(budget.column_batches(tables, 100_000, default))
    for batch in batches:
        assert sum((b - a) * 8 * 100_000 for _, a, b in batch) <= 48 << 20


def test_unusable_sizes_are_refused_naming_the_option():
    with pytest.raises(PipelineError, match="--column-batch-size '12 parsecs' is not a size"):
        budget.parse_size("12 parsecs", "--column-batch-size")
    with pytest.raises(PipelineError, match="--column-batch-size must be more than 0 bytes"):
        budget.batch_bytes(budget.parse_size("1.5GiB"), 0)


def test_validation_reads_back_a_slice_of_a_batch_at_a_time():
    """The merge's read-back of its file costs what one of its reads does (a slice), not a
    whole column batch: at 100,000 rows a batch's worth of columns made the validation
    the merge's peak."""
    batch = budget.batch_bytes(budget.parse_size("1.5GiB"))
    for rows in (1_000, 10_000, 100_000):
        columns = budget.validation_columns(rows, batch)
        assert 16 <= columns <= 2000
        assert columns == 16 or columns * rows * 8 <= batch / budget.SLICES_PER_BATCH
    assert budget.validation_columns(100_000, batch) == 16
