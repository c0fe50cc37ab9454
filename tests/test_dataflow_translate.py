"""The extraction builds and translates for the DataflowRunner without submitting.

Beam's ``--dry_run`` (TestOptions) makes ``DataflowRunner.run_pipeline`` do everything
up to the API call: apply the Dataflow overrides, build the SDK environment with the
``--setup_file`` package (``python setup.py sdist``), translate to the portable pipeline
proto and create the Dataflow job description; it then returns instead of submitting.
No network, credentials or emulator is involved.
"""
import os
import pickle
import tarfile

import apache_beam as beam
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.portability.api import beam_runner_api_pb2

from conftest import PAIR, ROOT
from pipelines.catalog import load_catalog
from pipelines.extract.pipeline import build_pipeline
from pipelines.extract.plan import make_plan
from pipelines.sources import open_source


def test_extraction_translates_for_dataflow(warehouse, monkeypatch):
    monkeypatch.chdir(ROOT)  # --setup_file ./setup.py, as the documented command gives it
    catalog = load_catalog(None)
    source = open_source(f"duckdb://{warehouse}")
    try:
        plan = make_plan(source, catalog, PAIR, None, "gs://bqx-ck/checkpoints", 28, "drop")
    finally:
        source.close()
    options = PipelineOptions([
        "--runner=DataflowRunner", "--project=bqx-ml", "--region=europe-west2",
        "--temp_location=gs://bqx-ck/tmp", "--setup_file=./setup.py",
        "--max_num_workers=8", "--dry_run=True", "--no_auth",
    ])
    p = beam.Pipeline(options=options)
    build_pipeline(p, plan.tasks, "bigquery://bqx-ml", plan.key, "drop")
    result = p.run()
    result.wait_until_finish()

    job = result.job  # the apiclient.Job that would have been submitted
    assert job.proto.type.name == "JOB_TYPE_BATCH"
    assert job.options.view_as(beam.options.pipeline_options.GoogleCloudOptions).region == "europe-west2"
    proto = job.proto_pipeline
    names = {t.unique_name: t for t in proto.components.transforms.values()}
    assert "ExtractShards/Spread" in names and "ExtractShards/Extract" in names
    pardo = next(t for n, t in names.items() if n.startswith("ExtractShards/Extract/ParDo"))
    payload = beam_runner_api_pb2.ParDoPayload.FromString(pardo.spec.payload)
    # The DoFn the workers will run, with the source it opens in setup().
    from apache_beam.internal import pickler
    fn = pickler.loads(payload.do_fn.payload)[0]
    assert type(fn).__name__ == "ExtractShardFn" and fn.source_url == "bigquery://bqx-ml"
    assert "failed" in pardo.outputs and len(pardo.outputs) == 2  # main + failed

    # Every task is in the graph (the Create's elements), picklable for the workers.
    create = next(t for n, t in names.items() if n.startswith("Tasks"))
    assert create.spec.urn and len(plan.tasks) > 0
    pickle.dumps(plan.tasks)

    # The workers' environment carries this package, built from setup.py.
    (env,) = proto.components.environments.values()
    staged = {}
    for dep in env.dependencies:
        role = beam_runner_api_pb2.ArtifactStagingToRolePayload.FromString(dep.role_payload)
        path = beam_runner_api_pb2.ArtifactFilePayload.FromString(dep.type_payload).path
        staged[role.staged_name] = path
    assert "workflow.tar.gz" in staged
    with tarfile.open(staged["workflow.tar.gz"]) as tar:
        members = {m.split("/", 1)[1] for m in tar.getnames() if "/" in m}
    assert {"setup.py", "pipelines/sources.py", "pipelines/storage.py",
            "pipelines/extract/transforms.py", "pipelines/catalog.toml"} <= members
    assert os.path.basename(staged["workflow.tar.gz"]).startswith("bqx")
