"""Checkpoint layout, commit records and the per-pair manifest.

Layout under a checkpoint root (a folder or a ``gs://`` prefix)::

    shared/{table}/{shard}.parquet          tables every pair shares (tri_, mkt_, var_, csi_)
    shared/{table}/{shard}.json             the shard's commit record
    pairs/{pair}/{table}/{shard}.parquet    the pair's own tables and its targets
    pairs/{pair}/{table}/{shard}.json
    pairs/{pair}/manifests/{window}.json    the manifest of one extraction window
    pairs/{pair}/manifests/{window}.SUCCESS written last, after verification

``{shard}`` and ``{window}`` are time ranges like ``20250106T0000-20250203T0000``. A
shard is written under a temporary name and renamed into place; its commit record is
written after it. A shard counts as done only when its record exists, the record's
fingerprint matches the current query and schema, and the file's size and CRC32C match
the record. Everything else is redone.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines import storage
from pipelines.catalog import Column, TableSpec, check_identifier, check_output_columns
from pipelines.errors import PipelineError, first_line
from pipelines.schema import ARROW_TYPES, arrow_type
from pipelines.window import Window, length_days

log = logging.getLogger(__name__)

FORMAT = 1

# Checkpoint parquet settings: one row group per shard (the merge reads shards whole),
# dictionary encoding except for floating-point columns (continuous values never fit a
# dictionary: trying cost half of the write), page checksums, statistics on the key.
# Part of the fingerprint: shards written otherwise are redone.
CHECKPOINT_LAYOUT = "one row group; no dictionary for floats"
CHECKPOINT_COMPRESSION = "snappy"


def default_checkpoint_root() -> str:
    """``gs://$GCS_CHECKPOINT_BUCKET/checkpoints`` if set, else ``$BQX_DATA_DIR/checkpoints``."""
    bucket = os.environ.get("GCS_CHECKPOINT_BUCKET")
    if bucket:
        return bucket if bucket.startswith("gs://") else f"gs://{bucket}/checkpoints"
    return os.path.join(os.environ.get("BQX_DATA_DIR", "data"), "checkpoints")


