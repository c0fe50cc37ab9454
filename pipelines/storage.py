"""Storage at the edges: local folders and ``gs://`` buckets through the same calls.

The commit protocol lives here: nothing appears under its final name until it is
complete. Locally a file is written beside its final name and renamed into place (an
atomic rename on POSIX); in a bucket the file is written to a local temporary and
uploaded with its CRC32C, which the server checks before the object becomes visible
(a GCS object appears only when its upload finishes, and never with other bytes).
Outputs too large for the local disk (the training file: on Cloud Run the disk is
memory) are streamed to a temporary object beside the final name instead, checked
there, and published by a server-side copy: :func:`atomic_gcs_object`.

``gs://`` goes through google-cloud-storage (one client per thread), and reads of
parquet through ``pyarrow.fs.GcsFileSystem`` (ranged reads, nothing buffered beyond what
pyarrow asks for). With ``STORAGE_EMULATOR_HOST`` set both talk to that emulator
anonymously; otherwise they use the default credentials.

Faults. Transient errors (429, 408, 5xx, dropped connections) are retried by the
libraries themselves with exponential back-off, for at most :func:`retry_timing`'s
deadline per call (``BQX_RETRY_SECONDS``, default 120 s), which the BigQuery clients of
:mod:`pipelines.sources` share; :func:`gcs_retry` is the one policy of every
google-cloud-storage call. Writes are conditional on the generation they replace, so
repeating one whose response was lost is safe. Permanent errors (403, 404, a missing
bucket) are not retried: they become a :class:`PipelineError` naming the path at once. A
full local disk is one too, and leaves nothing under the final name.
"""
from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime as dt
import errno
import functools
import os
import posixpath
import tempfile
import threading
import uuid
from pathlib import Path
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import google_crc32c

from pipelines import cli
from pipelines.errors import PipelineError

_CHUNK = 4 << 20
TEMP_MARK = ".tmp-"
# Requests kept in flight by a caller checking many objects of a bucket (every shard of
# an extraction): each is answered after tens of milliseconds, mostly waiting, and one
# after another thousands of them wait in turn (BENCHMARKS.md, "A bucket's latency").
BUCKET_CONCURRENCY = 16

# Retry timing of every client call (see retry_timing); seconds.
RETRY_SECONDS_ENV = "BQX_RETRY_SECONDS"
RETRY_INITIAL_ENV = "BQX_RETRY_INITIAL_SECONDS"
DEFAULT_RETRY_SECONDS = 120.0
DEFAULT_RETRY_INITIAL = 1.0
RETRY_MAXIMUM = 30.0
RETRY_MULTIPLIER = 2.0


@dataclasses.dataclass(frozen=True)
class RetryTiming:
    """How a client call retries transient errors: back-off from ``initial`` seconds,
    times ``multiplier`` per attempt up to ``maximum`` (each sleep is drawn uniformly
    below it), for at most ``deadline`` seconds in all."""

    initial: float
    maximum: float
    multiplier: float
    deadline: float


def retry_timing() -> RetryTiming:
    """The retry timing of every client call: google-cloud-storage, pyarrow's GCS reads,
    BigQuery REST and the Storage Read API.

    ``$BQX_RETRY_SECONDS`` (default 120): how long one call keeps retrying. Long enough
    to ride out a front end's brief unavailability or a rate limit, short enough that an
    outage fails the job (which resumes where it stopped) instead of hanging it; tests
    shorten it. ``$BQX_RETRY_INITIAL_SECONDS`` (default 1): the first back-off.
    """
    deadline = cli.env_number(RETRY_SECONDS_ENV, DEFAULT_RETRY_SECONDS, above=0, unit="seconds")
    initial = min(cli.env_number(RETRY_INITIAL_ENV, DEFAULT_RETRY_INITIAL, above=0, unit="seconds"),
                  deadline)
    return RetryTiming(initial, max(initial, min(RETRY_MAXIMUM, deadline / 4)),
                       RETRY_MULTIPLIER, deadline)


