"""Optuna learns from the figure the platform selects on: with the driver's wiring (Tune's metric
and OptunaSearch's metric `selected_key(cv_<metric>)`, ASHA on the epoch), the value Optuna's
study holds for every trial, stopped early by ASHA or not, is the trial's score as
`collect_trials` selects it (the maximum over its epochs), not its last epoch's value.

A function trainable stands in for the CFCML trainer: it reports what `tuning.hpo.trainer` reports
(the epoch's `cv_<metric>` and the running selection), for a score that peaks mid-training."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tuning.hpo.driver import collect_trials, search_algorithms
from tuning.hpo.run import SearchRun
from tuning.records.outcome import EpochSelection, selected_key

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

METRIC = "cv_macro_auc"
EPOCHS = 4


def _trainable(config: dict) -> None:
    from ray import tune

    selection = EpochSelection(METRIC)
    w = float(config["loss.w_cp"])
    for epoch in range(1, EPOCHS + 1):
        score = 0.5 + w * (1.0 - 0.2 * (epoch - 2) ** 2)  # best at epoch 2, lower at the last
        metrics = {"epoch": epoch, METRIC: score, "time_compute_s": 0.01 * epoch}
        metrics.update(selection.update(metrics))
        tune.report(metrics)


def test_optuna_holds_the_selected_score_of_every_trial(ray_local, tmp_path: Path) -> None:
    from ray import tune

    run = SearchRun.build("men", "smoke", runs_dir=tmp_path / "runs", num_samples=6, max_epochs=EPOCHS)
    assert run.search.grace_period == 1 and run.search.tpe_startup_trials(6) < 6  # ASHA stops, TPE models
    target = selected_key(METRIC)
    searcher, scheduler = search_algorithms(run, target)  # the driver's own
    tuner = tune.Tuner(
        tune.with_resources(_trainable, {"cpu": 0.5}),
        param_space={p.key: p.tune_domain() for p in run.search.space},
        tune_config=tune.TuneConfig(metric=target, mode="max", search_alg=searcher, scheduler=scheduler,
                                    num_samples=run.num_samples),
        run_config=tune.RunConfig(name="selection", storage_path=str(tmp_path / "ray"), verbose=0),
    )
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trainable travels by value
    results = tuner.fit()
    trials = {t.trial_id: t for t in collect_trials(results, METRIC, run)}
    assert len(trials) == 6 and all(t.scored for t in trials.values())

    held = {tid: ot.number for tid, ot in searcher._ot_trials.items()}  # Tune trial id -> Optuna trial
    study = {t.number: t for t in searcher._ot_study.trials}
    assert set(held) == set(trials)
    for tid, trial in trials.items():
        value = study[held[tid]].value
        assert value == pytest.approx(trial.score), tid
        if trial.epochs_run > 2:  # past the peak: the last epoch's value is lower
            assert trial.last_epoch_metrics[METRIC] < value
            assert trial.epoch == 2
    assert any(t.epochs_run < EPOCHS for t in trials.values())  # ASHA stopped some: still their maximum
    assert any(t.epochs_run == EPOCHS for t in trials.values())
