"""The container contract of the two Cloud Run jobs, checked without Docker.

Docker cannot run here, so this does what building and running each image would do:

1. read ``Dockerfile.extract`` / ``Dockerfile.merge``: base image, non-root user, what is
   copied (it must exist in the build context, the repository root that Cloud Build
   passes), what is installed, and the entry point (its module must exist);
2. build each "image" as a clean virtualenv (no system site-packages, no PYTHONPATH, none
   of the test venv's packages): the files the Dockerfile COPYs are copied into a fresh
   app folder, nothing else of the repository, and the Dockerfile's own ``pip install``
   runs there, non-editable, exactly as in the image; Cloud Build's smoke-test imports run
   in it too;
3. run the extract entry point with the job's environment only, against a small
   warehouse mirrored into the BigQuery emulator: exit 0, manifest and success marker in
   the emulated bucket; then a pair given as an argument, and a Cloud Run task picking its
   pair from ``PAIRS`` by ``CLOUD_RUN_TASK_INDEX`` (re-runs over the committed
   checkpoints: no work);
4. run the merge entry point with ``MERGE_METHOD=bigquery`` (``BQX_MERGE_STAGING=load``:
   the emulator reads external tables as 0 rows) and validate the exported training set
   in the emulated bucket with ``python -m pipelines.validate``.

The installs run in a background thread (extract, then merge) from the first test that
needs them on, while the emulators start and the warehouse is mirrored. pip's cache is not
disabled (unlike the image, ``PIP_NO_CACHE_DIR`` is dropped for the install), so a CI
machine with a working HTTP cache reuses downloads. The install times are printed.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time

import pytest
import yaml

from bigquery_warehouse import PAIR, bq_warehouse  # noqa: F401 (fixture)
from conftest import ROOT, run_module
from emulators import BUCKET, bq_emulator, gcs_emulator  # noqa: F401 (fixtures)

JOBS = ("extract", "merge")
BASE_IMAGE = "python:3.11-slim"
# The PATH of the python images, with the virtualenv's bin first (its ``python`` is the
# image's ``python``); the test venv's bin is deliberately not on it.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CHECKPOINTS = f"gs://{BUCKET}/contract/checkpoints"
OUTPUT = f"gs://{BUCKET}/contract/out"
INSTALL_TIMEOUT = 900
RUN_TIMEOUT = 300
# Packages that must never be in an image: the test tooling and the emulators, which run
# from the test venv.
TEST_ONLY = {"pytest", "hypothesis", "bqemulator", "gcp-storage-emulator",
             "duckdb-extension-spatial", "duckdb-extensions"}
# pyarrow's GcsFileSystem (google-cloud-cpp) reading an object of 4 MiB or more from
# gcp-storage-emulator hangs until its retry deadline (3 MiB reads fine; real GCS is not
# affected as far as known). The bigquery merge of the test warehouse (429 columns, 1,500
# rows) exports one ~4 MiB file; parts of PART_COLUMNS columns stay well below.
EMULATOR_READ_LIMIT = 3 << 20
PART_COLUMNS = 120
# What sets the two images apart: each carries its own job's heavy dependency only.
OWN = {"extract": ("apache-beam", "polars"), "merge": ("polars", "apache-beam")}


# --------------------------------------------------------------------------- Dockerfile

def parse_dockerfile(path: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; comments dropped, continuations joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    with open(path, encoding="utf-8") as fh:
        for raw in fh:
            line = raw.rstrip("\n")
            if not pending and (not line.strip() or line.lstrip().startswith("#")):
                continue
            if line.rstrip().endswith("\\"):
                pending += line.rstrip()[:-1] + " "
                continue
            line = pending + line
            pending = ""
            keyword, _, args = line.strip().partition(" ")
            out.append((keyword.upper(), args.strip()))
    assert not pending, f"{path}: a line continuation runs past the end of the file"
    return out


class Dockerfile:
    """The parts of a Dockerfile the contract is about."""

    def __init__(self, job: str):
        self.job = job
        self.name = f"Dockerfile.{job}"
        self.path = os.path.join(ROOT, self.name)
        self.instructions = parse_dockerfile(self.path)

    def all(self, keyword: str) -> list[str]:
        return [args for k, args in self.instructions if k == keyword]

    def one(self, keyword: str) -> str:
        found = self.all(keyword)
        assert len(found) == 1, f"{self.name}: expected one {keyword}, found {found}"
        return found[0]

    def index(self, keyword: str) -> int:
        return [k for k, _ in self.instructions].index(keyword)

    @property
    def env(self) -> dict[str, str]:
        env: dict[str, str] = {}
        for args in self.all("ENV"):
            words = shlex.split(args)
            if words and "=" not in words[0]:  # the legacy ``ENV KEY value`` form
                env[words[0]] = " ".join(words[1:])
                continue
            for word in words:
                key, _, value = word.partition("=")
                env[key] = value
        return env

    @property
    def copies(self) -> list[tuple[list[str], str]]:
        """(sources, destination) of every COPY, flags (--chown, ...) dropped."""
        out = []
        for args in self.all("COPY"):
            words = [w for w in shlex.split(args) if not w.startswith("--")]
            assert len(words) >= 2, f"{self.name}: COPY {args}"
            out.append((words[:-1], words[-1]))
        return out

    @property
    def entrypoint(self) -> list[str]:
        raw = self.one("ENTRYPOINT")
        assert raw.startswith("["), f"{self.name}: ENTRYPOINT must be the exec (JSON) form"
        return json.loads(raw)


def cloud_build(job: str) -> dict:
    with open(os.path.join(ROOT, f"cloudbuild-{job}.yaml"), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def job_spec_container(job: str) -> dict:
    with open(os.path.join(ROOT, "deploy", f"cloudrun-{job}-job.yaml"), encoding="utf-8") as fh:
        spec = yaml.safe_load(fh)
    (container,) = spec["spec"]["template"]["spec"]["template"]["spec"]["containers"]
    return container


def build_context(job: str) -> str:
    """The folder Cloud Build sends as the Docker build context (``docker build ... DIR``)."""
    args = next(s for s in cloud_build(job)["steps"] if s["name"] == "gcr.io/cloud-builders/docker")["args"]
    assert args[args.index("-f") + 1] == f"Dockerfile.{job}"
    return os.path.normpath(os.path.join(ROOT, args[-1]))


@pytest.mark.parametrize("job", JOBS)
def test_dockerfile_copies_what_exists_installs_its_extra_and_runs_its_launcher(job):
    d = Dockerfile(job)
    keywords = [k for k, _ in d.instructions]
    assert keywords[0] == "FROM" and d.one("FROM") == BASE_IMAGE
    workdir = d.one("WORKDIR")
    assert workdir == "/app"

    # A non-root user, created in the image, and the last word before the entry point:
    # the install runs as root, the job does not.
    user = d.one("USER")
    assert user not in ("root", "0") and not user.startswith(("root:", "0:"))
    creates = [shlex.split(r) for r in d.all("RUN") if r.startswith("useradd")]
    assert len(creates) == 1 and creates[0][-1] == user, f"{d.name}: USER {user} is never created"
    uid = creates[0][creates[0].index("--uid") + 1]
    assert int(uid) != 0
    assert d.index("USER") > max(i for i, (k, _) in enumerate(d.instructions) if k == "RUN")
    assert d.index("USER") < d.index("ENTRYPOINT")

    # Every COPY source exists in the build context and is copied before the install.
    context = build_context(job)
    assert context == ROOT
    positions = [i for i, (k, _) in enumerate(d.instructions) if k in ("COPY", "RUN")]
    install_at = next(i for i in positions if d.instructions[i][1].startswith("pip "))
    assert all(i < install_at for i in positions if d.instructions[i][0] == "COPY")
    for sources, dest in d.copies:
        for src in sources:
            assert os.path.exists(os.path.join(context, src)), f"{d.name}: COPY {src} does not exist"
        assert dest.startswith("./") or dest.startswith(workdir), dest
    copied = {src.rstrip("/") for sources, _ in d.copies for src in sources}
    assert {"setup.py", "pipelines", "launchers"} <= copied, "setup.py's packages must all be copied"

    # The job's own extra, installed from the copied tree, non-editable.
    installs = [shlex.split(r) for r in d.all("RUN") if r.startswith("pip ")]
    assert installs == [["pip", "install", f".[{job}]"]]

    # The entry point is the launcher module, which exists in what is copied.
    module = f"launchers.{job}_job"
    assert d.entrypoint == ["python", "-m", module]
    source = os.path.join(context, *module.split(".")) + ".py"
    assert os.path.isfile(source)
    assert module.split(".")[0] in copied
    with open(source, encoding="utf-8") as fh:
        assert 'if __name__ == "__main__":' in fh.read()
    assert {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"} <= set(d.env)


# --------------------------------------------------------------------------- the "images"

class Image:
    """One job's image as a folder (``/app``) and a clean virtualenv with its install."""

    def __init__(self, job: str, base: str, say=print):
        self.job = job
        self.say = say
        self.dockerfile = Dockerfile(job)
        self.base = base
        self.app = os.path.join(base, "app")
        self.venv = os.path.join(base, "venv")
        self.python = os.path.join(self.venv, "bin", "python")
        self.home = os.path.join(base, "home")
        self.log = os.path.join(base, "install.log")
        self.seconds: float | None = None
        self.returncode: int | None = None
        self.snapshot: dict[str, tuple[int, int]] = {}
        self._reported = False
        self._done = threading.Event()

    # The build ----------------------------------------------------------------------
    def prepare(self) -> "Image":
        self._copy()
        os.makedirs(self.home)
        return self

    def _copy(self) -> None:
        """What the Dockerfile COPYs, from the build context, into a fresh app folder."""
        context = build_context(self.job)
        os.makedirs(self.app)
        ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
        for sources, dest in self.dockerfile.copies:
            target = os.path.join(self.app, os.path.relpath(dest, "/app") if dest.startswith("/")
                                  else dest)
            for src in sources:
                path = os.path.join(context, src)
                if os.path.isdir(path):  # a folder's contents go into the destination
                    shutil.copytree(path, target, ignore=ignore, dirs_exist_ok=True)
                elif dest.endswith("/"):
                    os.makedirs(target, exist_ok=True)
                    shutil.copy2(path, os.path.join(target, os.path.basename(src)))
                else:
                    shutil.copy2(path, target)

    def _install_env(self) -> dict[str, str]:
        """The build's environment: this machine's pip settings (indexes, certificates),
        the Dockerfile's ENV except PIP_NO_CACHE_DIR (so pip may reuse its cache), and
        nothing that could point the install at the test venv."""
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_NO_CACHE_DIR",
                            "PIP_USER", "PIP_TARGET", "PIP_PREFIX")}
        env.update({k: v for k, v in self.dockerfile.env.items() if k != "PIP_NO_CACHE_DIR"})
        env["PATH"] = os.path.join(self.venv, "bin") + os.pathsep + SYSTEM_PATH
        return env

    def build(self) -> None:
        try:
            self._build()
        finally:
            self._done.set()

    def _build(self) -> None:
        started = time.monotonic()
        with open(self.log, "w") as log:
            proc = subprocess.run([sys.executable, "-m", "venv", self.venv], stdout=log,
                                  stderr=subprocess.STDOUT)
            if proc.returncode == 0:
                (install,) = [shlex.split(r) for r in self.dockerfile.all("RUN") if r.startswith("pip ")]
                # ``pip install ".[job]"`` in WORKDIR, with this image's python.
                try:
                    proc = subprocess.run([self.python, "-m", *install], cwd=self.app,
                                          env=self._install_env(), stdout=log,
                                          stderr=subprocess.STDOUT, timeout=INSTALL_TIMEOUT)
                except subprocess.TimeoutExpired:
                    log.write(f"\ninstall timed out after {INSTALL_TIMEOUT}s\n")
                    proc = subprocess.CompletedProcess([], -1)
        self.returncode = proc.returncode
        self.seconds = time.monotonic() - started
        # The image's /app as the install left it: the job (non-root) cannot change it.
        self.snapshot = tree(self.app)

    def wait(self) -> "Image":
        self._done.wait()
        if not self._reported:
            self._reported = True
            self.say(f"[container contract] {self.dockerfile.name}: fresh venv + "
                     f"pip install \".[{self.job}]\" took {self.seconds:.0f}s (exit {self.returncode})")
        if self.returncode != 0:
            with open(self.log) as fh:
                tail = fh.read()[-4000:]
            pytest.fail(f"{self.dockerfile.name}: the install failed (exit {self.returncode}, "
                        f"{self.seconds:.0f}s):\n{tail}")
        return self

    # Running the image ----------------------------------------------------------------
    def env(self, gcs: dict, bq: dict, **job_env: str) -> dict[str, str]:
        """What the container sees: the Dockerfile's ENV, the job's variables, and the
        emulators' addresses; nothing of the test process (no PYTHONPATH)."""
        env = dict(self.dockerfile.env)
        env.update(HOME=self.home,
                   PATH=os.path.join(self.venv, "bin") + os.pathsep + SYSTEM_PATH,
                   STORAGE_EMULATOR_HOST=gcs["host"],
                   BQX_BIGQUERY_ENDPOINT=bq["endpoint"], BQX_BIGQUERY_GRPC=bq["grpc"],
                   # On Cloud Run the clients' default project comes from the metadata
                   # server (the bigquery merge runs its jobs there); with anonymous
                   # emulator credentials it has to be given.
                   GOOGLE_CLOUD_PROJECT=bq["project"])
        env.update(job_env)
        return env

    def run(self, env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
        """The ENTRYPOINT with ``args`` (the Cloud Run job's args), in WORKDIR."""
        entry = self.dockerfile.entrypoint
        assert entry[0] == "python"
        proc = subprocess.run([self.python, *entry[1:], *args], cwd=self.app, env=env,
                              capture_output=True, text=True, timeout=RUN_TIMEOUT)
        changed = diff(self.snapshot, tree(self.app))
        assert not changed, f"the job wrote into /app (read-only for its user): {changed}"
        return proc

    def python_c(self, code: str, cwd: str | None = None) -> subprocess.CompletedProcess:
        """``python -c code`` in WORKDIR (or ``cwd``) with the image's environment."""
        env = {"HOME": self.home, "PATH": os.path.join(self.venv, "bin") + os.pathsep + SYSTEM_PATH,
               **self.dockerfile.env}
        return subprocess.run([self.python, "-c", code], cwd=cwd or self.app, env=env,
                              capture_output=True, text=True, timeout=120)


def tree(folder: str) -> dict[str, tuple[int, int]]:
    """{relative path: (size, mtime_ns)} of every file under ``folder``."""
    out = {}
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            path = os.path.join(dirpath, f)
            st = os.stat(path)
            out[os.path.relpath(path, folder)] = (st.st_size, st.st_mtime_ns)
    return out


def diff(before: dict, after: dict) -> list[str]:
    return sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))


