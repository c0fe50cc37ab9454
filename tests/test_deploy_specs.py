"""The deployment files: Cloud Run job specs, Cloud Build configs, the workflow, the
Dockerfiles' entry points and deploy/deploy.sh (syntax, dry run, role bindings)."""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import pytest
import yaml

from conftest import ROOT

DEPLOY = os.path.join(ROOT, "deploy")
JOBS = {"extract": "cloudrun-extract-job.yaml", "merge": "cloudrun-merge-job.yaml"}
# The 28 pairs in market order (the brief and pipelines/catalog.toml agree).
MARKET_ORDER = ("eurgbp euraud eurnzd eurusd eurcad eurchf eurjpy gbpaud gbpnzd gbpusd "
                "gbpcad gbpchf gbpjpy audnzd audusd audcad audchf audjpy nzdusd nzdcad "
                "nzdchf nzdjpy usdcad usdchf usdjpy cadchf cadjpy chfjpy").split()


def load(path: str):
    with open(os.path.join(ROOT, path), encoding="utf-8") as fh:
        return yaml.safe_load(fh)


@pytest.fixture(scope="module", params=sorted(JOBS))
def job(request):
    """(stage, parsed job spec)."""
    return request.param, load(os.path.join("deploy", JOBS[request.param]))


def task_spec(spec: dict) -> dict:
    return spec["spec"]["template"]["spec"]["template"]["spec"]


def container(spec: dict) -> dict:
    (c,) = task_spec(spec)["containers"]
    return c


def env_of(spec: dict) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(spec)["env"]}


def test_every_yaml_parses():
    files = [os.path.join("deploy", f) for f in (*JOBS.values(), "workflow.yaml")]
    files += ["cloudbuild-extract.yaml", "cloudbuild-merge.yaml"]
    for path in files:
        assert isinstance(load(path), dict), path


# --- Cloud Run job specs ---------------------------------------------------------------

EXPECTED = {
    #          cpu  memory  timeout retries parallelism
    "extract": ("4", "8Gi", 7200, 3, range(1, 29)),
    "merge": ("1", "2Gi", 10800, 3, range(28, 29)),
}


def test_job_sizes_timeouts_retries_and_fan_out(job):
    stage, spec = job
    cpu, memory, timeout, retries, parallelism = EXPECTED[stage]
    assert spec["apiVersion"] == "run.googleapis.com/v1" and spec["kind"] == "Job"
    assert spec["metadata"]["name"] == f"bqx-{stage}"
    assert spec["metadata"]["labels"]["cloud.googleapis.com/location"] == "${REGION}"
    execution = spec["spec"]["template"]["spec"]
    assert execution["taskCount"] == 28
    assert execution["parallelism"] in parallelism
    task = task_spec(spec)
    assert int(task["timeoutSeconds"]) == timeout
    assert task["maxRetries"] == retries
    limits = container(spec)["resources"]["limits"]
    assert (str(limits["cpu"]), limits["memory"]) == (cpu, memory)


def test_retries_are_documented_as_resuming():
    for stage, name in JOBS.items():
        with open(os.path.join(DEPLOY, name), encoding="utf-8") as fh:
            text = fh.read()
        assert re.search(r"retry (resumes|reruns)", text, re.I), name
    with open(os.path.join(DEPLOY, JOBS["extract"]), encoding="utf-8") as fh:
        assert "BigQuery" in fh.read()  # the parallelism comment explains the quota


def test_job_env_contract(job):
    stage, spec = job
    env = env_of(spec)
    required = {
        "extract": {"PAIRS", "GCS_CHECKPOINT_BUCKET", "EXTRACTION_WORKERS", "BQX_SOURCE"},
        "merge": {"PAIRS", "GCS_CHECKPOINT_BUCKET", "GCS_OUTPUT_BUCKET", "MERGE_METHOD"},
    }[stage]
    assert required <= set(env)
    assert env["PAIRS"].split(",") == MARKET_ORDER
    assert env["GCS_CHECKPOINT_BUCKET"] == "${CHECKPOINT_BUCKET}"
    if stage == "extract":
        assert env["EXTRACTION_WORKERS"] == "4"
        assert env["BQX_SOURCE"] == "bigquery://${SOURCE_PROJECT}"
        assert "GCS_OUTPUT_BUCKET" not in env  # its account cannot write there anyway
    else:
        assert env["GCS_OUTPUT_BUCKET"] == "${OUTPUT_BUCKET}"
        assert env["MERGE_METHOD"] == "${MERGE_METHOD}"


