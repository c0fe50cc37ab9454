"""``python -m pipelines.merge --pair eurusd --method polars``: see pipelines.merge.job."""
import sys

from pipelines.cli import run_main
from pipelines.merge.job import run

if __name__ == "__main__":
    sys.exit(run_main(run))