def _say(config):
    """Print a line on the terminal even while pytest captures output."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capture = config.pluginmanager.get_plugin("capturemanager")

    def say(text: str) -> None:
        if reporter is None:
            return
        if capture is not None:
            with capture.global_and_fixture_disabled():
                reporter.write_line("\n" + text)
        else:
            reporter.write_line("\n" + text)
    return say


@pytest.fixture(scope="session")
def images(tmp_path_factory, request):
    """Both images, building in the background from the first request on;
    ``images[job].wait()`` waits for one (and prints how long its install took)."""
    say = _say(request.config)
    built = {job: Image(job, str(tmp_path_factory.mktemp(f"image-{job}")), say).prepare()
             for job in JOBS}
    # One after the other, extract first (its job runs first): on 2 shared cores two
    # concurrent installs took longer than both in sequence (unpacking and byte-compiling
    # are CPU-bound).
    builder = threading.Thread(target=lambda: [built[job].build() for job in JOBS],
                               name="build-images", daemon=True)
    builder.start()
    yield built
    builder.join()


# --------------------------------------------------------------------------- the installs

DISTRIBUTIONS = (
    "import importlib.metadata as m, json\n"
    "d = m.distribution('bqx-pipelines')\n"
    "import re\n"
    "print(json.dumps({'names': sorted({re.sub(r'[-_.]+', '-', x.metadata['Name']).lower()"
    " for x in m.distributions()}),"
    " 'direct_url': json.loads(d.read_text('direct_url.json') or '{}'),"
    " 'files': str(d.locate_file(''))}))"
)


@pytest.mark.parametrize("job", JOBS)
def test_each_image_installs_its_dependency_set_only_and_passes_its_smoke_test(
        images, bq_warehouse, job):
    # bq_warehouse is asked for after images only so that the emulators start and the
    # warehouse is mirrored while both images install.
    image = images[job].wait()
    message = f"{job} install took {image.seconds:.0f}s (venv + pip, log {image.log})"
    # Outside WORKDIR: there the build's own bqx_pipelines.egg-info (pip builds in the
    # tree, in the image too) would be found before the installed metadata.
    proc = image.python_c(DISTRIBUTIONS, cwd=image.home)
    assert proc.returncode == 0, proc.stderr
    found = json.loads(proc.stdout)
    names = set(found["names"])
    own, other = OWN[job]
    assert own in names and other not in names, message
    assert not names & TEST_ONLY, f"{sorted(names & TEST_ONLY)} leaked into the {job} image"
    # Installed like the image: a copy in site-packages, not an editable link to the repo.
    assert found["direct_url"].get("dir_info", {}).get("editable") is not True, message
    assert found["files"].startswith(image.venv), found["files"]
    proc = subprocess.run([image.python, "-m", "pip", "check"], capture_output=True, text=True,
                          env={"PATH": SYSTEM_PATH, "HOME": image.home})
    assert proc.returncode == 0, proc.stdout + proc.stderr

    # The entry point resolves in WORKDIR to the copied launcher, as in the image; and
    # Cloud Build's smoke test (the imports the job needs later) passes in this install.
    module = image.dockerfile.entrypoint[-1]
    proc = image.python_c(f"import importlib.util; print(importlib.util.find_spec({module!r}).origin)")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == os.path.join(image.app, *module.split(".")) + ".py"
    smoke = next(s for s in cloud_build(job)["steps"] if s.get("id") == "smoke-test")
    assert smoke["entrypoint"] == "python" and smoke["args"][0] == "-c"
    proc = image.python_c(smoke["args"][1])
    assert proc.returncode == 0, f"Cloud Build's smoke test fails in the {job} install: {proc.stderr}"
    assert image.seconds < 600, message


# --------------------------------------------------------------------------- the jobs

def _gcs_names(prefix: str) -> list[str]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage as gcs

    client = gcs.Client(project="bqx-ml", credentials=AnonymousCredentials())
    return [b.name for b in client.list_blobs(BUCKET, prefix=prefix[len(f"gs://{BUCKET}/"):])]


def extract_env(image: Image, gcs: dict, bq: dict, source: str, **extra: str) -> dict[str, str]:
    return image.env(gcs, bq, BQX_SOURCE=source, GCS_CHECKPOINT_BUCKET=CHECKPOINTS,
                     EXTRACTION_WORKERS="2", **extra)


@pytest.fixture(scope="module")
def extract_run(images, bq_warehouse, gcs_emulator, bq_emulator):
    """The extract image run once for eurusd, as the Cloud Run job would."""
    image = images["extract"].wait()
    return image.run(extract_env(image, gcs_emulator, bq_emulator, bq_warehouse["source"],
                                 PAIR=PAIR), *job_spec_container("extract").get("args", []))


def test_extract_image_commits_checkpoints_into_the_bucket(extract_run):
    from pipelines import checkpoints, storage

    proc = extract_run
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert f"pair={PAIR}" in proc.stderr and "to_do=0" not in proc.stderr
    (window,) = checkpoints.find_windows(CHECKPOINTS, PAIR)
    assert storage.exists(checkpoints.manifest_path(CHECKPOINTS, PAIR, window))
    assert storage.exists(checkpoints.success_path(CHECKPOINTS, PAIR, window))
    manifest = checkpoints.load_manifest(CHECKPOINTS, PAIR)
    assert manifest.targets["rows"] > 0 and len(manifest.tables) > 1
    assert not checkpoints.verify_checkpoints(manifest)
    assert not [n for n in _gcs_names(CHECKPOINTS) if storage.TEMP_MARK in n]


@pytest.mark.parametrize("how", ["argument", "task-index"])
def test_extract_image_takes_its_pair_from_an_argument_or_the_task_index(
        extract_run, images, bq_warehouse, gcs_emulator, bq_emulator, how):
    assert extract_run.returncode == 0, "the first extraction failed"
    image = images["extract"]
    if how == "argument":
        env = extract_env(image, gcs_emulator, bq_emulator, bq_warehouse["source"])
        args = [PAIR]
    else:
        # The deployed job's PAIRS; this task's index is eurusd's place in it.
        spec_env = {e["name"]: e["value"] for e in job_spec_container("extract")["env"]}
        pairs = spec_env["PAIRS"]
        env = extract_env(image, gcs_emulator, bq_emulator, bq_warehouse["source"],
                          PAIRS=pairs, CLOUD_RUN_TASK_INDEX=str(pairs.split(",").index(PAIR)))
        args = []
    assert "PAIR" not in env
    proc = image.run(env, *args)
    assert proc.returncode == 0, proc.stderr[-6000:]
    # The committed checkpoints are reused: a re-run extracts nothing.
    assert f"pair={PAIR}" in proc.stderr
    assert "to_do=0" in proc.stderr and "[extract] start" not in proc.stderr, proc.stderr[-3000:]


def test_merge_image_exports_a_training_set_that_validates_in_the_bucket(
        extract_run, images, gcs_emulator, bq_emulator):
    from pipelines import checkpoints, storage

    assert extract_run.returncode == 0, "the extraction failed"
    image = images["merge"].wait()
    # Parts of at most PART_COLUMNS columns keep every exported file under ~3 MiB: reads
    # of larger objects from the GCS emulator through pyarrow's GcsFileSystem hang until
    # their retry deadline (the emulator's limitation, see PART_COLUMNS).
    env = image.env(gcs_emulator, bq_emulator, PAIR=PAIR, GCS_CHECKPOINT_BUCKET=CHECKPOINTS,
                    GCS_OUTPUT_BUCKET=OUTPUT, MERGE_METHOD="bigquery", BQX_MERGE_STAGING="load",
                    BQX_MERGE_MAX_COLUMNS=str(PART_COLUMNS))
    args = job_spec_container("merge").get("args", [])  # --overwrite, as deployed
    proc = image.run(env, *args)
    assert proc.returncode == 0, proc.stderr[-6000:]

    prefix = f"{OUTPUT}/training_{PAIR}"
    layout = json.loads(storage.read_bytes(f"{prefix}/_layout.json"))
    manifest = checkpoints.load_manifest(CHECKPOINTS, PAIR)
    assert layout["method"] == "bigquery" and layout["staging"] == "load"
    assert layout["pair"] == PAIR and layout["spine_rows"] == manifest.targets["rows"]

    # The BigQuery emulator writes exported files straight into the GCS emulator's
    # folder, which the GCS API does not list: register them through the API first.
    folder = os.path.join(gcs_emulator["objects_dir"], BUCKET, *prefix[len(f"gs://{BUCKET}/"):].split("/"))
    uploaded, sizes = 0, {}
    for dirpath, _dirs, files in os.walk(folder):
        for f in files:
            if f.endswith(".parquet"):
                rel = os.path.relpath(os.path.join(dirpath, f), folder).replace(os.sep, "/")
                with open(os.path.join(dirpath, f), "rb") as fh:
                    data = fh.read()
                storage.write_bytes(f"{prefix}/{rel}", data)
                sizes[rel] = len(data)
                uploaded += 1
    assert uploaded >= len(layout["parts"]) > 1
    too_big = {f: n for f, n in sizes.items() if n >= EMULATOR_READ_LIMIT}
    assert not too_big, f"exported files the GCS emulator cannot serve to pyarrow: {too_big}"

    proc = run_module("pipelines.validate", f"{prefix}/", env={"BQX_GCS_READ_RETRY_SECONDS": "30"})
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "PASS" in proc.stdout
    report = json.loads(storage.read_bytes(f"{prefix}.validation.json"))
    assert report["rows"] == layout["spine_rows"]
