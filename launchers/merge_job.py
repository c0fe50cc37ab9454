"""Entry point of the merge container: ``python -m launchers.merge_job [PAIR] [flags]``.

Configured by the environment: PAIR (or CLOUD_RUN_TASK_INDEX + PAIRS),
GCS_CHECKPOINT_BUCKET, GCS_OUTPUT_BUCKET, MERGE_METHOD, MEMORY_BUDGET, and the window to
merge: START_DATE/END_DATE, or AS_OF_DATE and WINDOW_DAYS (each optional).
"""
import sys

from launchers.job_env import run_for_task
from pipelines.cli import run_main


def main(argv=None) -> int:
    """Run the merge job for this task's pair."""
    from pipelines.merge.job import run

    return run_for_task(run, argv)


if __name__ == "__main__":
    sys.exit(run_main(main))
