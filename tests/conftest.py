"""Shared fixtures: a small sample warehouse and its extraction, made once per session."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAIR = "eurusd"
ROWS = 2000  # about 33 hours of minutes: two shards with --shard-days 1


def run_module(module: str, *args: str, env: dict | None = None, timeout: int = 300):
    """Run ``python -m module args`` the way a user would; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


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
