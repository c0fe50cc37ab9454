"""The merge's shape from its budget: runs of shards and column batches."""
from pipelines.merge import budget


def test_pack_cuts_runs_at_the_limit_and_keeps_oversized_items_alone():
    assert budget.pack([1, 1, 1, 5, 1], 2) == [2, 1, 1, 1]
    assert budget.pack([], 2) == []


def test_pack_first_run_has_its_own_limit():
    assert budget.pack([1] * 10, 4, first_limit=1) == [1, 4, 4, 1]


def test_first_column_batch_is_smaller_so_encoding_starts_sooner():
    row_bytes = [8] * 1000
    batches = budget.column_batches(row_bytes, 100_000, budget.parse_size("1.5GiB"))
    sizes = [len(b) for b in batches]
    assert sum(sizes) == 1000 and [i for b in batches for i in b] == list(range(1000))
    assert sizes[0] * 3 < sizes[1] and len(set(sizes[1:-1])) == 1
