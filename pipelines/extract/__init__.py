"""Job 1, extract: a pair's BigQuery tables -> sharded parquet checkpoints + manifest.

Run it with ``python -m pipelines.extract --pair eurusd``. The Beam pipeline is in
:mod:`pipelines.extract.pipeline`; discovery and planning in :mod:`.plan`; the
per-shard work in :mod:`.transforms`; the final verification and manifest in :mod:`.verify`.
"""
