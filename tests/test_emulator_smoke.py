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


def test_an_emulator_that_could_not_bind_is_started_again_on_other_ports(tmp_path):
    """free_port releases the port it found before the emulator binds it, so another
    process can take it first; the emulator then exits, and is started on new ports.
    Here the first start holds the chosen port in this process, as that other process
    would, and the real emulator command exits on its own bind error."""
    import socket
    import sys
    import urllib.request

    from emulator_procs import start_on_free_ports, stop

    held: list[socket.socket] = []
    tried: list[int] = []

    def command(ports):
        tried.append(ports[0])
        if len(tried) == 1:
            taken = socket.socket()
            taken.bind(("127.0.0.1", ports[0]))
            taken.listen()
            held.append(taken)
        return [sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(ports[0])]

    proc, (port,) = start_on_free_ports(command, 1, lambda ports: f"http://127.0.0.1:{ports[0]}/",
                                        str(tmp_path / "server.log"), cwd=str(tmp_path))
    try:
        assert len(tried) == 2 and port == tried[1] != tried[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as answer:
            assert answer.status == 200
    finally:
        stop(proc)
        held[0].close()
