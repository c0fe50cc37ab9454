"""Job 2, merge: a pair's checkpoints -> one training parquet file.

The merge walks the spine (the targets rows of the window) in windows of a few thousand
rows. For each window it takes the matching rows of every checkpoint (all are sorted by
key, so each table is read once, front to back), LEFT JOINs them onto the spine with the
chosen method, and writes the result as a row group. Memory follows the window, never
the number of rows: see :mod:`pipelines.merge.budget`.
"""
