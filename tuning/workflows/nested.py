"""Nested cross-validation, the search command's `--outer-folds K` step: `run_nested`.

For each outer fold k (`tuning.hpo.outer`), one after another on the same Ray session:

1. the outer fold's prepared dataset (`outer_view`) is written under
   `<runs-dir>/nested/<name>/outer<k>`: its development split is the outer-training patients,
   with their own inner folds; its "test" split is the outer-held-out patients; the test split of
   the search's dataset is not in it;
2. the whole search (the same search file, trial count and settings) runs on it as the search
   `<name>-outer<k>` (its own folder, MLflow parent run and `outcome.json`), selecting on the
   inner folds as the ordinary search does;
3. its winner is retrained on all outer-training patients for its selected epoch, as the final
   model is (`TrainJob(final=True)`), and scored once on the outer-held-out patients; nothing is
   registered. The scores and predictions are kept in the outer search's folder (`NESTED_FILE`,
   `HELDOUT_FILE`).

`--resume` reuses every finished step: a scored outer fold, a finished outer search (retrained
only), an interrupted one (resumed). `tuning.evidence.nested` aggregates the folds.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pandas as pd

from cfcml.config import ConfigError
from tuning.evidence.nested import NestedEstimate, OuterFold
from tuning.hpo.run import SearchRun
from tuning.records.outcome import OUTCOME_FILE, SearchOutcome
from tuning.workflows.errors import CommandFailed, CommandInterrupted

if TYPE_CHECKING:
    from ray.tune import Callback

    from cfcml.data.manifest import PreparedDataset

NESTED_FILE = "nested_outer.json"  # in an outer search's folder: its OuterFold, once scored
HELDOUT_FILE = "nested_heldout.csv"  # beside it: the retrained winner's held-out predictions


def outer_name(run: SearchRun, k: int) -> str:
    """The name (and folder under `<runs-dir>/ray`) of outer fold k's search: `<name>-outer<k>`."""
    return f"{run.name}-outer{k}"


def outer_runs(run: SearchRun) -> list[SearchRun]:
    """Each outer fold's search: `run` under its own name, without a final model or outer folds of
    its own; resumed when its folder exists (only with `run.resume`, see `check_outer_folders`)."""
    assert run.outer_folds is not None
    out = []
    for k in range(run.outer_folds):
        name = outer_name(run, k)
        out.append(dataclasses.replace(run, name=name, final=False, outer_folds=None,
                                       resume=(run.storage / name).exists()))
    return out


def check_outer_folders(run: SearchRun) -> None:
    """A new search (no --resume) finds no outer search folder of its name: ConfigError naming the
    first, before anything runs. A resumed one continues them."""
    if not run.outer_folds or run.resume:
        return
    for k in range(run.outer_folds):
        folder = run.storage / outer_name(run, k)
        if folder.exists():
            raise ConfigError(f"--outer-folds: an outer search named {folder.name!r} already exists at {folder}; "
                              f"pass --resume to continue it, or --name to start a new search")


def view_dir(run: SearchRun, k: int) -> Path:
    """Outer fold k's prepared dataset (a manifest over the base dataset's cache)."""
    return run.runs_dir / "nested" / run.name / f"outer{k}"


