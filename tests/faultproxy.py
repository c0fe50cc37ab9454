"""Fault-injecting proxies in front of the emulators, and the pytest fixture that starts them.

* :class:`HttpFaultProxy` sits in front of an HTTP/1.x endpoint (the GCS emulator's JSON
  API, the BigQuery emulator's REST API). It forwards every request and fails a chosen
  share of them, drawn from a seeded random sequence: a ``429``, ``500`` or ``503`` with a
  Google-style JSON error body (the upstream never sees the request), ``drop`` (the
  connection is closed without a response before forwarding) or ``lost`` (the request is
  forwarded and done, then the connection is closed without a response: the client
  cannot tell it succeeded, so its retry must be safe). Permanent rules answer matching
  requests with a fixed status (``403`` everywhere, ``404`` for one path, ...), and
  ``stall`` rules leave matching requests unanswered, as a connection that stops
  answering does (counting those the client gave up on). :meth:`HttpFaultProxy.report_running`
  makes a ``jobs.insert`` answer say the job is still running (the emulator finishes a
  job before it answers), so that the client polls it as it would BigQuery.
  :meth:`HttpFaultProxy.delay` holds every request for a fixed time before handling it:
  a remote service's latency (``python -m bench.latency`` measures what it costs a merge).
  With ``unique_job_ids`` it also does what BigQuery does and the emulator does not:
  a second ``jobs.insert`` with a job id already used is refused with 409 (the emulator
  runs the job again), which is what makes a retried insert after a ``lost`` response
  safe, and what the client libraries count on.
* :class:`GrpcFaultProxy` does the same for the BigQuery Storage Read API at the gRPC
  level (a generic gRPC server forwarding raw messages over its own channel, not a TCP
  relay): ``unavailable`` and ``exhausted`` fail a call before forwarding with
  UNAVAILABLE / RESOURCE_EXHAUSTED, ``reset`` breaks a server stream with UNAVAILABLE
  after its first message (a connection dropped mid-stream; :meth:`GrpcFaultProxy.break_streams`
  does it to the next streams for sure). ``stall`` rules leave
  matching calls unanswered (no message, no status), or a stream silent after some
  messages, until the client gives up on them. The BigQuery emulator ignores ReadRows'
  ``offset`` (it always sends the whole stream), so the proxy applies it: it asks for the
  whole stream and drops the rows before the offset, as BigQuery does, so that a stream
  resumed mid-way (by the library after a failure, or by the extract at a deadline)
  reads each row once here too.

Every proxy counts what it saw and what it injected (:attr:`counts`, :attr:`injected`),
so that a test can assert that faults really happened. "Deterministic" means the
sequence of decisions is fixed by the seed; which request meets which decision still
depends on the order in which concurrent clients reach the proxy.

The fixture :func:`fault_proxies` starts one proxy per endpoint in front of the session's
emulators; ``fault_proxies.env`` is what a job started with ``run_module(..., env=...)``
needs to go through them. The test process itself keeps talking to the emulators
directly, so checks made by a test are never disturbed by injected faults.
"""
from __future__ import annotations

import collections
import contextlib
import http.client
import http.server
import json
import random
import re
import select
import socket
import threading
import time
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from emulators import bq_emulator, gcs_emulator  # noqa: F401 (fixtures)

HTTP_FAULTS = ("429", "500", "503", "drop", "lost")
GRPC_FAULTS = ("unavailable", "exhausted", "reset")
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
               "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length",
               "server", "date"}
# (status, reason in the body, gRPC-style status) of a Google API error.
_GOOGLE_ERRORS = {
    400: ("invalid", "INVALID_ARGUMENT"), 403: ("forbidden", "PERMISSION_DENIED"),
    404: ("notFound", "NOT_FOUND"), 409: ("conflict", "ALREADY_EXISTS"),
    429: ("rateLimitExceeded", "RESOURCE_EXHAUSTED"), 500: ("backendError", "INTERNAL"),
    503: ("backendError", "UNAVAILABLE"),
}


