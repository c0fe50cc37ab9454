"""Column types: BigQuery type names, their DuckDB spellings, and Arrow types."""
from __future__ import annotations

import pyarrow as pa

from pipelines.errors import PipelineError

# Canonical Arrow type of each BigQuery type the pipeline carries.
ARROW_TYPES = {
    "FLOAT64": pa.float64(),
    "INT64": pa.int64(),
    "STRING": pa.string(),
    "BOOL": pa.bool_(),
    "TIMESTAMP": pa.timestamp("us", tz="UTC"),
}

# INFORMATION_SCHEMA spellings (BigQuery legacy aliases and DuckDB) -> BigQuery name.
_ALIASES = {
    "FLOAT64": "FLOAT64", "FLOAT": "FLOAT64", "DOUBLE": "FLOAT64",
    "INT64": "INT64", "INTEGER": "INT64", "BIGINT": "INT64", "INT": "INT64",
    "STRING": "STRING", "VARCHAR": "STRING",
    "BOOL": "BOOL", "BOOLEAN": "BOOL",
    "TIMESTAMP": "TIMESTAMP", "TIMESTAMP WITH TIME ZONE": "TIMESTAMP", "TIMESTAMPTZ": "TIMESTAMP",
}


def bigquery_type(source_type: str, where: str) -> str:
    """Map a type name from INFORMATION_SCHEMA to its BigQuery name, or refuse it."""
    name = _ALIASES.get(str(source_type).upper())
    if name is None:
        raise PipelineError(f"column {where} has type {source_type!r}, which the pipeline "
                            f"does not carry (supported: {', '.join(ARROW_TYPES)})")
    return name


def arrow_type(bq_type: str) -> pa.DataType:
    """The Arrow type that checkpoints and the training file use for ``bq_type``."""
    return ARROW_TYPES[bq_type]


def type_of_arrow(t: pa.DataType) -> str:
    """The BigQuery name of a canonical Arrow type (inverse of :func:`arrow_type`)."""
    for name, arrow in ARROW_TYPES.items():
        if arrow == t:
            return name
    raise ValueError(f"no BigQuery type for Arrow type {t}")
