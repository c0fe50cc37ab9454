"""Storage at the edges: local folders now, ``gs://`` buckets through the same calls.

The commit protocol lives here: nothing appears under its final name until it is
complete. Locally a file is written beside its final name and renamed into place (an
atomic rename on POSIX); in a bucket an object becomes visible only when its upload
finishes.
"""
from __future__ import annotations

import contextlib
import os
import posixpath
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

import google_crc32c

from pipelines.errors import PipelineError

_CHUNK = 4 << 20
TEMP_MARK = ".tmp-"


def is_gcs(path: str) -> bool:
    """True for ``gs://`` paths."""
    return str(path).startswith("gs://")


def join(root: str, *parts: str) -> str:
    """Join path parts under ``root`` (a folder or a ``gs://`` prefix)."""
    if is_gcs(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def _require_local(path: str) -> None:
    if is_gcs(path):
        raise PipelineError(f"{path}: gs:// paths need the cloud storage support "
                            "(not available in this build)")


@contextlib.contextmanager
def atomic_local_path(final: str) -> Iterator[str]:
    """Yield a local temporary path; publish it as ``final`` when the block succeeds.

    On any error the temporary file is removed and ``final`` is untouched.
    """
    _require_local(final)
    folder = os.path.dirname(os.path.abspath(final))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(final)}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    with atomic_local_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def read_bytes(path: str) -> bytes:
    """Read a whole (small) file."""
    _require_local(path)
    with open(path, "rb") as fh:
        return fh.read()


def exists(path: str) -> bool:
    """True if ``path`` is an existing file."""
    _require_local(path)
    return os.path.isfile(path)


def size(path: str) -> int:
    """Size of ``path`` in bytes."""
    _require_local(path)
    return os.path.getsize(path)


def crc32c(path: str) -> str:
    """CRC32C of a file's bytes as 8 hex digits (the checksum GCS keeps per object)."""
    _require_local(path)
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            checksum.update(chunk)
    return checksum.digest().hex()


def list_files(prefix: str) -> list[str]:
    """Every file under folder ``prefix`` (recursively), temporary files excluded."""
    _require_local(prefix)
    out = []
    for folder, _dirs, files in os.walk(prefix):
        out.extend(os.path.join(folder, f) for f in files if TEMP_MARK not in f)
    return sorted(out)


def delete(path: str) -> None:
    """Remove a file if it exists."""
    _require_local(path)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def local_path(path: str) -> str:
    """A path that local libraries (pyarrow, DuckDB) can open for reading."""
    _require_local(path)
    return path


def temp_dir(prefix: str = "bqx-") -> str:
    """A fresh local scratch folder."""
    return tempfile.mkdtemp(prefix=prefix)


def resolve_local(path: str) -> str:
    """Absolute form of a local path; ``gs://`` paths are returned as they are."""
    return path if is_gcs(path) else str(Path(path).expanduser().resolve())
