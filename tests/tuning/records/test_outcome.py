"""How a trial's epoch is selected and what a search publishes of it: one rule (the highest
`cv_<metric>`, the latest of tied epochs) for the score, the epoch, the metrics and the
checkpoint; retrained epochs replace discarded ones; selected figures are named as selected."""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest
from ray.tune import Result

from tuning.hpo.driver import collect_trials
from tuning.hpo.run import SearchRun
from tuning.records.outcome import SELECTED_EPOCH, EpochSelection, TrialResult, lineage, published_cv, selected_key

METRIC = "cv_macro_auc"
CONFIG = {"loss.tau_sam": 0.1, "loss.tau_up": 0.07, "loss.tau_cp": 0.07, "loss.momentum": 0.0, "loss.w_sam": 0.06,
          "loss.w_up": 0.04, "loss.w_cp": 0.24}  # the smoke search's keys


def _rows(scores: list[tuple[int, float]]) -> list[dict]:
    return [{"epoch": e, METRIC: s} for e, s in scores]


@pytest.mark.parametrize("scores, epoch, best", [
    ([(1, 0.7), (2, 1.0), (3, 0.9), (4, 1.0)], 4, 1.0),  # AUC 1.0 twice: the later epoch
    ([(1, 0.5), (2, 0.5), (3, 0.5)], 3, 0.5),  # a flat balanced accuracy
    ([(1, 0.6), (2, 0.9), (3, 0.8)], 2, 0.9),  # no tie: the maximum
    ([(1, math.nan), (2, 0.6), (3, math.nan)], 2, 0.6),  # an undefined epoch never wins
])
def test_the_selected_epoch_is_the_latest_of_the_best(scores, epoch: int, best: float) -> None:
    selection = EpochSelection(METRIC)
    reported = [selection.update(row) for row in _rows(scores)]
    assert (selection.epoch, selection.score) == (epoch, best)
    # every epoch reports the running maximum: the last report holds the trial's selected score
    running = [max((s for _, s in scores[:i + 1] if not math.isnan(s)), default=math.nan) for i in range(len(scores))]
    assert [r[selected_key(METRIC)] for r in reported] == pytest.approx(running, nan_ok=True)
    assert reported[-1] == {"selected_cv_macro_auc": best, SELECTED_EPOCH: epoch}


def test_a_restart_continues_the_selection_of_the_checkpoint_it_resumes_from() -> None:
    first = EpochSelection(METRIC)
    reports = [{**row, **first.update(row)} for row in _rows([(1, 0.6), (2, 0.8), (3, 0.95)])]
    # epoch 3's checkpoint was damaged: the trial restarts from epoch 2 and retrains epoch 3
    again = EpochSelection(METRIC)
    again.restore(reports[1])
    assert (again.epoch, again.score) == (2, 0.8)
    assert again.update({"epoch": 3, METRIC: 0.7}) == {"selected_cv_macro_auc": 0.8, SELECTED_EPOCH: 2}


@pytest.mark.parametrize("epochs, kept", [
    ([1, 2, 3], [1, 2, 3]),
    ([1, 2, 3, 2, 3], [1, 2, 3]),  # restarted from epoch 1: 2 and 3 retrained
    ([1, 2, 3, 4, 3], [1, 2, 3]),  # restarted from 2, stopped after retraining 3: epoch 4 is gone
    ([1, 2, 2, 3], [1, 2, 3]),  # a finished epoch re-sent
])
def test_lineage_keeps_retrained_epochs_and_drops_discarded_ones(epochs: list[int], kept: list[int]) -> None:
    rows = [{"epoch": e, "report": i} for i, e in enumerate(epochs)]
    out = lineage(rows)
    assert [r["epoch"] for r in out] == kept
    for row in out:  # each epoch's latest report
        assert row["report"] == max(i for i, e in enumerate(epochs) if e == row["epoch"])


