"""Shared fixtures: a small sample warehouse and its extraction, made once per session."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR = "eurusd"
ROWS = 2000  # about 33 hours of minutes: two shards with --shard-days 1


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300):
    """Run ``python -m module args`` the way a user would; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def file_states(root: str) -> dict:
    """Every file under ``root`` (a folder or ``gs://`` prefix) with its size and CRC32C:
    compared before and after, it shows that nothing was lost or changed."""
    from pipelines import storage

    return {p: (storage.size(p), storage.crc32c(p)) for p in storage.list_files(root)}


def extract_window(warehouse: str, root: str, first_day: str, last_day: str, pair: str = PAIR,
                   shard_days: int = 1) -> None:
    """Extract ``pair`` from the DuckDB ``warehouse`` into ``root`` for the days
    ``first_day`` .. ``last_day``; the extraction must succeed."""
    proc = run_module("pipelines.extract", "--pair", pair, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", root, "--shard-days", str(shard_days),
                      "--start-date", first_day, "--end-date", last_day)
    assert proc.returncode == 0, proc.stderr


def kill_module_when(module: str, args: list[str], ready, timeout: float = 120.0,
                     poll: float = 0.02) -> None:
    """Start ``python -m module args`` and SIGKILL it as soon as ``ready()`` holds (or it
    ended, or ``timeout`` passed): a crash at an arbitrary point, as a preempted job sees."""
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while not ready() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(poll)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def commit_records(root: str) -> list[str]:
    """The extraction's commit records under ``root``, one per finished shard."""
    from pipelines import storage

    try:
        return [p for p in storage.list_files(root) if p.endswith(".json") and "manifests" not in p]
    except FileNotFoundError:
        return []


def manifest_content(root: str, pair: str) -> list:
    """A committed extraction's tables, each with its shards' paths, CRC32C and rows."""
    from pipelines import checkpoints

    manifest = checkpoints.load_manifest(root, pair)
    return [(t["table"], [(s["path"], s["crc32c"], s["rows"]) for s in t["shards"]])
            for t in manifest.tables]


@pytest.fixture(scope="session")
def warehouse(tmp_path_factory) -> str:
    """A warehouse with a few tables of every group for eurusd and gbpusd."""
    from pipelines.sample import build_warehouse

    path = str(tmp_path_factory.mktemp("warehouse") / "w.duckdb")
    build_warehouse(path, [PAIR, "gbpusd"], rows=ROWS, seed=7, tables_per_group=2)
    return path


@pytest.fixture(scope="session")
def extracted(warehouse, tmp_path_factory) -> str:
    """The checkpoint root of one uninterrupted extraction of eurusd."""
    root = str(tmp_path_factory.mktemp("ck"))
    proc = run_module("pipelines.extract", "--pair", PAIR, "--source", f"duckdb://{warehouse}",
                      "--checkpoint-root", root, "--shard-days", "1")
    assert proc.returncode == 0, proc.stderr
    return root
