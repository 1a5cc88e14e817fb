"""The functions Tune runs for each trial of a search and of a comparison, in a module of their own.

Tune's trial actor is a fresh process that imports the module of the trial function to unpickle
it; this one imports nothing heavy at module level, and `tuning.hpo.trainer.fit` builds a one-CPU-worker
trainer without torch (`tuning.hpo.trainer.trainer_class`), so the actor loads neither torch nor the
data pipeline (imported through `tuning.hpo.driver` or `tuning.evidence.comparison` they cost CPU-seconds
per trial: docs/architecture.md, "What a trial costs besides training").
What a trial is given must be as light: a `SearchRun`, a `VariantTrials` (plain configurations,
not the `ComparisonPlan`, whose module loads torch). Only the Ray Train workers import torch.
`tests/test_layers.py` checks it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cfcml.config import ExperimentConfig
    from tuning.hpo.run import SearchRun


def run_trial(config: dict[str, Any], *, run: SearchRun, prepared_dir: str, metric: str) -> None:
    """One Tune trial: the sampled values (`config`, dotted keys, as Tune carries them:
    `SearchConfig.decode`) over the search's experiment, trained on all folds by a Ray Train
    trainer (`tuning.hpo.trainer.fit`)."""
    from ray import tune

    from cfcml.evaluation import metric_keys

    trial_id = tune.get_context().get_trial_id()
    experiment = run.experiment.replace(run.search.decode(dict(config)))
    _fit(experiment, prepared_dir, run.max_epochs, name=f"trial_{trial_id}",
         storage_path=str(run.storage / "train"), metric=metric, label=f"trial {trial_id}",
         also=tuple(metric_keys.cv(name) for name in run.search.objectives[1:]))


@dataclass(frozen=True)
class VariantTrials:
    """What every trial of a comparison is given (`tuning.evidence.comparison.ComparisonPlan.trials`).

    variants: name -> configuration; the seed is set per trial.
    max_epochs: every variant's epoch budget (no selection: the last epoch counts).
    prepared_dir: the prepared dataset's folder.
    name: the comparison's name; a trial's Ray Train run is `compare_<name>_<trial id>`.
    storage_path: the folder of those Ray Train runs.
    """

    variants: dict[str, ExperimentConfig]
    max_epochs: int
    prepared_dir: str
    name: str
    storage_path: str


def compare_trial(config: dict[str, Any], *, trials: VariantTrials) -> None:
    """One Tune trial of a comparison: variant `config["variant"]` with seed `config["seed"]` on
    all folds, then its fold models predict the test split once (after the last epoch)."""
    from ray import tune

    cfg = trials.variants[config["variant"]].replace({"train.seed": int(config["seed"])})
    _fit(cfg, trials.prepared_dir, trials.max_epochs, name=f"compare_{trials.name}_{tune.get_context().get_trial_id()}",
         storage_path=trials.storage_path, metric=None, predict_test=True)


def _fit(experiment: ExperimentConfig, prepared_dir: str, max_epochs: int, *, name: str, storage_path: str,
         metric: str | None, predict_test: bool = False, label: str | None = None, also: tuple[str, ...] = ()) -> None:
    """Train `experiment` on all folds as Ray Train run `name`, each epoch reported to Tune; `also`:
    `TrainJob.also`."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from tuning.hpo.trainer import TrainJob, fit

    job = TrainJob(experiment, prepared_dir, max_epochs, predict_test=predict_test, also=also)
    fit(job, name=name, storage_path=storage_path, metric=metric, callbacks=[TuneReportCallback()], label=label)
