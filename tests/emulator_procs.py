"""Starting the local GCS emulator as a process: shared by the tests' fixtures
(tests/emulators.py) and the soak (``python -m bench.soak``), without pytest.

The emulator speaks the real JSON API, so google-cloud-storage, pyarrow's GcsFileSystem
and Beam's gs:// filesystem run unchanged against it; no network, no credentials.
"""
from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Callable, Iterator

BUCKET = "bqx-test"
PROJECT = "bqx-ml"
# gcp-storage-emulator serves one request at a time; pyarrow's GCS reader keeps a download
# open while it issues range reads, which then waits forever. One thread per connection.
THREADED_GCS_EMULATOR = """
import http.server, sys
http.server.HTTPServer = http.server.ThreadingHTTPServer
from gcp_storage_emulator.__main__ import main
main(["-d", sys.argv[1], "start", "--port", sys.argv[2], "--default-bucket", sys.argv[3], "-q"])
"""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class EmulatorExited(RuntimeError):
    """The emulator's process ended before it answered."""


def wait_http(url: str, proc: subprocess.Popen, log: str, timeout: float = 60) -> None:
    """Wait until ``url`` answers; raise (with the log's tail) if ``proc`` dies or it
    never does."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmulatorExited(f"emulator exited with {proc.returncode}: {_tail(log)}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"emulator at {url} did not answer in {timeout}s: {_tail(log)}")


def start_on_free_ports(command: Callable[[list[int]], list[str]], ports: int,
                        ready_url: Callable[[list[int]], str], log: str, attempts: int = 3,
                        **popen: Any) -> tuple[subprocess.Popen, list[int]]:
    """Start ``command(ports)`` on ``ports`` free ports, its output in ``log``, and wait
    until ``ready_url(ports)`` answers; return the process and its ports.

    A port is free when :func:`free_port` picks it, but another process can take it
    before the emulator binds it; the emulator then exits, and is started again on
    other ports (up to ``attempts`` times)."""
    for attempt in range(1, attempts + 1):
        chosen: list[int] = []
        while len(chosen) < ports:
            port = free_port()
            if port not in chosen:
                chosen.append(port)
        with open(log, "w") as out:
            proc = subprocess.Popen(command(chosen), stdout=out, stderr=subprocess.STDOUT, **popen)
        try:
            wait_http(ready_url(chosen), proc, log)
        except EmulatorExited:
            if attempt == attempts:
                raise
            continue
        except BaseException:
            stop(proc)
            raise
        return proc, chosen
    raise AssertionError("unreachable")


def _tail(log: str) -> str:
    with open(log, encoding="utf-8", errors="replace") as fh:
        return fh.read()[-3000:]


def stop(proc: subprocess.Popen) -> None:
    """Stop an emulator process we started (terminate, then kill if it hangs)."""
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def gcs_emulator_process(data_dir: str, bucket: str = BUCKET) -> Iterator[dict]:
    """Run a GCS emulator with ``bucket`` storing its objects under ``data_dir``.

    Yields ``host`` (the value for ``STORAGE_EMULATOR_HOST``), ``data_dir``, ``bucket``
    and ``objects_dir`` (where the emulator keeps the objects' bytes). The environment
    is left alone: callers point their clients at ``host`` themselves.
    """
    os.makedirs(data_dir, exist_ok=True)
    proc, (port,) = start_on_free_ports(
        lambda ports: [sys.executable, "-c", THREADED_GCS_EMULATOR, data_dir, str(ports[0]), bucket],
        1, lambda ports: f"http://127.0.0.1:{ports[0]}/storage/v1/b/{bucket}",
        os.path.join(data_dir, "emulator.log"), cwd=data_dir)
    host = f"http://127.0.0.1:{port}"
    try:
        yield {"host": host, "data_dir": data_dir, "bucket": bucket,
               "objects_dir": os.path.join(data_dir, ".cloudstorage")}
    finally:
        stop(proc)


@contextlib.contextmanager
def environ(**values: str) -> Iterator[None]:
    """Set environment variables for this process (and its children) for the block."""
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
