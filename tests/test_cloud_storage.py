"""gs:// storage calls and the BigQuery source, against the local emulators."""
import datetime as dt
import os
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from bench.phases import CountedFile
from bigquery_warehouse import PAIR, bq_warehouse  # noqa: F401 (fixture)
from emulators import BUCKET, bq_emulator, gcs_emulator  # noqa: F401 (fixtures)
from pipelines import storage
from pipelines.errors import PipelineError


def _root():
    return f"gs://{BUCKET}/unit-{uuid.uuid4().hex[:8]}"


def _raw_names(prefix: str) -> list[str]:
    """Every object name under ``prefix`` as the bucket lists it (no filtering)."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="bqx-ml", credentials=AnonymousCredentials())
    bucket, _, name = prefix[len("gs://"):].partition("/")
    return sorted(b.name for b in client.list_blobs(bucket, prefix=name))


def _table(n=20_000):
    t0 = dt.datetime(2025, 1, 6, tzinfo=dt.timezone.utc)
    return pa.table({
        "interval_time": pa.array([t0 + dt.timedelta(minutes=i) for i in range(n)],
                                  pa.timestamp("us", tz="UTC")),
        "v": pa.array([i * 0.5 for i in range(n)], pa.float64()),
    })


def test_atomic_write_read_checksum_list_delete(gcs_emulator, tmp_path):
    root = _root()
    path = storage.join(root, "a", "x.parquet")
    table = _table()
    with storage.atomic_local_path(path) as tmp:
        assert not tmp.startswith("gs://")
        pq.write_table(table, tmp, row_group_size=5_000)
        local_copy = str(tmp_path / "x.parquet")
        with open(tmp, "rb") as src, open(local_copy, "wb") as dst:
            dst.write(src.read())
        assert not storage.exists(path), "nothing under the final name before the block ends"
    assert storage.exists(path)
    assert storage.size(path) == os.path.getsize(local_copy)
    # The object's CRC32C (from its metadata) is the local computation of the same bytes.
    assert storage.crc32c(path) == storage.crc32c(local_copy)
    assert len(storage.crc32c(path)) == 8
    assert storage.read_bytes(path) == open(local_copy, "rb").read()
    assert storage.read_buffer(path).to_pybytes() == open(local_copy, "rb").read()

    with storage.open_input(path) as source:
        assert pq.read_metadata(source).num_rows == table.num_rows
    with storage.open_input(path) as source:
        pf = pq.ParquetFile(source)
        assert pf.num_row_groups == 4
        assert pf.read_row_group(2).equals(table.slice(10_000, 5_000))

    storage.write_bytes(storage.join(root, "a", "b", "r.json"), b"{}")
    storage.write_bytes(storage.join(root, "c.json"), b"[]")
    storage.write_bytes(f"{root}-sibling/z.json", b"0")  # shares the text prefix only
    assert storage.list_files(root) == [f"{root}/a/b/r.json", f"{root}/a/x.parquet",
                                        f"{root}/c.json"]
    assert storage.list_files(root + "/a/") == [f"{root}/a/b/r.json", f"{root}/a/x.parquet"]
    assert storage.count_existing([path, f"{root}/c.json", f"{root}/nope.json"]) == 2

    # Replacing an object works (the upload is conditional on the generation it saw).
    storage.write_bytes(storage.join(root, "c.json"), b"[1]")
    assert storage.read_bytes(storage.join(root, "c.json")) == b"[1]"

    # With sizes and write times, from the same listing (what pipelines.prune reads).
    before = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=10)
    infos = storage.list_file_info(root)
    assert [f.path for f in infos] == storage.list_files(root)
    assert [f.size for f in infos] == [2, storage.size(path), 3]
    assert all(before < f.updated <= dt.datetime.now(dt.timezone.utc) + dt.timedelta(minutes=1)
               for f in infos)

    storage.delete(path)
    storage.delete(path)  # deleting what is not there is fine
    assert not storage.exists(path)
    assert storage.list_files(root) == [f"{root}/a/b/r.json", f"{root}/c.json"]


def test_failure_inside_atomic_block_leaves_no_object(gcs_emulator):
    root = _root()
    path = storage.join(root, "shard.parquet")
    with pytest.raises(RuntimeError):
        with storage.atomic_local_path(path) as tmp:
            pq.write_table(_table(1000), tmp)
            raise RuntimeError("killed mid-write")
    assert not storage.exists(path)
    assert _raw_names(root) == []

    storage.write_bytes(path, b"first")
    with pytest.raises(RuntimeError):
        with storage.atomic_local_path(path) as tmp:
            open(tmp, "wb").write(b"second, never published")
            raise RuntimeError("boom")
    assert storage.read_bytes(path) == b"first"
    assert _raw_names(root) == [path[len(f"gs://{BUCKET}/"):]]


def test_missing_objects(gcs_emulator):
    root = _root()
    missing = storage.join(root, "missing.json")
    assert not storage.exists(missing)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(missing)
    with pytest.raises(FileNotFoundError):
        storage.read_buffer(missing)
    with pytest.raises(FileNotFoundError):
        storage.size(missing)
    with pytest.raises(FileNotFoundError):
        storage.open_input(missing)
    assert storage.list_files(root) == []
    storage.delete(missing)
    from pipelines.checkpoints import read_json
    assert read_json(missing) is None


def test_bigquery_source_lists_columns_and_reads_arrow(bq_warehouse):
    from pipelines import sql
    from pipelines.catalog import load_catalog
    from pipelines.extract.plan import build_tasks, discover
    from pipelines.schema import bigquery_type
    from pipelines.sources import BigQuerySource, DuckDBSource, open_source
    from pipelines.window import Window

    catalog = load_catalog(None)
    bq = open_source(bq_warehouse["source"])
    duck = DuckDBSource(bq_warehouse["duckdb"])
    try:
        assert isinstance(bq, BigQuerySource) and bq.project == "bqx-ml"
        for dataset in (catalog.features_dataset, catalog.targets_dataset):
            got, want = bq.table_columns(dataset), duck.table_columns(dataset)
            assert list(got) == sorted(want)
            for table, columns in want.items():
                assert [(c, bigquery_type(t, c)) for c, t in columns] == \
                    [(c, bigquery_type(t, c)) for c, t in got[table]], table

        specs = discover(bq, catalog, PAIR)
        window = Window(dt.datetime(2025, 1, 6, tzinfo=dt.timezone.utc),
                        dt.datetime(2025, 1, 7, tzinfo=dt.timezone.utc))
        for spec in (specs[0], specs[-1]):
            task = build_tasks(catalog, PAIR, [spec], window, "gs://x/ck", 1, "drop", bq.project)[0]
            assert f"`{bq.project}`." in task.select_sql  # project-qualified GoogleSQL
            got = bq.query_arrow(task.select_sql)
            assert got.schema.field(catalog.key).type == pa.timestamp("us", tz="UTC")
            want = duck.query_arrow(task.select_sql.replace(f"`{bq.project}`.", ""))
            order = [(n, "ascending") for n in want.schema.names]
            assert got.num_rows == want.num_rows > 0
            assert got.sort_by(order).equals(want.cast(got.schema).sort_by(order)), spec.table
            counts = bq.query_rows(task.count_sql)[0]
            assert counts == duck.query_rows(task.count_sql.replace(f"`{bq.project}`.", ""))[0]
        # Scratch result tables are deleted after reading.
        from google.api_core import exceptions
        try:
            left = list(bq._client.list_tables(f"{bq.project}.{bq.scratch_dataset}"))
        except exceptions.NotFound:
            left = []
        assert left == []

        with pytest.raises(PipelineError) as err:
            bq.query_arrow(f"SELECT `no_such_column` FROM `{bq.project}`."
                           f"`{catalog.targets_dataset}`.`targets_{PAIR}`")
        message = str(err.value)
        assert f"targets_{PAIR}" in message and "no_such_column" in message
        key_range = sql.key_range(catalog.targets_dataset, f"targets_{PAIR}", catalog.key,
                                  dt.datetime(2000, 1, 1, tzinfo=dt.timezone.utc), bq.project)
        row = bq.query_rows(key_range)[0]
        assert row["first_key"].tzinfo is not None
    finally:
        bq.close()
        duck.close()


def _wide_bucket_shard(path: str | None = None, shift: float = 0.0):
    """A 40-column shard written to the bucket (at ``path``, or a new one) as the
    extract writes it, and a cursor reading it with its manifest entry."""
    from pipelines.checkpoints import write_shard
    from pipelines.merge.reader import ShardCursor

    t0 = dt.datetime(2025, 1, 6, tzinfo=dt.timezone.utc)
    columns = {f"f{i}": pa.array([j * 0.25 + i + shift for j in range(500)]) for i in range(40)}
    table = pa.table({"interval_time": pa.array([t0 + dt.timedelta(minutes=j) for j in range(500)],
                                                pa.timestamp("us", tz="UTC")), **columns})
    path = path or f"{_root()}/wide/20250106T0000-20250107T0000.parquet"
    size, crc = write_shard(table, path)
    cursor = ShardCursor("features.wide_eurusd", [(path, {"bytes": size, "crc32c": crc, "rows": 500})],
                         table.schema)
    return table, path, cursor


def _count_opened_reads(monkeypatch) -> list:
    """The files storage.open_input opens from now on, each counting its reads."""
    opened = []
    real_open = storage.open_input

    def counted_open(p):
        opened.append(CountedFile(real_open(p)))  # a spy: every read goes to the emulator
        return pa.PythonFile(opened[-1], mode="r")

    monkeypatch.setattr(storage, "open_input", counted_open)
    return opened


def test_a_later_slice_of_a_bucket_shard_reads_its_columns_in_one_range(gcs_emulator, monkeypatch):
    """The merge reads a wide table's later slices as byte ranges of their column
    chunks (pipelines.merge.reader). Arrow's GCS file has no read-ahead buffer here, so
    each read is a ranged request: the slice's consecutive chunks must come in one read,
    not one per column."""
    table, path, cursor = _wide_bucket_shard()
    opened = _count_opened_reads(monkeypatch)
    later = cursor.read_shards(0, 1, range(10, 40))
    assert later.equals(table.select(["interval_time"] + [f"f{i}" for i in range(10, 40)]))
    # The footer (its length, then itself) and one range for the 31 column chunks.
    assert len(opened) == 1 and opened[0].reads <= 4, opened[0].reads
    storage.delete(path)
    with pytest.raises(PipelineError, match=r"checkpoint missing: gs://.*20250106T0000.*wide_eurusd"):
        cursor.read_shards(0, 1, range(10, 40))


def test_the_first_slice_of_a_bucket_shard_checks_the_stored_crc32c_and_downloads_no_whole_shard(
        gcs_emulator, monkeypatch):
    """A wide table's first slice reads its own column chunks too (a whole download
    would fetch the later slices' bytes once more): the shard's CRC32C is the one GCS
    keeps, compared with the manifest's, and a shard replaced since is named."""
    table, path, cursor = _wide_bucket_shard()

    def no_whole_download(p):
        raise AssertionError(f"{p} downloaded whole")

    monkeypatch.setattr(storage, "read_buffer", no_whole_download)
    opened = _count_opened_reads(monkeypatch)
    first = cursor.read_shards(0, 1, range(0, 10))
    assert first.equals(table.select(["interval_time"] + [f"f{i}" for i in range(10)]))
    assert len(opened) == 1 and opened[0].reads <= 4, opened[0].reads
    # The next slices reuse the footer the first one read: they read only the key's
    # column chunk and their own consecutive chunks, one range each.
    assert cursor.read_shards(0, 1, range(10, 20)).equals(
        table.select(["interval_time"] + [f"f{i}" for i in range(10, 20)]))
    assert len(opened) == 2 and opened[1].reads <= 2, opened[1].reads
    cursor.read_shards(0, 1, range(20, 40))
    assert cursor._footers == {}  # dropped with the last slice

    stale = cursor._shards
    _wide_bucket_shard(path, shift=1.0)  # the object is replaced; the manifest entry is not
    from pipelines.merge.reader import ShardCursor

    replaced = ShardCursor(cursor.label, stale, cursor.schema)
    with pytest.raises(PipelineError, match=r"checkpoint gs://.*20250106T0000-20250107T0000\.parquet "
                                            r"(is corrupt: CRC32C|has \d+ bytes)"):
        replaced.read_shards(0, 1, range(0, 10))


