"""The search driver: Ray Tune + Optuna (TPE) + ASHA over lockstep cross-validation folds.

`run_search` takes a resolved `SearchRun` and a prepared dataset, owns the search's MLflow parent
run and its state file, runs the Tuner (or restores it with `run.resume`) and returns the
`SearchOutcome`. Ray must be running (`tuning.runtime.ray_cluster.ray_session`). The final model is the
caller's next step (`tuning.release.final`).
"""
from __future__ import annotations

import json
import numbers
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfcml.data.manifest import PreparedDataset
from cfcml.evaluation import metric_keys
from tuning.hpo.run import SearchRun
from tuning.hpo.trial import run_trial
from tuning.records.outcome import (
    FRONT_RULE,
    OUTCOME_FILE,
    SELECTED_NOTE,
    EpochReport,
    EpochSelection,
    SearchOutcome,
    TrialResult,
    lineage,
    published_cv,
    selected_key,
)

if TYPE_CHECKING:
    import pandas as pd
    from mlflow.tracking import MlflowClient
    from ray.tune import Callback, ResultGrid

STATE_FILE = "cfcml_search.json"
STATE_SAVE_PERIOD_S = "5"  # Tune's experiment state, see run_search
REPORT_EVERY_S = 60  # Tune's status table on the console at most this often (one line per finished trial besides)


class SearchInterrupted(RuntimeError):
    """The user stopped the search; its state is saved for --resume."""


@dataclass
class SearchState:
    """What a resumed search must find again: written when the search starts."""

    parent_run_id: str
    tracking_uri: str
    experiment_id: str
    settings: dict[str, Any] | None = None  # SearchRun.settings: what --resume must find again

    @classmethod
    def load(cls, search_dir: Path) -> SearchState | None:
        path = search_dir / STATE_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        return cls(data["parent_run_id"], data["tracking_uri"], data["experiment_id"], data.get("settings"))

    def changed(self, settings: dict[str, Any]) -> list[str]:
        """'KEY: RECORDED recorded, NOW now' per resolved setting that differs from the recorded
        ones, less those a resume may change (`tuning.hpo.run.RESUME_MAY_CHANGE`). Empty for a state
        file written before settings were recorded (nothing to compare)."""
        from tuning.hpo.run import RESUME_MAY_CHANGE

        if self.settings is None:
            return []
        missing = "<not set>"
        return [f"{key}: {self.settings.get(key, missing)!r} recorded, {settings.get(key, missing)!r} now"
                for key in sorted(set(self.settings) | set(settings))
                if key not in RESUME_MAY_CHANGE and self.settings.get(key, missing) != settings.get(key, missing)]

    def save(self, search_dir: Path) -> None:
        search_dir.mkdir(parents=True, exist_ok=True)
        (search_dir / STATE_FILE).write_text(json.dumps(asdict(self), indent=1), encoding="utf-8")


def _start_parent(run: SearchRun, prepared: PreparedDataset, tracking_uri: str, metric: str) -> SearchState:
    """Create the search's parent run and write the state file. A parent run of this search that
    never got its parameters (the driver was killed between creating it and writing the state file)
    is reused rather than duplicated; a finished one (a search folder deleted to start over) is not."""
    from mlflow.tracking import MlflowClient

    from tuning.hpo.tuner import create_parent_run, log_parent_inputs
    from tuning.tracking.lifecycle import ends_on_error
    from tuning.tracking.store import write_json_artifact

    client = MlflowClient(tracking_uri)
    parent = create_parent_run(client, run.runs_dir, run.dataset, run.name, kind="search", group=str(run.search_dir),
                               prepared=prepared, reuse_without_param="search")
    state = SearchState(parent.run_id, tracking_uri, parent.experiment_id, run.settings(prepared.fingerprint))
    with ends_on_error(client, parent.run_id):  # a failure from here on leaves the run FAILED, not RUNNING
        state.save(run.search_dir)
        t = run.experiment.train
        log_parent_inputs(client, state.parent_run_id, prepared, {
            "search": run.search.name, "num_samples": run.num_samples, "max_epochs": run.max_epochs,
            "folds": t.folds, "fold_seed": prepared.fold_seed, "seed": t.seed, "metric": metric,
            "dataset_fingerprint": prepared.fingerprint, "git_commit": parent.git_commit, "workers": t.workers,
            "gpus_per_worker": t.gpus_per_worker,
        })
        write_json_artifact(client, state.parent_run_id, {
            "search": {k: v for k, v in asdict(run.search).items() if k != "space"},
            "space": [asdict(p) for p in run.search.space],
            "experiment": run.experiment.to_dict(),
        }, "search_config.json")
    return state


