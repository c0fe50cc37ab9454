#!/usr/bin/env bash
# Deploy the BQX training-data pipeline to Google Cloud: the Artifact Registry repository,
# the two buckets, the BigQuery scratch dataset, one service account per job (and one for
# the workflow) with least-privilege roles, both images (Cloud Build), both Cloud Run jobs
# and the Cloud Workflows definition. Every step is idempotent: rerun it to update.
#
#   deploy/deploy.sh --project my-proj --tag v1 \
#       --checkpoint-bucket my-proj-bqx-checkpoints --output-bucket my-proj-bqx-training
#   deploy/deploy.sh ... --dry-run      # print the commands, run nothing (no gcloud needed)
#
# Options (or the environment variable in brackets):
#   --project P              [PROJECT]            project of the jobs, buckets and images (required)
#   --region R               [REGION]             default us-central1
#   --tag T                  [TAG]                image tag; default: a UTC timestamp
#   --checkpoint-bucket B    [CHECKPOINT_BUCKET]  bucket name, without gs:// (required)
#   --output-bucket B        [OUTPUT_BUCKET]      bucket name, without gs:// (required)
#   --source-project S       [SOURCE_PROJECT]     BigQuery project of the feature tables; default bqx-ml
#   --source-location L      [SOURCE_LOCATION]    BigQuery location of those datasets; default us-central1
#   --merge-method M         [MERGE_METHOD]       polars (default), duckdb or bigquery
#   --out DIR                                     keep the rendered job specs in DIR
#   --skip-build                                  deploy images already pushed under TAG
#   --dry-run                                     print the commands instead of running them
#
# Every value is checked against a strict pattern before use and passed to commands as a
# quoted argument; nothing is ever evaluated.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

PROJECT="${PROJECT:-}"
REGION="${REGION:-us-central1}"
TAG="${TAG:-}"
CHECKPOINT_BUCKET="${CHECKPOINT_BUCKET:-}"
OUTPUT_BUCKET="${OUTPUT_BUCKET:-}"
SOURCE_PROJECT="${SOURCE_PROJECT:-bqx-ml}"
SOURCE_LOCATION="${SOURCE_LOCATION:-us-central1}"
MERGE_METHOD="${MERGE_METHOD:-polars}"
OUT_DIR=""
DRY_RUN=0
SKIP_BUILD=0

# Names fixed by the job specs and the workflow.
REPOSITORY="bqx"
EXTRACT_JOB="bqx-extract"
MERGE_JOB="bqx-merge"
WORKFLOW="bqx-training"
SCRATCH_DATASET="bqx_merge_scratch"
SOURCE_DATASETS=("bqx_ml_v3_features_v2" "bqx_ml_v3_analytics_v2")

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed -e '$d' -e 's/^# \{0,1\}//'
}

die() {
  printf 'error: %s\n' "$*" >&2
  exit 2
}

# The value of option "$1" given as "$2"; refuses a missing value.
value_of() {
  [[ $# -ge 2 && -n "$2" && "$2" != --* ]] || die "$1 needs a value"
  printf '%s' "$2"
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) PROJECT="$(value_of "$@")"; shift 2 ;;
    --region) REGION="$(value_of "$@")"; shift 2 ;;
    --tag) TAG="$(value_of "$@")"; shift 2 ;;
    --checkpoint-bucket) CHECKPOINT_BUCKET="$(value_of "$@")"; shift 2 ;;
    --output-bucket) OUTPUT_BUCKET="$(value_of "$@")"; shift 2 ;;
    --source-project) SOURCE_PROJECT="$(value_of "$@")"; shift 2 ;;
    --source-location) SOURCE_LOCATION="$(value_of "$@")"; shift 2 ;;
    --merge-method) MERGE_METHOD="$(value_of "$@")"; shift 2 ;;
    --out) OUT_DIR="$(value_of "$@")"; shift 2 ;;
    --project=*) PROJECT="${1#*=}"; shift ;;
    --region=*) REGION="${1#*=}"; shift ;;
    --tag=*) TAG="${1#*=}"; shift ;;
    --checkpoint-bucket=*) CHECKPOINT_BUCKET="${1#*=}"; shift ;;
    --output-bucket=*) OUTPUT_BUCKET="${1#*=}"; shift ;;
    --source-project=*) SOURCE_PROJECT="${1#*=}"; shift ;;
    --source-location=*) SOURCE_LOCATION="${1#*=}"; shift ;;
    --merge-method=*) MERGE_METHOD="${1#*=}"; shift ;;
    --out=*) OUT_DIR="${1#*=}"; shift ;;
    --skip-build) SKIP_BUILD=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done