def test_a_local_file_checksum_covers_every_chunk_it_is_read_in(tmp_path, monkeypatch):
    """A local file's CRC32C, read in chunks, is the CRC32C of all its bytes, also when
    its size is not a multiple of the chunk, and of an empty file."""
    data = os.urandom(10_000)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    monkeypatch.setattr(storage, "_CHUNK", 4096)  # three reads, the last a short one
    assert storage.crc32c(str(path)) == storage.bytes_crc32c(data)
    path.write_bytes(b"")
    assert storage.crc32c(str(path)) == storage.bytes_crc32c(b"")


def _bucket_shards(days: int = 3, overlap: bool = False):
    """A 40-column table's ``days`` one-day shards in the bucket, as the extract writes
    them, and a cursor over them (with ``overlap``, the last shard repeats a key)."""
    from pipelines.checkpoints import write_shard
    from pipelines.merge.reader import ShardCursor

    root, tables, shards = _root(), [], []
    for day in range(days):
        t0 = dt.datetime(2025, 1, 6 + day, tzinfo=dt.timezone.utc)
        times = [t0 + dt.timedelta(minutes=j) for j in range(300)]
        if overlap and day == days - 1:  # the shard before's last key, once more
            times.insert(0, t0 - dt.timedelta(days=1) + dt.timedelta(minutes=299))
        columns = {f"f{i}": pa.array([j * 0.5 + i + day for j in range(len(times))]) for i in range(40)}
        table = pa.table({"interval_time": pa.array(times, pa.timestamp("us", tz="UTC")), **columns})
        path = f"{root}/wide/2025010{6 + day}T0000-2025010{7 + day}T0000.parquet"
        size, crc = write_shard(table, path)
        tables.append(table)
        shards.append((path, {"bytes": size, "crc32c": crc, "rows": table.num_rows}))
    return pa.concat_tables(tables), shards, ShardCursor("features.wide_eurusd", shards, tables[0].schema)


