"""``python -m pipelines.extract --pair eurusd``: see pipelines.extract.pipeline."""
import sys

from pipelines.cli import run_main
from pipelines.extract.pipeline import run

if __name__ == "__main__":
    sys.exit(run_main(run))