def is_gcs(path: str) -> bool:
    """True for ``gs://`` paths."""
    return str(path).startswith("gs://")


def join(root: str, *parts: str) -> str:
    """Join path parts under ``root`` (a folder or a ``gs://`` prefix)."""
    if is_gcs(root):
        return posixpath.join(root, *parts)
    return os.path.join(root, *parts)


def check_gcs_path(path: str) -> str:
    """Return ``path``; refuse a ``gs://`` path with a ``.`` or ``..`` segment.

    Object names are not resolved like folders: ``gs://b/ck/../x`` would name an object
    ``ck/../x`` to one client and ``x`` to another, so a path built from hand-edited or
    hostile input could read or write outside its prefix.
    """
    if is_gcs(path) and any(part in (".", "..") for part in str(path)[5:].split("/")):
        raise PipelineError(f"{path}: '.' and '..' segments are not allowed in a gs:// path")
    return path


def _split(path: str) -> tuple[str, str]:
    """``gs://bucket/name`` -> (bucket, name)."""
    bucket, _, name = check_gcs_path(str(path))[len("gs://"):].partition("/")
    if not bucket:
        raise PipelineError(f"{path}: a gs:// path needs a bucket name")
    return bucket, name


# --------------------------------------------------------------------------- gs:// clients

_local = threading.local()


def _emulator_host() -> str | None:
    return os.environ.get("STORAGE_EMULATOR_HOST") or None