def test_a_reads_shards_in_a_bucket_are_fetched_at_once_and_checked_in_order(gcs_emulator, monkeypatch):
    """Each shard fetch from a bucket is a few requests that wait on the network, so a
    read of several shards fetches them at once; what it returns, and the checks across
    shards (keys in order, the earliest problem first), are those of reading in turn.
    A spy holds each fetch until 3 are running (at most 5 s: fetches made in turn fail
    the test, slowly), so a loaded machine cannot make at-once fetches look sequential;
    every fetch still goes to the emulator."""
    import threading

    table, shards, cursor = _bucket_shards()
    running, most = [0], [0]
    changed = threading.Condition()

    def slowed(real):
        def fetch(path, *args):
            with changed:
                running[0] += 1
                most[0] = max(most[0], running[0])
                changed.notify_all()
                changed.wait_for(lambda: running[0] >= 3 or most[0] >= 3, timeout=5)
            try:
                return real(path, *args)
            finally:
                with changed:
                    running[0] -= 1
        return fetch

    for name in ("read_buffer", "crc32c"):
        monkeypatch.setattr(storage, name, slowed(getattr(storage, name)))
    assert cursor.read_shards(0, 3).equals(table)
    assert most[0] == 3
    most[0] = 0
    _t, _s, sliced = _bucket_shards()
    assert sliced.read_shards(0, 3, range(0, 10)).equals(
        _t.select(["interval_time"] + [f"f{i}" for i in range(10)]))
    assert most[0] == 3  # the first slice's stored-checksum lookups

    _t, shards, repeated = _bucket_shards(overlap=True)
    with pytest.raises(PipelineError, match=r"checkpoint gs://.*20250108T0000-20250109T0000\.parquet "
                                            r"of features\.wide_eurusd has keys out of order"):
        repeated.read_shards(0, 3)
    # A missing middle shard is named, not the last shard's keys.
    from pipelines.merge.reader import ShardCursor

    storage.delete(shards[1][0])
    again = ShardCursor("features.wide_eurusd", shards, _t.schema)
    with pytest.raises(PipelineError, match=r"checkpoint missing: gs://.*20250107T0000-20250108T0000"):
        again.read_shards(0, 3)


