"""Command-line options of the extract job (Beam PipelineOptions)."""
from __future__ import annotations

import os

from apache_beam.options.pipeline_options import PipelineOptions

from pipelines.cli import env_choice, env_number
from pipelines.window import DEFAULT_SHARD_DAYS

DUPLICATE_KEY_POLICIES = ("drop", "error")


class ExtractOptions(PipelineOptions):
    """Options of ``python -m pipelines.extract``; Beam's own flags work alongside."""

    @classmethod
    def _add_argparse_args(cls, parser):
        parser.add_argument("--pair", default=os.environ.get("PAIR"),
                            help="currency pair, e.g. eurusd [PAIR]")
        parser.add_argument("--source", default=os.environ.get("BQX_SOURCE"),
                            help="duckdb:///path/file.duckdb or bigquery://PROJECT "
                                 "[BQX_SOURCE]; default: the embedded sample warehouse, "
                                 "created on first use")
        parser.add_argument("--checkpoint_root", "--checkpoint-root",
                            dest="checkpoint_root", default=None,
                            help="folder or gs://BUCKET/PREFIX for checkpoints "
                                 "[GCS_CHECKPOINT_BUCKET]; default data/checkpoints")
        parser.add_argument("--start_date", "--start-date", dest="start_date", default=os.environ.get("START_DATE"),
                            help="first day of the window, YYYY-MM-DD [START_DATE]")
        parser.add_argument("--end_date", "--end-date", dest="end_date", default=os.environ.get("END_DATE"),
                            help="last day of the window (included) [END_DATE]; without "
                                 "both dates the window is the whole days the targets "
                                 "cover, up to yesterday (UTC)")
        parser.add_argument("--days", type=int, metavar="N",
                            default=env_number("WINDOW_DAYS", None, int, minimum=1),
                            help="without dates: only the last N of those days "
                                 "[WINDOW_DAYS]")
        parser.add_argument("--as_of", "--as-of", dest="as_of", metavar="YYYY-MM-DD",
                            default=os.environ.get("AS_OF_DATE"),
                            help="without dates: the day taken as today (UTC) for that "
                                 "window, which ends the day before at the latest "
                                 "[AS_OF_DATE]; the workflow sets it once per run, so that "
                                 "every pair and every retried task gets the same window")
        parser.add_argument("--catalog", default=os.environ.get("BQX_CATALOG"),
                            help="catalog TOML file [BQX_CATALOG]; default: the shipped one")
        parser.add_argument("--shard_days", "--shard-days", dest="shard_days", type=int,
                            default=env_number("SHARD_DAYS", DEFAULT_SHARD_DAYS, int, minimum=1),
                            help=f"length of a checkpoint shard in days [SHARD_DAYS] "
                                 f"(default {DEFAULT_SHARD_DAYS})")
        parser.add_argument("--on_duplicate_keys", "--on-duplicate-keys",
                            dest="on_duplicate_keys", choices=DUPLICATE_KEY_POLICIES,
                            default=env_choice("ON_DUPLICATE_KEYS", "drop", DUPLICATE_KEY_POLICIES),
                            help="drop repeated keys (counted) or fail [ON_DUPLICATE_KEYS]")
        parser.add_argument("--sample_rows", "--sample-rows", dest="sample_rows", type=int,
                            default=env_number("SAMPLE_ROWS", 10000, int, minimum=1),
                            help="rows per table when the embedded warehouse is created")
        parser.add_argument("--verbose", action="store_true", help="debug logging")