def _client():
    """The google-cloud-storage client of this thread (created on first use).

    Against an emulator (``STORAGE_EMULATOR_HOST``) it is anonymous; otherwise it uses
    the default credentials. The library reads ``STORAGE_EMULATOR_HOST`` itself.
    """
    key = (_emulator_host(), os.getpid())
    cached = getattr(_local, "client", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    from google.cloud import storage as gcs

    if key[0]:
        from google.auth.credentials import AnonymousCredentials

        project = os.environ.get("GOOGLE_CLOUD_PROJECT") or "local-emulator"
        client = gcs.Client(project=project, credentials=AnonymousCredentials())
    else:
        from google.auth import exceptions as auth_errors

        try:
            client = gcs.Client()
        except auth_errors.GoogleAuthError as exc:
            raise PipelineError(f"gs:// storage: no Google credentials ({exc})") from None
    _local.client = (key, client)
    return client


@functools.lru_cache(maxsize=4)
def _arrow_gcs(emulator: str | None, pid: int):
    """A pyarrow GCS filesystem (thread-safe, shared by the process)."""
    import datetime as dt

    from pyarrow import fs

    # google-cloud-cpp under pyarrow retries transient errors by itself until this limit
    # (its back-off is its own); BQX_GCS_READ_RETRY_SECONDS overrides it for reads only.
    seconds = cli.env_number("BQX_GCS_READ_RETRY_SECONDS", retry_timing().deadline, above=0,
                             unit="seconds")
    retry = dt.timedelta(seconds=seconds)
    if emulator:
        scheme, _, host = emulator.rpartition("://")
        return fs.GcsFileSystem(anonymous=True, endpoint_override=host,
                                scheme=scheme or "http", retry_time_limit=retry)
    return fs.GcsFileSystem(retry_time_limit=retry)


def gcs_retry(conditional: bool = False):
    """The retry policy of every google-cloud-storage call: the library's own predicate
    (``DEFAULT_RETRY``: 429, 408, 5xx, connection errors) with :func:`retry_timing`.

    ``conditional=True`` for writes: a write is retried only when it carries a
    generation precondition (``if_generation_match``), which makes repeating it safe
    (the library's ``DEFAULT_RETRY_IF_GENERATION_SPECIFIED``, with the same timing).
    """
    from google.cloud.storage.retry import DEFAULT_RETRY, ConditionalRetryPolicy, is_generation_specified

    timing = retry_timing()
    policy = DEFAULT_RETRY.with_timeout(timing.deadline).with_delay(
        initial=timing.initial, maximum=timing.maximum, multiplier=timing.multiplier)
    if conditional:
        return ConditionalRetryPolicy(policy, is_generation_specified, ["query_params"])
    return policy


# Buckets this process has seen to exist: a 404 in them means a missing object only.
_buckets_seen: set[str] = set()


def _no_bucket(bucket: str, path: str) -> PipelineError:
    return PipelineError(f"gs://{bucket}: the bucket does not exist (deleted, or a wrong "
                         f"name?); needed for {path}")


def _require_bucket(path: str) -> None:
    """Raise a PipelineError naming the bucket when the bucket of ``path`` does not exist.

    GCS answers 404 for a missing object and for a missing bucket alike, and a deleted
    bucket must not read as "no checkpoint yet" (a resume would redo everything and fail
    on every upload). Asked by listing at most one object, which the jobs' object roles
    allow (``buckets.get`` they do not), once per bucket and process.
    """
    from google.api_core import exceptions

    bucket, _ = _split(path)
    if bucket in _buckets_seen:
        return
    try:
        list(_client().list_blobs(bucket, max_results=1, fields="items(name)",
                                  retry=gcs_retry()))
    except exceptions.NotFound:
        raise _no_bucket(bucket, path) from None
    except exceptions.GoogleAPIError as exc:
        raise _gcs_error(path, f"checking bucket gs://{bucket}", exc) from None
    _buckets_seen.add(bucket)


def _blob(path: str):
    bucket, name = _split(path)
    if not name:
        raise PipelineError(f"{path}: a gs:// path needs an object name")
    return _client().bucket(bucket).blob(name)


def _gcs_error(path: str, what: str, exc: Exception) -> PipelineError:
    return PipelineError(f"{path}: {what} failed: {_whole_error(exc)}")


def _whole_error(exc: Exception) -> str:
    """The error with what the server said: the upload library's InvalidResponse shows
    only the status, so its response body (GCS's JSON message) is added."""
    from google.api_core import exceptions

    text = str(exc)
    response = getattr(exc, "response", None)
    if response is None or isinstance(exc, exceptions.GoogleAPIError):
        return text
    try:
        body = response.text
    except Exception:  # noqa: BLE001 - a body that cannot be read adds nothing
        return text
    try:
        import json

        message = json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = " ".join(str(body).split())
    return f"{text}: {message}" if message else text


def _get_blob(path: str):
    """The object's metadata, or None when it does not exist."""
    from google.api_core import exceptions

    bucket, name = _split(path)
    try:
        blob = _client().bucket(bucket).get_blob(name, retry=gcs_retry())
    except exceptions.NotFound:  # get_blob returns None instead, but be sure
        blob = None
    except exceptions.GoogleAPIError as exc:
        raise _gcs_error(path, "reading metadata", exc) from None
    if blob is None:
        _require_bucket(path)
    return blob


def _require_blob(path: str):
    blob = _get_blob(path)
    if blob is None:
        raise FileNotFoundError(path)
    return blob


def _hex_crc(b64: str | None) -> str | None:
    return None if b64 is None else base64.b64decode(b64).hex()


def _upload(local: str, final: str) -> None:
    """Upload ``local`` to ``final`` with a CRC32C the server verifies.

    The upload is conditional on the generation found just before it (0: must not
    exist), which makes it safe for the library to retry. When the condition fails the
    object was written meanwhile (by a retried attempt of this upload, or a concurrent
    worker doing the same task): that is fine if its bytes are ours, an error otherwise.
    """
    from google.api_core import exceptions

    crc = _file_crc32c(local)
    crc_b64 = base64.b64encode(bytes.fromhex(crc)).decode()
    current = _get_blob(final)
    blob = _blob(final)
    try:
        blob.upload_from_filename(
            local, content_type="application/octet-stream", checksum="crc32c",
            crc32c_checksum_value=crc_b64,
            if_generation_match=current.generation if current is not None else 0,
            retry=gcs_retry(conditional=True))
    except exceptions.PreconditionFailed:
        now = _get_blob(final)
        if now is None or _hex_crc(now.crc32c) != crc or now.size != os.path.getsize(local):
            raise PipelineError(f"{final} was replaced by another writer during the upload "
                                "(different content)") from None
    except exceptions.GoogleAPIError as exc:
        raise _gcs_error(final, "upload", exc) from None


# --------------------------------------------------------------------------- the calls

@contextlib.contextmanager
def atomic_local_path(final: str, durable: bool = True) -> Iterator[str]:
    """Yield a local temporary path; publish it as ``final`` when the block succeeds.

    On any error the temporary file is removed and ``final`` is untouched. For a
    ``gs://`` ``final`` the temporary is uploaded (CRC32C verified by the server), so
    the object appears only complete. A full disk (or a file larger than the file system
    or the process allows) is a :class:`PipelineError` naming ``final``.

    Locally the file is fsynced before the rename, so that ``final`` survives a crash of
    the machine once it exists; ``durable=False`` skips that, for files whose loss in
    such a crash costs only redoing them (a process that dies leaves them intact).
    """
    if is_gcs(final):
        _split(final)
        folder = tempfile.mkdtemp(prefix="bqx-upload-")
        tmp = os.path.join(folder, f"{posixpath.basename(final)}{TEMP_MARK}{uuid.uuid4().hex[:12]}")
        try:
            with _disk_full_is_an_error(final, tmp):
                yield tmp
            _upload(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            with contextlib.suppress(OSError):
                os.rmdir(folder)
        return
    folder = os.path.dirname(os.path.abspath(final))
    os.makedirs(folder, exist_ok=True)
    # The pid in the name lets a later run tell a dead run's leftover from a live one.
    tmp = os.path.join(folder, f".{os.path.basename(final)}{TEMP_MARK}{os.getpid()}-{uuid.uuid4().hex[:12]}")
    try:
        with _disk_full_is_an_error(final, tmp):
            yield tmp
            if durable:
                with open(tmp, "rb") as fh:
                    os.fsync(fh.fileno())  # a delayed allocation failure shows up here
            os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


# errno -> what to tell the user; the errors that mean "no room for this file".
_NO_ROOM = {
    errno.ENOSPC: "no space left on the disk",
    errno.EDQUOT: "the disk quota is exhausted",
    errno.EFBIG: "file too large (for the file system or the process's file size limit)",
}


@contextlib.contextmanager
def _disk_full_is_an_error(final: str, tmp: str) -> Iterator[None]:
    """Turn a full disk while writing ``tmp`` into one PipelineError line naming
    ``final``: the environment's problem, not a bug (no traceback)."""
    try:
        yield
    except OSError as exc:
        if exc.errno not in _NO_ROOM:
            raise
        raise PipelineError(f"{final}: {_NO_ROOM[exc.errno]} while writing it (temporary "
                            f"{tmp}: {exc.strerror or exc}); nothing was written under "
                            "its name") from None


# --------------------------------------------------------------------------- large gs:// outputs

# Bytes a streaming upload holds before sending them (a multiple of 256 KiB, as resumable
# uploads require): the memory cost of writing an object of any size.
UPLOAD_CHUNK = 16 << 20
# Temporaries older than this are leftovers of a killed run (a merge of a pair is hours
# at most), not the object of a run still in progress.
STALE_TEMPORARY_SECONDS = 24 * 3600


def temporary_name(final: str) -> str:
    """``{final}.tmp-{12 hex digits}``: where an object is staged before it is published."""
    return f"{final}{TEMP_MARK}{uuid.uuid4().hex[:12]}"


class StagedObject:
    """A ``gs://`` object written in place under a temporary name, then published.

    For outputs too large for the local disk (on Cloud Run the disk is memory): the
    bytes go straight to the bucket through a resumable upload of :data:`UPLOAD_CHUNK`
    bytes per request, so memory stays at a few chunks whatever the size (the library
    copies the pending chunk: +60 MiB peak RSS for a 350 MiB merge). Use it through
    :func:`atomic_gcs_object`.

    * :meth:`open_write` streams to the temporary object ``{final}.tmp-{uuid}``
      (:attr:`path`); the server checks the CRC32C of the whole upload, and the object
      exists only once the upload is finalised when the block ends without error (an
      error cancels the upload session; a killed process leaves an unfinalised session,
      which GCS discards after a week, and no object).
    * Readers can check :attr:`path` while ``final`` is untouched.
    * :meth:`publish` copies it to ``final`` server-side (``objects.rewrite``, repeated
      until done; no bytes pass through this process) and checks the copy's CRC32C.
    * :meth:`discard` deletes the temporary.

    A process killed after the upload finished and before the temporary was deleted
    leaves ``{final}.tmp-*`` behind: never under a final name, skipped by
    :func:`list_files`, and removed by :func:`remove_stale_temporaries` (which the
    merge runs before it writes the same output) or by a bucket lifecycle rule, e.g.
    ``{"action": {"type": "Delete"}, "condition": {"age": 2, "matchesPrefix":
    ["training/training_eurusd.parquet.tmp-", ...]}}`` (one prefix per output; the
    final name is not matched by its own temporaries' prefix).
    """

    def __init__(self, final: str):
        _split(final)
        self.final = final
        self.path = temporary_name(final)

    @contextlib.contextmanager
    def open_write(self) -> Iterator:
        """A binary stream (``write``/``tell``; ``flush`` does nothing) into :attr:`path`.

        The upload is finalised when the block ends normally and cancelled when it
        raises. Only for a new temporary name (the upload requires that no object has it).
        """
        from google.api_core import exceptions
        from google.cloud.storage import exceptions as media_errors

        writer = _blob(self.path).open(
            "wb", chunk_size=UPLOAD_CHUNK, ignore_flush=True, if_generation_match=0,
            checksum="crc32c", content_type="application/octet-stream",
            retry=gcs_retry(conditional=True))
        try:
            yield writer
        except BaseException as exc:
            with contextlib.suppress(Exception):
                writer.terminate()  # cancel the session: nothing is finalised
            # A chunk sent from inside the block failed for good (403, a deleted bucket,
            # retries exhausted): one line naming the object, not a traceback.
            if isinstance(exc, (exceptions.GoogleAPIError, media_errors.InvalidResponse)):
                raise _gcs_error(self.final, f"streaming upload to {self.path}", exc) from None
            raise
        try:
            writer.close()  # sends the last chunk and finalises the object
        except BaseException as exc:
            # Cancel the session; a writer left open would also try the upload again
            # when it is garbage-collected (io's finaliser calls close()).
            with contextlib.suppress(Exception):
                writer.terminate()
            if isinstance(exc, media_errors.DataCorruption):
                raise PipelineError(f"{self.path}: upload corrupted in transit ({exc})") from None
            if isinstance(exc, (exceptions.GoogleAPIError, media_errors.InvalidResponse)):
                raise _gcs_error(self.final, f"streaming upload to {self.path}", exc) from None
            raise

    def publish(self, overwrite: bool = True) -> None:
        """Copy :attr:`path` to :attr:`final` on the server (rewrite until done).

        Without ``overwrite`` an existing ``final`` is an error (also when it appears
        during the copy); with it, the ``final`` seen just before is replaced. The copy
        is conditional on both generations, which makes retrying it safe.
        """
        from google.api_core import exceptions

        source = _require_blob(self.path)
        current = _get_blob(self.final)
        if current is not None and not overwrite:
            raise PipelineError(f"{self.final} already exists; not replaced")
        target = _blob(self.final)
        token = None
        try:
            while True:
                token, _done, _total = target.rewrite(
                    source, token=token,
                    if_generation_match=current.generation if current is not None else 0,
                    if_source_generation_match=source.generation,
                    retry=gcs_retry(conditional=True))
                if token is None:
                    break
        except exceptions.PreconditionFailed:
            pass  # a retried call that had succeeded, or another writer: checked below
        except exceptions.GoogleAPIError as exc:
            raise _gcs_error(self.final, f"copy from {self.path}", exc) from None
        now = _get_blob(self.final)
        if now is None or now.crc32c != source.crc32c or now.size != source.size:
            raise PipelineError(f"{self.final} was written by another writer while "
                                f"{self.path} was being published (different content)")

    def discard(self) -> None:
        """Delete the temporary object if it exists (errors only logged: a lifecycle
        rule or a later run removes what is left)."""
        try:
            delete(self.path)
        except PipelineError as exc:
            import logging

            logging.getLogger("pipelines.storage").warning(
                "could not delete the temporary %s (remove it by hand or let a lifecycle "
                "rule do it): %s", self.path, exc)


@contextlib.contextmanager
def atomic_gcs_object(final: str, overwrite: bool = True) -> Iterator[StagedObject]:
    """Yield a :class:`StagedObject` for ``final``; publish it when the block succeeds.

    Inside the block write through ``staged.open_write()`` and check ``staged.path``;
    raise to reject it. When the block ends normally the temporary object is copied to
    ``final`` server-side; in every case it is then deleted. On any failure ``final``
    is untouched.
    """
    staged = StagedObject(final)
    try:
        yield staged
        staged.publish(overwrite=overwrite)
    finally:
        staged.discard()


def remove_stale_temporaries(final: str, min_age_seconds: float = STALE_TEMPORARY_SECONDS) -> list[str]:
    """Delete leftovers of killed runs beside ``final``; return their paths.

    In a bucket: the ``{final}.tmp-*`` objects last written ``min_age_seconds`` ago or
    earlier (another machine may still be writing a newer one). Locally: the
    ``.{name}.tmp-{pid}-*`` files whose process no longer runs.
    """
    if not is_gcs(final):
        return _remove_dead_local_temporaries(final)

    from google.api_core import exceptions

    bucket, name = _split(final)
    cutoff = dt.datetime.now(dt.timezone.utc) - dt.timedelta(seconds=min_age_seconds)
    removed = []
    try:
        blobs = list(_client().list_blobs(bucket, prefix=f"{name}{TEMP_MARK}", retry=gcs_retry()))
    except exceptions.NotFound:  # listing a bucket that exists never answers 404
        raise _no_bucket(bucket, final) from None
    except exceptions.GoogleAPIError as exc:
        raise _gcs_error(final, "listing temporaries", exc) from None
    for blob in blobs:
        if blob.updated is None or blob.updated <= cutoff:
            path = f"gs://{bucket}/{blob.name}"
            delete(path)
            removed.append(path)
    return removed


def _remove_dead_local_temporaries(final: str) -> list[str]:
    folder, name = os.path.split(os.path.abspath(final))
    prefix = f".{name}{TEMP_MARK}"
    removed = []
    try:
        entries = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for entry in entries:
        pid = entry[len(prefix):].split("-", 1)[0] if entry.startswith(prefix) else ""
        if pid.isdigit() and not _process_alive(int(pid)):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(folder, entry))
                removed.append(os.path.join(folder, entry))
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def write_bytes(path: str, data: bytes, durable: bool = True) -> None:
    """Write ``data`` (bytes or any buffer) to ``path`` atomically (``durable``: see
    :func:`atomic_local_path`)."""
    with atomic_local_path(path, durable) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)