def _object_requests(proxy) -> list[tuple[str, str]]:
    """The requests a proxy saw for single objects. Not the bucket's own metadata (since
    3.x google-cloud-storage fetches it once per client in the background, and the
    storage layer has one client per thread), nor listings (the storage layer lists one
    object once per bucket and process, to tell a missing object from a missing bucket)."""
    return [(method, path) for method, path in proxy.seen if "/o/" in path]


def test_checking_checkpoints_in_a_bucket_asks_two_requests_a_shard_many_at_once(
        gcs_emulator, extracted):
    """The merge's preflight, and the extraction's check before it commits, look at
    every shard. In a bucket each request waits tens of milliseconds, and there are
    thousands of shards: one metadata request (size and CRC32C together) and one ranged
    read of the footer per shard, made several at once (storage.map_under). Through a
    proxy that holds each request 0.3 s, so that they overlap if they can."""
    from emulators import upload_tree
    from faultproxy import HttpFaultProxy
    from emulator_procs import environ
    from pipelines import checkpoints

    root = _root()
    upload_tree(extracted, root)
    manifest = checkpoints.load_manifest(root, PAIR)
    shards = manifest.totals()["shards"]
    proxy = HttpFaultProxy(gcs_emulator["host"], name="gcs")
    try:
        proxy.delay(0.3)
        with environ(STORAGE_EMULATOR_HOST=proxy.url):
            assert checkpoints.verify_checkpoints(manifest, check_content=True) == []
        assert len(_object_requests(proxy)) == 2 * shards
        assert proxy.most_in_flight > 2  # in turn: one, and the client's bucket lookup
        # A damaged shard is still found, and named, by the same two requests.
        first = manifest.shard_files(manifest.tables[1])[0]
        storage.write_bytes(first, b"PAR1 not parquet PAR1")
        proxy.reset()
        with environ(STORAGE_EMULATOR_HOST=proxy.url):
            problems = checkpoints.verify_checkpoints(manifest, check_content=False)
        assert len(problems) == 1 and problems[0].startswith(f"checkpoint {first} has 21 bytes")
        # Its footer is not read; its commit record is (to tell a damaged file from a
        # manifest edited since), so again two requests a shard.
        assert len(_object_requests(proxy)) == 2 * shards
    finally:
        proxy.stop()


