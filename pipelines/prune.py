"""``python -m pipelines.prune [--checkpoint-root ROOT] [--keep-windows 1]
[--keep-dates FIRST..LAST ...] [--delete]``: remove the checkpoints no kept extraction
needs.

An extraction run again on a later day commits a new window, and the last shard of each
table in the earlier window (clipped at its old end) is then used by nothing but that
window's manifest. This keeps, for every pair, the committed windows ending on its
``--keep-windows`` latest end days (all windows ending on one of those days) and the
windows named by ``--keep-dates`` (say a full history extracted once with fixed dates,
beside daily ``--days`` windows that end later), and removes the other windows'
manifests and success markers and every shard and commit record that no kept manifest
of *any* pair lists: a shared table's shard stays while one pair still needs it, and the
shards of an extraction that never finished go (a later run extracts them again).

Only files last written ``--min-age-hours`` ago or earlier are removed, so the shards and
manifests of an extraction still running are left alone (do not prune a root while an
extraction of an *older* window is running: the shards it already counts as done may be
removed, and it then fails its verification, to be run again). Files that do not belong
to the checkpoint layout are never touched. Without ``--delete`` nothing is removed: the
plan is printed. Success markers go first, then manifests, then records and shards, so
an interrupted prune never leaves a committed window whose files are gone.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import logging
import sys

from pipelines import checkpoints, cli, storage
from pipelines.errors import PipelineError
from pipelines.window import Window, parse_date, window_from_dates

log = logging.getLogger("pipelines.prune")

DEFAULT_MIN_AGE_HOURS = 24.0


@dataclasses.dataclass
class PrunePlan:
    """What a prune of one checkpoint root keeps and removes."""

    kept: dict[str, list[Window]]          # pair -> windows kept
    windows: list[storage.FileInfo]        # manifests and success markers to remove
    shards: list[storage.FileInfo]         # shards and commit records to remove
    too_new: int                           # files no kept window lists, left for their age

    def removals(self) -> list[storage.FileInfo]:
        """Every file to remove, in a safe order: success markers, manifests, records,
        then shards."""
        markers = sorted(self.windows, key=lambda f: (not f.path.endswith(".SUCCESS"), f.path))
        shards = sorted(self.shards, key=lambda f: (not f.path.endswith(".json"), f.path))
        return markers + shards


def _classify(relpath: str) -> tuple[str, str | None, Window | None]:
    """("window", pair, window) for a manifest or success marker, ("shard", None, None)
    for a shard or commit record, ("other", None, None) for anything else, by where the
    file (its path relative to the root) sits in the checkpoint layout."""
    parts = relpath.split("/")
    name = parts[-1]
    if len(parts) == 4 and parts[0] == "pairs" and parts[2] == "manifests":
        for suffix in (".SUCCESS", ".json"):
            if name.endswith(suffix):
                try:
                    return "window", parts[1], Window.from_id(name[: -len(suffix)])
                except PipelineError:  # not a window's name: not ours to remove
                    break
    elif ((len(parts) == 3 and parts[0] == "shared") or (len(parts) == 4 and parts[0] == "pairs")) \
            and (name.endswith(".parquet") or name.endswith(".json")):
        return "shard", None, None
    return "other", None, None


def parse_window(text: str) -> Window:
    """The window of ``--keep-dates FIRST..LAST`` (both days included)."""
    first, sep, last = text.partition("..")
    if not sep:
        raise PipelineError(f"--keep-dates {text!r} is not FIRST..LAST, like "
                            "2020-01-01..2025-12-31")
    return window_from_dates(parse_date(first, "--keep-dates"), parse_date(last, "--keep-dates"))


def plan_prune(root: str, keep_windows: int = 1, min_age_hours: float = DEFAULT_MIN_AGE_HOURS,
               now: dt.datetime | None = None, keep: tuple[Window, ...] = ()) -> PrunePlan:
    """Work out what pruning ``root`` keeps and removes (nothing is removed here).

    ``keep`` names windows kept besides the latest; each must be committed for some
    pair, or the prune stops (a mistyped date would otherwise protect nothing). Every
    kept window's manifest is loaded and checked as the merge checks it: a malformed one
    stops the prune, since the files it lists cannot be known."""
    if keep_windows < 1:
        raise PipelineError(f"--keep-windows must be at least 1, not {keep_windows}")
    if min_age_hours < 0:
        raise PipelineError(f"--min-age-hours must not be negative, not {min_age_hours}")
    checkpoints.check_root(root)
    cutoff = (now or dt.datetime.now(dt.timezone.utc)) - dt.timedelta(hours=min_age_hours)
    window_files: dict[str, list[tuple[Window, storage.FileInfo]]] = {}
    shard_files = []
    for f in storage.list_file_info(root):
        relpath = checkpoints.relative(root, f.path)
        kind, pair, window = _classify(relpath)
        if kind == "window":
            window_files.setdefault(pair, []).append((window, f))
        elif kind == "shard":
            shard_files.append((relpath, f))
    if not window_files and not shard_files:
        raise PipelineError(f"no checkpoints under {root}: give the extract job's "
                            f"--checkpoint-root")
    committed = {pair: [w for w, f in entries if f.path.endswith(".SUCCESS")]
                 for pair, entries in window_files.items()}
    for window in keep:
        if not any(window in windows for windows in committed.values()):
            raise PipelineError(
                f"--keep-dates {window.start.date()}..{window.last_day}: "
                f"no pair has that window committed under {root} (committed: "
                f"{', '.join(sorted({w.id for ws in committed.values() for w in ws})) or 'none'})")
    kept: dict[str, list[Window]] = {}
    needed: set[str] = set()  # paths relative to the root, as manifests list them
    for pair, entries in sorted(window_files.items()):
        windows = committed[pair]
        kept[pair] = sorted(set(checkpoints.windows_ending_last(windows, keep_windows))
                            | {w for w in windows if w in keep})
        for window in kept[pair]:
            manifest = checkpoints.load_manifest(root, pair, window)
            for entry in manifest.tables:
                for shard in entry["shards"]:
                    needed.update((shard["path"], checkpoints.record_path(shard["path"])))
    old_windows = [f for pair, entries in window_files.items() for w, f in entries
                   if w not in kept[pair] and f.updated <= cutoff]
    unused = [f for relpath, f in shard_files if relpath not in needed]
    return PrunePlan(kept, old_windows, [f for f in unused if f.updated <= cutoff],
                     sum(f.updated > cutoff for f in unused))


def apply(removals: list[storage.FileInfo]) -> None:
    """Remove ``removals`` (a plan's :meth:`PrunePlan.removals`) in their order, with
    progress."""
    progress = cli.Progress("prune", len(removals), "files")
    try:
        for done, f in enumerate(removals, start=1):
            storage.delete(f.path)
            progress.update(done)
    finally:
        progress.close()


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Options of ``python -m pipelines.prune``."""
    p = cli.ArgumentParser(prog="python -m pipelines.prune",
                           description=__doc__.split("\n\n")[0].split(":", 1)[-1].strip())
    p.add_argument("--checkpoint-root", default=None,
                   help="the extract job's checkpoint root [GCS_CHECKPOINT_BUCKET]; default "
                        "data/checkpoints")
    p.add_argument("--keep-windows", type=int, default=1,
                   help="per pair, keep the committed windows ending on this many latest end "
                        "days (default 1)")
    p.add_argument("--keep-dates", action="append", default=[], metavar="FIRST..LAST",
                   help="also keep this window wherever it is committed (repeatable), e.g. "
                        "a full history extracted once: 2020-01-01..2025-12-31")
    p.add_argument("--min-age-hours", type=float, default=DEFAULT_MIN_AGE_HOURS,
                   help=f"remove only files last written this long ago or earlier (default "
                        f"{DEFAULT_MIN_AGE_HOURS:g})")
    p.add_argument("--delete", action="store_true",
                   help="remove the files; without it the plan is printed and nothing changes")
    p.add_argument("--verbose", action="store_true")
    return p.parse_args(argv)


def run(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m pipelines.prune``; returns the exit code."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    cli.setup_logging(args.verbose)
    root = storage.resolve_local(args.checkpoint_root or checkpoints.default_checkpoint_root())
    keep = tuple(parse_window(text) for text in args.keep_dates)
    plan = plan_prune(root, args.keep_windows, args.min_age_hours, keep=keep)
    removals = plan.removals()
    for pair, windows in plan.kept.items():
        log.info("[prune] %s: keeping %s", pair, ", ".join(w.id for w in windows) or "nothing")
    for f in removals[:20]:
        log.info("[prune] %s %s", "remove" if args.delete else "would remove", f.path)
    if args.delete:
        apply(removals)
    verb = "removed" if args.delete else "would be removed (pass --delete to remove them)"
    print(f"{root}: {len(plan.windows)} manifest file(s) of dropped windows and "
          f"{len(plan.shards)} shard file(s), {sum(f.size for f in removals) / 2**30:.2f} GiB, "
          f"{verb}; "
          f"{plan.too_new} unlisted file(s) newer than {args.min_age_hours:g} h left")
    return cli.EXIT_OK


if __name__ == "__main__":
    sys.exit(cli.run_main(run))
