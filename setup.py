"""Packaging of the BQX ML pipelines.

Dependencies are pinned here so that the containers, CI and Dataflow workers (which
install this package with ``--setup_file ./setup.py``) run the same versions.
"""
from setuptools import find_packages, setup

# Both jobs: Arrow, the embedded warehouse, the query builder and the Google clients.
COMMON = [
    "pyarrow==25.0.1",
    "numpy>=2.0,<3",
    "duckdb==1.5.5",
    "sqlglot[c]==30.11.0",  # compiled parser; bqemulator (tests) needs <30.12
    "google-cloud-bigquery==3.47.0",
    "google-cloud-bigquery-storage==2.43.0",
    "google-cloud-storage==3.17.1",
    "google-crc32c>=1.5,<2",
]
EXTRACT = ["apache-beam[gcp]==2.77.0"]
MERGE = ["polars==2.1.0"]
TEST = [
    "pytest>=9,<10",
    "hypothesis>=6.100,<7",
    "pyyaml>=6,<7",
    # Local emulators of GCS and BigQuery that the cloud tests start (tests/emulators.py);
    # bqemulator runs on DuckDB and needs its spatial extension, installed offline here.
    "gcp-storage-emulator==2026.7.19",
    "bqemulator==1.4.0",
    "duckdb-extension-spatial==1.5.5",
    "duckdb-extensions==1.5.5",
]

setup(
    name="bqx-pipelines",
    version="0.1.0",
    description="BigQuery feature tables -> parquet checkpoints -> one training file per FX pair",
    python_requires=">=3.11",
    packages=find_packages(include=["pipelines", "pipelines.*", "launchers", "launchers.*"]),
    package_data={"pipelines": ["catalog.toml"]},
    install_requires=COMMON,
    extras_require={
        "extract": EXTRACT,
        "merge": MERGE,
        "test": TEST,
        "all": EXTRACT + MERGE,
        # The PNG chart of ``python -m bench.merge --report``.
        "bench": ["matplotlib>=3.8,<4"],
        "dev": EXTRACT + MERGE + TEST + ["matplotlib>=3.8,<4"],
    },
)
