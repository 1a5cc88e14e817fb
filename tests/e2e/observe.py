"""What a search left behind, read the way a user would: MLflow runs and metric steps, Tune's
per-trial result rows, Ray Train's checkpoint folders. Used by the fault-injection tests."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from tuning.tracking.store import tag_filter

EXPERIMENT = "cfcml-men"


def runs(uri: str, kind: str) -> list[Any]:
    """The experiment's runs with tag cfcml.kind = `kind` ([] while the store is being created)."""
    try:
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            return []
        return client.search_runs([exp.experiment_id], filter_string=tag_filter(**{"cfcml.kind": kind}))
    except Exception:  # the SQLite store does not exist yet or is being migrated
        return []


def epochs_logged(uri: str) -> dict[str, tuple[int, str]]:
    """Per trial run name: (the last epoch MLflow holds, the run's status)."""
    return {r.info.run_name: (int(r.data.metrics.get("epoch", 0)), r.info.status) for r in runs(uri, "trial")}


def steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """The steps of every point of metric `key`, in the order MLflow returns them (duplicates kept)."""
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def result_rows(search_dir: Path) -> dict[str, list[dict[str, Any]]]:
    """Tune's result.json rows of every trial of a search, by trial folder name."""
    out = {}
    for path in sorted(Path(search_dir).glob("run_trial_*/result.json")):
        out[path.parent.name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def checkpoints(train_dir: Path) -> dict[str, list[str]]:
    """Ray Train's checkpoint folders per trial run (runs/ray/train/trial_<id>)."""
    return {run.name: sorted(p.name for p in run.glob("checkpoint_*"))
            for run in sorted(Path(train_dir).glob("trial_*"))}