[[ -n "$TAG" ]] || TAG="$(date -u +%Y%m%d-%H%M%S)"

# check NAME VALUE PATTERN WHAT: refuse anything but the expected shape.
check() {
  [[ -n "$2" ]] || die "$1 is required (see --help)"
  [[ "$2" =~ $3 ]] || die "$1='$2' is not $4"
}
check PROJECT "$PROJECT" '^[a-z][a-z0-9-]{4,28}[a-z0-9]$' "a Google Cloud project ID"
check SOURCE_PROJECT "$SOURCE_PROJECT" '^[a-z][a-z0-9-]{4,28}[a-z0-9]$' "a Google Cloud project ID"
check REGION "$REGION" '^[a-z]+-[a-z]+[0-9]+$' "a region like us-central1"
check SOURCE_LOCATION "$SOURCE_LOCATION" '^([A-Za-z]{2}|[a-z]+-[a-z]+[0-9]+)$' "a BigQuery location like us-central1 or US"
check TAG "$TAG" '^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$' "a Docker tag"
check CHECKPOINT_BUCKET "$CHECKPOINT_BUCKET" '^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$' "a bucket name (no gs://)"
check OUTPUT_BUCKET "$OUTPUT_BUCKET" '^[a-z0-9][a-z0-9_.-]{1,61}[a-z0-9]$' "a bucket name (no gs://)"
check MERGE_METHOD "$MERGE_METHOD" '^(polars|duckdb|bigquery)$' "one of polars, duckdb, bigquery"
# One bucket for both would give the merge account write access to the checkpoints.
[[ "$CHECKPOINT_BUCKET" != "$OUTPUT_BUCKET" ]] || die "CHECKPOINT_BUCKET and OUTPUT_BUCKET must differ"

EXTRACT_SA="bqx-extract@${PROJECT}.iam.gserviceaccount.com"
MERGE_SA="bqx-merge@${PROJECT}.iam.gserviceaccount.com"
WORKFLOW_SA="bqx-workflow@${PROJECT}.iam.gserviceaccount.com"