def _result(tmp_path: Path, rows: list[dict], deleted: tuple[int, ...] = ()) -> Result:
    """A finished trial as Tune hands it over: its reported rows, each epoch's checkpoint on disk
    (Ray Train's retention may have deleted some)."""
    frame = []
    for i, row in enumerate(rows):
        path = tmp_path / f"checkpoint_{i:03d}_epoch{row['epoch']}"
        if row["epoch"] not in deleted:
            path.mkdir()
        score = row[METRIC]
        frame.append({"trial_id": "t1", "epoch": row["epoch"], METRIC: score, "cv_balanced_accuracy": score / 2,
                      "val_macro_auc_fold0": score + 0.01 * row["epoch"], "train_loss": 1.0 / (i + 1),
                      "checkpoint_path": str(path), "timestamp": 1000 + i, "time_total_s": 10.0 * (i + 1),
                      "time_compute_s": 8.0 * (i + 1)})
    df = pd.DataFrame(frame)
    return Result(metrics={**frame[-1], "config": CONFIG}, checkpoint=None, error=None, path=str(tmp_path),
                  metrics_dataframe=df)


@pytest.mark.parametrize("scores", [
    [(1, 0.7), (2, 1.0), (3, 0.9), (4, 1.0), (5, 0.8)],
    [(1, 1.0), (2, 1.0), (3, 1.0)],
    [(1, 0.5), (2, 0.75), (3, 0.75), (4, 0.75), (5, 0.5)],
])
def test_tied_epochs_give_one_epoch_for_score_metrics_tag_and_weights(tmp_path: Path, scores) -> None:
    run = SearchRun.build("men", "smoke")
    (trial,) = collect_trials([_result(tmp_path, _rows(scores))], METRIC, run)
    best = max(s for _, s in scores)
    epoch = max(e for e, s in scores if s == best)
    assert (trial.epoch, trial.score) == (epoch, best)
    assert trial.metrics["val_macro_auc_fold0"] == pytest.approx(best + 0.01 * epoch)  # that epoch's row
    assert Path(trial.checkpoint_path).name.endswith(f"_epoch{epoch}")  # the weights of that same epoch
    assert trial.epochs_run == len(scores) and trial.last_epoch_metrics[METRIC] == scores[-1][1]
    assert trial.params["loss.tau_sam"] == 0.1 and trial.experiment.loss.tau_sam == 0.1
    # the running maximum the worker reports ends on the same figure
    selection = EpochSelection(METRIC)
    assert [selection.update(r) for r in _rows(scores)][-1][selected_key(METRIC)] == trial.score


def test_the_selected_epochs_checkpoint_or_none_never_another_epochs(tmp_path: Path) -> None:
    run = SearchRun.build("men", "smoke")
    rows = _rows([(1, 0.9), (2, 0.9), (3, 0.6)])
    (trial,) = collect_trials([_result(tmp_path, rows, deleted=(2,))], METRIC, run)
    assert trial.epoch == 2 and trial.checkpoint_path is None


def test_retrained_epochs_replace_discarded_ones_in_the_selection(tmp_path: Path) -> None:
    run = SearchRun.build("men", "smoke")
    # epochs 1-3, then a restart from epoch 1's checkpoint retrains 2 and 3 with other values
    rows = _rows([(1, 0.6), (2, 0.95), (3, 0.7), (2, 0.8), (3, 0.85)])
    (trial,) = collect_trials([_result(tmp_path, rows)], METRIC, run)
    assert (trial.epoch, trial.score) == (3, 0.85)  # the discarded 0.95 is not the trial's score
    assert Path(trial.checkpoint_path).name == "checkpoint_004_epoch3"
    assert [h["epoch"] for h in trial.history] == [1, 2, 3] and trial.history[1][METRIC] == 0.8


def test_published_figures_say_they_were_selected() -> None:
    trial = TrialResult("t", score=0.9, epoch=3, epochs_run=5,
                        metrics={METRIC: 0.9, "val_macro_auc_fold0": 0.95, "train_loss": 0.2},
                        last_epoch_metrics={METRIC: 0.8})
    assert published_cv(trial) == {"selected_cv_macro_auc": 0.9, "selected_val_macro_auc_fold0": 0.95,
                                    "selected_train_loss": 0.2, "last_epoch_cv_macro_auc": 0.8}
    assert published_cv(trial, ("cv_",)) == {"selected_cv_macro_auc": 0.9, "last_epoch_cv_macro_auc": 0.8}
    assert not any(k.startswith(("best_", "cv_")) for k in published_cv(trial))  # nothing unlabelled


