"""BQX ML feature pipelines: source -> checkpoints (extract) -> training file (merge).

Shared code for both jobs lives directly in this package: the catalog (what a pair's
tables are and how their columns are named), the time window, the query builder, the
checkpoint layout and manifest, storage, and validation of the training file.
"""
