"""Retrain the best configuration of a search on all development data, test it once, register it.

    python pipelines/train_final.py --dataset men [--name men-default]

Choice: one model retrained on all development data (not the fold ensemble), for as many
epochs as the best trial's best CV epoch, so that model selection stays on validation folds and
the final model has seen every development patient. The held-out test split is read here and
only here, once, after training; metrics come with bootstrap 95% confidence intervals. The model
is registered as `cfcml-<dataset>` with its CV and test metrics.

(`register_cv_ensemble` registers the best trial's fold ensemble instead, for `search.py
--no-final`: no test evaluation happens then.)
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
import torch

from cfcml.config import PROJECT_ROOT, flatten_dict

OUTCOME_FILE = "outcome.json"


def _child_run(client: Any, outcome: dict[str, Any], kind: str) -> tuple[str, bool]:
    """The search's `kind` run (final / cv-ensemble): reused if it exists. Returns (run id, done)."""
    from tuning.tracking import find_run

    run_id = find_run(client, outcome["experiment_id"], **{"cfcml.search": outcome["search_dir"], "cfcml.kind": kind})
    if run_id is not None:
        done = client.get_run(run_id).data.tags.get("cfcml.registered_version") is not None
        return run_id, done
    run = client.create_run(outcome["experiment_id"], run_name=kind, tags={
        "mlflow.parentRunId": outcome["parent_run_id"], "cfcml.search": outcome["search_dir"], "cfcml.kind": kind,
    })
    return run.info.run_id, False


def _cv_tags(best: dict[str, Any], metric: str) -> dict[str, str]:
    tags = {f"cv_{k[3:]}": f"{v:.4f}" for k, v in best["metrics"].items() if k.startswith("cv_")}
    tags.update({"selection_metric": metric, "best_trial": str(best["trial_id"]), "best_epoch": str(best["epoch"])})
    return tags


def train_final(prepared: Any, outcome: dict[str, Any], *, tracking_uri: str, storage: str) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient
    from ray.train import Checkpoint

    from cfcml.metrics import bootstrap_ci, plot_confusion, plot_roc
    from cfcml.training import frame_probs
    from pipelines.pyfunc_model import log_and_register
    from tuning.tracking import log_figure, log_metrics, log_params
    from tuning.trainer import CHECKPOINT_FILE, TEST_FILE, fit

    best = outcome.get("best")
    if not best:
        print("no best configuration: nothing to retrain")
        return {}
    client = MlflowClient(tracking_uri)
    run_id, done = _child_run(client, outcome, "final")
    if done:
        print(f"final model already trained and registered (run {run_id}); nothing to do")
        return {"run_id": run_id}
    epochs = int(best["epoch"])
    print(f"\n=== final model: best configuration retrained on all {len(prepared.dev_frame())} development "
          f"patients for {epochs} epochs, then tested once on {len(prepared.test_frame())} held-out patients ===")
    log_params(client, run_id, {**flatten_dict(best["experiment"]), "final_epochs": epochs})
    result = fit({"experiment": best["experiment"], "prepared_dir": str(prepared.out_dir),
                  "max_epochs": epochs, "final": True},
                 name=f"final_{Path(outcome['search_dir']).name}_{best['trial_id']}",
                 storage_path=str(Path(storage) / "train"), metric=None)
    with Checkpoint(result.checkpoint.path).as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
        test = pd.read_csv(Path(d) / TEST_FILE)
        client.log_artifact(run_id, str(Path(d) / TEST_FILE), "predictions")
    spec = prepared.spec
    probs = frame_probs(test, spec.classes)
    labels = test["label"].to_numpy()
    ci = bootstrap_ci(spec.task, labels, probs, n_boot=1000, seed=0)
    values = {}
    for name, (point, low, high) in ci.items():
        values.update({f"test_{name}": point, f"test_{name}_ci_low": low, f"test_{name}_ci_high": high})
    log_metrics(client, run_id, {**values, **{k: v for k, v in best["metrics"].items() if k.startswith("cv_")}})
    log_figure(client, run_id, plot_roc(labels, probs, list(spec.classes)), "plots/roc_test.png")
    log_figure(client, run_id, plot_confusion(labels, probs, list(spec.classes)), "plots/confusion_test.png")

    print(f"test metrics ({len(labels)} patients, bootstrap 95% CI, 1000 resamples):")
    for name, (point, low, high) in ci.items():
        print(f"  {name:20s} {point:7.4f}  [{low:.4f}, {high:.4f}]")
    fold = state["folds"][0]
    tags = {**_cv_tags(best, outcome["metric"]), "stage": "final",
            **{f"test_{k}": f"{v[0]:.4f} [{v[1]:.4f}, {v[2]:.4f}]" for k, v in ci.items()}}
    info = log_and_register(tracking_uri=tracking_uri, run_id=run_id, prepared=prepared,
                            experiment=best["experiment"],
                            states=[{"model": fold["model"], "normalizer": fold["normalizer"]}],
                            model_name=f"cfcml-{outcome['dataset']}", tags=tags)
    client.set_tag(run_id, "cfcml.registered_version", str(info.registered_model_version))
    client.set_terminated(run_id, "FINISHED")
    print(f"registered cfcml-{outcome['dataset']} version {info.registered_model_version}: "
          f"mlflow.pyfunc.load_model('models:/cfcml-{outcome['dataset']}/{info.registered_model_version}')")
    return {"run_id": run_id, "test": ci, "version": info.registered_model_version}


