"""The search report: best configuration, per-fold CV, test CIs (or why none), trials, history,
parallel coordinates and parameter importance, the oracle on synthetic data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cfcml.config import load_experiment
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from cfcml.evaluation.metrics import Estimate
from cfcml.evaluation.oracle import oracle_scores
from tuning.evidence.search_report import build_report, param_importance
from tuning.hpo.space import load_search
from tuning.records.outcome import SearchOutcome, TrialResult
from tuning.release.final import Release


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp("report") / "men", patients=24, seed=0, size=(8, 8, 4))
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(8, 8, 4))


def outcome(tmp_path: Path, n: int) -> SearchOutcome:
    rng = np.random.default_rng(0)
    trials = []
    for i in range(n):
        w = float(10 ** rng.uniform(-2.3, -0.3))
        score = 0.9 - 0.2 * w + 0.01 * float(rng.normal())
        metrics = {"cv_macro_auc": score, "cv_balanced_accuracy": 0.6, **{
            f"val_{m}_fold{k}": score for m in ("macro_auc", "balanced_accuracy", "acc_class_0") for k in (0, 1)}}
        params = {"loss.w_sam": w, "loss.tau_sam": float(rng.uniform(0.02, 0.5))}
        trials.append(TrialResult(f"t{i}", params=params, score=score, epoch=3, epochs_run=4 if i % 2 else 2,
                                  metrics=metrics, last_epoch_metrics={"cv_macro_auc": score - 0.05}))
    trials.append(TrialResult("broken", error="worker died"))
    return SearchOutcome("men", "cv_macro_auc", trials, str(tmp_path / "men-x"), "p", "u", "1", "r",
                         ["loss.w_sam", "loss.tau_sam"])


def search_file(tmp_path: Path):
    path = tmp_path / "s.yaml"
    path.write_text("space:\n  loss.w_sam: {dist: loguniform, low: 0.005, high: 0.5}\n"
                    "  loss.tau_sam: {dist: uniform, low: 0.02, high: 0.5}\n")
    return load_search(str(path), load_experiment("men"))


def test_report_with_a_final_model_and_an_oracle(prepared, tmp_path: Path) -> None:
    out = outcome(tmp_path, 8)
    test = {"macro_auc": (0.8, 0.7, 0.9), "balanced_accuracy": (0.6, 0.5, 0.7), "acc_class_0": (0.9, 0.8, 1.0)}
    final = Release("final", "f", "cfcml-men", "1", test={k: Estimate(*v) for k, v in test.items()})
    text, figures = build_report(out, prepared, search_file(tmp_path), final, oracle_scores(prepared, n_boot=50))
    best = out.best
    assert f"Trial `{best.trial_id}` at epoch 3" in text and "| loss.w_sam |" in text
    # the selected figure is labelled as such, the last epoch's stands next to it
    assert f"cv_macro_auc = {best.score:.4f}, **selected** (optimistic: the maximum over its epochs and over" in text
    assert f"not maximised over epochs: {best.score - 0.05:.4g}" in text and "estimate nothing was selected on" in text
    assert "| mean (selected) | mean at last epoch |" in text
    assert f"| macro_auc | {best.score:.4g} | {best.score:.4g} | {best.score:.4g} | {best.score - 0.05:.4g} |" in text
    assert "| trial | selected cv_macro_auc | bal. acc. | epoch | cv_macro_auc at last epoch | ran |" in text
    assert "| macro_auc | " in text and "| balanced_accuracy | 0.6000 | [0.5000, 0.7000] |" in text
    assert "## Oracle (synthetic data)" in text and "image_signal*table_signal" in text
    assert "| broken | no score: worker died |" in text
    assert "## Parameter importance" in text and "Not shown" not in text  # 8 trials: computed
    assert set(figures) == {"report/history.png", "report/parallel_coordinates.png", "report/importance.png"}


def test_report_without_a_final_model_or_enough_trials(prepared, tmp_path: Path) -> None:
    out = outcome(tmp_path, 2)
    text, figures = build_report(out, prepared, search_file(tmp_path), None)
    assert "Not evaluated: the search ran with --no-final" in text
    assert "Not shown: needs at least 3 scored trials (have 2)" in text
    assert "report/importance.png" not in figures
    assert isinstance(param_importance(out.trials, search_file(tmp_path)), str)


def test_importance_covers_a_list_valued_choice_as_read_back_from_outcome_json(tmp_path: Path) -> None:
    """outcome.json holds a list choice as a JSON list, the search file as the config's tuple;
    Optuna's categorical distribution takes neither, so both become the label Optuna searched."""
    path = tmp_path / "s.yaml"
    path.write_text("space:\n  model.mixer_stages: {dist: choice, values: [[4], [3, 4]]}\n"
                    "  loss.tau_sam: {dist: uniform, low: 0.02, high: 0.5}\n")
    search = load_search(str(path), load_experiment("men"))
    trials = [TrialResult(f"t{i}", params={"model.mixer_stages": [4] if i % 2 else (3, 4), "loss.tau_sam": 0.05 * i},
                          score=0.5 + 0.1 * (i % 2) + 0.01 * i) for i in range(1, 7)]
    out = SearchOutcome("men", "cv_macro_auc", trials, str(tmp_path / "men-x"), "p", "u", "1", "r", search.keys)
    out.save(tmp_path / "outcome.json")
    importance = param_importance(SearchOutcome.load(tmp_path / "outcome.json").trials, search)
    assert isinstance(importance, dict) and set(importance) == {"model.mixer_stages", "loss.tau_sam"}


def test_a_multi_objective_report_shows_the_front_and_the_chosen_point(prepared, tmp_path: Path) -> None:
    out = outcome(tmp_path, 6)
    out.objectives = ["macro_auc", "balanced_accuracy"]
    for i, t in enumerate(out.trials[:6]):  # balanced accuracy falls as the AUC rises: a trade-off front
        t.metrics["cv_balanced_accuracy"] = 1.0 - t.metrics["cv_macro_auc"] + 0.01 * i
    text, figures = build_report(out, prepared, search_file(tmp_path), None)
    best, front = out.best, out.front
    assert best is not None and len(front) >= 2
    assert "## Pareto front" in text and "nearest the ideal point" in text
    assert "ASHA stopped trials on the primary" in text
    assert "| trial | macro_auc | balanced_accuracy | chosen |" in text
    rows = [line for line in text.splitlines() if line.startswith(tuple(f"| {t.trial_id} | " for t in front))
            and "| **yes** |" in line]
    assert len(rows) == 1 and rows[0].startswith(f"| {best.trial_id} | ")
    assert f"Trial `{best.trial_id}`" in text and "the Pareto front's point that the rule below chose" in text
    assert "report/pareto_front.png" in figures
    # a single-objective outcome has no front section
    out.objectives = []
    assert "## Pareto front" not in build_report(out, prepared, search_file(tmp_path), None)[0]
