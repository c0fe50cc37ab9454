"""Benchmarks: ``python -m bench.merge --rows 20000`` (see bench/merge.py)."""
