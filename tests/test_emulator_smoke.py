"""The emulators answer the official clients (a guard for every cloud test)."""
from google.auth.credentials import AnonymousCredentials

from emulators import bq_emulator, gcs_emulator  # noqa: F401 (fixtures)


def test_official_clients_talk_to_the_emulators(gcs_emulator, bq_emulator):
    from google.cloud import bigquery, storage

    gcs = storage.Client(project="bqx-ml", credentials=AnonymousCredentials())
    gcs.bucket(gcs_emulator["bucket"]).blob("smoke/a.txt").upload_from_string(b"hi")
    assert "smoke/a.txt" in [b.name for b in gcs.list_blobs(gcs_emulator["bucket"], prefix="smoke/")]
    bq = bigquery.Client(project="bqx-ml", credentials=AnonymousCredentials(),
                         client_options={"api_endpoint": bq_emulator["endpoint"]})
    bq.create_dataset("smoke", exists_ok=True)
    bq.query("CREATE OR REPLACE TABLE smoke.t AS SELECT TIMESTAMP_ADD(TIMESTAMP '2025-01-06 "
             "00:00:00+00', INTERVAL x MINUTE) AS interval_time, x * 1.5 AS v "
             "FROM UNNEST(GENERATE_ARRAY(0, 99)) AS x").result()
    rows = bq.query("SELECT COUNT(*) AS n FROM smoke.t WHERE interval_time >= "
                    "TIMESTAMP '2025-01-06 00:30:00+00'").result()
    assert [r.n for r in rows] == [70]
