"""Container entry points of the two Cloud Run jobs (extract-only and merge-only)."""