def run_nested(run: SearchRun, prepared: PreparedDataset, outcome: SearchOutcome | None = None,
               callbacks: list[Callback] | None = None, n_boot: int | None = None) -> NestedEstimate:
    """Run nested cross-validation with `run.outer_folds` outer folds (Ray must be running) and,
    given the ordinary search's `outcome`, log the estimate on its parent run.

    Args:
        run: the ordinary search (its name, settings and `outer_folds`).
        prepared: its prepared dataset; only the development rows are read.
        outcome: the ordinary search's outcome, whose figures stand beside the nested ones and whose
            parent run gets the `nested_*` metrics (each outer search's parent run is tagged
            `cfcml.nested_of` with its id and `cfcml.outer_fold` with k); None to log nothing.
        callbacks: more Tune callbacks for each outer search (e.g. the disk guard).
        n_boot: the CI's bootstrap resamples (default `tuning.evidence.nested.N_BOOT`).

    Returns:
        The `NestedEstimate`.

    Raises:
        ConfigError: `run.outer_folds` unset or below 2, or an outer fold that cannot hold every
            class in its inner folds and its held-out part.
        CommandFailed: an outer search in which no trial scored, or whose winner diverged.
        CommandInterrupted: Ctrl-C in an outer search (its state is saved for --resume).
    """
    from cfcml.training import TrainingDiverged
    from tuning.evidence.nested import N_BOOT, log_nested, nested_estimate
    from tuning.hpo.outer import outer_split, outer_view

    if not run.outer_folds:
        raise ConfigError("--outer-folds: not set")
    outer = outer_split(prepared, run.outer_folds)
    inner = run.experiment.train.folds
    subs = outer_runs(run)
    views = [outer_view(prepared, outer, k, inner, view_dir(run, k)) for k in range(run.outer_folds)]
    _run_outer_folds_at_once(subs, views, callbacks or [], run.verbose)
    folds, predictions = [], []
    for k, (sub, view) in enumerate(zip(subs, views, strict=True)):
        print(f"\n=== nested CV: outer fold {k + 1} of {run.outer_folds}: search {sub.name!r} on "
              f"{len(view.dev_frame())} outer-training patients ({inner} inner folds) ===")
        try:
            fold, heldout = _outer_fold(sub, view, k, callbacks or [])
        except TrainingDiverged as exc:
            raise CommandFailed(f"nested CV, outer fold {k}: {exc}") from None
        folds.append(fold)
        predictions.append(heldout)
    spec = prepared.spec
    nested = nested_estimate(spec.task, spec.classes, run.metric(spec), folds, predictions,
                             n_boot=N_BOOT if n_boot is None else n_boot)
    if outcome is not None:
        from mlflow.tracking import MlflowClient

        from tuning.hpo.driver import SearchState

        client = MlflowClient(outcome.tracking_uri)
        log_nested(client, outcome.parent_run_id, nested, outcome)
        for k, sub in enumerate(outer_runs(run)):  # each outer search's parent run names the search it serves
            state = SearchState.load(sub.search_dir)
            if state is not None and state.tracking_uri == outcome.tracking_uri:
                client.set_tag(state.parent_run_id, "cfcml.nested_of", outcome.parent_run_id)
                client.set_tag(state.parent_run_id, "cfcml.outer_fold", str(k))
    return nested


def _run_outer_folds_at_once(subs: list[SearchRun], views: list[PreparedDataset], callbacks: list,
                             verbose: bool) -> None:
    """The outer folds not scored yet, each in a child process joined to the cluster, at once as its
    trial slots allow (`tuning.runtime.concurrent`); nothing when the cluster runs one trial at a
    time or one fold is left (`run_nested` then runs them here, one after another). Each fold's
    records land in its search folder, where `run_nested` reads them."""
    from tuning.hpo.tuner import open_store, trial_concurrency
    from tuning.runtime.concurrent import SearchJob, run_concurrently
    from tuning.workflows.errors import raise_child_failures

    todo = [k for k, sub in enumerate(subs)
            if not ((sub.search_dir / NESTED_FILE).is_file() and (sub.search_dir / HELDOUT_FILE).is_file())]
    slots = trial_concurrency(subs[0].experiment.train) if len(todo) > 1 else 1
    if slots < 2:
        return
    open_store(subs[0])
    print(f"\n=== nested CV: the searches of outer folds {', '.join(str(k) for k in todo)}, "
          f"{min(slots, len(todo))} at once ({slots} trial slots shared out) ===")
    jobs = [SearchJob(f"outer {k}", outer_fold_job, (subs[k], str(views[k].out_dir), k, callbacks)) for k in todo]
    raise_child_failures(run_concurrently(jobs, slots, verbose=verbose), "outer fold",
                         "the same command plus --resume continues them")


def outer_fold_job(sub: SearchRun, view_dir: str, k: int, callbacks: list, max_concurrent: int | None = None) -> None:
    """Outer fold k in a child process (`tuning.runtime.concurrent`): `_outer_fold` on the view in
    `view_dir` with `max_concurrent` trials at once; its records stay in its search folder."""
    from cfcml.data.manifest import PreparedDataset
    from cfcml.training import TrainingDiverged

    try:
        _outer_fold(dataclasses.replace(sub, max_concurrent=max_concurrent), PreparedDataset.load(view_dir), k,
                    callbacks)
    except TrainingDiverged as exc:
        raise CommandFailed(f"nested CV, outer fold {k}: {exc}") from None