def read_bytes(path: str) -> bytes:
    """Read a whole (small) file; FileNotFoundError if it does not exist."""
    return read_buffer(path).to_pybytes()


def read_buffer(path: str):
    """Read a whole file into a ``pyarrow.Buffer`` from Arrow's memory pool;
    FileNotFoundError if it does not exist.

    The merge reads checkpoint shards so: their bytes then come from the pool that
    decodes them, not from the C heap (BENCHMARKS.md, section "code at 56d7b48": peak
    RSS at 100,000 rows with this and the key-only join, against the full run before)."""
    import pyarrow as pa

    if is_gcs(path):
        from google.api_core import exceptions

        sink = pa.BufferOutputStream()
        try:
            _blob(path).download_to_file(sink, retry=gcs_retry())
        except exceptions.NotFound:
            _require_bucket(path)
            raise FileNotFoundError(path) from None
        except exceptions.GoogleAPIError as exc:
            raise _gcs_error(path, "download", exc) from None
        return sink.getvalue()
    with pa.OSFile(path, "r") as source:
        return source.read_buffer()


_T = TypeVar("_T")
_R = TypeVar("_R")


def map_under(root: str, fn: Callable[[_T], _R], items: Iterable[_T]) -> list[_R]:
    """``[fn(item) for item in items]``, each ``fn`` working on files under ``root``: in
    a bucket :data:`BUCKET_CONCURRENCY` calls at once (their time is mostly waiting for
    answers), locally one after another (disk and CPU, which threads would not speed up).
    Results come in the items' order; the first exception in that order is raised, once
    the calls already running have ended, and no call starts after it."""
    if not is_gcs(root):
        return [fn(item) for item in items]
    pool = ThreadPoolExecutor(BUCKET_CONCURRENCY, thread_name_prefix="bucket-requests")
    try:
        return list(pool.map(fn, items))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def stat(path: str, checksum: bool = False) -> tuple[int, str | None] | None:
    """``(size, CRC32C)`` of the file ``path``, None when there is none. In a bucket
    one metadata request gives both (the CRC32C is the one GCS keeps, never recomputed;
    with ``checksum`` an object without one is a PipelineError); locally the CRC32C is
    computed, reading the file, only with ``checksum`` (else None)."""
    if is_gcs(path):
        blob = _get_blob(path)
        if blob is None:
            return None
        crc = _hex_crc(blob.crc32c)
        if checksum and crc is None:
            raise PipelineError(f"{path}: the object has no CRC32C in its metadata")
        return int(blob.size), crc
    if not os.path.isfile(path):
        return None
    return os.path.getsize(path), _file_crc32c(path) if checksum else None


