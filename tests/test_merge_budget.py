"""The merge's shape from its budget: runs of shards and column batches."""
import pytest

from pipelines.errors import PipelineError
from pipelines.merge import budget


def test_pack_cuts_runs_at_the_limit_and_keeps_oversized_items_alone():
    assert budget.pack([1, 1, 1, 5, 1], 2) == [2, 1, 1, 1]
    assert budget.pack([], 2) == []


def test_pack_first_run_has_its_own_limit():
    assert budget.pack([1] * 10, 4, first_limit=1) == [1, 4, 4, 1]


def _columns(batches):
    """Every (table, column) in the order the batches hand them out."""
    return [(t, c) for b in batches for t, start, stop in b for c in range(start, stop)]


def test_first_column_batch_is_smaller_so_encoding_starts_sooner():
    tables = [[8, 8]] + [[8]] * 999
    batches = budget.column_batches(tables, 100_000, budget.batch_bytes(budget.parse_size("1.5GiB")))
    sizes = [len(b) for b in batches]
    assert _columns(batches) == [(0, 0), (0, 1)] + [(t, 0) for t in range(1, 1000)]
    assert sizes[0] * 3 < sizes[1] and len(set(sizes[1:-1])) == 1


def test_wide_tables_come_in_slices_of_a_quarter_batch_but_never_the_spine():
    """At 100,000 rows a batch is 48 MiB: a 232-column table (186 MB) becomes slices,
    a 12-column one stays whole, and so does a spine of 300 target columns."""
    rows, size = 100_000, budget.parse_size("1.5GiB")
    limit = budget.batch_bytes(size)
    tables = [[8] * 300, [8] * 12, [8] * 232, [], [8] * 12]
    batches = budget.column_batches(tables, rows, limit)
    assert _columns(batches) == [(t, c) for t, cols in enumerate(tables) for c in range(len(cols))]
    runs = [run for b in batches for run in b]
    assert (0, 0, 300) in runs and (1, 0, 12) in runs and (3, 0, 0) in runs
    slices = [(a, b) for t, a, b in runs if t == 2]
    assert len(slices) > 1 and all((b - a) * 8 * rows <= limit / 4 for a, b in slices)
    # 10,000 rows: the 232-column table (18.6 MB) is cut in two, the others fit a slice.
    runs = [run for b in budget.column_batches(tables, 10_000, limit) for run in b]
    assert [(a, b) for t, a, b in runs if t == 2] == [(0, 157), (157, 232)]
    assert all(b - a == len(tables[t]) for t, a, b in runs if t != 2)


def test_batches_stop_growing_with_the_budget_at_their_largest_size():
    """A batch larger than BATCH_BYTES_MAX buys no speed: a larger budget keeps the same
    batches, a smaller one makes smaller ones, and so does a smaller largest size."""
    tables = [[8] * 49] + [[8] * 20] * 600
    default = budget.batch_bytes(budget.parse_size("1.5GiB"))
    assert default == budget.batch_bytes(budget.parse_size("16GiB")) == budget.BATCH_BYTES_MAX
    assert budget.batch_bytes(budget.parse_size("500MiB")) < default
    assert budget.batch_bytes(budget.parse_size("16GiB"), 8 << 20) == 8 << 20
    batches = budget.column_batches(tables, 100_000, default)
    assert len(budget.column_batches(tables, 100_000, default / 2)) > len(batches)
    for batch in batches[1:]:
        assert sum((b - a) * 8 * 100_000 for _, a, b in batch) <= budget.BATCH_BYTES_MAX


def test_unusable_sizes_are_refused_naming_the_option():
    with pytest.raises(PipelineError, match="--column-batch-size '12 parsecs' is not a size"):
        budget.parse_size("12 parsecs", "--column-batch-size")
    with pytest.raises(PipelineError, match="--column-batch-size must be more than 0 bytes"):
        budget.batch_bytes(budget.parse_size("1.5GiB"), 0)
