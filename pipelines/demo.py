"""``python -m pipelines.demo``: the whole pipeline pair for one pair on the embedded default.

sample warehouse -> extract (Beam, DirectRunner) -> merge -> validate, at a small scale,
with everything under ``$BQX_DATA_DIR`` (default ``data/``). Re-running resumes: the
warehouse and finished checkpoints are reused, the training file is rebuilt.
"""
from __future__ import annotations

import os
import sys
import time

from pipelines import cli


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the exit code."""
    p = cli.ArgumentParser(prog="python -m pipelines.demo", description=__doc__)
    p.add_argument("--pair", default=cli.env_default("PAIR", "eurusd"))
    p.add_argument("--rows", type=int, default=10000, help="rows of the sample warehouse")
    p.add_argument("--method", default=cli.env_default("MERGE_METHOD", "polars"))
    args = p.parse_args(argv)
    from pipelines.extract.pipeline import extract
    from pipelines.merge.job import run as merge

    data = os.environ.setdefault("BQX_DATA_DIR", "data")
    started = time.monotonic()
    window = extract(["--pair", args.pair, "--sample-rows", str(args.rows)])
    output = os.path.join(data, "output", f"training_{args.pair}.parquet")
    # The window just extracted, by its dates: other windows extracted by hand into the
    # same folder (--days, --start-date) may end on the same day. WINDOW_DAYS and
    # AS_OF_DATE, if set, chose it already, and would clash with the dates.
    for chosen in ("WINDOW_DAYS", "AS_OF_DATE"):
        os.environ.pop(chosen, None)
    code = merge(["--pair", args.pair, "--method", args.method, "--output", output, "--overwrite",
                  "--start-date", window.start.date().isoformat(),
                  "--end-date", window.last_day.isoformat()])
    if code:
        return code
    print(f"\ntraining file: {os.path.abspath(output)}")
    print(f"validation report: {os.path.abspath(output[:-len('.parquet')] + '.validation.json')}")
    print(f"demo finished in {time.monotonic() - started:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_main(main))