def test_a_resumed_extraction_finds_its_done_shards_in_a_bucket_many_at_once(
        gcs_emulator, warehouse, extracted):
    """Every run of the extract job first asks which shards are done (a run on a later
    day finds all but the last): per task its commit record and one metadata request
    (size and CRC32C), several tasks at once in a bucket. Through a proxy that holds
    each request 0.3 s."""
    from emulator_procs import environ
    from emulators import upload_tree
    from faultproxy import HttpFaultProxy
    from pipelines.catalog import load_catalog
    from pipelines.extract.pipeline import pending_tasks
    from pipelines.extract.plan import make_plan
    from pipelines.sources import DuckDBSource
    from pipelines.window import window_from_dates

    root = _root()
    upload_tree(extracted, root)
    source = DuckDBSource(warehouse)
    try:  # the fixture's extraction: the targets' whole days, one-day shards
        plan = make_plan(source, load_catalog(), PAIR,
                         window_from_dates(dt.date(2025, 1, 6), dt.date(2025, 1, 7)), root, 1, "drop")
    finally:
        source.close()
    storage.delete(plan.tasks[3].record_path)
    proxy = HttpFaultProxy(gcs_emulator["host"], name="gcs")
    try:
        proxy.delay(0.3)
        with environ(STORAGE_EMULATOR_HOST=proxy.url):
            assert pending_tasks(plan) == [plan.tasks[3]]
        # The task without a record costs one request; its shard is not looked at.
        assert len(_object_requests(proxy)) == 2 * len(plan.tasks) - 1
        assert proxy.most_in_flight > 2  # in turn: one, and the client's bucket lookup
    finally:
        proxy.stop()


