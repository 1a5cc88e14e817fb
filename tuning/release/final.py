"""The final stage of a search: retrain the best configuration on all development data, test it
once, register it (or register the best trial's fold ensemble without testing).

Choice: one model retrained on all development data (not the fold ensemble), for as many
epochs as the best trial's best CV epoch, so that model selection stays on validation folds and
the final model has seen every development patient. The held-out test split is read here and
only here, once, after training; metrics come with bootstrap 95% confidence intervals. The model
is registered as `cfcml-<dataset>` with its CV and test metrics.

`register_cv_ensemble` registers the best trial's fold ensemble instead (`search.py --no-final`):
no test evaluation happens then. Both return a `Release`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cfcml.data.manifest import PreparedDataset
from cfcml.evaluation import metric_keys
from cfcml.evaluation.metrics import Estimate, format_estimate
from tuning.records.outcome import SELECTED_NOTE, SearchOutcome, TrialResult, published_cv

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient

    from cfcml.evaluation.calibrator import Calibrator
    from tuning.evidence.clinical import ClinicalEvidence
    from tuning.records.checkpoints import FoldWeights

REGISTERED_TAG = "cfcml.registered_version"
CV_ONLY = metric_keys.prefixes(metric_keys.CV)  # what a registered model publishes of its search: cv_* only
STAGES = ("final", "cv-ensemble")


@dataclass(frozen=True)
class Release:
    """What the last step of a search registered (`train_final`, `register_cv_ensemble`).

    Args:
        stage: "final" (the best configuration retrained on all development rows, tested once) or
            "cv-ensemble" (the best trial's fold models, probabilities averaged; `search.py --no-final`).
        run_id: its MLflow run (tag `cfcml.kind` = `stage`, a child of the search's parent run).
        model_name: the registered model, `cfcml-<dataset>`.
        version: the registry's version of it.
        test: the test metrics with their bootstrap 95% CIs (1000 resamples over patients), as this
            call measured them; None when it did not test (a cv-ensemble, or a final model that an
            earlier run of the step registered: its figures are on that run).
        evidence: the clinical evidence on the test split (`tuning.evidence.clinical`); None without
            a test evaluation in this call, or when it failed (the model is registered uncalibrated).
        card: the model card (markdown) this call wrote; None when the model was registered earlier.
        reused: the registry held this run's model already: nothing was trained, tested or written.

    Raises:
        ValueError: `stage` not one of `STAGES`; test figures or evidence on a "cv-ensemble" (that
            step never reads the test split).
    """

    stage: str
    run_id: str
    model_name: str
    version: str
    test: dict[str, Estimate] | None = None
    evidence: ClinicalEvidence | None = None
    card: str | None = None
    reused: bool = False

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"Release.stage: {self.stage!r} is not one of {STAGES}")
        if self.stage == "cv-ensemble" and (self.test is not None or self.evidence is not None):
            raise ValueError("Release.test: a cv-ensemble is never tested (the test split is read only by the final "
                             "model), yet test figures or evidence were given")

    @property
    def test_split_used(self) -> bool:
        """Whether the held-out test split was read for this model (now or by an earlier run of the
        step): only a final model's is; a cv-ensemble's step never reads it."""
        return self.stage == "final"


def registered_version(client: MlflowClient, run_id: str, model_name: str,
                       tags: dict[str, str] | Callable[[str], dict[str, str]] | None = None) -> str | None:
    """The registry's version of `run_id`'s model under `model_name`, read from the registry (the
    run's `cfcml.registered_version` tag only says that one was registered once).

    A version deleted from the registry (the model or the version, e.g. in the UI) is found again
    if another version of the same run remains, else the run's logged model (`runs:/<id>/model`)
    is registered again, tagged with `tags`; both are said on the console. Returns None when the
    run has no registration to restore (never registered, or no logged model left): the caller
    then trains and registers it.
    """
    from mlflow.exceptions import MlflowException

    from tuning.tracking.store import filter_literal

    tagged = client.get_run(run_id).data.tags.get(REGISTERED_TAG)
    if tagged is None:
        return None
    try:
        if client.get_model_version(model_name, tagged).run_id == run_id:
            return tagged
    except MlflowException:
        pass
    versions = client.search_model_versions(
        f"name = {filter_literal(model_name)} and run_id = {filter_literal(run_id)}")
    if versions:
        version = str(max(int(v.version) for v in versions))
        print(f"{model_name} version {tagged} of run {run_id} is not in the registry; version {version} of the "
              f"same run is")
    else:
        print(f"{model_name} version {tagged} of run {run_id} is gone from the registry (deleted); registering "
              f"the run's logged model again")
        import mlflow

        try:
            mlflow.set_tracking_uri(client.tracking_uri)
            version = str(mlflow.register_model(f"runs:/{run_id}/model", model_name).version)
        except MlflowException as exc:
            print(f"the run's logged model cannot be registered ({exc.message.splitlines()[0][:200]}); "
                  f"training and registering it again")
            return None
        for key, value in ((tags(run_id) if callable(tags) else tags) or {}).items():
            client.set_model_version_tag(model_name, version, key, value)
    client.set_tag(run_id, REGISTERED_TAG, version)
    return version


def _child_run(client: MlflowClient, outcome: SearchOutcome, kind: str, prepared: PreparedDataset,
               tags: dict[str, str] | Callable[[str], dict[str, str]] | None = None) -> tuple[str, str | None]:
    """The search's `kind` run (final / cv-ensemble): reused if it exists, with its source tags and
    the prepared dataset as input. Returns (run id, registered version): the version when the
    registry holds its model (`registered_version`, which registers a deleted one again with
    `tags`), else None."""
    from tuning.tracking.store import find_run, log_provenance

    run_id = find_run(client, outcome.experiment_id, **{"cfcml.search": outcome.search_dir, "cfcml.kind": kind})
    if run_id is not None:
        version = registered_version(client, run_id, f"cfcml-{outcome.dataset}", tags)
        if version is None:
            from tuning.tracking.lifecycle import reopen_run

            reopen_run(client, run_id)
        return run_id, version
    run = client.create_run(outcome.experiment_id, run_name=kind, tags={
        "mlflow.parentRunId": outcome.parent_run_id, "cfcml.search": outcome.search_dir, "cfcml.kind": kind,
    })
    log_provenance(client, run.info.run_id, prepared)
    return run.info.run_id, None


def _cv_tags(best: TrialResult, metric: str) -> dict[str, str]:
    """The model version's CV tags: `selected_cv_*` (optimistic: the maximum over epochs and
    trials) and `last_epoch_cv_*`, named by `published_cv`, with a note saying which is which."""
    tags = {k: f"{v:.4f}" for k, v in published_cv(best, CV_ONLY).items()}
    tags.update({"selection_metric": metric, "best_trial": best.trial_id, metric_keys.SELECTED_EPOCH: str(best.epoch),
                 metric_keys.SELECTED_FIGURES: SELECTED_NOTE})
    return tags


def train_final(prepared: PreparedDataset, outcome: SearchOutcome, *, storage: str | Path,
                explain: bool = False) -> Release | None:
    """Retrain `outcome.best` on all development rows, test once, register. Idempotent: a search
    whose final model is registered already is left alone (`Release.reused`).

    Args:
        prepared: the dataset the search ran on.
        outcome: the finished search.
        storage: the search's Ray storage folder (`<runs-dir>/ray`); the Ray Train run goes under
            its `train/`.
        explain: also log Grad-CAM and field-occlusion figures of a few test patients on the final
            run (`--explain-test-patients`). Off by default: those figures show patients' images and
            clinical fields, and anyone who can read the MLflow store can see them.

    Returns:
        The `Release` (stage "final"); None when the search has no best configuration.

    Raises:
        cfcml.training.TrainingDiverged: the configuration diverged on all development data (the
            final run is FAILED with the reason).
    """
    from mlflow.tracking import MlflowClient

    from tuning.tracking.lifecycle import owned_run

    best = outcome.best
    if best is None or best.experiment is None:
        print("no best configuration: nothing to retrain")
        return None
    client = MlflowClient(outcome.tracking_uri)

    def tags_from_run(run_id: str) -> dict[str, str]:  # the version tags, if it is registered again
        metrics = client.get_run(run_id).data.metrics
        return {**_cv_tags(best, outcome.metric), "stage": "final",
                **{k: format_estimate((v, metrics.get(metric_keys.ci_low(k), math.nan),
                                       metrics.get(metric_keys.ci_high(k), math.nan)), 4)
                   for k, v in metrics.items() if metric_keys.is_kind(k, metric_keys.TEST)
                   and not k.endswith((metric_keys.CI_LOW, metric_keys.CI_HIGH))}}

    run_id, version = _child_run(client, outcome, "final", prepared, tags_from_run)
    if version is not None:
        print(f"final model already trained and registered (run {run_id}); nothing to do")
        return Release("final", run_id, f"cfcml-{outcome.dataset}", version, reused=True)
    with owned_run(client, run_id):  # FINISHED, or FAILED/KILLED with the reason, never left RUNNING
        return _train_final(client, run_id, prepared, outcome, best, storage, explain)


def _train_final(client: MlflowClient, run_id: str, prepared: PreparedDataset, outcome: SearchOutcome,
                 best: TrialResult, storage: str | Path, explain: bool) -> Release:
    from cfcml.config import flatten_dict
    from cfcml.evaluation.metrics import bootstrap_ci, plot_confusion, plot_roc
    from cfcml.training import frame_probs
    from tuning.hpo.trainer import TrainJob, fit, ray_train_name
    from tuning.records.checkpoints import TEST_FILE, open_checkpoint
    from tuning.release.served_model import log_and_register
    from tuning.tracking.callbacks import TrainRunTracker
    from tuning.tracking.store import log_figure, log_metrics, log_params

    assert best.experiment is not None  # train_final checked it
    print(f"\n=== final model: best configuration retrained on all {len(prepared.dev_frame())} development "
          f"patients for {best.epoch} epochs, then tested once on {len(prepared.test_frame())} held-out patients ===")
    log_params(client, run_id, {**flatten_dict(best.experiment.to_dict()), "final_epochs": best.epoch})
    from tuning.records.state_files import repair_train_snapshots

    job = TrainJob(best.experiment, str(prepared.out_dir), best.epoch, final=True, predict_test=True)
    name = ray_train_name(f"final_{Path(outcome.search_dir).name}_{best.trial_id}")
    repair_train_snapshots([Path(storage) / "train" / name])  # a rerun after a full disk or a crash
    result = fit(job, name=name,
                 storage_path=str(Path(storage) / "train"), metric=None,
                 callbacks=[TrainRunTracker(outcome.tracking_uri, run_id)])  # per-epoch loss, system metrics
    with open_checkpoint(result.checkpoint.path) as ckpt:
        test = ckpt.test_predictions()
        client.log_artifact(run_id, str(ckpt.file(TEST_FILE)), "predictions")
        (weights,) = ckpt.fold_weights()
    spec = prepared.spec
    probs = frame_probs(test, spec.classes)
    labels = test["label"].to_numpy()
    ci = bootstrap_ci(spec.task, labels, probs, n_boot=1000, seed=0)
    values = {}
    for name, (point, low, high) in ci.items():
        key = metric_keys.test(name)
        values.update({key: point, metric_keys.ci_low(key): low, metric_keys.ci_high(key): high})
    log_metrics(client, run_id, {**values, **published_cv(best, CV_ONLY)})  # test next to labelled CV
    log_figure(client, run_id, plot_roc(labels, probs, list(spec.classes)), "plots/roc_test.png")
    log_figure(client, run_id, plot_confusion(labels, probs, list(spec.classes)), "plots/confusion_test.png")

    figures = {name: Estimate.of(v) for name, v in ci.items()}
    print(f"test metrics ({len(labels)} patients, bootstrap 95% CI, 1000 resamples):")
    for name, estimate in figures.items():
        print(f"  {name:20s} {estimate:.4f}")
    evidence = _clinical(client, run_id, prepared, best, test, weights)
    tags = {**_cv_tags(best, outcome.metric), "stage": "final",
            **{metric_keys.test(k): format_estimate(v, 4) for k, v in figures.items()}}
    info = log_and_register(tracking_uri=outcome.tracking_uri, run_id=run_id, prepared=prepared,
                            experiment=best.experiment, members=[weights],
                            model_name=f"cfcml-{outcome.dataset}", tags=tags,
                            calibrator=evidence.calibrator if evidence else None)
    version = str(info.registered_model_version)
    card = _card(client, run_id, prepared, outcome, "final", version, figures, evidence,
                 evidence.calibrator if evidence else None)
    client.set_tag(run_id, "cfcml.registered_version", version)
    print(f"registered cfcml-{outcome.dataset} version {version}: "
          f"mlflow.pyfunc.load_model('models:/cfcml-{outcome.dataset}/{version}')")
    if explain:
        _explain(client, run_id, prepared, best, weights)
    client.set_terminated(run_id, "FINISHED")
    return Release("final", run_id, f"cfcml-{outcome.dataset}", version, test=figures, evidence=evidence,
                   card=card)


def _clinical(client: MlflowClient, run_id: str, prepared: PreparedDataset, best: TrialResult, test: pd.DataFrame,
              weights: FoldWeights) -> ClinicalEvidence | None:
    """Calibration, operating points, decision curves, subgroups and withheld inputs
    (tuning/evidence/clinical.py), logged under clinical/ and printed; None when the best trial's
    out-of-fold predictions are gone."""
    from tuning.evidence.clinical import (
        calibration_table,
        decision_table,
        final_evidence,
        log_evidence,
        operating_table,
    )
    try:
        evidence = final_evidence(prepared, best, test, weights)
    except Exception as exc:  # the model is trained and tested: register it (uncalibrated), say why
        client.set_tag(run_id, "cfcml.clinical_error", f"{type(exc).__name__}: {exc}"[:500])
        print(f"warning: clinical evidence failed ({type(exc).__name__}: {exc}); the model is registered "
              "without calibration or operating points")
        return None
    if evidence is None:
        return None
    names = metric_keys.headline_metrics(prepared.spec.task, len(prepared.spec.classes))
    log_evidence(client, run_id, evidence, names[:2])
    for title, table in (("calibration", calibration_table), ("operating points", operating_table),
                         ("decision curves", decision_table)):
        print(f"\n{title}:\n" + "\n".join(table(evidence)))
    return evidence


def _card(client: MlflowClient, run_id: str, prepared: PreparedDataset, outcome: SearchOutcome, stage: str,
          version: str, test: dict[str, Estimate] | None, evidence: ClinicalEvidence | None,
          calibrator: Calibrator | None) -> str:
    """The model card (tuning/release/model_card.py) on the run and as the registered version's description."""
    from tuning.release.model_card import CARD_FILE, CardInputs, log_card, model_card

    best = outcome.best
    assert best is not None and best.experiment is not None  # the callers checked both
    train = best.experiment.train
    text = model_card(CardInputs(f"cfcml-{outcome.dataset}", version, stage, prepared, outcome, best, test, evidence,
                                 calibrator, run_id, train.modality_dropout, train.field_dropout))
    log_card(client, run_id, text, f"cfcml-{outcome.dataset}", version)
    print(f"model card: {CARD_FILE} on run {run_id} and the description of cfcml-{outcome.dataset} version {version}")
    return text


def _explain(client: MlflowClient, run_id: str, prepared: PreparedDataset, best: TrialResult,
             weights: FoldWeights) -> None:
    """Grad-CAM and field-occlusion figures of the registered final model on a few of the test
    patients it was just evaluated on (tuning/release/explain.py). Only for looking: they select nothing.
    A failure is reported and tagged on the run, never raised: the model is registered already."""
    try:
        from tuning.release.explain import ARTIFACT_DIR, log_explanations

        assert best.experiment is not None  # train_final checked it
        names = log_explanations(client, run_id, prepared, best.experiment, weights, prepared.test_frame())
        print(f"explanations: {len(names)} files under {ARTIFACT_DIR}/ on the final run")
    except Exception as exc:
        client.set_tag(run_id, "cfcml.explain_error", f"{type(exc).__name__}: {exc}"[:500])
        print(f"warning: explanations failed ({type(exc).__name__}: {exc}); the registered model is unaffected")


def register_cv_ensemble(prepared: PreparedDataset, outcome: SearchOutcome) -> Release | None:
    """Register the best trial's fold models (its selected epoch) as one averaged ensemble; the
    test split is not read. Idempotent, as `train_final`.

    Returns:
        The `Release` (stage "cv-ensemble", no test figures); None when the search has no best
        checkpoint.
    """
    from mlflow.tracking import MlflowClient

    from tuning.tracking.lifecycle import owned_run

    best = outcome.best
    if best is None or not best.checkpoint_path or best.experiment is None:
        print("no best checkpoint: nothing to register")
        return None
    client = MlflowClient(outcome.tracking_uri)
    run_id, version = _child_run(client, outcome, "cv-ensemble", prepared,
                                 {**_cv_tags(best, outcome.metric), "stage": "cv-ensemble"})
    if version is not None:
        return Release("cv-ensemble", run_id, f"cfcml-{outcome.dataset}", version, reused=True)
    with owned_run(client, run_id):
        return _register_cv_ensemble(client, run_id, prepared, outcome, best)


def _register_cv_ensemble(client: MlflowClient, run_id: str, prepared: PreparedDataset, outcome: SearchOutcome,
                          best: TrialResult) -> Release:
    from tuning.evidence.clinical import best_trial_calibrator
    from tuning.records.checkpoints import open_checkpoint
    from tuning.release.served_model import log_and_register
    from tuning.tracking.store import log_metrics

    assert best.checkpoint_path and best.experiment is not None  # register_cv_ensemble checked both
    with open_checkpoint(best.checkpoint_path) as ckpt:
        members = ckpt.fold_weights()
    log_metrics(client, run_id, published_cv(best, CV_ONLY))
    fitted = best_trial_calibrator(prepared.spec, best)  # the fold models' own out-of-fold predictions
    calibrator = fitted[0] if fitted else None
    info = log_and_register(tracking_uri=outcome.tracking_uri, run_id=run_id, prepared=prepared,
                            experiment=best.experiment, members=members,
                            model_name=f"cfcml-{outcome.dataset}",
                            tags={**_cv_tags(best, outcome.metric), "stage": "cv-ensemble"}, calibrator=calibrator)
    version = str(info.registered_model_version)
    card = _card(client, run_id, prepared, outcome, "cv-ensemble", version, None, None, calibrator)
    client.set_tag(run_id, "cfcml.registered_version", version)
    client.set_terminated(run_id, "FINISHED")
    print(f"registered the best trial's {len(members)}-fold ensemble as cfcml-{outcome.dataset} "
          f"version {version}")
    return Release("cv-ensemble", run_id, f"cfcml-{outcome.dataset}", version, card=card)