def _code_text() -> str:
    parts = []
    for folder in ("launchers", "pipelines"):
        for dirpath, _dirs, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    with open(os.path.join(dirpath, f), encoding="utf-8") as fh:
                        parts.append(fh.read())
    return "\n".join(parts)


def test_every_env_name_is_read_by_the_code(job):
    """A misspelt variable would be silently ignored: each one must appear in the code."""
    code = _code_text()
    for name in env_of(job[1]):
        assert f'"{name}"' in code, f"{name} is set by the job but read nowhere"
    for name in ("PAIR", "CLOUD_RUN_TASK_INDEX"):
        assert f'"{name}"' in code


def test_the_task_index_and_the_pair_override_pick_the_pair():
    from launchers.job_env import pair_for_task
    from pipelines.catalog import load_catalog

    assert list(load_catalog().pairs) == MARKET_ORDER
    for stage in JOBS:
        pairs = env_of(load(os.path.join("deploy", JOBS[stage])))["PAIRS"]
        for i, pair in enumerate(MARKET_ORDER):
            assert pair_for_task([], {"PAIRS": pairs, "CLOUD_RUN_TASK_INDEX": str(i)}) == pair
        # The workflow's override (PAIR, one task) wins over the task index.
        assert pair_for_task([], {"PAIRS": pairs, "CLOUD_RUN_TASK_INDEX": "0",
                                  "PAIR": "chfjpy"}) == "chfjpy"


def test_each_job_runs_as_its_own_service_account():
    accounts = {stage: task_spec(load(os.path.join("deploy", f)))["serviceAccountName"]
                for stage, f in JOBS.items()}
    assert accounts == {"extract": "bqx-extract@${PROJECT}.iam.gserviceaccount.com",
                        "merge": "bqx-merge@${PROJECT}.iam.gserviceaccount.com"}


def test_images_are_the_ones_cloud_build_pushes(job):
    stage, spec = job
    image = container(spec)["image"]
    assert image == f"${{REGION}}-docker.pkg.dev/${{PROJECT}}/bqx/bqx-{stage}:${{TAG}}"
    build = load(f"cloudbuild-{stage}.yaml")
    pushed = (build["images"][0].replace("${_REGION}", "${REGION}")
              .replace("$PROJECT_ID", "${PROJECT}").replace("${_TAG}", "${TAG}"))
    assert pushed == image


def test_the_merge_job_replaces_its_output_on_retry():
    from launchers.job_env import flags
    from pipelines.merge.job import parse_args

    args = container(load(os.path.join("deploy", JOBS["merge"])))["args"]
    assert args == ["--overwrite"]
    assert parse_args(["--pair", "eurusd", *flags(args)]).overwrite


@pytest.mark.parametrize("stage, job_prog", [("extract", "pipelines.extract"),
                                              ("merge", "pipelines.merge")])