@pytest.mark.parametrize("restored, skipped", [(None, []), ({"epoch": 2, "cv_auc": 0.5}, ["checkpoint_x: truncated"])])
def test_an_epoch_report_survives_the_flat_dict_ray_carries(restored, skipped) -> None:
    from tuning.records.outcome import EpochReport

    report = EpochReport({"epoch": 3, "cv_auc": 0.7, "system/cpu": 50.0}, time_compute_s=4.5, time_setup_s=2.0,
                         resumed_from_epoch=2 if restored else 0, checkpointed=True, restored=restored,
                         checkpoints_skipped=skipped, scan_backend="chunked")
    flat = report.to_dict()
    assert flat["cv_auc"] == 0.7 and flat["time_compute_s"] == 4.5 and flat["scan_backend"] == "chunked"
    assert EpochReport.from_dict(flat).scan_backend == "chunked"
    assert EpochReport.from_dict({"epoch": 1}).scan_backend is None
    assert EpochReport.from_dict({"epoch": 1, "scan_backend": float("nan")}).scan_backend is None
    assert EpochReport.from_dict({**flat, "timestamp": 1}).to_dict() == {**flat, "timestamp": 1}
    assert set(report.to_dict(with_restart=False)) == set(flat) - {"restored", "checkpoints_skipped"}
    assert report.retrained  # epoch 3 was trained, not re-sent


def test_a_re_sent_finished_epoch_is_not_a_retrained_one() -> None:
    from tuning.records.outcome import EpochReport

    restored = {"epoch": 4, "cv_auc": 0.8}
    assert not EpochReport.from_dict({**restored, "restored": restored}).retrained


NAN = math.nan


@pytest.mark.parametrize("reports, epoch, score", [
    ([(1, 0.6), (2, 0.7), (3, 0.8)], 3, 0.8),  # improving: the last
    ([(1, 0.8), (2, 0.7), (3, 0.6)], 1, 0.8),  # worsening: the first
    ([(1, 0.7), (2, 0.9), (3, 0.9), (4, 0.5)], 3, 0.9),  # tied best: the later
    ([(1, 0.9), (2, 0.5), (3, 0.9)], 3, 0.9),  # tied best apart: the later
    ([(1, NAN), (2, 0.5), (3, NAN)], 2, 0.5),  # NaN never wins, nor breaks a tie
    ([(1, 0.5), (2, None)], 1, 0.5),  # a report without the metric is an epoch without a score
    ([(1, NAN), (2, NAN)], 0, None),  # nothing selectable
    ([(1, 0.6), (2, 0.95), (3, 0.7), (2, 0.8), (3, 0.85)], 3, 0.85),  # restart from 1: discarded 0.95 gone
    ([(1, 0.6), (2, 0.9), (3, 0.7), (3, 0.65)], 2, 0.9),  # restart from 2: the selected epoch 2 stays
    ([(1, 0.9), (2, 0.9), (2, 0.5)], 1, 0.9),  # the selected tie retrained lower: the earlier one again
    ([(1, 0.6), (2, 0.7), (3, 0.8), (1, 0.5)], 1, 0.5),  # restart from scratch: only the new epoch 1
])
def test_the_one_rule_selects_the_latest_best_finite_epoch_of_the_lineage(reports, epoch: int, score) -> None:
    selection = EpochSelection(METRIC)
    for i, (e, s) in enumerate(reports):
        fields = selection.update({"epoch": e} if s is None else {"epoch": e, METRIC: s}, ref=f"report {i}")
    assert (selection.epoch, selection.score) == (epoch, score)
    assert fields[SELECTED_EPOCH] == epoch and fields[selected_key(METRIC)] == pytest.approx(
        math.nan if score is None else score, nan_ok=True)
    # the ref of the selected epoch's own (latest) report, never a discarded one's
    latest = max((i for i, (e, _) in enumerate(reports) if e == epoch), default=None)
    assert selection.selected == (None if latest is None else f"report {latest}")