def _outer_fold(sub: SearchRun, view: PreparedDataset, k: int, callbacks: list) -> tuple[OuterFold, pd.DataFrame]:
    """Outer fold k: its search (reused, resumed or new), then its winner retrained and scored once."""
    folder = sub.search_dir
    record, heldout_file = folder / NESTED_FILE, folder / HELDOUT_FILE
    if record.is_file() and heldout_file.is_file():
        print(f"outer fold {k}: scored already ({record}); reused")
        return OuterFold.from_dict(json.loads(record.read_text(encoding="utf-8"))), pd.read_csv(heldout_file)
    if (folder / OUTCOME_FILE).is_file():
        outcome = SearchOutcome.load(folder / OUTCOME_FILE)
    else:
        outcome = _search(sub, view, callbacks)
    best = outcome.best
    if best is None or best.experiment is None:
        raise CommandFailed(f"nested CV, outer fold {k}: no trial of search {sub.name!r} produced a score")
    heldout = _retrain_and_score(sub, view, outcome)
    from cfcml.evaluation.metrics import compute_metrics
    from cfcml.training import frame_probs

    spec = view.spec
    metrics = compute_metrics(spec.task, heldout["label"].to_numpy(), frame_probs(heldout, spec.classes))
    fold = OuterFold(fold=k, search=sub.name, train_patients=len(view.dev_frame()), heldout_patients=len(heldout),
                     trial_id=best.trial_id, epoch=best.epoch, params=dict(best.params),
                     selected_score=float(best.score) if best.score is not None else float("nan"),
                     metrics={n: float(v) for n, v in metrics.items()})
    heldout.to_csv(heldout_file, index=False)
    record.write_text(json.dumps(fold.to_dict(), indent=1), encoding="utf-8")
    return fold, heldout


def _search(sub: SearchRun, view: PreparedDataset, callbacks: list) -> SearchOutcome:
    from tuning.hpo import driver
    from tuning.hpo.driver import SearchState

    state = SearchState.load(sub.search_dir) if sub.resume else None
    changed = state.changed(sub.settings(view.fingerprint)) if state is not None else []
    if changed:  # as `tuning.workflows.search.check_resume` refuses the ordinary search's
        raise ConfigError(f"--resume: outer search {sub.name!r} was started with other settings "
                          f"({'; '.join(changed)}); resume it with the settings it started with, or start a new "
                          f"search with --name")
    try:
        return driver.run_search(sub, view, callbacks=callbacks)
    except driver.SearchInterrupted as exc:
        raise CommandInterrupted(str(exc), apart=True) from None


def _retrain_and_score(sub: SearchRun, view: PreparedDataset, outcome: SearchOutcome) -> pd.DataFrame:
    """The winner retrained on every outer-training patient for its selected epoch, as the final
    model is (`TrainJob(final=True)`), predicting the outer-held-out patients once after its last
    epoch: those predictions (patient_id, label, prob_<class>)."""
    from tuning.hpo.trainer import TrainJob, fit, ray_train_name
    from tuning.records.checkpoints import open_checkpoint
    from tuning.records.state_files import repair_train_snapshots

    best = outcome.best
    assert best is not None and best.experiment is not None  # _outer_fold checked both
    print(f"outer winner (trial {best.trial_id}) retrained on {len(view.dev_frame())} outer-training patients for "
          f"{best.epoch} epochs, scored once on {len(view.test_frame())} outer-held-out patients")
    job = TrainJob(best.experiment, str(view.out_dir), best.epoch, final=True, predict_test=True)
    name = ray_train_name(f"retrain_{sub.name}_{best.trial_id}")
    storage = sub.storage / "train"
    repair_train_snapshots([storage / name])
    result = fit(job, name=name, storage_path=str(storage), metric=None, label=f"{sub.name} winner")
    with open_checkpoint(result.checkpoint.path) as ckpt:
        return ckpt.test_predictions()