def search_algorithms(run: SearchRun, target: str) -> tuple[Any, Any]:
    """The search's OptunaSearch (TPE, or random) and ASHA scheduler, both maximising `target`
    (the Tuner's metric too: `selected_key` of the selection metric).

    A multi-objective search (`SearchConfig.objectives`, two or more): Optuna's study has one
    direction per objective and receives `run.objective_keys` of each finished trial (TPE in Optuna
    5 models several objectives; random stays random); Optuna gets no intermediate values then
    (Ray's OptunaSearch reports none for several objectives). ASHA compares one scalar, so it stops
    trials on the primary objective alone (`target`), and holds its own metric and mode: the Tuner
    gets none, which would overwrite the searcher's list (docs/configuration.md, "Several objectives")."""
    import optuna
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from tuning.hpo.space import initial_point

    seed = run.experiment.train.seed
    sampler = optuna.samplers.RandomSampler(seed=seed) if run.search.searcher == "random" else \
        optuna.samplers.TPESampler(seed=seed, n_startup_trials=run.search.tpe_startup_trials(run.num_samples))
    multi = run.search.multi_objective
    searcher = OptunaSearch(
        metric=run.objective_keys if multi else target,
        mode=[metric_keys.objective_mode(n) for n in run.search.objectives] if multi else "max", sampler=sampler,
        points_to_evaluate=[initial_point(run.search, run.experiment)] if run.search.space else None,
    )
    # stop_last_trials=False: a trial at its last epoch ends by itself, its Ray Train run shut down
    # in order. Stopped by Tune at that moment instead, its controller could die mid-shutdown and
    # leave its workers' CPUs reserved (tuning.runtime.placement_groups), the next trial waiting for them.
    scheduler = ASHAScheduler(time_attr="epoch", max_t=run.max_epochs,
                              metric=target if multi else None, mode="max" if multi else None,
                              grace_period=min(run.search.grace_period, run.max_epochs),
                              reduction_factor=run.search.reduction_factor, stop_last_trials=False)
    return searcher, scheduler


def run_search(run: SearchRun, prepared: PreparedDataset, callbacks: list[Callback] | None = None) -> SearchOutcome:
    """Run (or, with `run.resume`, continue) the search; raises SearchInterrupted on Ctrl-C.
    `callbacks`: more Tune callbacks (e.g. `tuning.tracking.lifecycle.DiskGuard`) for a new search.
    However it ends, the parent run and its trial runs are left FINISHED, FAILED or KILLED with
    the reason as a tag (`tuning.tracking.lifecycle`)."""
    from mlflow.tracking import MlflowClient

    from tuning.tracking.lifecycle import owned_run, reopen_run
    from tuning.tracking.store import default_tracking_uri

    metric = run.metric(prepared.spec)
    state = SearchState.load(run.search_dir) if run.resume else None
    if state is None:
        state = _start_parent(run, prepared, run.tracking_uri or default_tracking_uri(run.runs_dir), metric)
    client = MlflowClient(state.tracking_uri)
    reopen_run(client, state.parent_run_id)
    # The parent run and its trial runs end FINISHED, FAILED or KILLED however this ends.
    with owned_run(client, state.parent_run_id, children=True):
        return _run_tuner(run, prepared, state, client, metric, callbacks or [])