def read_range(path: str, start: int, length: int) -> bytes:
    """``length`` bytes of the file ``path`` from byte ``start`` (fewer at its end): in a
    bucket one ranged request; FileNotFoundError if it does not exist."""
    if length <= 0:
        return b""
    if is_gcs(path):
        from google.api_core import exceptions

        try:
            return _blob(path).download_as_bytes(start=start, end=start + length - 1,
                                                 retry=gcs_retry())
        except exceptions.NotFound:
            _require_bucket(path)
            raise FileNotFoundError(path) from None
        except exceptions.GoogleAPIError as exc:
            raise _gcs_error(path, "ranged read", exc) from None
    with open(path, "rb") as fh:
        fh.seek(start)
        return fh.read(length)


def exists(path: str) -> bool:
    """True if ``path`` is an existing file (object)."""
    if is_gcs(path):
        return _get_blob(path) is not None
    return os.path.isfile(path)


def size(path: str) -> int:
    """Size of ``path`` in bytes."""
    if is_gcs(path):
        return int(_require_blob(path).size)
    return os.path.getsize(path)


def bytes_crc32c(data) -> str:
    """CRC32C of in-memory bytes as 8 hex digits (what :func:`crc32c` gives for a file)."""
    return google_crc32c.Checksum(data).digest().hex()