# run CMD ARGS...: run a command, or print it (shell-quoted, one line) in a dry run.
run() {
  if (( DRY_RUN )); then
    printf '%q' "$1"
    shift
    if [[ $# -gt 0 ]]; then printf ' %q' "$@"; fi
    printf '\n'
  else
    printf '+ %s\n' "$*" >&2
    "$@"
  fi
}

# run_retry CMD ARGS...: like run, retried a few times (a new service account takes a
# moment before IAM accepts it in a binding).
run_retry() {
  local attempt
  for attempt in 1 2 3 4 5; do
    if run "$@"; then return 0; fi
    (( attempt < 5 )) || return 1
    printf 'retrying in %ss\n' "$(( attempt * 10 ))" >&2
    sleep "$(( attempt * 10 ))"
  done
}

# exists CMD ARGS...: true if the describe command succeeds. A dry run prints it and
# assumes the resource is missing, so that every create command is shown.
exists() {
  if (( DRY_RUN )); then
    printf '# if missing (checked with: %q' "$1"
    shift
    printf ' %q' "$@"
    printf ')\n'
    return 1
  fi
  "$@" >/dev/null 2>&1
}

say() {
  printf '# %s\n' "$*"
}

# Role bindings: each names exactly one role, one member and the narrowest resource.
grant_project() {  # PROJECT_ID MEMBER ROLE
  run_retry gcloud projects add-iam-policy-binding "$1" \
    "--member=$2" "--role=$3" --condition=None --quiet
}
grant_bucket() {  # BUCKET MEMBER ROLE
  run_retry gcloud storage buckets add-iam-policy-binding "gs://$1" \
    "--project=$PROJECT" "--member=$2" "--role=$3"
}
grant_dataset() {  # PROJECT_ID DATASET LOCATION MEMBER ROLE: BigQuery's GRANT ... ON SCHEMA
  run_retry bq "--project_id=$PROJECT" "--location=$3" query --nouse_legacy_sql \
    "GRANT \`$5\` ON SCHEMA \`$1\`.$2 TO \"$4\""
}
grant_job() {  # JOB MEMBER ROLE
  run_retry gcloud run jobs add-iam-policy-binding "$1" \
    "--project=$PROJECT" "--region=$REGION" "--member=$2" "--role=$3" --quiet
}

if (( DRY_RUN )); then
  say "dry run: nothing is executed; the commands below would be"
else
  command -v gcloud >/dev/null || die "gcloud is not installed (try --dry-run)"
  command -v bq >/dev/null || die "bq is not installed (it comes with the Google Cloud CLI)"
fi

if [[ -z "$OUT_DIR" ]]; then
  OUT_DIR="$(mktemp -d "${TMPDIR:-/tmp}/bqx-deploy.XXXXXX")"
  trap 'rm -rf -- "$OUT_DIR"' EXIT
else
  mkdir -p -- "$OUT_DIR"
fi

say "project=$PROJECT region=$REGION tag=$TAG source=$SOURCE_PROJECT merge_method=$MERGE_METHOD"
say "checkpoints=gs://$CHECKPOINT_BUCKET output=gs://$OUTPUT_BUCKET"

say "1. APIs"
run gcloud services enable "--project=$PROJECT" \
  run.googleapis.com workflows.googleapis.com workflowexecutions.googleapis.com \
  cloudbuild.googleapis.com artifactregistry.googleapis.com iam.googleapis.com \
  bigquery.googleapis.com bigquerystorage.googleapis.com storage.googleapis.com

say "2. Artifact Registry repository, buckets, scratch dataset"
if ! exists gcloud artifacts repositories describe "$REPOSITORY" "--project=$PROJECT" "--location=$REGION"; then
  run gcloud artifacts repositories create "$REPOSITORY" "--project=$PROJECT" \
    "--location=$REGION" --repository-format=docker \
    "--description=BQX training-data pipeline images"
fi
for bucket in "$CHECKPOINT_BUCKET" "$OUTPUT_BUCKET"; do
  if ! exists gcloud storage buckets describe "gs://$bucket" "--project=$PROJECT"; then
    run gcloud storage buckets create "gs://$bucket" "--project=$PROJECT" \
      "--location=$REGION" --uniform-bucket-level-access --public-access-prevention
  fi
done
# Only the bigquery merge method writes here; its tables expire after a day.
if ! exists bq "--project_id=$PROJECT" show --dataset "$PROJECT:$SCRATCH_DATASET"; then
  run bq "--project_id=$PROJECT" mk --dataset "--location=$REGION" \
    --default_table_expiration=86400 \
    "--description=Scratch tables of the BQX merge (bigquery method)" \
    "$PROJECT:$SCRATCH_DATASET"
fi

say "3. service accounts"
for account in bqx-extract bqx-merge bqx-workflow; do
  if ! exists gcloud iam service-accounts describe "$account@$PROJECT.iam.gserviceaccount.com" "--project=$PROJECT"; then
    run gcloud iam service-accounts create "$account" "--project=$PROJECT" \
      "--display-name=BQX pipeline: $account"
  fi
done

say "4. roles of bqx-extract: read the feature datasets, run queries and read sessions, write checkpoints"
# Dataset-level read on the two source datasets only (not project-wide dataViewer).
for dataset in "${SOURCE_DATASETS[@]}"; do
  grant_dataset "$SOURCE_PROJECT" "$dataset" "$SOURCE_LOCATION" "serviceAccount:$EXTRACT_SA" roles/bigquery.dataViewer
done
# Query jobs and Storage Read API sessions are created in the project that the
# bigquery://PROJECT source names (these two roles exist only at project level).
grant_project "$SOURCE_PROJECT" "serviceAccount:$EXTRACT_SA" roles/bigquery.jobUser
grant_project "$SOURCE_PROJECT" "serviceAccount:$EXTRACT_SA" roles/bigquery.readSessionUser
# objectAdmin, not objectCreator: the commit protocol renames (copy + delete) and a
# resumed run replaces partial shards.
grant_bucket "$CHECKPOINT_BUCKET" "serviceAccount:$EXTRACT_SA" roles/storage.objectAdmin

say "5. roles of bqx-merge: read checkpoints, write training files, BigQuery scratch (bigquery method)"
grant_bucket "$CHECKPOINT_BUCKET" "serviceAccount:$MERGE_SA" roles/storage.objectViewer
grant_bucket "$OUTPUT_BUCKET" "serviceAccount:$MERGE_SA" roles/storage.objectAdmin
grant_project "$PROJECT" "serviceAccount:$MERGE_SA" roles/bigquery.jobUser
grant_dataset "$PROJECT" "$SCRATCH_DATASET" "$REGION" "serviceAccount:$MERGE_SA" roles/bigquery.dataEditor

say "6. images (Cloud Build: build, smoke-test the entry point, push)"
if (( SKIP_BUILD )); then
  say "skipped (--skip-build): using the images tagged $TAG"
else
  for stage in extract merge; do
    run gcloud builds submit "--project=$PROJECT" "--config=$ROOT/cloudbuild-$stage.yaml" \
      "--substitutions=_REGION=$REGION,_TAG=$TAG" "$ROOT"
  done
fi

say "7. Cloud Run jobs"
# Only these placeholders are replaced; the values were checked above and contain
# none of sed's special characters (| & \ or newlines).
render() {  # TEMPLATE OUTPUT
  sed -e "s|\${PROJECT}|$PROJECT|g" \
      -e "s|\${REGION}|$REGION|g" \
      -e "s|\${TAG}|$TAG|g" \
      -e "s|\${CHECKPOINT_BUCKET}|$CHECKPOINT_BUCKET|g" \
      -e "s|\${OUTPUT_BUCKET}|$OUTPUT_BUCKET|g" \
      -e "s|\${SOURCE_PROJECT}|$SOURCE_PROJECT|g" \
      -e "s|\${MERGE_METHOD}|$MERGE_METHOD|g" \
      "$1" > "$2"
  if grep -n '\${' "$2" >&2; then
    die "$1: placeholders left after rendering (above)"
  fi
}
for stage in extract merge; do
  render "$ROOT/deploy/cloudrun-$stage-job.yaml" "$OUT_DIR/cloudrun-$stage-job.yaml"
  say "rendered $OUT_DIR/cloudrun-$stage-job.yaml"
  run gcloud run jobs replace "$OUT_DIR/cloudrun-$stage-job.yaml" \
    "--project=$PROJECT" "--region=$REGION" --quiet
done

say "8. roles of bqx-workflow: run the two jobs with overrides, follow their executions"
# roles/run.invoker (run.jobs.run) cannot pass overrides; the workflow overrides PAIR and
# taskCount, which needs run.jobs.runWithOverrides. roles/run.jobsExecutorWithOverrides
# has run + runWithOverrides (+ cancel) and is granted on the two jobs only;
# roles/run.developer would also let it update or delete jobs, so it is not used.
for job in "$EXTRACT_JOB" "$MERGE_JOB"; do
  grant_job "$job" "serviceAccount:$WORKFLOW_SA" roles/run.jobsExecutorWithOverrides
done
# The connector waits by polling the run's long-running operation and execution
# (run.operations.get, run.executions.get). Operations cannot carry an IAM policy of
# their own, so this read-only role is granted on the project.
grant_project "$PROJECT" "serviceAccount:$WORKFLOW_SA" roles/run.viewer

say "9. workflow"
run gcloud workflows deploy "$WORKFLOW" "--project=$PROJECT" "--location=$REGION" \
  "--source=$ROOT/deploy/workflow.yaml" "--service-account=$WORKFLOW_SA"

say "done. Run every pair (extract, then merge per pair):"
say "  gcloud workflows run $WORKFLOW --project=$PROJECT --location=$REGION"
say "or some pairs:  ... --data='{\"pairs\": [\"eurusd\", \"gbpusd\"]}'"
say "or the jobs directly (28 tasks each, merge only after extract finished):"
say "  gcloud run jobs execute $EXTRACT_JOB --project=$PROJECT --region=$REGION --wait"
say "  gcloud run jobs execute $MERGE_JOB --project=$PROJECT --region=$REGION --wait"
