"""Pytest fixtures that start the local GCS and BigQuery emulators on free ports.

Both speak the real wire protocols, so the official clients (google-cloud-storage,
google-cloud-bigquery, the BigQuery Storage Read API over gRPC, Beam's gs:// filesystem)
run unchanged against them. No network and no credentials are used: the clients get
anonymous credentials, and Beam is told ``--no_auth`` so it does not wait for a lookup.
"""
from __future__ import annotations

import os
import shutil
import sys

import pytest

# Starting the GCS emulator's process lives in emulator_procs.py, shared with the soak
# (python -m bench.soak), which runs without pytest.
from emulator_procs import BUCKET, PROJECT, environ, gcs_emulator_process, start_on_free_ports
from emulator_procs import stop as _stop

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A GCS emulator with bucket ``bqx-test``; yields its data folder.

    ``STORAGE_EMULATOR_HOST`` is set for this process and its children, so
    google-cloud-storage and Beam's gs:// filesystem talk to it.
    """
    data = tmp_path_factory.mktemp("gcs")
    with gcs_emulator_process(str(data), BUCKET) as emulator:
        with environ(STORAGE_EMULATOR_HOST=emulator["host"], GOOGLE_CLOUD_PROJECT=PROJECT):
            yield emulator


@pytest.fixture(scope="session")
def bq_emulator(tmp_path_factory, gcs_emulator):
    """A BigQuery emulator (REST and Storage Read gRPC) that sees the GCS emulator's
    objects; yields its endpoints. ``BQX_BIGQUERY_ENDPOINT``/``BQX_BIGQUERY_GRPC`` are set
    for this process and its children."""
    import duckdb
    import duckdb_extensions

    # The emulator needs DuckDB's spatial extension and cannot download it here.
    duckdb_extensions.import_extension("spatial", con=duckdb.connect())
    data = tmp_path_factory.mktemp("bq")
    env = {**os.environ, "BQEMU_GCS_LOCAL_ROOT": gcs_emulator["objects_dir"]}
    proc, (rest, grpc) = start_on_free_ports(
        lambda ports: [os.path.join(BIN, "bqemulator"), "start", "--rest-port", str(ports[0]),
                       "--grpc-port", str(ports[1]), "--project", PROJECT, "--log-level", "warning"],
        2, lambda ports: f"http://127.0.0.1:{ports[0]}/healthz", str(data / "emulator.log"),
        env=env, cwd=str(data))
    endpoint = f"http://127.0.0.1:{rest}"
    try:
        with environ(BQX_BIGQUERY_ENDPOINT=endpoint, BQX_BIGQUERY_GRPC=f"127.0.0.1:{grpc}"):
            yield {"endpoint": endpoint, "grpc": f"127.0.0.1:{grpc}", "project": PROJECT}
    finally:
        _stop(proc)


def upload_tree(local_root: str, gs_root: str) -> int:
    """Copy a local checkpoint tree into the emulated bucket, same relative paths; return
    how many files."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    bucket, _, prefix = gs_root[len("gs://"):].partition("/")
    target = gcs.Client(project=PROJECT, credentials=AnonymousCredentials()).bucket(bucket)
    count = 0
    for folder, _dirs, files in os.walk(local_root):
        for f in files:
            path = os.path.join(folder, f)
            rel = os.path.relpath(path, local_root).replace(os.sep, "/")
            target.blob(f"{prefix}/{rel}").upload_from_filename(path)
            count += 1
    return count


def clear_dir(path: str) -> None:
    """Remove a folder's contents (objects of an emulated bucket, for instance)."""
    shutil.rmtree(path, ignore_errors=True)
