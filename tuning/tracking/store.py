"""MLflow tracking for searches: one experiment per dataset, a parent run per search, a nested
child run per Tune trial.

Everything is logged from the driver through `MlflowClient` (no global active run), so trials
running anywhere on a cluster need no access to the tracking server. Runs are found again by
tags (`cfcml.search`, `cfcml.trial_id`) and metric steps already logged are skipped, so resuming
or re-running a search never duplicates a run or a metric point.

What the MLflow UI shows besides metrics: the experiment is tagged as a model-training one
(`mlflow.experimentKind`), every run carries its source (`mlflow.source.*`: entry point, git
commit, branch; `mlflow.user`) and the prepared dataset as an MLflow dataset input (name,
fingerprint as digest, the prepared folder as source, the manifest's columns as schema, rows per
split and fold as profile), and trials and the final run get per-epoch system metrics measured on
their Ray Train worker (`system/...`, the names of MLflow's own system metrics monitor; see
`tuning.hpo.trainer.SystemMetrics`).
"""
from __future__ import annotations

import functools
import getpass
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag, Run
from mlflow.tracking import MlflowClient

from cfcml.config import PROJECT_ROOT
from cfcml.data.manifest import PreparedDataset
from cfcml.evaluation import metric_keys
from tuning.runtime.preflight import tracking_uri_choice

if TYPE_CHECKING:
    from matplotlib.figure import Figure

# what an epoch logs of a report (`log_epoch_once`): train_*, val_*, cv_*, selected_*, system/*
LOGGED_PREFIXES = metric_keys.prefixes(metric_keys.TRAIN, metric_keys.VAL, metric_keys.CV, metric_keys.SELECTED,
                                       metric_keys.SYSTEM)
# On every trial run and final run: the selective scan its model actually ran (`EpochReport.scan_backend`:
# "chunked", "triton", ...; "chunked" where `auto` fell back after the triton self-check; "none" without
# Mamba blocks), set from the run's first report (cfcml/networks/scan_check.py, docs/gpu.md).
SCAN_BACKEND_TAG = "cfcml.scan_backend"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind (not GenAI)


def default_tracking_uri(runs_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store under the project's runs/ folder."""
    uri, what = tracking_uri_choice(None, runs_dir)
    if what == "--runs-dir":
        runs_dir.mkdir(parents=True, exist_ok=True)
    return uri


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


@functools.lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """MLflow's source tags for runs this process creates: the entry point that ran, the git commit
    (and branch, remote, whether tracked files had uncommitted changes) and the user."""
    argv0 = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else Path("python")
    try:
        name = str(argv0.relative_to(PROJECT_ROOT))
    except ValueError:
        name = argv0.name
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": name, "mlflow.user": user,
            "mlflow.source.git.commit": git_commit()}
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = _git("remote", "get-url", "origin")
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
    if tags["mlflow.source.git.commit"] != "unknown":
        tags["cfcml.git_dirty"] = "true" if _git("status", "--porcelain", "--untracked-files=no") else "false"
    return tags


def dataset_entity(prepared: PreparedDataset, name: str | None = None) -> Dataset:
    """The prepared dataset as an MLflow dataset: its fingerprint as digest, the prepared folder as
    source, the manifest's columns as schema and the rows of each split and validation fold as
    profile (counts only: no rows are read for it)."""
    from mlflow.types import ColSpec, Schema

    manifest = prepared.manifest
    kinds = {"i": "long", "u": "long", "f": "double", "b": "boolean"}
    schema = Schema([ColSpec(kinds.get(dtype.kind, "string"), str(col)) for col, dtype in manifest.dtypes.items()])
    dev = manifest[manifest["split"] == "dev"]
    profile: dict[str, Any] = {"num_rows": len(manifest), "dev_rows": len(dev),
                               "test_rows": int((manifest["split"] == "test").sum()),
                               "classes": len(prepared.spec.classes), "folds": prepared.folds,
                               "fold_seed": prepared.fold_seed}
    profile.update({f"fold_{k}_validation_rows": int((dev["fold"] == k).sum()) for k in range(prepared.folds)})
    return Dataset(name=name or prepared.spec.name, digest=prepared.fingerprint, source_type="local",
                   source=json.dumps({"uri": str(prepared.out_dir)}),
                   schema=json.dumps({"mlflow_colspec": schema.to_dict()}), profile=json.dumps(profile))