def _run_tuner(run: SearchRun, prepared: PreparedDataset, state: SearchState, client: MlflowClient,
               metric: str, callbacks: list[Callback]) -> SearchOutcome:
    from ray import tune

    from tuning.hpo.tuner import build_trainable, build_tuner, fit_tuner, trial_concurrency
    from tuning.tracking.callbacks import SearchTracker
    from tuning.tracking.lifecycle import end_children, end_run
    from tuning.tracking.store import dataset_entity, log_metrics, write_json_artifact

    spec = prepared.spec

    # ASHA, Optuna and the choice of the best trial all act on the trial's maximum over its epochs
    # so far (`selected_key`), the figure the platform selects on (docs/evaluation.md). Ray Train
    # still ranks a trial's checkpoints by the epoch's own `metric`, so the selected epoch's is kept.
    target = selected_key(metric)
    trainable = build_trainable(run_trial, run=run, prepared_dir=str(prepared.out_dir), metric=metric)
    tracker = SearchTracker(state.tracking_uri, state.experiment_id, state.parent_run_id, str(run.search_dir),
                            metric, list(spec.classes), spec.task, dataset=dataset_entity(prepared))
    if run.resume and tune.Tuner.can_restore(str(run.search_dir)):
        tuner = tune.Tuner.restore(str(run.search_dir), trainable=trainable, resume_errored=True)
    else:
        searcher, scheduler = search_algorithms(run, target)
        multi = run.search.multi_objective  # the scheduler and the searcher hold their own metrics then
        reporter = tune.CLIReporter(
            metric_columns={"epoch": "epoch", metric: metric, target: target,
                            **{k: k for k in run.objective_keys[1:]},
                            metric_keys.TRAIN_LOSS: metric_keys.TRAIN_LOSS},
            parameter_columns=run.search.keys, max_report_frequency=REPORT_EVERY_S, sort_by_metric=True,
            metric=target if multi else None, mode="max" if multi else None,
        )
        tuner = build_tuner(
            trainable,
            param_space=run.search.param_space(),
            tune_config=tune.TuneConfig(
                metric=None if multi else target, mode=None if multi else "max",
                search_alg=searcher, scheduler=scheduler,
                num_samples=run.num_samples,
                max_concurrent_trials=run.max_concurrent or trial_concurrency(run.experiment.train),
            ),
            name=run.name, storage_path=str(run.storage), callbacks=[tracker, *callbacks], reporter=reporter,
            stall_s=run.experiment.train.stall_timeout_s,
        )
    # TUNE_GLOBAL_CHECKPOINT_S: save the experiment state (what --resume continues from) at most
    # every 5 s rather than Tune's automatic 10 s or more, so a driver killed outright (SIGKILL, a
    # lost node) leaves a state that knows every trial that had finished 5 s before. Tune has no
    # save-on-trial-end hook; a trial's start-up alone (Ray Train controller, worker, data) takes
    # longer than 5 s, so the trial after a finished one has not reported an epoch before the
    # state knows the finished one. Every second (before) cost the driver a save per second.
    results = fit_tuner(tuner, TUNE_GLOBAL_CHECKPOINT_S=STATE_SAVE_PERIOD_S)
    finished = finished_trials(run.search_dir)
    if finished < run.num_samples:
        # Ctrl-C: Tune saved its state (unfinished trials as they were), stopped them and returned.
        reason = f"interrupted with {finished} of {run.num_samples} trials finished; --resume continues it"
        end_run(client, state.parent_run_id, "KILLED", reason)
        # Tune marks the interrupted trials terminated without calling the tracker's end of trial
        end_children(client, state.experiment_id, state.parent_run_id, "KILLED", reason)
        raise SearchInterrupted(f"search {run.name!r} interrupted with {finished} of {run.num_samples} trials "
                                f"finished; continue it with the same command plus --resume")
    outcome = SearchOutcome(
        dataset=run.dataset, metric=metric, trials=collect_trials(results, metric, run),
        search_dir=str(run.search_dir), prepared_dir=str(prepared.out_dir), tracking_uri=state.tracking_uri,
        experiment_id=state.experiment_id, parent_run_id=state.parent_run_id, searched=run.search.keys,
        objectives=list(run.search.objectives) if run.search.multi_objective else [],
    )
    outcome.save(run.search_dir / OUTCOME_FILE)
    best = outcome.best
    if best:
        log_metrics(client, state.parent_run_id, published_cv(best))
        client.set_tag(state.parent_run_id, "cfcml.best_trial", best.trial_id)
        client.set_tag(state.parent_run_id, f"cfcml.{metric_keys.SELECTED_FIGURES}", SELECTED_NOTE)
        write_json_artifact(client, state.parent_run_id, best.to_dict(), "best_configuration.json")
        if outcome.multi_objective:
            log_front(client, state.parent_run_id, outcome)
    if best:
        client.set_terminated(state.parent_run_id, "FINISHED")
    else:
        end_run(client, state.parent_run_id, "FAILED", "no trial reported a score")
    return outcome