def check_root(root: str) -> str:
    """Return ``root`` if it can be a checkpoint root; refuse a local path that is a file
    and a ``gs://`` path with ``.``/``..`` segments, naming it."""
    if storage.is_gcs(root):
        return storage.check_gcs_path(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise PipelineError(f"checkpoint root {root} is not a folder")
    return root


def shard_relpath(spec_shared: bool, pair: str, table: str, shard_id: str) -> str:
    """A shard's path relative to the checkpoint root, '/'-separated: the only form a
    manifest may list (anything else could point outside the root)."""
    area = "shared" if spec_shared else f"pairs/{pair}"
    return f"{area}/{table}/{shard_id}.parquet"


def shard_path(root: str, spec_shared: bool, pair: str, table: str, shard: Window) -> str:
    """Where a shard's parquet file lives."""
    area = ("shared",) if spec_shared else ("pairs", pair)
    return storage.join(root, *area, table, f"{shard.id}.parquet")


def record_path(parquet_path: str) -> str:
    """The commit record beside a shard."""
    return parquet_path[: -len(".parquet")] + ".json"


def manifest_path(root: str, pair: str, window: Window) -> str:
    """The manifest of ``pair`` for ``window``."""
    return storage.join(root, "pairs", pair, "manifests", f"{window.id}.json")


def success_path(root: str, pair: str, window: Window) -> str:
    """The success marker written after the manifest."""
    return storage.join(root, "pairs", pair, "manifests", f"{window.id}.SUCCESS")


def output_schema(spec: TableSpec, key: str) -> pa.Schema:
    """The Arrow schema of a table's checkpoint: the key, then its output columns."""
    fields = [pa.field(key, arrow_type("TIMESTAMP"), nullable=False)]
    fields += [pa.field(c.output, arrow_type(c.type)) for c in spec.columns]
    return pa.schema(fields)


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One unit of extraction work: one table's rows in one time shard."""

    spec: TableSpec
    shard: Window
    path: str
    select_sql: str
    count_sql: str
    fingerprint: str
    # Whether count_sql also counts the table's bad keys (its ``n_bad`` column): only
    # the window's first shard does.
    counts_bad_keys: bool = False

    @property
    def record_path(self) -> str:
        """Path of this task's commit record."""
        return record_path(self.path)

    @property
    def label(self) -> str:
        """Short name for logs and errors."""
        return f"{self.spec.dataset}.{self.spec.table} shard {self.shard.id}"


def fingerprint(select_sql: str, count_sql: str, schema: pa.Schema, policy: str) -> str:
    """Identity of a shard's content: what was queried, how, and into which schema."""
    payload = json.dumps({
        "format": FORMAT,
        "select": select_sql,
        "count": count_sql,
        "schema": [[f.name, str(f.type)] for f in schema],
        "on_duplicate_keys": policy,
        "layout": CHECKPOINT_LAYOUT,
        "compression": CHECKPOINT_COMPRESSION,
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def write_shard(table: pa.Table, path: str) -> tuple[int, str]:
    """Write a checkpoint shard atomically; return its size and CRC32C.

    The file is encoded in memory and its CRC32C taken from those bytes, so the shard
    is not read back to checksum it; the bytes are then written (and fsynced) under a
    temporary name and renamed into place, as :func:`storage.write_bytes` does.
    """
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, **_parquet_options(table))
    data = sink.getvalue()
    crc = storage.bytes_crc32c(data)
    storage.write_bytes(path, data)
    return data.size, crc


def _parquet_options(table: pa.Table) -> dict[str, Any]:
    """``pq.write_table`` settings of a checkpoint (see CHECKPOINT_LAYOUT)."""
    dictionary = [f.name for f in table.schema if not pa.types.is_floating(f.type)]
    return dict(
        row_group_size=max(table.num_rows, 1),
        compression=CHECKPOINT_COMPRESSION,
        use_dictionary=dictionary or False,
        write_page_checksum=True,
        # Statistics on the key only: on hundreds of feature columns they would
        # just grow the footer.
        write_statistics=[table.schema.names[0]],
    )


def write_record(path: str, record: dict[str, Any]) -> None:
    """Write a commit record atomically (after its shard, which is durable by then).

    Not fsynced: a record that a machine crash loses or leaves empty only makes its
    task be redone (an unreadable record proves nothing), while the fsync cost as much
    as the shard's own. The manifest, written after verification, is durable.
    """
    storage.write_bytes(path, json.dumps(record, indent=1, sort_keys=True).encode(), durable=False)


def read_json(path: str) -> dict[str, Any] | None:
    """A JSON document, or None if it does not exist or does not parse."""
    try:
        return json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        return None
    except (ValueError, UnicodeDecodeError):
        return None


def shard_is_done(task: ShardTask, check_content: bool = True) -> bool:
    """True when a committed shard proves ``task`` finished: record, fingerprint, size
    and (with ``check_content``) CRC32C all agree."""
    record = read_json(task.record_path)
    if not record or record.get("fingerprint") != task.fingerprint:
        return False
    found = storage.stat(task.path, checksum=check_content)
    if found is None or found[0] != record.get("bytes"):
        return False
    return not check_content or found[1] == record.get("crc32c")


def _iso(t: dt.datetime | None) -> str | None:
    return None if t is None else t.isoformat()


def make_record(task: ShardTask, rows: int, counts: dict[str, int], duplicates: int,
                key_min: dt.datetime | None, key_max: dt.datetime | None,
                nbytes: int, crc: str) -> dict[str, Any]:
    """The commit record of a finished shard."""
    return {
        "format": FORMAT,
        "table": task.spec.table,
        "dataset": task.spec.dataset,
        "shard": {"start": task.shard.start.isoformat(), "end": task.shard.end.isoformat()},
        "file": task.path.rsplit("/", 1)[-1],
        "fingerprint": task.fingerprint,
        "rows": rows,
        "source_rows": counts["n_rows"],
        "source_keys": counts["n_keys"],
        "duplicates_dropped": duplicates,
        "bad_keys_dropped": counts.get("n_bad", 0),
        "key_min": _iso(key_min),
        "key_max": _iso(key_max),
        "bytes": nbytes,
        "crc32c": crc,
    }


def spec_to_json(spec: TableSpec) -> dict[str, Any]:
    """A table spec as plain JSON (manifest entries, Beam elements)."""
    return {
        "dataset": spec.dataset, "table": spec.table, "group": spec.group,
        "shared": spec.shared, "stem": spec.stem,
        "columns": [[c.source, c.output, c.type] for c in spec.columns],
    }


def spec_from_json(data: dict[str, Any]) -> TableSpec:
    """Inverse of :func:`spec_to_json`."""
    return TableSpec(
        dataset=data["dataset"], table=data["table"], group=data["group"],
        shared=data["shared"], stem=data["stem"],
        columns=tuple(Column(*c) for c in data["columns"]),
    )


@dataclasses.dataclass
class Manifest:
    """What one extraction of a pair in one window produced; the merge's only input."""

    pair: str
    window: Window
    key: str
    root: str
    tables: list[dict[str, Any]]  # spec_to_json + "shards": [records with "path"]
    source: str = ""
    shard_days: int = 0

    def to_json(self) -> dict[str, Any]:
        """JSON form; paths are stored relative to the checkpoint root."""
        return {
            "format": FORMAT, "pair": self.pair, "key": self.key,
            "window": {"id": self.window.id, "start": self.window.start.isoformat(),
                       "end": self.window.end.isoformat()},
            "source": self.source, "shard_days": self.shard_days,
            "totals": self.totals(),
            "tables": self.tables,
        }

    def totals(self) -> dict[str, int]:
        """Sums over every table: tables, shards, rows, drops, bytes, columns."""
        shards = [s for t in self.tables for s in t["shards"]]
        return {
            "tables": len(self.tables),
            "feature_tables": sum(t["group"] != "targets" for t in self.tables),
            "columns": sum(len(t["columns"]) for t in self.tables),
            "shards": len(shards),
            "rows": sum(s["rows"] for s in shards),
            "duplicates_dropped": sum(s["duplicates_dropped"] for s in shards),
            "bad_keys_dropped": sum(s["bad_keys_dropped"] for s in shards),
            "bytes": sum(s["bytes"] for s in shards),
        }

    @property
    def targets(self) -> dict[str, Any]:
        """The targets table's entry (always first)."""
        return self.tables[0]

    def specs(self) -> list[TableSpec]:
        """The tables as specs, targets first, then features in catalog order."""
        return [spec_from_json(t) for t in self.tables]

    def shard_files(self, entry: dict[str, Any]) -> list[str]:
        """Absolute paths of a table entry's shards, in time order."""
        return [storage.join(self.root, *s["path"].split("/")) for s in entry["shards"]]

    @classmethod
    def from_json(cls, data: dict[str, Any], root: str) -> "Manifest":
        """Parse a manifest read from ``root``."""
        return cls(
            pair=data["pair"], key=data["key"], root=root,
            window=Window(dt.datetime.fromisoformat(data["window"]["start"]),
                          dt.datetime.fromisoformat(data["window"]["end"])),
            tables=data["tables"], source=data.get("source", ""),
            shard_days=data.get("shard_days", 0),
        )


def relative(root: str, path: str) -> str:
    """``path`` relative to the checkpoint root (with '/' separators)."""
    prefix = root.rstrip("/\\") + ("/" if storage.is_gcs(root) else os.sep)
    if not path.startswith(prefix):
        raise ValueError(f"{path} is not under {root}")
    return path[len(prefix):].replace("\\", "/")


def find_windows(root: str, pair: str) -> list[Window]:
    """Windows of ``pair`` that have a manifest with a success marker, oldest first."""
    folder = storage.join(root, "pairs", pair, "manifests")
    try:
        names = storage.list_files(folder)
    except FileNotFoundError:
        return []
    out = []
    for name in names:
        base = name.replace("\\", "/").rsplit("/", 1)[-1]
        if base.endswith(".SUCCESS"):
            out.append(Window.from_id(base[: -len(".SUCCESS")]))
    return sorted(out)


def windows_ending_last(windows: Iterable[Window], days: int = 1) -> list[Window]:
    """The ``windows`` whose end is one of the ``days`` latest ends among them, in order:
    every window ending on one of those days, so that windows ending together are
    never told apart by anything else."""
    windows = set(windows)
    ends = sorted({w.end for w in windows}, reverse=True)[:days]
    return sorted(w for w in windows if w.end in ends)


def merge_candidates(windows: Iterable[Window], days: int | None = None,
                     as_of: dt.date | None = None) -> list[Window]:
    """The committed ``windows`` a merge given no dates chooses among: those ending last
    (more than one is ambiguous); with ``days``, of those of at most ``days`` days, the
    longest among those ending last (none when no window is that short). With
    ``as_of`` (``--as-of``), only windows ending before that day count, as the
    extraction given the same day commits."""
    if as_of is not None:
        windows = [w for w in windows if w.last_day < as_of]
    if days is not None:
        windows = [w for w in windows if length_days(w) <= days]
    last = windows_ending_last(windows)
    return [max(last, key=length_days)] if days is not None and last else last


def load_manifest(root: str, pair: str, window: Window | None = None,
                  days: int | None = None, as_of: dt.date | None = None) -> Manifest:
    """The committed manifest of ``pair``; refuses (naming what is missing) otherwise.

    Without ``window`` it is the committed window that ends last: the default window
    of an extraction run again on a later day ends later, and the merge that follows it
    must take the new one. Two windows ending last (say a year and its last month) are
    ambiguous and refused, unless ``days`` is given: then only windows of at most
    ``days`` days count, and of those ending last the longest is taken (what an
    extraction with ``--days`` commits: that many days, or fewer when the targets cover
    fewer). With ``as_of`` only windows ending before that day count: the extraction
    given the same ``--as-of`` commits one, and a later window committed meanwhile (by a
    run on a later day) is not taken. The manifest is checked as hostile input
    (:func:`manifest_problem`) before anything it names is read.
    """
    check_root(root)
    if window is None:
        committed = find_windows(root, pair)
        if not committed:
            raise PipelineError(
                f"no committed extraction of pair {pair!r} under {root} "
                f"(no {storage.join(root, 'pairs', pair, 'manifests', '*.SUCCESS')}); "
                "run the extract job first")
        last = merge_candidates(committed, days, as_of)
        if not last:
            rules = ([f"of at most {days} days"] if days is not None else []) + \
                ([f"ending before the --as-of day {as_of}"] if as_of is not None else [])
            flags = ([f"--days {days}"] if days is not None else []) + \
                ([f"--as-of {as_of}"] if as_of is not None else [])
            raise PipelineError(
                f"pair {pair!r} has no extracted window {' and '.join(rules)} under "
                f"{root}; run the extract job with {' '.join(flags)} first")
        if len(last) > 1:
            raise PipelineError(
                f"pair {pair!r} has {len(last)} extracted windows whose last day is "
                f"{last[0].last_day} under {root} "
                f"({', '.join(w.id for w in last)}); choose one with --start-date/--end-date "
                "or --days")
        window = last[0]
        if len(committed) > 1:
            rule = "the one ending last" if days is None else \
                f"the longest of at most {days} days among those ending last"
            if as_of is not None:
                rule += f" before the --as-of day {as_of}"
            log.info("pair %s has %d extracted windows under %s; using %s, %s "
                     "(--start-date/--end-date choose another: %s)", pair, len(committed), root,
                     rule, window.id, ", ".join(w.id for w in committed if w != window))
    mpath, spath = manifest_path(root, pair, window), success_path(root, pair, window)
    if not storage.exists(mpath):
        raise PipelineError(f"manifest missing: {mpath}; run the extract job for "
                            f"{pair} {window.id} first")
    if not storage.exists(spath):
        raise PipelineError(f"extraction incomplete: {mpath} has no success marker "
                            f"{spath}; re-run the extract job to finish it")
    data = read_json(mpath)
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("pair") != pair:
        raise PipelineError(f"manifest {mpath} is unreadable or not a format-{FORMAT} "
                            f"manifest of {pair}")
    problem = manifest_problem(data, pair, window)
    if problem:
        raise PipelineError(f"manifest {mpath} is malformed: {problem}; it was edited by "
                            "hand or damaged: re-run the extract job to rewrite it")
    return Manifest.from_json(data, root)


# --------------------------------------------------------------------------- manifest checks
# The manifest is the merge's only input and names every file it reads and every
# identifier it puts into SQL, so a hand-edited one is checked as hostile input.

_SHARD_INTS = ("rows", "bytes", "duplicates_dropped", "bad_keys_dropped")


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def manifest_problem(data: dict[str, Any], pair: str, window: Window) -> str | None:
    """What is wrong with a manifest's JSON (None when it is sound).

    Checked: the window is the one its file name says; the key, datasets, tables and
    columns are plain identifiers of known types whose output names do not collide;
    the first table is the targets; every shard path is exactly this table's layout path
    for a shard of the window (never absolute, never ``..``); counts are non-negative
    integers and CRC32Cs 8 hex digits.
    """
    try:
        start = dt.datetime.fromisoformat(data["window"]["start"])
        end = dt.datetime.fromisoformat(data["window"]["end"])
        if Window(start, end) != window:
            return f"its window {start.isoformat()} .. {end.isoformat()} is not {window.id}"
    except (KeyError, TypeError, ValueError, PipelineError):
        return "'window' needs ISO 'start' and 'end' times with a time zone"
    tables = data.get("tables")
    if not isinstance(tables, list) or not tables:
        return "'tables' is not a non-empty list"
    try:
        check_identifier(data.get("key"), "the manifest's key")
        specs = []
        for i, entry in enumerate(tables):
            where = f"tables[{i}]"
            problem = _table_problem(entry, where)
            if problem is None:
                where = f"{where} ({entry['dataset']}.{entry['table']})"
                problem = _shards_problem(entry, where, pair, window)
            if problem:
                return problem
            specs.append(spec_from_json(entry))
        if specs[0].group != "targets":
            return "tables[0] is not the targets table"
        check_output_columns(data["key"], specs)
    except PipelineError as exc:
        return str(exc)
    return None


def _table_problem(entry: Any, where: str) -> str | None:
    """A table entry's shape, names and column types."""
    if not isinstance(entry, dict):
        return f"{where} is not an object"
    for field in ("dataset", "table"):
        check_identifier(entry.get(field), f"{where}.{field}")
    if not isinstance(entry.get("group"), str) or not isinstance(entry.get("stem"), str):
        return f"{where} needs a 'group' and a 'stem'"
    if not isinstance(entry.get("shared"), bool):
        return f"{where}.shared is not true or false"
    columns = entry.get("columns")
    if not isinstance(columns, list):
        return f"{where}.columns is not a list"
    for j, col in enumerate(columns):
        if not (isinstance(col, list) and len(col) == 3):
            return f"{where}.columns[{j}] is not [source, output, type]"
        check_identifier(col[0], f"{where}.columns[{j}]")
        check_identifier(col[1], f"{where}.columns[{j}]")
        if col[2] not in ARROW_TYPES:
            return f"{where}.columns[{j}] has type {col[2]!r}, not one of {', '.join(ARROW_TYPES)}"
    return None


def _shards_problem(entry: dict[str, Any], where: str, pair: str, window: Window) -> str | None:
    """A table entry's shards: layout paths in time order inside the window, counts,
    CRC32Cs, and the table's row total."""
    shards = entry.get("shards")
    if not isinstance(shards, list):
        return f"{where}.shards is not a list"
    previous_end = window.start
    for k, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"{where}.shards[{k}] is not an object"
        path = shard.get("path")
        shard_id = path.rsplit("/", 1)[-1][: -len(".parquet")] if isinstance(path, str) else ""
        try:
            span = Window.from_id(shard_id)
        except PipelineError:
            span = None
        expected = shard_relpath(entry["shared"], pair, entry["table"], shard_id)
        if span is None or path != expected or span.id != shard_id:
            return (f"{where}.shards[{k}] path {path!r} is not one of this table's shard "
                    f"files ({shard_relpath(entry['shared'], pair, entry['table'], '<shard>')})")
        if span.start != previous_end or span.end > window.end:
            return (f"{where}.shards[{k}] {shard_id} does not follow the previous shard "
                    f"inside window {window.id}")
        previous_end = span.end
        for field in _SHARD_INTS:
            if not _count(shard.get(field)):
                return f"{where}.shards[{k}].{field} is not a non-negative integer"
        crc = shard.get("crc32c")
        if not (isinstance(crc, str) and len(crc) == 8
                and all(c in "0123456789abcdef" for c in crc)):
            return f"{where}.shards[{k}].crc32c {crc!r} is not 8 lower-case hex digits"
    if previous_end != window.end:
        return f"{where} has shards up to {previous_end.isoformat()}, not the window's end"
    if entry.get("rows") != sum(s["rows"] for s in shards):
        return f"{where}.rows {entry.get('rows')!r} is not the sum of its shards' rows"
    return None


def verify_checkpoints(manifest: Manifest, check_content: bool = True) -> list[str]:
    """Problems with a manifest's checkpoint files (empty list when all are sound).

    Each file must exist with the size and CRC32C its manifest entry states, and its
    parquet footer must give the recorded rows and the table's schema. When the file
    disagrees with the manifest but agrees with its own commit record, the problem
    names the manifest (edited by hand, or stale) instead of the file.
    """
    listed_in = manifest_path(manifest.root, manifest.pair, manifest.window)
    shards = []
    for entry in manifest.tables:
        expected = output_schema(spec_from_json(entry), manifest.key)
        shards.extend((path, shard, expected)
                      for shard, path in zip(entry["shards"], manifest.shard_files(entry)))
    found = storage.map_under(manifest.root, lambda s: verify_shard(*s, check_content, listed_in),
                              shards)
    return [problem for problems in found for problem in problems]


def verify_shard(path: str, shard: dict[str, Any], expected: pa.Schema,
                 check_content: bool, listed_in: str | None = None) -> Iterable[str]:
    """Problems of one shard against ``shard`` (its commit record, or its manifest entry
    when ``listed_in`` names the manifest)."""
    found = storage.stat(path, checksum=check_content)
    if found is None:
        return [f"checkpoint missing: {path}"]
    nbytes, crc = found
    if nbytes != shard["bytes"]:
        return [_stale_listing(path, listed_in, "bytes", shard["bytes"], nbytes)
                or f"checkpoint {path} has {nbytes} bytes, its record says "
                   f"{shard['bytes']} (truncated or replaced)"]
    if check_content:
        if crc != shard["crc32c"]:
            return [_stale_listing(path, listed_in, "crc32c", shard["crc32c"], crc)
                    or f"checkpoint {path} is corrupt: CRC32C {crc} differs from the "
                       f"recorded {shard['crc32c']}"]
    try:
        meta = read_parquet_footer(path, nbytes)
        schema = meta.schema.to_arrow_schema()
    except Exception as exc:  # pyarrow raises several types for broken footers
        first = first_line(exc)
        return [f"checkpoint {path} is not readable parquet: {first}"]
    if meta.num_rows != shard["rows"]:
        return [_stale_listing(path, listed_in, "rows", shard["rows"], meta.num_rows)
                or f"checkpoint {path} holds {meta.num_rows} rows, its record says "
                   f"{shard['rows']}"]
    if not schema.remove_metadata().equals(expected):
        return [f"checkpoint {path} has schema drift: {describe_schema_difference(schema, expected)}"]
    return []


# Bytes read from a file's end to find its parquet footer (a checkpoint's is a few KiB:
# ~300 bytes per column).
FOOTER_READ = 64 << 10


def read_parquet_footer(path: str, nbytes: int) -> pq.FileMetaData:
    """The parquet footer of the file ``path`` of ``nbytes`` bytes, from one read of its
    end (two when the footer is longer than :data:`FOOTER_READ`): in a bucket one or two
    ranged requests, where opening it through Arrow costs three or more, made one after
    another. Raises what pyarrow raises for a file that is not parquet."""
    tail = storage.read_range(path, max(0, nbytes - FOOTER_READ), min(nbytes, FOOTER_READ))
    if len(tail) >= 8 and tail[-4:] == b"PAR1":
        length = int.from_bytes(tail[-8:-4], "little")
        if len(tail) < length + 8 <= nbytes - 4:  # the footer starts before the bytes read
            tail = storage.read_range(path, nbytes - length - 8, length + 8)
    # The footer's offsets point into the whole file; reading the metadata uses none.
    return pq.read_metadata(pa.BufferReader(tail))


def _stale_listing(path: str, listed_in: str | None, field: str, listed: Any,
                   actual: Any) -> str | None:
    """The problem line blaming the manifest ``listed_in`` when the shard's own commit
    record agrees with the file on ``field``; None when the file is the odd one out."""
    if listed_in is None:
        return None
    record = read_json(record_path(path))
    if not record or record.get(field) != actual:
        return None
    return (f"manifest {listed_in} lists {field} {listed!r} for checkpoint {path}, but "
            f"the file and its commit record have {actual!r}: the manifest was edited by "
            "hand or is stale; re-run the extract job to rewrite it")


def describe_schema_difference(actual: pa.Schema, expected: pa.Schema) -> str:
    """One line naming the first columns where two schemas differ."""
    diffs = []
    a, e = {f.name: f.type for f in actual}, {f.name: f.type for f in expected}
    diffs += [f"column {n} is missing" for n in e if n not in a]
    diffs += [f"unexpected column {n}" for n in a if n not in e]
    diffs += [f"column {n} is {a[n]}, expected {e[n]}" for n in e if n in a and a[n] != e[n]]
    if not diffs and actual.names != expected.names:
        diffs.append("columns are in a different order")
    if not diffs:
        diffs.append("nullability or metadata differ")
    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more