def log_provenance(client: MlflowClient, run_id: str, dataset: Dataset | PreparedDataset,
                   context: str = "training") -> None:
    """Tag `run_id` with its source (`source_tags`) and log `dataset` as its input (used in
    `context`). Idempotent: MLflow keeps one input per run and dataset."""
    if isinstance(dataset, PreparedDataset):
        dataset = dataset_entity(dataset)
    client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in source_tags().items()])
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


def experiment_id(client: MlflowClient, dataset: str, artifact_root: Path | None) -> str:
    """The dataset's experiment (`cfcml-<dataset>`), created on first use, tagged as a model-training
    experiment unless someone set its kind already."""
    name = f"cfcml-{dataset}"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = (artifact_root / name).resolve().as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def ui_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs page in the MLflow UI, in its machine-learning view (MLflow 3's UI
    opens on its GenAI view unless told otherwise; the choice is then remembered by the browser)."""
    return f"{host}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def filter_literal(value: str) -> str:
    """`value` as a string literal of an MLflow filter string (runs, model versions, experiments).

    MLflow's parser (`mlflow.utils.search_utils`, checked with MLflow 3.x) has no escape character:
    it takes a value between one pair of single or double quotes as it is. So a value without an
    apostrophe is single-quoted, one with an apostrophe double-quoted; a value with both has no
    literal and raises ValueError (`tag_filter` matches such a value with LIKE instead).
    Backslashes, spaces and backticks need nothing.
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both quote characters: no MLflow filter literal can hold it")


def tag_filter(**tags: str) -> str:
    """A filter string matching runs whose tags equal `tags` (dotted keys welcome), every value
    quoted by `filter_literal`: the one place values enter a runs filter. A value holding both
    quote characters becomes a LIKE pattern with `_` for each quote, which can match more runs:
    callers keep only exact matches (`find_run` does)."""
    clauses = []
    for key, value in tags.items():
        try:
            clauses.append(f"tags.`{key}` = {filter_literal(value)}")
        except ValueError:
            pattern = str(value).replace("'", "_").replace('"', "_")
            clauses.append(f"tags.`{key}` LIKE {filter_literal(pattern)}")
    return " and ".join(clauses)


def find_runs(client: MlflowClient, exp_id: str, **tags: str) -> list[Run]:
    """Runs of `exp_id` whose tags equal `tags` exactly (any value, apostrophes and quotes included)."""
    runs = client.search_runs([exp_id], filter_string=tag_filter(**tags), max_results=1000)
    return [r for r in runs if all(r.data.tags.get(k) == str(v) for k, v in tags.items())]


def find_run(client: MlflowClient, exp_id: str, **tags: str) -> str | None:
    runs = find_runs(client, exp_id, **tags)
    return runs[0].info.run_id if runs else None


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run (re-logging a param with a new value is an MLflow error)."""
    have = client.get_run(run_id).data.params
    todo = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(todo), 100):
        client.log_batch(run_id, params=todo[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, Any], step: int = 0,
                timestamp_ms: int | None = None) -> None:
    """Log the finite numbers of `values` at `step` (MLflow takes 1000 metrics per batch)."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    metrics = [mlflow.entities.Metric(k, float(v), ts, step) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_figure(client: MlflowClient, run_id: str, fig: Figure, name: str) -> None:
    import matplotlib.pyplot as plt

    client.log_figure(run_id, fig, name)
    plt.close(fig)


def write_json_artifact(client: MlflowClient, run_id: str, data: object, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        client.log_artifact(run_id, str(path))