def _file_crc32c(path: str) -> str:
    checksum = google_crc32c.Checksum()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            checksum.update(chunk)
    return checksum.digest().hex()


def crc32c(path: str) -> str:
    """CRC32C of a file's bytes as 8 hex digits (the checksum GCS keeps per object;
    for ``gs://`` it is read from the object's metadata, not recomputed)."""
    found = stat(path, checksum=True)
    if found is None:
        raise FileNotFoundError(path)
    return found[1]


def list_files(prefix: str) -> list[str]:
    """Every file under folder ``prefix`` (recursively), temporary files excluded."""
    if is_gcs(prefix):
        return sorted(p for p in _list_gcs(prefix.rstrip("/") + "/") if TEMP_MARK not in p)
    out = []
    for folder, _dirs, files in os.walk(prefix):
        out.extend(os.path.join(folder, f) for f in files if TEMP_MARK not in f)
    return sorted(out)


@dataclasses.dataclass(frozen=True)
class FileInfo:
    """A listed file: its path, size in bytes and when it was last written (UTC)."""

    path: str
    size: int
    updated: dt.datetime


def list_file_info(prefix: str) -> list[FileInfo]:
    """:func:`list_files` with each file's size and last write time, from the same one
    listing in a bucket (no request per object)."""
    if is_gcs(prefix):
        blobs = _list_gcs(prefix.rstrip("/") + "/", fields="items(name,size,updated),nextPageToken",
                          blobs=True)
        return sorted((FileInfo(path, int(blob.size or 0), blob.updated) for path, blob in blobs
                       if TEMP_MARK not in path), key=lambda f: f.path)
    out = []
    for path in list_files(prefix):
        with contextlib.suppress(FileNotFoundError):  # removed since the listing
            st = os.stat(path)
            out.append(FileInfo(path, st.st_size,
                                dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc)))
    return out