class _Dice:
    """Seeded decisions: which request fails and how. Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self.configure(0.0, 0, ())

    def configure(self, rate: float, seed: int, kinds) -> None:
        with self._lock:
            self.rate, self.kinds = rate, tuple(kinds)
            self._rng = random.Random(seed)

    def roll(self, allowed) -> str | None:
        """The fault for the next request (None: forward it), among ``allowed`` kinds."""
        with self._lock:
            kinds = [k for k in self.kinds if k in allowed]
            if not kinds or self._rng.random() >= self.rate:
                return None
            return self._rng.choice(kinds)


@dataclass
class Rule:
    """A fixed answer for the requests matching method, path and body: ``status`` (a
    permanent error), with ``stall`` no answer for that many seconds, or else the ``lost``
    fault; for the first ``times`` matching requests only, or all of them."""

    status: int | None
    path: str | None = None  # regex searched in the decoded path (query included)
    method: str | None = None
    body: str | None = None  # regex searched in the request body
    message: str | None = None
    times: int | None = None
    stall: float | None = None

    def matches(self, method: str, path: str, body: bytes) -> bool:
        """True when the request is one this rule answers (and counts it)."""
        if self.times is not None and self.times <= 0:
            return False
        if not self._fits(method, path, body):
            return False
        if self.times is not None:
            self.times -= 1
        return True

    def _fits(self, method: str, path: str, body: bytes) -> bool:
        if self.method and method.upper() != self.method.upper():
            return False
        if self.path and not re.search(self.path, urllib.parse.unquote(path)):
            return False
        return not self.body or re.search(self.body.encode(), body) is not None


class _Counting:
    """What a proxy saw and did."""

    def _reset_counts(self) -> None:
        self._count_lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.injected: list[tuple[str, str, str]] = []  # (kind, method, path)

    def _count(self, what: str, method: str = "", path: str = "", injected: bool = False) -> None:
        with self._count_lock:
            self.counts[what] += 1
            if injected:
                self.injected.append((what, method, path))

    @property
    def faults(self) -> int:
        """How many requests were failed on purpose (random faults and rules)."""
        return len(self.injected)

    def wait_for_count(self, what: str, n: int, seconds: float = 10.0) -> int:
        """``counts[what]`` once it reaches ``n``, or after ``seconds``.

        The proxy notices a client giving up on a call in its own thread, polling; the
        client may finish its work before that thread has counted it (seen in CI on a
        loaded machine), so tests wait for the count rather than read it at once."""
        give_up = time.monotonic() + seconds
        while self.counts[what] < n and time.monotonic() < give_up:
            time.sleep(0.02)
        return self.counts[what]

    def summary(self) -> str:
        """``requests=N forwarded=M 429=a ...``: for test output and reports."""
        return " ".join(f"{k}={v}" for k, v in sorted(self.counts.items()))


class HttpFaultProxy(_Counting):
    """An HTTP/1.1 proxy to ``upstream`` (``http://host:port``) that injects faults."""

    def __init__(self, upstream: str, name: str = "http", unique_job_ids: bool = False):
        self.name = name
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self._dice = _Dice()
        self.rules: list[Rule] = []
        self._rule_lock = threading.Lock()
        self.unique_job_ids = unique_job_ids
        self._job_ids: set[str] = set()
        self._job_lock = threading.Lock()
        self._running_reports = 0
        self.latency = 0.0
        self._in_flight = 0
        self.most_in_flight = 0  # requests being handled at once, at most
        self.seen: list[tuple[str, str]] = []  # (method, path) of every request
        self._reset_counts()
        proxy = self

        class Handler(_ProxyHandler):
            owner = proxy

        self._server = _QuietServer(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name=f"proxy-{name}",
                                        daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT`` of the proxy."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def inject(self, rate: float, seed: int = 0, kinds=HTTP_FAULTS) -> None:
        """Fail a share ``rate`` of the requests from now on, with faults drawn from ``kinds``."""
        self._dice.configure(rate, seed, kinds)

    def fail(self, status: int, path: str | None = None, method: str | None = None,
             body: str | None = None, message: str | None = None) -> Rule:
        """Answer every matching request with ``status`` (a permanent error) from now on."""
        rule = Rule(status, path, method, body, message)
        self.rules.append(rule)
        return rule

    def lose(self, path: str | None = None, method: str | None = None, body: str | None = None,
             times: int = 1) -> Rule:
        """Forward the first ``times`` matching requests and drop their responses (the
        ``lost`` fault, on purpose rather than at random)."""
        rule = Rule(None, path, method, body, times=times)
        self.rules.append(rule)
        return rule

    def stall(self, path: str | None = None, method: str | None = None, body: str | None = None,
              times: int = 1, seconds: float = 120.0) -> Rule:
        """Leave the first ``times`` matching requests unanswered and not forwarded, for
        ``seconds`` or until the client hangs up, then hang up: a connection that stops
        answering. ``counts["stall-abandoned"]`` counts the requests the client gave up on
        first."""
        rule = Rule(None, path, method, body, times=times, stall=seconds)
        self.rules.append(rule)
        return rule

    def delay(self, seconds: float) -> None:
        """Hold every request ``seconds`` before handling it from now on (0: none)."""
        self.latency = seconds

    def report_running(self, times: int = 1) -> None:
        """Answer the next ``times`` successful ``jobs.insert`` requests with the job's
        state changed to RUNNING, as BigQuery answers a job that takes a while."""
        with self._job_lock:
            self._running_reports = times

    def _take_running_report(self, method: str, path: str) -> bool:
        """Whether this successful request's answer is to say RUNNING (and counts it)."""
        if method != "POST" or not re.search(r"/projects/[^/]+/jobs(\?|$)", path):
            return False
        with self._job_lock:
            if self._running_reports <= 0:
                return False
            self._running_reports -= 1
            return True

    def reset(self) -> None:
        """No faults, no rules, no delay, counters at zero."""
        self._dice.configure(0.0, 0, ())
        self.rules = []
        self._running_reports = 0
        self.latency = 0.0
        self.most_in_flight = 0
        self.seen = []
        self._reset_counts()

    def _job_id(self, method: str, path: str, body: bytes) -> str | None:
        """The job id of a BigQuery ``jobs.insert`` (None for anything else)."""
        if not self.unique_job_ids or method != "POST" or not re.search(
                r"/projects/[^/]+/jobs(\?|$)", path):
            return None
        with contextlib.suppress(ValueError, KeyError, AttributeError, TypeError):
            return json.loads(body)["jobReference"]["jobId"]
        return None

    def _job_taken(self, job_id: str) -> bool:
        """Claim ``job_id``; True if an earlier insert already had it."""
        with self._job_lock:
            taken = job_id in self._job_ids
            self._job_ids.add(job_id)
        return taken

    def stop(self) -> None:
        """Stop serving."""
        self._server.shutdown()
        self._server.server_close()


class _QuietServer(http.server.ThreadingHTTPServer):
    """Clients that hang up (after a fault, or at the end of a job) are not news."""

    daemon_threads = True

    def handle_error(self, request, client_address):
        import sys

        if not isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            super().handle_error(request, client_address)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    owner: HttpFaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as the clients expect of Google's servers

    def setup(self):
        super().setup()
        # Headers and body leave in separate writes: without this, Nagle's algorithm and
        # delayed ACKs stall every keep-alive response by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def do_GET(self):
        self._handle()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline().strip():  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self) -> None:
        owner = self.owner
        with owner._count_lock:
            owner.seen.append((self.command, self.path))
            owner._in_flight += 1
            owner.most_in_flight = max(owner.most_in_flight, owner._in_flight)
        try:
            self._answer()
        finally:
            with owner._count_lock:
                owner._in_flight -= 1

    def _answer(self) -> None:
        owner = self.owner
        body = self._read_body()
        method, path = self.command, self.path
        owner._count("requests")
        if owner.latency:
            time.sleep(owner.latency)
        with owner._rule_lock:
            rule = next((r for r in owner.rules if r.matches(method, path, body)), None)
        if rule is not None and rule.status is not None:
            self._inject(str(rule.status), rule.message)
            return
        if rule is not None and rule.stall is not None:
            self._stall(rule.stall)
            return
        kind = "lost" if rule is not None else owner._dice.roll(HTTP_FAULTS)
        if kind in ("429", "500", "503", "drop"):
            self._inject(kind)  # the upstream never sees the request
            return
        job_id = owner._job_id(method, path, body)
        if job_id and owner._job_taken(job_id):
            owner._count("409-job-exists")
            self._send_error(409, f"Already Exists: Job {job_id}")
            return
        self._relay(method, path, body, lose=kind == "lost")

    def _inject(self, kind: str, message: str | None = None) -> None:
        """Answer with the fault ``kind`` (a status code, or ``drop``) and count it."""
        self.owner._count(kind, self.command, self.path, injected=True)
        if kind == "drop":
            self._hang_up()
        else:
            self._send_error(int(kind), message)

    def _stall(self, seconds: float) -> None:
        """Answer nothing for ``seconds``, or until the client closes the connection."""
        self.owner._count("stall", self.command, self.path, injected=True)
        readable, _, _ = select.select([self.connection], [], [], seconds)
        with contextlib.suppress(OSError):
            if readable and not self.connection.recv(1, socket.MSG_PEEK):
                self.owner._count("stall-abandoned")
        self._hang_up()

    def _relay(self, method: str, path: str, body: bytes, lose: bool) -> None:
        """Forward the request; send the upstream's answer back (a job's state changed to
        RUNNING when :meth:`HttpFaultProxy.report_running` asks), or with ``lose`` hang up
        instead (the ``lost`` fault: done upstream, unknown to the client)."""
        owner = self.owner
        try:
            status, reason, headers, data = self._forward(method, path, body)
        except OSError as exc:
            owner._count("upstream-error")
            self._send_error(502, f"faultproxy: upstream unreachable: {exc}")
            return
        owner._count("forwarded")
        if lose:
            owner._count("lost", method, path, injected=True)
            self._hang_up()
            return
        if status == 200 and owner._take_running_report(method, path):
            job = json.loads(data)
            job.setdefault("status", {})["state"] = "RUNNING"
            data = json.dumps(job).encode()
            owner._count("reported-running")
        self.send_response(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if method != "HEAD" and status not in (204, 304):
            self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(data)

    def _forward(self, method: str, path: str, body: bytes):
        host, port = self.owner.upstream
        conn = http.client.HTTPConnection(host, port, timeout=120)
        try:
            conn.connect()
            conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP_BY_HOP}
            headers["Host"] = f"{host}:{port}"
            if body or method in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            return resp.status, resp.reason, resp.getheaders(), data
        finally:
            conn.close()

    def _send_error(self, status: int, message: str | None) -> None:
        """A Google API error response (JSON body with ``errors[].reason``, which the
        BigQuery client's retry predicate reads)."""
        reason, grpc_status = _GOOGLE_ERRORS.get(status, ("error", "UNKNOWN"))
        message = message or f"faultproxy: injected {status} ({reason})"
        data = json.dumps({"error": {"code": status, "message": message, "status": grpc_status,
                                     "errors": [{"message": message, "domain": "global",
                                                 "reason": reason}]}}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _hang_up(self) -> None:
        """Close the connection without a response (a reset, as a dying front end does)."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       b"\x01\x00\x00\x00\x00\x00\x00\x00")
            self.connection.shutdown(socket.SHUT_RDWR)


@dataclass
class _Stall:
    """A gRPC stall rule: the next ``times`` calls of a method matching the regex
    ``method`` go silent after ``after`` messages, for ``seconds``."""

    method: str
    times: int
    seconds: float
    after: int


class GrpcFaultProxy(_Counting):
    """A gRPC proxy to ``upstream`` (``host:port``, plaintext) that injects faults.

    Messages are forwarded as raw bytes, so it serves any service; methods whose names
    are in ``server_streaming`` are proxied as unary-stream calls, all others as unary.
    """

    def __init__(self, upstream: str, server_streaming=("ReadRows",), name: str = "grpc"):
        import grpc

        self.name = name
        self._grpc = grpc
        self._dice = _Dice()
        self.rules: list[tuple[str, object, str]] = []  # (method regex, code, message)
        self.stalls: list[_Stall] = []
        self.breaks = 0  # streams left to break after their first message
        # The Arrow schema of every read stream, from its session, to apply offsets.
        self._schemas: dict[str, bytes] = {}
        self._reset_counts()
        self._streaming = tuple(server_streaming)
        self._channel = grpc.insecure_channel(upstream)
        self._server = grpc.server(ThreadPoolExecutor(16, thread_name_prefix=f"proxy-{name}"),
                                   handlers=[_GenericHandler(self)])
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT`` of the proxy."""
        return f"127.0.0.1:{self.port}"

    def inject(self, rate: float, seed: int = 0, kinds=GRPC_FAULTS) -> None:
        """Fail a share ``rate`` of the calls from now on, with faults drawn from ``kinds``."""
        self._dice.configure(rate, seed, kinds)

    def fail(self, code, method: str = ".", message: str | None = None) -> None:
        """Fail every call whose method matches the regex ``method`` with status ``code``
        (a ``grpc.StatusCode``) from now on."""
        self.rules.append((method, code, message or f"faultproxy: {code.name} for {method}"))

    def stall(self, method: str = ".", times: int = 1, seconds: float = 120.0,
              after: int = 0) -> None:
        """Leave the next ``times`` calls whose method matches the regex ``method``
        unanswered (not forwarded; with ``after``, a stream goes silent after that many
        messages, before its end) for ``seconds`` or until the client cancels them, then
        fail them with UNAVAILABLE: a connection that stops answering.
        ``counts["stall-abandoned"]`` counts the calls the client gave up on first."""
        self.stalls.append(_Stall(method, times, seconds, after))

    def break_streams(self, times: int = 1) -> None:
        """Break the next ``times`` server streams after their first message, as the
        ``reset`` fault does."""
        self.breaks = times

    def reset(self) -> None:
        """No faults, no rules, counters at zero."""
        self._dice.configure(0.0, 0, ())
        self.rules = []
        self.stalls = []
        self.breaks = 0
        self._reset_counts()

    def stop(self) -> None:
        """Stop serving and close the upstream channel."""
        self._server.stop(grace=None).wait()
        self._channel.close()

    # ------------------------------------------------------------------ calls
    def _metadata(self, context):
        return [(k, v) for k, v in context.invocation_metadata()
                if not k.startswith(":") and k not in ("user-agent", "te", "content-type")
                and not k.startswith("grpc-")]

    def _before(self, method: str, context, streaming: bool) -> str | None:
        """Count the call, apply rules and the faults that come before forwarding;
        return the fault to apply after the first message (``reset``) or None."""
        grpc = self._grpc
        self._count("requests")
        for pattern, code, message in self.rules:
            if re.search(pattern, method):
                self._count(code.name, "RPC", method, injected=True)
                context.abort(code, message)
        self._stall_if_asked(method, context)
        if streaming:
            with self._count_lock:
                if self.breaks > 0:
                    self.breaks -= 1
                    return "reset"
        kind = self._dice.roll(GRPC_FAULTS if streaming else ("unavailable", "exhausted"))
        if kind == "unavailable":
            self._count(kind, "RPC", method, injected=True)
            context.abort(grpc.StatusCode.UNAVAILABLE, "faultproxy: injected UNAVAILABLE")
        if kind == "exhausted":
            self._count(kind, "RPC", method, injected=True)
            context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                          "faultproxy: injected RESOURCE_EXHAUSTED")
        return kind

    def _stall_if_asked(self, method: str, context, sent: int = 0) -> None:
        """Stall the call if a stall rule matches it after ``sent`` messages."""
        with self._count_lock:
            rule = next((r for r in self.stalls if r.times > 0 and r.after == sent
                         and re.search(r.method, method)), None)
            if rule is not None:
                rule.times -= 1
        if rule is None:
            return
        self._count("stall", "RPC", method, injected=True)
        give_up = time.monotonic() + rule.seconds
        while context.is_active() and time.monotonic() < give_up:
            time.sleep(0.05)
        if not context.is_active():
            self._count("stall-abandoned")
        context.abort(self._grpc.StatusCode.UNAVAILABLE, "faultproxy: stalled call ended")

    def _unary(self, method: str):
        def call(request: bytes, context):
            self._before(method, context, streaming=False)
            try:
                reply = self._channel.unary_unary(method)(
                    request, metadata=self._metadata(context), timeout=context.time_remaining())
            except self._grpc.RpcError as exc:
                context.abort(exc.code(), exc.details() or "")
            self._count("forwarded")
            if method.endswith("/CreateReadSession"):
                from google.cloud.bigquery_storage_v1 import types

                session = types.ReadSession.deserialize(reply)
                for stream in session.streams:
                    self._schemas[stream.name] = session.arrow_schema.serialized_schema
            return reply
        return call

    def _from_offset(self, request: bytes):
        """A ReadRows request for the whole stream, and a function that drops the rows
        before the request's offset from the stream's messages."""
        import pyarrow as pa
        from google.cloud.bigquery_storage_v1 import types

        asked = types.ReadRowsRequest.deserialize(request)
        skip, name = asked.offset, asked.read_stream
        asked.offset = 0

        def drop_rows(messages):
            nonlocal skip
            for message in messages:
                if skip:
                    response = types.ReadRowsResponse.deserialize(message)
                    rows = response.row_count
                    if skip >= rows:
                        skip -= rows
                        continue
                    schema = pa.ipc.read_schema(pa.py_buffer(self._schemas[name]))
                    batch = pa.ipc.read_record_batch(
                        pa.py_buffer(response.arrow_record_batch.serialized_record_batch), schema)
                    kept = batch.slice(skip)
                    response.arrow_record_batch.serialized_record_batch = kept.serialize().to_pybytes()
                    response.arrow_record_batch.row_count = kept.num_rows
                    response.row_count, skip = kept.num_rows, 0
                    message = types.ReadRowsResponse.serialize(response)
                yield message
        return types.ReadRowsRequest.serialize(asked), drop_rows

    def _stream(self, method: str):
        def call(request: bytes, context):
            kind = self._before(method, context, streaming=True)
            drop_rows = None
            if method.endswith("/ReadRows"):
                request, drop_rows = self._from_offset(request)
            upstream = self._channel.unary_stream(method)(
                request, metadata=self._metadata(context), timeout=context.time_remaining())
            self._count("forwarded")
            try:
                sent = 0
                for message in (drop_rows(upstream) if drop_rows else upstream):
                    yield message
                    sent += 1
                    self._stall_if_asked(method, context, sent)
                    if kind == "reset":
                        self._count(kind, "RPC", method, injected=True)
                        upstream.cancel()
                        context.abort(self._grpc.StatusCode.UNAVAILABLE,
                                      "faultproxy: stream reset after its first message")
            except self._grpc.RpcError as exc:
                if exc.code() != self._grpc.StatusCode.CANCELLED:
                    context.abort(exc.code(), exc.details() or "")
        return call


class _GenericHandler:
    """Routes every gRPC method to the proxy (a ``grpc.GenericRpcHandler``)."""

    def __init__(self, proxy: GrpcFaultProxy):
        self.proxy = proxy

    def service(self, details):
        grpc = self.proxy._grpc
        method = details.method
        if method.rsplit("/", 1)[-1] in self.proxy._streaming:
            return grpc.unary_stream_rpc_method_handler(self.proxy._stream(method))
        return grpc.unary_unary_rpc_method_handler(self.proxy._unary(method))


class FaultProxies:
    """The proxies in front of the GCS emulator, BigQuery REST and the Storage Read API."""

    def __init__(self, gcs_host: str, bq_endpoint: str, bq_grpc: str):
        self.gcs = HttpFaultProxy(gcs_host, "gcs")
        self.bq = HttpFaultProxy(bq_endpoint, "bigquery", unique_job_ids=True)
        self.grpc = GrpcFaultProxy(bq_grpc, name="storage-read")

    @property
    def all(self) -> list:
        """Every proxy."""
        return [self.gcs, self.bq, self.grpc]

    @property
    def env(self) -> dict[str, str]:
        """Environment that makes the pipelines' clients go through the proxies."""
        return {"STORAGE_EMULATOR_HOST": self.gcs.url, "BQX_BIGQUERY_ENDPOINT": self.bq.url,
                "BQX_BIGQUERY_GRPC": self.grpc.address}

    def inject(self, rate: float, seed: int = 0) -> None:
        """Random faults at ``rate`` on every proxy (each with its own seeded sequence)."""
        for i, proxy in enumerate(self.all):
            proxy.inject(rate, seed + i)

    def reset(self) -> None:
        """No faults anywhere; counters at zero."""
        for proxy in self.all:
            proxy.reset()

    def summary(self) -> str:
        """One line per proxy of what it saw and injected."""
        return "; ".join(f"{p.name}: {p.summary()}" for p in self.all)

    def stop(self) -> None:
        """Stop every proxy."""
        for proxy in self.all:
            proxy.stop()


@pytest.fixture(scope="module")
def fault_proxies(gcs_emulator, bq_emulator):
    """Proxies in front of the emulators, reset (no faults) before every use; pass
    ``fault_proxies.env`` to the jobs that should go through them."""
    proxies = FaultProxies(gcs_emulator["host"], bq_emulator["endpoint"], bq_emulator["grpc"])
    try:
        yield proxies
    finally:
        proxies.stop()


@pytest.fixture
def proxies(fault_proxies):
    """:func:`fault_proxies`, with no faults and zero counts at the start of the test."""
    fault_proxies.reset()
    yield fault_proxies
    fault_proxies.reset()