def register_cv_ensemble(prepared: Any, outcome: dict[str, Any], *, tracking_uri: str) -> dict[str, Any]:
    """Register the best trial's fold models (best CV epoch) as one averaged ensemble."""
    from mlflow.tracking import MlflowClient
    from ray.train import Checkpoint

    from pipelines.pyfunc_model import log_and_register
    from tuning.tracking import log_metrics
    from tuning.trainer import CHECKPOINT_FILE

    best = outcome.get("best")
    if not best or not best.get("checkpoint_path"):
        print("no best checkpoint: nothing to register")
        return {}
    client = MlflowClient(tracking_uri)
    run_id, done = _child_run(client, outcome, "cv-ensemble")
    if done:
        return {"run_id": run_id}
    with Checkpoint(best["checkpoint_path"]).as_directory() as d:
        state = torch.load(Path(d) / CHECKPOINT_FILE, map_location="cpu", weights_only=False)
    states = [{"model": f["model"], "normalizer": f["normalizer"]} for f in state["folds"]]
    log_metrics(client, run_id, {k: v for k, v in best["metrics"].items() if k.startswith("cv_")})
    info = log_and_register(tracking_uri=tracking_uri, run_id=run_id, prepared=prepared,
                            experiment=best["experiment"], states=states,
                            model_name=f"cfcml-{outcome['dataset']}",
                            tags={**_cv_tags(best, outcome["metric"]), "stage": "cv-ensemble"})
    client.set_tag(run_id, "cfcml.registered_version", str(info.registered_model_version))
    client.set_terminated(run_id, "FINISHED")
    print(f"registered the best trial's {len(states)}-fold ensemble as cfcml-{outcome['dataset']} "
          f"version {info.registered_model_version}")
    return {"run_id": run_id, "version": info.registered_model_version}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True)
    p.add_argument("--name", help="the search's name (default <dataset>-default)")
    p.add_argument("--runs-dir", type=Path, default=PROJECT_ROOT / "runs")
    p.add_argument("--address", help="Ray cluster address; default: a local Ray")
    args = p.parse_args(argv)
    storage = args.runs_dir.resolve() / "ray"
    search_dir = storage / (args.name or f"{args.dataset}-default")
    outcome_file = search_dir / OUTCOME_FILE
    if not outcome_file.is_file():
        print(f"error: no finished search at {search_dir} ({OUTCOME_FILE} missing); run tuning/search.py first",
              file=sys.stderr)
        return 2
    outcome = json.loads(outcome_file.read_text())
    import ray

    from cfcml.data.manifest import PreparedDataset

    prepared = PreparedDataset.load(outcome["prepared_dir"])
    ray.init(address=args.address, include_dashboard=False)
    try:
        train_final(prepared, outcome, tracking_uri=outcome["tracking_uri"], storage=str(storage))
    finally:
        ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
