"""Mirror a DuckDB sample warehouse into the BigQuery emulator.

Every table of the warehouse's two datasets is written as parquet, uploaded to the GCS
emulator's bucket, and loaded (a load job with an explicit schema: the emulator needs
one) into the same dataset and table name of the emulator's project. Both sides then
hold the same rows, defects included, so an extraction through ``bigquery://`` can be
compared with one through ``duckdb://``.
"""
from __future__ import annotations

import os
import tempfile

import duckdb
import pytest

from emulators import bq_emulator, gcs_emulator  # noqa: F401 (fixtures)
from pipelines.schema import bigquery_type


def mirror_warehouse(warehouse: str, project: str, bucket: str, bq_endpoint: str,
                     datasets: tuple[str, ...] | None = None, prefix: str = "warehouse") -> dict:
    """Load every table of ``warehouse`` into the emulator; return {dataset: [tables]}.

    ``STORAGE_EMULATOR_HOST`` must point at the GCS emulator the BigQuery emulator reads
    ``gs://`` from (``BQEMU_GCS_LOCAL_ROOT``).
    """
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import bigquery
    from google.cloud import storage as gcs

    from pipelines.catalog import load_catalog

    if datasets is None:
        catalog = load_catalog(None)
        datasets = (catalog.features_dataset, catalog.targets_dataset)
    bq = bigquery.Client(project=project, credentials=AnonymousCredentials(),
                         client_options={"api_endpoint": bq_endpoint})
    blobs = gcs.Client(project=project, credentials=AnonymousCredentials()).bucket(bucket)
    con = duckdb.connect(warehouse, read_only=True)
    con.execute("SET TimeZone = 'UTC'")
    loaded: dict[str, list[str]] = {}
    jobs = []
    with tempfile.TemporaryDirectory(prefix="bqx-mirror-") as scratch:
        for dataset in datasets:
            bq.create_dataset(bigquery.Dataset(f"{project}.{dataset}"), exists_ok=True)
            columns: dict[str, list[tuple[str, str]]] = {}
            for table, column, dtype in con.execute(
                    "SELECT table_name, column_name, data_type FROM information_schema.columns "
                    "WHERE table_schema = ? ORDER BY table_name, ordinal_position",
                    [dataset]).fetchall():
                columns.setdefault(table, []).append((column, dtype))
            for table, cols in columns.items():
                local = os.path.join(scratch, f"{dataset}.{table}.parquet")
                con.execute(f'COPY "{dataset}"."{table}" TO \'{local}\' (FORMAT parquet)')
                name = f"{prefix}/{dataset}/{table}.parquet"
                blobs.blob(name).upload_from_filename(local)
                schema = [bigquery.SchemaField(c, bigquery_type(t, f"{table}.{c}")) for c, t in cols]
                bq.delete_table(f"{project}.{dataset}.{table}", not_found_ok=True)
                jobs.append(bq.load_table_from_uri(
                    f"gs://{bucket}/{name}", f"{project}.{dataset}.{table}",
                    job_config=bigquery.LoadJobConfig(
                        source_format=bigquery.SourceFormat.PARQUET, schema=schema,
                        write_disposition=bigquery.WriteDisposition.WRITE_EMPTY)))
                loaded.setdefault(dataset, []).append(table)
        for job in jobs:
            job.result()
    con.close()
    bq.close()
    return loaded


def duckdb_row_counts(warehouse: str, loaded: dict) -> dict[str, int]:
    """Rows per ``dataset.table`` in the DuckDB warehouse (to check the mirror)."""
    con = duckdb.connect(warehouse, read_only=True)
    try:
        return {f"{d}.{t}": con.execute(f'SELECT COUNT(*) FROM "{d}"."{t}"').fetchone()[0]
                for d, tables in loaded.items() for t in tables}
    finally:
        con.close()


PAIR = "eurusd"
ROWS = 1500  # 25 hours of minutes: two shards per table with --shard-days 1


@pytest.fixture(scope="session")
def bq_warehouse(tmp_path_factory, gcs_emulator, bq_emulator) -> dict:
    """A small sample warehouse of eurusd (DuckDB file) mirrored into the BigQuery
    emulator; yields {"duckdb": path, "source": "bigquery://PROJECT", "loaded": ...}."""
    from pipelines.sample import build_warehouse

    path = str(tmp_path_factory.mktemp("bqwh") / "w.duckdb")
    build_warehouse(path, [PAIR], rows=ROWS, seed=11, tables_per_group=2)
    loaded = mirror_warehouse(path, bq_emulator["project"], gcs_emulator["bucket"],
                              bq_emulator["endpoint"])
    return {"duckdb": path, "source": f"bigquery://{bq_emulator['project']}", "loaded": loaded}
