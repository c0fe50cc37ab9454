"""Pytest fixtures that start the local GCS and BigQuery emulators on free ports.

Both speak the real wire protocols, so the official clients (google-cloud-storage,
google-cloud-bigquery, the BigQuery Storage Read API over gRPC, Beam's gs:// filesystem)
run unchanged against them. No network and no credentials are used: the clients get
anonymous credentials, and Beam is told ``--no_auth`` so it does not wait for a lookup.
"""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

BUCKET = "bqx-test"
# gcp-storage-emulator serves one request at a time; pyarrow's GCS reader keeps a download
# open while it issues range reads, which then waits forever. One thread per connection.
_THREADED_GCS_EMULATOR = """
import http.server, sys
http.server.HTTPServer = http.server.ThreadingHTTPServer
from gcp_storage_emulator.__main__ import main
main(["-d", sys.argv[1], "start", "--port", sys.argv[2], "--default-bucket", sys.argv[3], "-q"])
"""
PROJECT = "bqx-ml"
BIN = os.path.dirname(sys.executable)


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"emulator exited with {proc.returncode}: {open(log).read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"emulator at {url} did not answer in {timeout}s: {open(log).read()[-3000:]}")


def _stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="session")
def gcs_emulator(tmp_path_factory):
    """A GCS emulator with bucket ``bqx-test``; yields its data folder.

    ``STORAGE_EMULATOR_HOST`` is set for this process and its children, so
    google-cloud-storage and Beam's gs:// filesystem talk to it.
    """
    data = tmp_path_factory.mktemp("gcs")
    port = free_port()
    log = str(data / "emulator.log")
    proc = subprocess.Popen(
        [sys.executable, "-c", _THREADED_GCS_EMULATOR, str(data), str(port), BUCKET],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, cwd=str(data))
    host = f"http://127.0.0.1:{port}"
    try:
        _wait_http(f"{host}/storage/v1/b/{BUCKET}", proc, log)
        with _env(STORAGE_EMULATOR_HOST=host, GOOGLE_CLOUD_PROJECT=PROJECT):
            yield {"host": host, "data_dir": str(data), "bucket": BUCKET,
                   "objects_dir": str(data / ".cloudstorage")}
    finally:
        _stop(proc)


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
    rest, grpc = free_port(), free_port()
    log = str(data / "emulator.log")
    env = {**os.environ, "BQEMU_GCS_LOCAL_ROOT": gcs_emulator["objects_dir"]}
    proc = subprocess.Popen(
        [os.path.join(BIN, "bqemulator"), "start", "--rest-port", str(rest), "--grpc-port",
         str(grpc), "--project", PROJECT, "--log-level", "warning"],
        stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, cwd=str(data))
    endpoint = f"http://127.0.0.1:{rest}"
    try:
        _wait_http(f"{endpoint}/healthz", proc, log)
        with _env(BQX_BIGQUERY_ENDPOINT=endpoint, BQX_BIGQUERY_GRPC=f"127.0.0.1:{grpc}"):
            yield {"endpoint": endpoint, "grpc": f"127.0.0.1:{grpc}", "project": PROJECT}
    finally:
        _stop(proc)


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def clear_dir(path: str) -> None:
    """Remove a folder's contents (objects of an emulated bucket, for instance)."""
    shutil.rmtree(path, ignore_errors=True)