def _list_gcs(prefix: str, fields: str = "items(name),nextPageToken", blobs: bool = False):
    """Names (as ``gs://`` paths) of every object whose name starts with ``prefix``; with
    ``blobs``, (path, blob) pairs whose blobs carry ``fields``."""
    from google.api_core import exceptions

    bucket, name = _split(prefix)
    try:
        for blob in _client().list_blobs(bucket, prefix=name or None, retry=gcs_retry(),
                                         fields=fields):
            path = f"gs://{bucket}/{blob.name}"
            yield (path, blob) if blobs else path
    except exceptions.NotFound:  # listing a bucket that exists never answers 404
        raise _no_bucket(bucket, prefix) from None
    except exceptions.GoogleAPIError as exc:
        raise _gcs_error(prefix, "listing", exc) from None


def count_existing(paths: Iterable[str]) -> int:
    """How many of ``paths`` exist. In a bucket this is one listing of the paths'
    common prefix, not one request per path (the extract's progress line)."""
    paths = list(paths)
    gcs = [p for p in paths if is_gcs(p)]
    found = sum(os.path.isfile(p) for p in paths if not is_gcs(p))
    if gcs:
        wanted = set(gcs)
        prefix = os.path.commonprefix(gcs)
        if len(wanted) == 1:
            return found + exists(gcs[0])
        found += sum(p in wanted for p in _list_gcs(prefix))
    return found