def _worker_reports(tmp_path: Path) -> list[dict]:
    """What a trial's worker reports (tuning.hpo.trainer.train_loop_per_worker, its selection and
    checkpoint policy as they are): epochs 1-5; the worker group crashes and epoch 4's checkpoint
    is damaged, so it restarts from epoch 2's and retrains 3-8; then a resumed search restarts the
    finished run, which re-sends its last epoch. Tune adds `checkpoint_path` to a checkpointed
    epoch's report (TuneReportCallback)."""
    from tuning.hpo.trainer import CheckpointPolicy

    policy = CheckpointPolicy(every=2, max_epochs=8)
    segments = [[(1, 0.6), (2, 0.7), (3, NAN), (4, 0.7), (5, 0.65)],
                [(3, 0.75), (4, 0.75), (5, 0.5), (6, 0.72), (7, 0.74), (8, 0.74)]]
    reports: list[dict] = []
    checkpoints: dict[int, dict] = {}  # epoch -> the metrics its checkpoint holds
    for n, segment in enumerate(segments):
        selection = EpochSelection(METRIC)
        restored = None
        if n:  # Resumption.load: restore the selection from the checkpoint it continues from
            restored = checkpoints[segment[0][0] - 1]
            selection.restore(restored)
        for epoch, score in segment:
            metrics = {"epoch": epoch, METRIC: score, "val_macro_auc_fold0": score}
            metrics.update(selection.update(metrics))
            report = dict(metrics)
            if policy.due(epoch, selection.epoch):
                checkpoints[epoch] = dict(metrics)
                path = tmp_path / f"checkpoint_{len(reports):03d}"
                path.mkdir()
                report["checkpoint_path"] = str(path)
            if restored is not None:
                report["restored"], restored = restored, None
            reports.append(report)
    last = checkpoints[8]
    reports.append({**last, "restored": last})  # the finished run's re-send: no new checkpoint
    return reports


def test_the_worker_the_driver_and_the_tracker_select_the_same_epoch(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient
    from ray.tune.experiment import Trial

    from tuning.tracking.callbacks import SearchTracker

    reports = _worker_reports(tmp_path)
    worker = reports[-1]  # the trial's last report: what ASHA, Optuna and the best-trial choice read

    # the driver: Tune's rows of the trial, as collect_trials reads them after the search
    rows = [{k: v for k, v in r.items() if k != "restored"} | {"trial_id": "t1", "timestamp": 1000 + i,
                                                                  "time_total_s": 10.0 * (i + 1)}
            for i, r in enumerate(reports)]
    result = Result(metrics={**rows[-1], "config": CONFIG}, checkpoint=None, error=None, path=str(tmp_path),
                    metrics_dataframe=pd.DataFrame(rows))
    (driver,) = collect_trials([result], METRIC, SearchRun.build("men", "smoke"))

    # the tracker: the same reports as Tune hands them to its callback on the driver
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("agree", artifact_location=str(tmp_path / "artifacts"))
    tracker = SearchTracker(client.tracking_uri, exp_id, client.create_run(exp_id).info.run_id, "agree", METRIC,
                            ["a", "b", "c"], "multiclass")
    trial = Trial("__fake", config={}, trial_id="t1", stub=True)
    for i, report in enumerate(reports):
        tracker.on_trial_result(0, [trial], trial, {**report, "timestamp": 1000 + i})

    retrained_4 = reports[6]["checkpoint_path"]  # epoch 4 of the second segment, tied with 3: the later
    assert (worker[SELECTED_EPOCH], worker[selected_key(METRIC)]) == (4, 0.75)
    assert (driver.epoch, driver.score, driver.checkpoint_path) == (4, 0.75, retrained_4)
    assert tracker._best["t1"] == (0.75, retrained_4) and tracker._selections["t1"].epoch == 4
    assert driver.metrics["val_macro_auc_fold0"] == 0.75 and driver.epochs_run == 8
