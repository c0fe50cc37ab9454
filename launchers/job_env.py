"""What both job launchers share: which pair a container (or Cloud Run task) works on."""
from __future__ import annotations

import os

from pipelines.catalog import load_catalog
from pipelines.errors import PipelineError


def pair_for_task(argv: list[str], env=os.environ) -> str:
    """The pair of this run: the first argument, else ``PAIR``, else the entry of
    ``PAIRS`` (comma-separated, default: all 28) at ``CLOUD_RUN_TASK_INDEX``.

    One Cloud Run execution with ``--tasks 28`` thereby fans out over every pair.
    """
    catalog = load_catalog(env.get("BQX_CATALOG") or None)
    positional = [a for a in argv if not a.startswith("-")]
    if positional:
        return catalog.check_pair(positional[0])
    if env.get("PAIR"):
        return catalog.check_pair(env["PAIR"])
    index = env.get("CLOUD_RUN_TASK_INDEX")
    if index is None:
        raise PipelineError("no pair: pass it as an argument, or set PAIR, or run as a "
                            "Cloud Run task (CLOUD_RUN_TASK_INDEX) with PAIRS")
    pairs = [p.strip() for p in env.get("PAIRS", ",".join(catalog.pairs)).split(",") if p.strip()]
    try:
        return catalog.check_pair(pairs[int(index)])
    except (IndexError, ValueError):
        raise PipelineError(f"CLOUD_RUN_TASK_INDEX={index} has no pair in PAIRS "
                            f"({len(pairs)} pairs)") from None


def flags(argv: list[str]) -> list[str]:
    """The arguments that are flags (the positional pair removed)."""
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            out.append(a)
            continue
        if a.startswith("-"):
            out.append(a)
            skip = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("-")
    return out


def run_for_task(job_run, argv: list[str] | None) -> int:
    """Call a job's ``run(argv)`` with this task's pair (see :func:`pair_for_task`) and
    the remaining flags."""
    import sys

    argv = sys.argv[1:] if argv is None else argv
    if "-h" in argv or "--help" in argv:
        return job_run(["--help"])  # the job's own options; no pair needed to read them
    return job_run(["--pair", pair_for_task(argv), *flags(argv)])