def test_a_launcher_given_help_prints_its_jobs_options_without_a_pair(stage, job_prog):
    """The container's entry point with --help shows the job's options; without this
    it asked for a pair first."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("PAIR", "PAIRS", "CLOUD_RUN_TASK_INDEX")}
    proc = subprocess.run([sys.executable, "-m", f"launchers.{stage}_job", "--help"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m {job_prog} ")
    assert "--days N" in proc.stdout


# --- Cloud Build -----------------------------------------------------------------------

@pytest.mark.parametrize("stage", sorted(JOBS))
def test_cloud_build_builds_the_right_dockerfile_and_pushes(stage):
    build = load(f"cloudbuild-{stage}.yaml")
    assert {"_REGION", "_TAG"} <= set(build["substitutions"])
    tag = f"${{_REGION}}-docker.pkg.dev/$PROJECT_ID/bqx/bqx-{stage}:${{_TAG}}"
    docker = build["steps"][0]
    assert docker["name"] == "gcr.io/cloud-builders/docker"
    assert docker["args"][:3] == ["build", "-f", f"Dockerfile.{stage}"]
    assert docker["args"][docker["args"].index("-t") + 1] == tag
    assert build["images"] == [tag]
    # A smoke test runs the built image before anything is pushed.
    smoke = build["steps"][1]
    assert smoke["name"] == tag and smoke["entrypoint"] == "python"
    assert f"launchers.{stage}_job" in smoke["args"][-1]


# --- Dockerfiles and entry points ------------------------------------------------------

@pytest.mark.parametrize("stage", sorted(JOBS))
def test_dockerfile_entrypoint_is_the_launcher(stage):
    with open(os.path.join(ROOT, f"Dockerfile.{stage}"), encoding="utf-8") as fh:
        lines = [ln for ln in fh if ln.startswith("ENTRYPOINT")]
    assert len(lines) == 1
    assert json.loads(lines[0][len("ENTRYPOINT"):]) == ["python", "-m", f"launchers.{stage}_job"]
    assert os.path.isfile(os.path.join(ROOT, "launchers", f"{stage}_job.py"))


def test_launchers_import_without_the_other_image_s_packages():
    """The container contract: each launcher imports with what its image installs (the
    extract image has no polars, the merge image no Apache Beam)."""
    code = (
        "import sys\n"
        "import launchers.extract_job, pipelines.extract.pipeline\n"
        "assert not any(m.split('.')[0] == 'polars' for m in sys.modules), 'extract needs polars'\n"
        "for m in [m for m in sys.modules if m.split('.')[0] in ('launchers', 'pipelines', 'apache_beam')]:\n"
        "    del sys.modules[m]\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    code = (
        "import sys\n"
        "import launchers.merge_job, pipelines.merge.job, pipelines.merge.join_polars, "
        "pipelines.merge.join_duckdb\n"
        "assert 'apache_beam' not in sys.modules, 'merge needs apache_beam'\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# --- Workflow --------------------------------------------------------------------------

def walk(node, path=()):
    """Every (path, dict) in a parsed YAML tree."""
    if isinstance(node, dict):
        yield path, node
        for k, v in node.items():
            yield from walk(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk(v, path + (i,))


def test_workflow_runs_extract_then_merge_per_pair_in_parallel(monkeypatch):
    wf = load(os.path.join("deploy", "workflow.yaml"))
    assert set(wf) == {"main", "run_job"}
    assert wf["main"]["params"] == ["args"]

    # The default pairs: all 28 in market order.
    init = next(n for _p, n in walk(wf["main"]) if "all_pairs" in n)
    assert init["all_pairs"] == MARKET_ORDER

    # Every job execution goes through run_job, which catches its failure.
    calls = [(p, n) for p, n in walk(wf) if "call" in n]
    connector = [(p, n) for p, n in calls if n["call"].startswith("googleapis.")]
    assert len(connector) == 1
    path, run = connector[0]
    assert path[0] == "run_job" and "try" in path
    assert run["call"] == "googleapis.run.v2.projects.locations.jobs.run"
    overrides = run["args"]["body"]["overrides"]
    assert overrides["taskCount"] == 1
    assert overrides["containerOverrides"][0]["env"] == "${env}"
    # The environment: PAIR, then the run's window variables, if any.
    assert wf["run_job"]["params"] == ["job", "pair", "window_env"]
    environment, window = wf["run_job"]["steps"][:2]
    assert environment["environment"]["assign"] == [{"env": [{"name": "PAIR", "value": "${pair}"}]}]
    assert window["window"]["for"]["in"] == "${window_env}"
    assert window["window"]["for"]["steps"] == [
        {"add_entry": {"assign": [{"env": "${list.concat(env, entry)}"}]}}]
    start = wf["run_job"]["steps"][2]["start"]
    assert start["except"]["as"] == "e"
    # Success means a succeeded task, not merely no exception.
    assert "succeededCount" in json.dumps(wf["run_job"])

    # One parallel iteration per pair; results shared; extract before merge; merge only
    # after the pair's extraction succeeded.
    (parallel,) = [n["parallel"] for _p, n in walk(wf["main"]) if "parallel" in n]
    assert parallel["shared"] == ["results"]
    assert parallel["for"]["value"] == "pair" and parallel["for"]["in"] == "${pairs}"
    steps = [next(iter(s)) for s in parallel["for"]["steps"]]
    assert steps == ["start_pair", "extract", "merge", "record"]
    branch = parallel["for"]["steps"][1:]
    merge_switch = branch[1]["merge"]["switch"]
    assert merge_switch[0]["condition"] == '${extracted.state == "succeeded"}'
    merge_call = merge_switch[0]["steps"][0]["run_merge"]
    assert merge_call["call"] == "run_job" and merge_call["args"]["job"] == "${merge_job}"
    extract_calls = [n for _p, n in walk(branch[0]) if n.get("call") == "run_job"]
    assert [c["args"]["job"] for c in extract_calls] == ["${extract_job}"]
    assert "results[pair]" in branch[2]["record"]["assign"][0]

    # Every job execution, the seed's included, gets the run's one window: dates or
    # days (WINDOW_DAYS), never both, never one date alone; refused before any execution.
    job_calls = [n for _p, n in walk(wf["main"]) if n.get("call") == "run_job"]
    assert len(job_calls) == 3
    assert all(c["args"]["window_env"] == "${window_env}" for c in job_calls)
    step_names = [next(iter(s)) for s in wf["main"]["steps"]]
    assert (step_names.index("check_window") < step_names.index("pin_the_day")
            < step_names.index("seed"))
    check = wf["main"]["steps"][step_names.index("check_window")]["check_window"]["switch"]
    assert check[0]["condition"] == "${days != null and (start_date != null or end_date != null)}"
    assert "raise" in check[0]
    assert check[1]["condition"] == "${start_date != null and end_date != null}"
    assert check[1]["assign"] == [{"window_env": [
        {"name": "START_DATE", "value": "${start_date}"},
        {"name": "END_DATE", "value": "${end_date}"}]}]
    assert check[2]["condition"] == "${start_date != null or end_date != null}"
    assert "raise" in check[2]
    assert check[3]["condition"] == "${days != null}"
    assert check[3]["assign"] == [{"window_env": [
        {"name": "WINDOW_DAYS", "value": "${string(int(days))}"}]}]
    # Without dates both jobs also get the execution's start day (UTC), taken once, so
    # that every pair and every retried task works out the same window, and each merge
    # takes a window ending before that day.
    (options,) = [s["options"]["assign"] for s in wf["main"]["steps"] if "options" in s]
    assert {k: v for d in options for k, v in d.items()}["as_of"] == \
        "${text.substring(time.format(sys.now()), 0, 10)}"
    (pin,) = wf["main"]["steps"][step_names.index("pin_the_day")]["pin_the_day"]["switch"]
    assert pin == {"condition": "${start_date == null}", "assign": [
        {"as_of_entry": {"name": "AS_OF_DATE", "value": "${as_of}"}},
        {"window_env": "${list.concat(window_env, as_of_entry)}"}]}
    # The variables the workflow sets are the ones both jobs read.
    from apache_beam.options.pipeline_options import PipelineOptions

    from pipelines.extract.options import ExtractOptions
    from pipelines.merge.job import parse_args

    names = {"START_DATE": ("2025-01-06", "start_date"), "END_DATE": ("2025-01-07", "end_date"),
             "WINDOW_DAYS": ("70", "days"), "AS_OF_DATE": ("2025-01-08", "as_of")}
    for name, (value, _attr) in names.items():
        monkeypatch.setenv(name, value)
    extract = PipelineOptions([]).view_as(ExtractOptions)
    merge = parse_args(["eurusd"])
    for _name, (value, attr) in names.items():
        expected = int(value) if attr == "days" else value
        assert getattr(extract, attr) == expected == getattr(merge, attr)


# --- deploy.sh -------------------------------------------------------------------------

DEPLOY_SH = os.path.join(DEPLOY, "deploy.sh")
ARGS = ["--project", "my-proj", "--region", "europe-west4", "--tag", "v7",
        "--checkpoint-bucket", "my-ck", "--output-bucket", "my-out"]


def test_deploy_script_syntax():
    proc = subprocess.run(["bash", "-n", DEPLOY_SH], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    with open(DEPLOY_SH, encoding="utf-8") as fh:
        text = fh.read()
    assert "set -euo pipefail" in text
    assert not re.search(r"^[^#]*\beval\b", text, re.M)


@pytest.fixture()
def fake_cloud(tmp_path):
    """A PATH where gcloud, bq and docker only record that they were called."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    marker = tmp_path / "called"
    for tool in ("gcloud", "bq", "docker", "gsutil"):
        script = bin_dir / tool
        script.write_text(f"#!/bin/sh\necho \"{tool} $*\" >> '{marker}'\nexit 1\n")
        script.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for name in ("PROJECT", "REGION", "TAG", "CHECKPOINT_BUCKET", "OUTPUT_BUCKET",
                 "SOURCE_PROJECT", "SOURCE_LOCATION", "MERGE_METHOD"):
        env.pop(name, None)
    return env, marker


