"""Least privilege in the code and the images: no shell, no credentials written anywhere.

The roles themselves are in deploy/deploy.sh (tested by test_deploy_specs.py) and
documented in the README and docs/deploy.md.
"""
import ast
import fnmatch
import os

from conftest import ROOT, run_module

CODE_DIRS = ("pipelines", "launchers", "bench", "tests")
SECRET = "SECRETMARKER-7f3a9c"


def _python_files():
    for top in CODE_DIRS:
        for folder, _dirs, files in os.walk(os.path.join(ROOT, top)):
            for name in files:
                if name.endswith(".py"):
                    yield os.path.join(folder, name)


def _shell_calls(path: str) -> list[str]:
    """Calls that start a shell: os.system/os.popen, or any call with shell=True."""
    found = []
    tree = ast.parse(open(path).read(), path)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in ("system", "popen") \
                and isinstance(func.value, ast.Name) and func.value.id == "os":
            found.append(f"{path}:{node.lineno} os.{func.attr}")
        for kw in node.keywords:
            if kw.arg == "shell" and not (isinstance(kw.value, ast.Constant) and kw.value.value is False):
                found.append(f"{path}:{node.lineno} shell=")
    return found


def test_no_subprocess_goes_through_a_shell():
    offenders = [hit for path in _python_files() for hit in _shell_calls(path)]
    assert offenders == []


def _ignored(patterns: list[str], name: str) -> bool:
    """Docker's rule: the last matching pattern wins; ``!`` re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(name, pattern) or name.startswith(pattern + "/"):
            ignored = not negate
    return ignored


def test_build_context_holds_only_the_code():
    lines = [l.strip() for l in open(os.path.join(ROOT, ".dockerignore"))]
    patterns = [l for l in lines if l and not l.startswith("#")]
    for name in ("setup.py", "pipelines/catalog.toml", "pipelines/extract/pipeline.py",
                 "launchers/job_env.py"):
        assert not _ignored(patterns, name), name
    for name in ("key.json", ".env", "data/warehouse.duckdb", ".venv/bin/python",
                 ".git/config", "tests/test_security.py", "credentials/sa.json"):
        assert _ignored(patterns, name), name
    for dockerfile in ("Dockerfile.extract", "Dockerfile.merge"):
        text = open(os.path.join(ROOT, dockerfile)).read()
        assert "\nUSER " in text, dockerfile
        for word in ("CREDENTIALS", "TOKEN", "SECRET", "KEY"):
            assert not any(line.startswith(("ENV", "ARG")) and word in line.upper()
                           for line in text.splitlines()), (dockerfile, word)


def test_credentials_never_reach_logs_manifests_or_outputs(warehouse, tmp_path):
    """Jobs run with a (fake) service-account key file and an access token in their
    environment; neither may appear in anything they print or write."""
    key_file = tmp_path / "sa-key.json"
    key_file.write_text('{"type": "service_account", "private_key": "-----BEGIN PRIVATE '
                        f'KEY-----{SECRET}-----END PRIVATE KEY-----"}}')
    env = {"GOOGLE_APPLICATION_CREDENTIALS": str(key_file),
           "CLOUDSDK_AUTH_ACCESS_TOKEN": f"ya29.{SECRET}", "GOOGLE_OAUTH_ACCESS_TOKEN": SECRET}
    root, out = str(tmp_path / "ck"), str(tmp_path / "out" / "training_eurusd.parquet")
    extract = run_module("pipelines.extract", "--pair", "eurusd", "--source", f"duckdb://{warehouse}",
                         "--checkpoint-root", root, "--shard-days", "1", "--verbose", env=env)
    assert extract.returncode == 0, extract.stderr
    merge = run_module("pipelines.merge", "--pair", "eurusd", "--checkpoint-root", root,
                       "--output", out, "--verbose", env=env)
    assert merge.returncode == 0, merge.stderr
    for stream in (extract.stdout, extract.stderr, merge.stdout, merge.stderr):
        assert SECRET not in stream and "sa-key.json" not in stream
    for folder, _dirs, files in os.walk(tmp_path):
        for name in files:
            path = os.path.join(folder, name)
            if path != str(key_file):
                assert SECRET.encode() not in open(path, "rb").read(), path
