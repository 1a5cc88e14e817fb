"""Comparison plan and statistics: variants on one base, a tuned variant from a finished search,
mean and sd over seeds, the fold-ensemble test with CIs and paired differences against cfcml."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cfcml.config import FUSION_VARIANTS, ConfigError
from tuning.evidence.comparison import (
    VARIANTS,
    ComparisonResult,
    aggregate,
    markdown,
    plan_comparison,
    same_configurations,
    variant_configs,
)
from tuning.records.outcome import SearchOutcome, TrialResult


def test_default_plan_has_every_variant_but_the_tuned_one_on_the_search_budget(tmp_path: Path) -> None:
    plan = plan_comparison("men", tmp_path, search="smoke", runs_dir=tmp_path, max_epochs=3)
    assert list(plan.variants) == [v for v in VARIANTS if v != "cfcml_tuned"]
    base = plan.variants["cfcml"]
    assert base.train.epochs == 3 and base.train.folds == 2 and base.model.dim == 32  # smoke overrides, CLI
    assert plan.variants["no_fine"].loss.fine is False and plan.variants["no_cie"].model.cie is False
    assert plan.variants["no_mg"].model.multi_granularity is False
    for name in ("image_only", "tabular_only", "late_concat", *FUSION_VARIANTS):  # baselines: cross-entropy only
        assert plan.variants[name].model.variant == name and plan.variants[name].loss.fine is False
    assert plan.seeds == (0, 1, 2) and plan.out_dir == tmp_path.resolve() / "compare" / "men-smoke"


def test_tuned_variant_takes_the_best_trials_searched_values(tmp_path: Path) -> None:
    folder = tmp_path / "ray" / "men-smoke"
    folder.mkdir(parents=True)
    best = TrialResult("t1", params={"loss.w_cp": 0.011, "loss.tau_sam": 0.3}, score=0.9, epoch=2)
    SearchOutcome("men", "cv_macro_auc", [TrialResult("t0", score=0.5), best], str(folder), "p", "u", "1",
                  "r", ["loss.w_cp", "loss.tau_sam"]).save()
    plan = plan_comparison("men", tmp_path, search="smoke", runs_dir=tmp_path, from_search="men-smoke",
                           variants="cfcml_tuned,image_only", seeds=1)
    assert list(plan.variants) == ["cfcml", "cfcml_tuned", "image_only"]  # cfcml always: the reference
    tuned = plan.variants["cfcml_tuned"]
    assert tuned.loss.w_cp == 0.011 and tuned.loss.tau_sam == 0.3
    assert tuned.model == plan.variants["cfcml"].model  # the comparison's own model and budget


@pytest.mark.parametrize("kwargs,match", [
    ({"variants": "cfcml,bogus"}, r"--variants: unknown variant\(s\) \['bogus'\]"),
    ({"variants": "cfcml_tuned"}, r"--variants: cfcml_tuned needs a finished search"),
    ({"from_search": "nope"}, r"--from-search: no finished search"),
    ({"seeds": 0}, r"--seeds: expected a positive integer"),
])
def test_bad_plans_name_the_flag(tmp_path: Path, kwargs, match) -> None:
    with pytest.raises(ConfigError, match=match):
        plan_comparison("men", tmp_path, runs_dir=tmp_path, **kwargs)


def _probs(y: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    logits = np.eye(3)[y] * 2 + rng.normal(0, noise, (len(y), 3))
    e = np.exp(logits)
    return e / e.sum(1, keepdims=True)


def test_aggregate_averages_seeds_and_ensembles_the_test_split() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(60) % 3
    trials = []
    for seed, auc in ((0, 0.8), (1, 0.9)):
        trials.append({"variant": "cfcml", "seed": seed, "metrics": {"cv_macro_auc": auc, "epoch": 3},
                       "test_probs": _probs(y, 1.0, rng)})
        trials.append({"variant": "no_fine", "seed": seed, "metrics": {"cv_macro_auc": auc - 0.1},
                       "test_probs": _probs(y, 3.0, rng)})
    out = aggregate(trials, "multiclass", ["a", "b", "c"], y, ["cfcml", "no_fine", "late_concat"], n_boot=200)
    cfcml, no_fine, missing = out
    assert cfcml.cv["macro_auc"] == pytest.approx(0.85) and cfcml.cv_sd["macro_auc"] == pytest.approx(0.05)
    assert "epoch" not in cfcml.cv
    np.testing.assert_allclose(cfcml.test_probs, (trials[0]["test_probs"] + trials[2]["test_probs"]) / 2)
    point, low, high = cfcml.test["macro_auc"]
    assert low <= point <= high and "balanced_accuracy" in cfcml.test
    assert cfcml.diff_vs_cfcml is None
    diff = no_fine.diff_vs_cfcml
    assert diff[0] == pytest.approx(no_fine.test["macro_auc"][0] - point) and diff[1] <= diff[0] <= diff[2]
    assert missing.seeds_done == 0 and missing.test_probs is None and missing.diff_vs_cfcml is None

    result = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], out, y, None,
                              3, 2, 2)
    text = markdown(result)
    assert "| cfcml | 0.850 ± 0.050 |" in text and "test recall: a / b / c" in text
    data = result.to_json()
    assert set(data["variants"]) == {"cfcml", "no_fine", "late_concat"}
    assert "diff_vs_cfcml" not in data["variants"]["cfcml"]
    assert set(data["variants"]["no_fine"]["diff_vs_cfcml"]) == {"auc_diff", "ci_low", "ci_high"}
    assert data["variants"]["cfcml"]["test"]["macro_auc"] == pytest.approx(point, abs=1e-6)


@pytest.mark.parametrize("tuned, expected", [
    ({"film_tuned": ("film", {})}, {"film_tuned": "film"}),  # its search chose film's defaults
    ({"film_tuned": ("film", {"optim.lr": 3e-4})}, {}),  # chose another learning rate
    ({"cfcml_tuned": ("cfcml", {}), "film_tuned": ("film", {})}, {"cfcml_tuned": "cfcml", "film_tuned": "film"}),
    ({"no_fine_tuned": ("no_fine", {"model.dropout": 0.3})}, {}),
])
def test_a_variant_configured_like_an_earlier_one_is_named_with_it(tuned, expected) -> None:
    from cfcml.config import load_experiment

    variants = variant_configs(load_experiment("men"), ["cfcml", "no_fine", "film"], None)
    for name, (of, values) in tuned.items():
        variants[name] = variants[of].replace(values)
    assert same_configurations(variants) == expected


def test_the_report_names_rows_that_are_one_variants_models() -> None:
    rng = np.random.default_rng(0)
    y = np.arange(30) % 3
    probs = _probs(y, 1.0, rng)
    trials = [{"variant": v, "seed": 0, "metrics": {"cv_macro_auc": 0.8}, "test_probs": probs}
              for v in ("cfcml", "film", "film_tuned")]
    out = aggregate(trials, "multiclass", ["a", "b", "c"], y, ["cfcml", "film", "film_tuned"], n_boot=50)
    out[2].same_as = "film"
    result = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], out, y, None,
                              3, 2, 1, tune_each=2)
    assert "`film_tuned` = `film`" in markdown(result)
    assert result.to_json()["variants"]["film_tuned"]["same_as"] == "film"
    assert result.to_json()["variants"]["film"]["same_as"] is None


def test_comparisons_show_each_variants_calibration_and_subgroups(tmp_path: Path) -> None:
    import json

    import pandas as pd

    from cfcml.data.spec import load_dataset_spec
    from tuning.evidence.comparison import clinical_figures

    rng = np.random.default_rng(1)
    y = np.arange(60) % 3
    trials = [{"variant": v, "seed": 0, "metrics": {"cv_macro_auc": 0.8}, "test_probs": _probs(y, s, rng)}
              for v, s in (("cfcml", 1.0), ("no_fine", 3.0))]
    variants = aggregate(trials, "multiclass", ["a", "b", "c"], y, ["cfcml", "no_fine", "late_concat"], n_boot=100)
    spec = load_dataset_spec("men")
    rows = pd.DataFrame({"sex": ["0", "1"] * 30, "location": ["1"] * 50 + ["2"] * 10,
                         "age": np.linspace(30, 80, 60)})
    calibration, subgroups = clinical_figures("multiclass", y, spec, rows, variants)
    assert set(calibration) == set(subgroups) == {"cfcml", "no_fine"}  # late_concat has no predictions
    assert [(r.field, r.category) for r in subgroups["cfcml"]][:2] == [("sex", "0"), ("sex", "1")]
    result = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], variants, y, None,
                              3, 2, 1, calibration=calibration, subgroups=subgroups)
    text = markdown(result)
    assert "## Calibration (test, fold ensembles as trained)" in text and "| no_fine |" in text
    assert "## Subgroups (test macro_auc" in text and "| location | 2 | 10 |" in text and "**too small**" in text
    data = json.loads(json.dumps(result.to_json()))
    assert data["variants"]["cfcml"]["subgroups"][0]["field"] == "sex"
    assert len(data["variants"]["cfcml"]["calibration"]["ece"]) == 3


@pytest.mark.parametrize("with_oracle", [True, False])
def test_the_oracle_travels_as_oracle_scores_into_the_table_the_json_and_the_figures(tmp_path: Path,
                                                                                      with_oracle: bool) -> None:
    import json

    from cfcml.evaluation.metrics import bootstrap_ci
    from cfcml.evaluation.oracle import OracleScores
    from tuning.evidence.comparison import figures, write_outputs

    rng = np.random.default_rng(2)
    y = np.arange(60) % 3
    trials = [{"variant": "cfcml", "seed": 0, "metrics": {"cv_macro_auc": 0.8}, "test_probs": _probs(y, 1.0, rng)}]
    variants = aggregate(trials, "multiclass", ["a", "b", "c"], y, ["cfcml"], n_boot=100)
    probs = _probs(y, 0.3, rng)
    test = bootstrap_ci("multiclass", y, probs, n_boot=100, seed=0)
    features = ["img_signal", "tab_signal", "img_signal*tab_signal"]
    oracle = OracleScores(features, {"macro_auc": 0.97, "balanced_accuracy": 0.9}, test, probs) if with_oracle \
        else None
    result = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], variants, y, oracle,
                              3, 2, 1)
    paths = write_outputs(result, tmp_path / "out")
    assert [p.name for p in paths] == ["comparison.md", "comparison.json", "roc_test.png", "metric_bars.png"]

    text = (tmp_path / "out" / "comparison.md").read_text()
    data = json.loads((tmp_path / "out" / "comparison.json").read_text())
    figs = figures(result)
    roc_labels = [line.get_label() for line in figs["roc_test.png"].axes[0].get_lines()]
    bar_lines = {line.get_label(): line.get_ydata()[0] for line in figs["metric_bars.png"].axes[0].get_lines()}
    if not with_oracle:
        assert "*oracle*" not in text and data["oracle"] is None
        assert not any(label.startswith("oracle") for label in [*roc_labels, *bar_lines])
        return
    auc, low, high = test["macro_auc"]
    acc, acc_low, acc_high = test["balanced_accuracy"]
    recalls = " / ".join(f"{test[f'acc_class_{k}'][0]:.2f}" for k in range(3))
    assert (f"| *oracle* (generator latents) | 0.970 | 0.900 | {auc:.3f} [{low:.3f}, {high:.3f}] "
            f"| {acc:.3f} [{acc_low:.3f}, {acc_high:.3f}] | {recalls} | |") in text
    assert "(img_signal, tab_signal, img_signal*tab_signal)" in text
    # the JSON keeps its layout: points and CIs apart, no test probabilities
    assert data["oracle"] == {
        "features": features, "cv": {"macro_auc": 0.97, "balanced_accuracy": 0.9},
        "test": {k: pytest.approx(v[0], abs=1e-6) for k, v in test.items()},
        "test_ci": {k: [pytest.approx(v[1], abs=1e-6), pytest.approx(v[2], abs=1e-6)] for k, v in test.items()},
        "class_reach": []}
    assert f"oracle ({auc:.3f})" in roc_labels  # its ROC curve, from its test probabilities
    assert bar_lines["oracle macro_auc"] == pytest.approx(auc)  # its test points as the reference lines
    assert bar_lines["oracle balanced_accuracy"] == pytest.approx(acc)


def _finished_search(runs: Path, name: str, dataset: str, params: dict, searched: list[str] | None = None) -> Path:
    """A search folder as a finished search leaves it: its state file and outcome.json."""
    from tuning.hpo.driver import SearchState

    folder = runs / "ray" / name
    SearchState("parent", f"sqlite:///{runs / 'mlflow.db'}", "1", {"dataset": dataset}).save(folder)
    SearchOutcome(dataset, "cv_auc", [TrialResult("t1", params=params, score=0.8, epoch=2)], str(folder), "p",
                  "u", "1", "parent", searched if searched is not None else list(params)).save()
    return folder


def test_a_search_of_another_dataset_is_refused_naming_both_and_the_folder(tmp_path: Path) -> None:
    """The bug report: a MEN search was taken as Derm7pt's tuned configuration (exit 0)."""
    folder = _finished_search(tmp_path, "men-default", "men", {"loss.w_cp": 0.1})
    with pytest.raises(ConfigError) as info:
        plan_comparison("derm7pt", tmp_path, runs_dir=tmp_path, from_search="men-default", search="smoke")
    assert str(info.value) == (f"--from-search: the search in {folder} tuned dataset 'men', not this comparison's "
                               "'derm7pt': its values are another experiment's")


