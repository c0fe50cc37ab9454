"""Writing the training file: one row group per window, published only when complete."""
from __future__ import annotations

import json
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

METADATA_KEY = b"bqx.training"
OUTPUT_COMPRESSION = "zstd"
OUTPUT_COMPRESSION_LEVEL = 1


class TrainingFileWriter:
    """A parquet writer tuned for ~17,000 columns.

    Statistics only on the key (they let readers skip row groups by time, and on every
    column they would make the footer several times larger), dictionary encoding only
    for strings, no Arrow schema blob (parquet's own schema round-trips these types).
    """

    def __init__(self, path: str, schema: pa.Schema, metadata: dict[str, Any]):
        self.schema = schema
        self._metadata = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
        strings = [f.name for f in schema if pa.types.is_string(f.type)]
        self._writer = pq.ParquetWriter(
            path, self.schema,
            compression=OUTPUT_COMPRESSION,
            compression_level=OUTPUT_COMPRESSION_LEVEL,
            use_dictionary=strings or False,
            write_statistics=[schema.names[0]],
            store_schema=False,
        )
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        """Append ``table`` as one row group."""
        self._writer.write_table(table, row_group_size=max(table.num_rows, 1))
        self.rows += table.num_rows

    def close(self) -> None:
        """Write the footer (with the ``bqx.training`` metadata)."""
        self._writer.add_key_value_metadata(self._metadata)
        self._writer.close()