def delete(path: str) -> None:
    """Remove a file if it exists."""
    if is_gcs(path):
        from google.api_core import exceptions

        try:
            _blob(path).delete(retry=gcs_retry())
        except exceptions.NotFound:
            pass
        except exceptions.GoogleAPIError as exc:
            raise _gcs_error(path, "delete", exc) from None
        return
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def open_input(path: str):
    """What pyarrow reads ``path`` from: a seekable ``pyarrow.NativeFile``.

    Locally an OS file; in a bucket a ``GcsFileSystem`` random-access file that reads
    byte ranges on demand (no read-ahead buffer, so one open file per table of a
    667-table merge costs next to nothing). Close it when done (or use ``with``).
    """
    import pyarrow as pa

    if is_gcs(path):
        bucket, name = _split(path)
        filesystem = _arrow_gcs(_emulator_host(), os.getpid())
        try:
            return filesystem.open_input_file(f"{bucket}/{name}")
        except FileNotFoundError:
            raise
        except OSError as exc:
            if "not found" in str(exc).lower() or "No such" in str(exc):
                raise FileNotFoundError(path) from None
            raise
    return pa.OSFile(path, "rb")


def local_path(path: str) -> str:
    """A local path that local libraries can open (local paths only; for ``gs://`` use
    :func:`open_input`)."""
    if is_gcs(path):
        raise PipelineError(f"{path}: not a local path; read it with storage.open_input")
    return path


def temp_dir(prefix: str = "bqx-") -> str:
    """A fresh local scratch folder."""
    return tempfile.mkdtemp(prefix=prefix)


def resolve_local(path: str) -> str:
    """Absolute form of a local path; ``gs://`` paths are returned as they are."""
    return path if is_gcs(path) else str(Path(path).expanduser().resolve())