def test_a_parquet_footer_is_read_from_the_file_end_in_one_or_two_reads(gcs_emulator, tmp_path):
    """read_parquet_footer reads FOOTER_READ bytes from the end, and once more when the
    footer is longer (17,000 columns are not a checkpoint's, but a wide table's could
    be); the same metadata pyarrow reads from the whole file. A file that is not
    parquet raises as pyarrow does."""
    from pipelines import checkpoints

    wide = pa.table({f"c{i}": pa.array([float(i)]) for i in range(2000)})
    local = str(tmp_path / "wide.parquet")
    pq.write_table(wide, local)
    nbytes = os.path.getsize(local)
    with open(local, "rb") as fh:
        fh.seek(nbytes - 8)
        footer = int.from_bytes(fh.read(4), "little")
    assert footer + 8 > checkpoints.FOOTER_READ
    small = str(tmp_path / "small.parquet")
    pq.write_table(_table(100), small)
    remote = storage.join(_root(), "wide.parquet")
    storage.write_bytes(remote, open(local, "rb").read())
    for path, size in ((local, nbytes), (small, os.path.getsize(small)), (remote, nbytes)):
        meta = checkpoints.read_parquet_footer(path, size)
        with storage.open_input(path) as source:
            assert meta.to_dict() == pq.read_metadata(source).to_dict()
    assert storage.read_range(remote, 0, 4) == b"PAR1" == storage.read_range(local, nbytes - 4, 99)
    (tmp_path / "text.parquet").write_bytes(b"no parquet here")
    with pytest.raises(Exception, match="(?i)parquet magic bytes not found|invalid"):
        checkpoints.read_parquet_footer(str(tmp_path / "text.parquet"), 15)


def test_calls_on_a_bucket_run_at_once_and_local_ones_in_turn(tmp_path):
    """storage.map_under: results in order; in a bucket several calls at once (here four
    calls that each wait for the other three: in turn they would never meet), locally
    one after another on the caller's thread; the first error in order is raised."""
    import threading

    meet = threading.Barrier(4, timeout=30)
    assert storage.map_under("gs://b/ck", lambda i: (meet.wait(), i)[1], range(4)) == [0, 1, 2, 3]
    caller = threading.get_ident()
    assert storage.map_under(str(tmp_path), lambda i: (threading.get_ident(), i),
                             range(3)) == [(caller, 0), (caller, 1), (caller, 2)]

    def fail_on_odd(i):
        if i % 2:
            raise ValueError(f"item {i}")
        return i

    for root in ("gs://b/ck", str(tmp_path)):
        with pytest.raises(ValueError, match="^item 1$"):
            storage.map_under(root, fail_on_odd, range(6))


def test_an_object_without_a_stored_crc32c_is_refused_where_its_checksum_is_needed(monkeypatch):
    """GCS keeps a CRC32C for every object, and the emulator always computes one, so an
    object's metadata without it is a fault no emulator here can produce: a stand-in for
    the metadata lookup (a mock, for that reason only). Its size is still given; a
    checksum asked of it is a one-line error naming the object."""
    import types

    monkeypatch.setattr(storage, "_get_blob", lambda path: types.SimpleNamespace(size=12, crc32c=None))
    path = "gs://b/ck/x.parquet"
    assert storage.stat(path) == (12, None)
    for check in (lambda: storage.stat(path, checksum=True), lambda: storage.crc32c(path)):
        with pytest.raises(PipelineError, match=r"^gs://b/ck/x\.parquet: the object has no CRC32C in its metadata$"):
            check()
