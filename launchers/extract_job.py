"""Entry point of the extract container: ``python -m launchers.extract_job [PAIR] [flags]``.

Configured by the environment: PAIR (or CLOUD_RUN_TASK_INDEX + PAIRS),
GCS_CHECKPOINT_BUCKET, EXTRACTION_WORKERS, BQX_SOURCE, and the window: START_DATE/END_DATE,
or AS_OF_DATE and WINDOW_DAYS (each optional). Other
flags go to ``pipelines.extract`` as they are (Beam flags included).
"""
import sys

from launchers.job_env import run_for_task
from pipelines.cli import run_main


def main(argv=None) -> int:
    """Run the extract job for this task's pair."""
    from pipelines.extract.pipeline import run

    return run_for_task(run, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