FRONT_ARTIFACT = "pareto_front.json"


def log_front(client: MlflowClient, run_id: str, outcome: SearchOutcome) -> None:
    """A multi-objective search's Pareto front on its parent run: `FRONT_ARTIFACT` (the
    objectives, their modes, the rule, and per front trial its id, objective values, searched values
    and whether the rule chose it) and the tag `cfcml.front_rule`."""
    from tuning.tracking.store import write_json_artifact

    best = outcome.best
    write_json_artifact(client, run_id, {
        "objectives": outcome.objectives, "modes": outcome.modes, "rule": FRONT_RULE,
        "front": [{"trial_id": t.trial_id, "chosen": best is not None and t.trial_id == best.trial_id,
                   **dict(zip(outcome.objectives, outcome.objective_values(t) or [], strict=True)), "params": t.params}
                  for t in outcome.front],
    }, FRONT_ARTIFACT)
    client.set_tag(run_id, "cfcml.front_rule", FRONT_RULE)


def finished_trials(search_dir: Path) -> int:
    """Trials that ended (completed, stopped by ASHA or failed) in the saved experiment state.

    The state Tune saves when it returns is the one `--resume` continues from; after a Ctrl-C it
    still shows the interrupted trials unfinished (Tune marks them terminated in memory only).
    """
    from ray.tune import ExperimentAnalysis

    trials = ExperimentAnalysis(str(search_dir)).trials
    return sum(t.status in ("TERMINATED", "ERROR") for t in trials)


def collect_trials(results: ResultGrid, metric: str, run: SearchRun) -> list[TrialResult]:
    """Per trial: its selected epoch by the CV metric (validation folds only, never the test split).

    The epochs are the trial's `lineage` (a restart from an older checkpoint replaces the epochs
    it retrained) and the epoch is picked by `EpochSelection`, the rule the trial's worker applied
    while it ran: its metrics, its epoch and its checkpoint all come from that one epoch's report.
    """
    trials = []
    for result in results:  # type: ignore[attr-defined]  # ResultGrid iterates by __getitem__, unseen by mypy
        df = result.metrics_dataframe
        trial_id = str((result.metrics or {}).get("trial_id") or Path(result.path).name)
        if df is None or metric not in df or df[metric].dropna().empty:
            trials.append(TrialResult(trial_id=trial_id, error=str(result.error)))
            continue
        rows = lineage(row for _, row in df.iterrows() if row.get("epoch") == row.get("epoch"))
        selection = EpochSelection(metric)
        for row in rows:
            selection.update(row, ref=row)
        if selection.score is None:
            trials.append(TrialResult(trial_id=trial_id, error=f"no finite {metric} in any epoch"))
            continue
        row = selection.selected
        # The selected epoch's own checkpoint, or none: weights of another epoch are never taken.
        path = row.get("checkpoint_path")
        checkpoint = path if isinstance(path, str) and ("://" in path or Path(path).exists()) else None
        params = run.search.decode({key: result.config.get(key) for key in run.search.keys})
        last = rows[-1]
        trials.append(TrialResult(
            trial_id=str(row.get("trial_id", trial_id)),
            params=params,
            score=selection.score,
            epoch=selection.epoch,
            epochs_run=int(last["epoch"]),
            wall_s=float(df["time_total_s"].iloc[-1]),
            compute_s=EpochReport.from_dict(df.iloc[-1].to_dict()).time_compute_s,
            checkpoint_path=checkpoint,
            metrics=_numbers(row, metric_keys.prefixes(metric_keys.CV, metric_keys.VAL, metric_keys.TRAIN)),
            last_epoch_metrics=_numbers(last, metric_keys.prefixes(metric_keys.CV)),
            history=[{"epoch": int(r["epoch"]), metric: float(r[metric]), "timestamp": float(r["timestamp"])}
                     for r in rows],
            experiment=run.experiment.replace(params),
        ))
    return trials


def _numbers(row: pd.Series, prefixes: tuple[str, ...]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if isinstance(k, str) and k.startswith(prefixes)
            and isinstance(v, numbers.Real) and not isinstance(v, bool)}
