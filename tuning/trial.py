"""The function Tune runs for each trial of a search, in a module of its own.

Tune's trial actor is a fresh process that imports the module of the trial function to unpickle
it; this one imports nothing heavy at module level, and `tuning.trainer.fit` builds a one-CPU-worker
trainer without torch (`tuning.trainer.trainer_class`), so the actor loads neither torch nor the
data pipeline (in `tuning.driver` they cost a few CPU-seconds per trial). Only the Ray Train
workers import torch. `tests/test_layers.py` checks it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tuning.run import SearchRun


def run_trial(config: dict[str, Any], *, run: SearchRun, prepared_dir: str, metric: str) -> None:
    """One Tune trial: the sampled values (`config`, dotted keys) over the search's experiment,
    trained on all folds by a Ray Train trainer (`tuning.trainer.fit`)."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from tuning.trainer import TrainJob, fit

    trial_id = tune.get_context().get_trial_id()
    job = TrainJob(run.experiment.replace(dict(config)), prepared_dir, run.max_epochs)
    fit(job, name=f"trial_{trial_id}", storage_path=str(run.storage / "train"), metric=metric,
        callbacks=[TuneReportCallback()], label=f"trial {trial_id}")