def deploy(env, *args, timeout=60):
    return subprocess.run(["bash", DEPLOY_SH, *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def bindings(stdout: str) -> set[tuple[str, str, str]]:
    """(member, role, resource) of every role binding the dry run would make."""
    out = set()
    for line in stdout.splitlines():
        if line.startswith("#") or "roles/" not in line:
            continue
        argv = shlex.split(line)
        opts = dict(a[2:].split("=", 1) for a in argv if a.startswith("--") and "=" in a)
        if argv[:3] == ["gcloud", "projects", "add-iam-policy-binding"]:
            out.add((opts["member"], opts["role"], f"project:{argv[3]}"))
        elif argv[:4] == ["gcloud", "storage", "buckets", "add-iam-policy-binding"]:
            out.add((opts["member"], opts["role"], argv[4]))
        elif argv[:4] == ["gcloud", "run", "jobs", "add-iam-policy-binding"]:
            out.add((opts["member"], opts["role"], f"job:{argv[4]}"))
        elif argv[0] == "bq" and "query" in argv:
            m = re.fullmatch(r"GRANT `(roles/[\w.]+)` ON SCHEMA `([\w-]+)`\.(\w+) TO \"(.+)\"",
                             argv[-1])
            assert m, argv[-1]
            out.add((m.group(4), m.group(1), f"dataset:{m.group(2)}.{m.group(3)}"))
        else:
            raise AssertionError(f"a role in a command the test does not know: {line}")
    return out


EXTRACT_SA = "serviceAccount:bqx-extract@my-proj.iam.gserviceaccount.com"
MERGE_SA = "serviceAccount:bqx-merge@my-proj.iam.gserviceaccount.com"
WORKFLOW_SA = "serviceAccount:bqx-workflow@my-proj.iam.gserviceaccount.com"
EXPECTED_BINDINGS = {
    (EXTRACT_SA, "roles/bigquery.dataViewer", "dataset:bqx-ml.bqx_ml_v3_features_v2"),
    (EXTRACT_SA, "roles/bigquery.dataViewer", "dataset:bqx-ml.bqx_ml_v3_analytics_v2"),
    (EXTRACT_SA, "roles/bigquery.jobUser", "project:bqx-ml"),
    (EXTRACT_SA, "roles/bigquery.readSessionUser", "project:bqx-ml"),
    (EXTRACT_SA, "roles/storage.objectAdmin", "gs://my-ck"),
    (MERGE_SA, "roles/storage.objectViewer", "gs://my-ck"),
    (MERGE_SA, "roles/storage.objectAdmin", "gs://my-out"),
    (MERGE_SA, "roles/bigquery.jobUser", "project:my-proj"),
    (MERGE_SA, "roles/bigquery.dataEditor", "dataset:my-proj.bqx_merge_scratch"),
    (WORKFLOW_SA, "roles/run.jobsExecutorWithOverrides", "job:bqx-extract"),
    (WORKFLOW_SA, "roles/run.jobsExecutorWithOverrides", "job:bqx-merge"),
    (WORKFLOW_SA, "roles/run.viewer", "project:my-proj"),
}


def test_dry_run_prints_exactly_the_least_privilege_bindings(fake_cloud, tmp_path):
    env, marker = fake_cloud
    proc = deploy(env, *ARGS, "--dry-run", "--out", str(tmp_path / "rendered"))
    assert proc.returncode == 0, proc.stderr
    assert not marker.exists(), f"the dry run called: {marker.read_text()}"
    got = bindings(proc.stdout)
    assert got == EXPECTED_BINDINGS
    # Nothing broad anywhere: no basic roles, no admin roles (but the bucket-scoped
    # storage.objectAdmin), no storage role on a whole project.
    for member, role, resource in got:
        assert role not in {"roles/owner", "roles/editor", "roles/viewer"}
        assert not role.endswith(".admin") and role != "roles/run.developer", role
        if role.startswith("roles/storage."):
            assert resource.startswith("gs://"), (role, resource)
        if role in {"roles/bigquery.dataViewer", "roles/bigquery.dataEditor"}:
            assert resource.startswith("dataset:"), (role, resource)


def test_dry_run_builds_renders_and_deploys(fake_cloud, tmp_path):
    env, _marker = fake_cloud
    out = tmp_path / "rendered"
    proc = deploy(env, *ARGS, "--dry-run", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    commands = [shlex.split(ln) for ln in proc.stdout.splitlines() if not ln.startswith("#")]
    builds = [c for c in commands if c[:3] == ["gcloud", "builds", "submit"]]
    assert [next(a for a in c if a.startswith("--config=")) for c in builds] == [
        f"--config={ROOT}/cloudbuild-extract.yaml", f"--config={ROOT}/cloudbuild-merge.yaml"]
    assert all("--substitutions=_REGION=europe-west4,_TAG=v7" in c for c in builds)
    replaces = [c for c in commands if c[:4] == ["gcloud", "run", "jobs", "replace"]]
    assert [c[4] for c in replaces] == [str(out / JOBS["extract"]), str(out / JOBS["merge"])]
    assert any(c[:3] == ["gcloud", "workflows", "deploy"] and
               "--service-account=bqx-workflow@my-proj.iam.gserviceaccount.com" in c
               for c in commands)
    sas = [c for c in commands if c[:4] == ["gcloud", "iam", "service-accounts", "create"]]
    assert [c[4] for c in sas] == ["bqx-extract", "bqx-merge", "bqx-workflow"]

    for stage, name in JOBS.items():
        text = (out / name).read_text()
        assert "${" not in text
        spec = yaml.safe_load(text)
        assert container(spec)["image"] == (
            f"europe-west4-docker.pkg.dev/my-proj/bqx/bqx-{stage}:v7")
        assert task_spec(spec)["serviceAccountName"] == f"bqx-{stage}@my-proj.iam.gserviceaccount.com"
        env_ = env_of(spec)
        assert env_["GCS_CHECKPOINT_BUCKET"] == "my-ck"
        if stage == "extract":
            assert env_["BQX_SOURCE"] == "bigquery://bqx-ml"
        else:
            assert env_["GCS_OUTPUT_BUCKET"] == "my-out" and env_["MERGE_METHOD"] == "polars"


def test_settings_come_from_the_environment_too(fake_cloud, tmp_path):
    env, _marker = fake_cloud
    env = {**env, "PROJECT": "env-proj", "TAG": "t1", "CHECKPOINT_BUCKET": "env-ck",
           "OUTPUT_BUCKET": "env-out", "MERGE_METHOD": "duckdb"}
    proc = deploy(env, "--dry-run", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "--region=us-central1" in proc.stdout  # the default region
    assert "MERGE_METHOD" in (tmp_path / JOBS["merge"]).read_text()
    assert env_of(yaml.safe_load((tmp_path / JOBS["merge"]).read_text()))["MERGE_METHOD"] == "duckdb"


@pytest.mark.parametrize("bad", [
    ["--project", "x; rm -rf /"],
    ["--project", "$(touch pwned)"],
    ["--tag", "v1 --quiet"],
    ["--checkpoint-bucket", "gs://my-ck"],
    ["--output-bucket", "my-ck"],          # the same bucket as the checkpoints
    ["--region", "us-central1|x"],
    ["--merge-method", "pandas"],
    ["--project"],                          # no value
    ["--what"],
])
def test_bad_input_is_refused_before_any_command(fake_cloud, tmp_path, bad):
    env, marker = fake_cloud
    proc = deploy(env, *ARGS, *bad, "--dry-run", "--out", str(tmp_path / "r"))
    assert proc.returncode == 2, proc.stdout
    assert proc.stderr.startswith("error: ")
    assert not [ln for ln in proc.stdout.splitlines() if not ln.startswith("#")]
    assert not marker.exists()
    assert not (tmp_path / "pwned").exists() and not os.path.exists(os.path.join(ROOT, "pwned"))


def test_a_real_run_needs_gcloud(tmp_path):
    # A PATH with only what the script needs before it looks for gcloud (this machine
    # may have a real gcloud in /usr/bin, which must not run).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dirname").symlink_to(subprocess.run(
        ["bash", "-c", "command -v dirname"], capture_output=True, text=True).stdout.strip())
    env = {"PATH": str(bin_dir), "HOME": str(tmp_path)}
    proc = subprocess.run(["/bin/bash", DEPLOY_SH, *ARGS], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "gcloud is not installed" in proc.stderr