def test_the_compare_command_refuses_it_before_ray_starts(tmp_path: Path, capsys) -> None:
    from tuning.compare import main

    folder = _finished_search(tmp_path, "men-default", "men", {"loss.w_cp": 0.1})
    code = main(["--dataset", "derm7pt", "--data-root", str(tmp_path / "nowhere"), "--runs-dir", str(tmp_path),
                 "--from-search", "men-default", "--search", "smoke"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert err.startswith(f"error: --from-search: the search in {folder} tuned dataset 'men', not this comparison's "
                          "'derm7pt'")


@pytest.mark.parametrize("params,searched,match", [
    ({"loss.w_cp": 0.1, "loss.w_xyz": 0.2}, None, r"searched loss.w_xyz, which this comparison's 'men' "
                                                  r"configuration does not have$"),
    ({"loss.w_cp": 0.1}, ["loss.w_cp", "model.depth"], r"searched model.depth, which"),
    ({"model.dim": 36}, None, r"does not fit this comparison's configuration: config.model.heads: "
                              r"dim 36 is not divisible by 8 heads$"),
])
def test_searched_values_the_comparison_cannot_take_are_refused_naming_them(tmp_path: Path, params, searched,
                                                                            match) -> None:
    folder = _finished_search(tmp_path, "men-x", "men", params, searched)
    with pytest.raises(ConfigError, match=rf"^--from-search: .*{folder}.*{match}"):
        plan_comparison("men", tmp_path, runs_dir=tmp_path, from_search="men-x", search="smoke",
                        overrides={"model.heads": 8})


def test_a_tuned_list_value_is_read_back_into_the_config(tmp_path: Path) -> None:
    _finished_search(tmp_path, "men-stages", "men", {"model.mixer_stages": [3, 4]})
    plan = plan_comparison("men", tmp_path, runs_dir=tmp_path, from_search="men-stages", search="smoke",
                           variants="cfcml_tuned", seeds=1)
    assert plan.variants["cfcml_tuned"].model.mixer_stages == (3, 4)
    assert plan.variants["cfcml"].model.mixer_stages == (4,)  # the smoke search's


def test_the_report_says_which_variants_learn_the_classes_only_both_modalities_identify() -> None:
    """On a synthetic cohort whose oracle finds class `a` crossmodal: a variant that ranks `a` well
    beyond what one modality gives learns it, one that ranks it at chance does not; the oracle's
    recalls fill its row; the JSON keeps every figure."""
    import json

    from cfcml.evaluation.metrics import bootstrap_ci
    from cfcml.evaluation.oracle import BOTH, ClassReach, OracleScores

    rng = np.random.default_rng(4)
    y = np.arange(90) % 3
    good = _probs(y, 0.3, rng)
    blind = _probs(np.where(y == 0, rng.integers(1, 3, 90), y), 0.3, rng)  # an `a` looks like a `b` or a `c`
    trials = [{"variant": name, "seed": 0, "metrics": {"cv_macro_auc": 0.8}, "test_probs": p}
              for name, p in (("cfcml", blind), ("film", good))]
    variants = aggregate(trials, "multiclass", ["a", "b", "c"], y, ["cfcml", "film"], n_boot=200)
    reach = [ClassReach("a", {"image": 0.5, "table": 0.55, BOTH: 0.97}, {"image": 0.52, "table": 0.6, BOTH: 0.96}),
             *(ClassReach(c, {"image": 0.9, "table": 0.6, BOTH: 0.95}, {"image": 0.9, "table": 0.6, BOTH: 0.95})
               for c in "bc")]
    oracle = OracleScores(["image_signal", "table_signal"], {"macro_auc": 0.97}, bootstrap_ci(
        "multiclass", y, good, n_boot=50), good, reach)
    result = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], variants, y, oracle,
                              3, 2, 1)
    text = markdown(result)
    assert "## What each method learns (synthetic data)" in text and "**a** (0.50 / 0.55 / 0.97)" in text
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ")
            and line.count("|") == 9}
    assert rows["cfcml"].endswith("| 0.600 | no |") and rows["film"].endswith("| 0.600 | **yes** |")
    assert "Learn every crossmodal class: `film`." in text
    data = json.loads(json.dumps(result.to_json()))
    assert [(c["variant"], c["class"], c["learnt"]) for c in data["learnt"]] == [("cfcml", "a", False),
                                                                                 ("film", "a", True)]
    assert [r["crossmodal"] for r in data["oracle"]["class_reach"]] == [True, False, False]

    # an oracle whose classes each need one modality only: a sentence, no table
    plain = ComparisonResult("men", "cv_macro_auc", "macro_auc", "multiclass", ["a", "b", "c"], variants, y,
                             OracleScores([], {}, {}, good, [reach[1]] * 3), 3, 2, 1)
    assert "no class here tests whether a method combines the modalities" in markdown(plain)
    assert plain.to_json()["learnt"] == []
