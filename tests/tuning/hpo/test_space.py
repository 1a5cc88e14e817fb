"""Search configs: validated at load with the file and key named; the public values come first."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from tiny_men import prepare_tiny_men, tiny_experiment

from cfcml.config import ConfigError, load_experiment
from tuning.hpo.run import parse_set
from tuning.hpo.space import initial_point, load_search


@pytest.fixture
def base():
    return load_experiment("men")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("name", ["default", "demo", "smoke"])
def test_shipped_searches_load_for_both_datasets(name):
    for dataset in ("men", "derm7pt"):
        base = load_experiment(dataset)
        search = load_search(name, base)
        assert search.space and all(p.key.startswith("loss.") for p in search.space if name == "smoke")
        base.replace(search.overrides)  # the overrides are valid experiment keys


# what the comparisons found to matter (issue 24): the fine stage off, the optimiser, dropout, width,
# class balancing and whole-input dropout; the fine stage's own settings stay searched too
REACHED = ("loss.fine", "optim.lr", "optim.weight_decay", "model.dropout", "model.dim", "loss.class_weights",
           "train.modality_dropout", "train.field_dropout",
           "loss.tau_sam", "loss.tau_up", "loss.tau_cp", "loss.momentum", "loss.w_sam", "loss.w_up", "loss.w_cp")


@pytest.mark.parametrize("name", ["default"])  # demo keeps its space until its figures are measured (issue 24)
@pytest.mark.parametrize("dataset", ["men", "derm7pt"])
def test_the_shipped_searches_reach_the_fine_stage_off_and_the_training_settings(name, dataset):
    """Every listed key is searched; the fine stage can be off, both class balancings are offered,
    and the published value of every searched key lies inside its range (it is the first trial)."""
    base = load_experiment(dataset)
    search = load_search(name, base)
    params = {p.key: p for p in search.space}
    assert set(REACHED) <= set(params)
    assert set(params["loss.fine"].values) == {True, False}
    assert set(params["loss.class_weights"].values) == {"balanced", "none"}
    published = base.replace(search.overrides)
    for key, value in initial_point(search, published).items():
        param = params[key]
        assert value == published.value(key), key  # the experiment's own value, not a substitute
        if param.dist == "choice":
            assert value in param.values, key
        else:
            assert param.low <= value <= param.high and math.isfinite(param.low) and math.isfinite(param.high), key


def test_initial_point_is_the_experiment_values(base):
    search = load_search("default", base)
    point = initial_point(search, base)
    assert point["loss.tau_sam"] == 0.07 and point["loss.w_cp"] == 0.24 and point["loss.momentum"] == 0.0


def test_smoke_dataset_overrides_pick_the_dataset(base):
    men = base.replace(load_search("smoke", base).overrides)
    derm_base = load_experiment("derm7pt")
    derm = derm_base.replace(load_search("smoke", derm_base).overrides)
    assert men.train.image_size == (32, 32, 8) and derm.train.image_size == (64, 64)


@pytest.mark.parametrize("text,match", [
    ("num_sampels: 3\n", r"num_sampels: unknown key"),
    ("num_samples: 0\n", r"num_samples: expected a positive integer"),
    ("space:\n  loss.tau_sam: {dist: gaussian, low: 0.1, high: 1}\n", r"space.loss.tau_sam.dist"),
    ("space:\n  loss.tau_sam: {dist: loguniform, low: 0.5, high: 0.1}\n", r"space.loss.tau_sam: need 0 < low < high"),
    ("space:\n  loss.tau_sam: {dist: loguniform, low: 0.0, high: 0.1}\n", r"space.loss.tau_sam"),
    ("space:\n  loss.tau_same: {dist: uniform, low: 0.1, high: 0.2}\n",
     r"space.loss.tau_same: .*tau_same: unknown key"),
    ("space:\n  loss.momentum: {dist: uniform, low: 0.5, high: 1.5, step: 1}\n",
     r"space.loss.momentum.step: unknown key"),
    ("space:\n  model.variant: {dist: choice, values: []}\n", r"space.model.variant"),
    ("overrides: {model.dim: -4}\n", r"overrides: .*model.dim: must be > 0"),
    ("startup_trials: 0\n", r"startup_trials: expected a positive integer"),
    # several objectives (issue 24): each a validation metric, named once, the primary one maximised
    ("objectives: [macro_auc, balanced_acc]\n", r"objectives\[1\]: 'balanced_acc' is not a validation metric"),
    ("objectives: [macro_auc, balanced_accuracy, macro_auc]\n", r"objectives\[2\]: 'macro_auc' is named twice"),
    ("objectives: [brier, macro_auc]\n", r"objectives\[0\]: 'brier' is minimised, but the primary"),
    ("objectives: macro_auc\n", r"objectives"),
])
def test_bad_search_configs_name_file_and_key(tmp_path, base, text, match):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=match) as info:
        load_search(path, base)
    assert str(info.value).startswith(path)


@pytest.mark.parametrize("space,match", [
    # a high bound past the config's own check (loss.momentum must be in [0, 1))
    ("loss.momentum: {dist: uniform, low: 0.0, high: 1.5}", r"space.loss.momentum.high: 1.5 can be sampled.*\[0, 1\)"),
    ("loss.momentum: {dist: uniform, low: 0.5, high: 1.0}", r"space.loss.momentum.high: 1.0 can be sampled"),
    ("loss.momentum: {dist: uniform, low: -0.5, high: 0.5}", r"space.loss.momentum.low: -0.5"),
    # every categorical choice, not only the first
    ("loss.momentum: {dist: choice, values: [0.0, 0.5, 2.0]}", r"space.loss.momentum.values\[2\]: 2.0"),
    ("model.dim: {dist: choice, values: [32, -8]}", r"space.model.dim.values\[1\]: -8"),
    # int: whole bounds, both valid
    ("model.dim: {dist: int, low: 8, high: 32.5}", r"space.model.dim: dist: int needs whole-number"),
    ("model.dim: {dist: int, low: -8, high: 32}", r"space.model.dim.low: -8"),
    # a float distribution over an integer key samples non-integers
    ("model.dim: {dist: uniform, low: 8, high: 32}", r"space.model.dim.low: 8.0 can be sampled"),
    ("loss.tau_sam: {dist: loguniform, low: -1, high: 0.5}", r"space.loss.tau_sam: need 0 < low < high"),
])
def test_every_value_a_space_can_sample_is_checked_against_the_config(tmp_path, base, space, match):
    """Refused at load (before Ray starts), naming the key and the bound that fails."""
    path = write(tmp_path, f"space:\n  {space}\n")
    with pytest.raises(ConfigError, match=match) as info:
        load_search(path, base)
    assert str(info.value).startswith(path) and "\n" not in str(info.value)


def test_a_valid_space_keeps_its_bounds(tmp_path, base):
    path = write(tmp_path, "space:\n  loss.momentum: {dist: uniform, low: 0.0, high: 0.95}\n"
                           "  model.dim: {dist: choice, values: [16, 32]}\n")
    search = load_search(path, base)
    assert [p.bounds() for p in search.space] == [[("low", 0.0), ("high", 0.95)],
                                                   [("values[0]", 16), ("values[1]", 32)]]


def test_unknown_search_name_lists_the_known_ones(base):
    with pytest.raises(ConfigError, match=r"unknown search 'nope'.*known: default, demo, smoke"):
        load_search("nope", base)


def test_parse_set_reads_yaml_values():
    assert parse_set(["model.pretrained=/w/swin.pt", "train.image_size=[32, 32, 8]", "loss.fine=false"]) == {
        "model.pretrained": "/w/swin.pt", "train.image_size": [32, 32, 8], "loss.fine": False}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_set(["no-equals-sign"])


@pytest.mark.parametrize("text,num_samples,startup", [
    ("{}\n", 4, 1),             # the demo search: the defaults, then TPE at once
    ("{}\n", 8, 2),
    ("{}\n", 24, 8),            # the default search
    ("{}\n", 100, 10),          # Optuna's own default is the ceiling
    ("startup_trials: 5\n", 8, 5),
])
def test_tpe_models_within_the_trial_budget(tmp_path, base, text, num_samples, startup):
    """Optuna's TPE proposes at random for its first 10 trials by default, so a search of 10 trials
    or fewer would be a random search under TPE's name (bench_search saw identical proposals)."""
    search = load_search(write(tmp_path, text), base)
    assert search.tpe_startup_trials(num_samples) == startup



def test_input_dropout_keys_are_searchable_and_their_range_is_checked(tmp_path, base):
    search = load_search(write(tmp_path, "space:\n  train.modality_dropout: {dist: uniform, low: 0.0, high: 0.3}\n"
                                         "  train.field_dropout: {dist: choice, values: [0.0, 0.1, 0.2]}\n"), base)
    assert [p.key for p in search.space] == ["train.modality_dropout", "train.field_dropout"]
    assert initial_point(search, base) == {"train.modality_dropout": 0.0, "train.field_dropout": 0.0}
    with pytest.raises(ConfigError, match=r"train.field_dropout: must be in \[0, 1\)"):
        load_search(write(tmp_path, "space:\n  train.field_dropout: {dist: choice, values: [1.5]}\n"), base)


def test_the_command_line_is_checked_against_the_space_too(tmp_path):
    """A --set that makes a sampled value invalid (dim 36 is fine with 4 heads, not with 8) fails
    when the search is resolved, before Ray starts, naming the bound."""
    from tuning.hpo.run import SearchRun

    path = write(tmp_path, "space:\n  model.dim: {dist: choice, values: [32, 36]}\n")
    SearchRun.build("men", path)  # 4 heads: both choices divide
    with pytest.raises(ConfigError, match=r"with --set and the flags\): space.model.dim.values\[1\]: 36 .*"
                                          r"not divisible by 8 heads"):
        SearchRun.build("men", path, overrides={"model.heads": 8})


# ------------------------------------------------------------------ non-finite bounds and choices


@pytest.mark.parametrize("space,match", [
    ("loss.tau_sam: {dist: loguniform, low: 0.02, high: .inf}", r"space.loss.tau_sam.high: expected a finite number, "
                                                                  r"got inf$"),
    ("loss.momentum: {dist: uniform, low: -.inf, high: 0.5}", r"space.loss.momentum.low: expected a finite number, "
                                                                r"got -inf$"),
    ("loss.momentum: {dist: uniform, low: .nan, high: 0.5}", r"space.loss.momentum.low: expected a finite number, "
                                                               r"got nan$"),
    ("model.dim: {dist: int, low: 8, high: .inf}", r"space.model.dim.high: expected a finite number, got inf$"),
    ("loss.w_cp: {dist: uniform, low: 0.1, high: 'inf'}", r"space.loss.w_cp.high: expected a finite number, "
                                                            r"got 'inf'$"),
    # a choice value is judged by the key's own rule, which refuses nan and inf
    ("loss.momentum: {dist: choice, values: [0.0, .nan]}", r"space.loss.momentum.values\[1\]: nan can be sampled "
                                                            r".*expected a finite number, got nan$"),
    ("loss.w_cp: {dist: choice, values: [.inf, 0.1]}", r"space.loss.w_cp.values\[0\]: inf can be sampled "
                                                        r".*expected a finite number, got inf$"),
])
def test_search_bounds_and_choices_must_be_finite(tmp_path, base, space, match):
    path = write(tmp_path, f"space:\n  {space}\n")
    with pytest.raises(ConfigError, match=match) as info:
        load_search(path, base)
    assert str(info.value).startswith(f"{path}: ") and "\n" not in str(info.value)


def test_set_optim_lr_nan_is_refused_when_the_search_is_resolved(tmp_path):
    """The bug report: `--set optim.lr=nan` passed validation and every trial failed in Ray."""
    from tuning.hpo.run import SearchRun

    with pytest.raises(ConfigError, match=r"^config\.optim\.lr: expected a finite number, got nan$"):
        SearchRun.build("men", "smoke", overrides=parse_set(["optim.lr=nan"]), runs_dir=tmp_path)


# ------------------------------------------------------------------ a search file that says two things


@pytest.mark.parametrize("text,message", [
    ("num_samples: 2\nmax_epochs: 3\nnum_samples: 40\n", "duplicate key 'num_samples' at lines 1 and 3"),
    ("space:\n  loss.tau_sam: {dist: loguniform, low: 0.02, high: 0.5}\n"
     "  loss.tau_sam: {dist: loguniform, low: 0.1, high: 0.2}\n", "duplicate key 'loss.tau_sam' at lines 2 and 3"),
    ("space:\n  loss.momentum: {dist: uniform, low: 0.0, low: 0.5, high: 0.9}\n",
     "duplicate key 'low' twice on line 2"),
    ("overrides:\n  model.dim: 32\n  model.dim: 64\n", "duplicate key 'model.dim' at lines 2 and 3"),
])
def test_a_search_file_naming_a_key_twice_is_refused_with_both_lines(tmp_path, base, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_search(path, base)
    assert str(info.value) == f"{path}: {message}: give it once"


def test_a_set_value_naming_a_key_twice_is_refused():
    with pytest.raises(ConfigError, match=r"^--set 'model=\{dim: 32, dim: 64\}': the value is not valid YAML "
                                          r"\(duplicate key 'dim' twice on line 1\)$"):
        parse_set(["model={dim: 32, dim: 64}"])


# ------------------------------------------------------------------ choices are typed as their key


@pytest.mark.parametrize("space,match", [
    # a list-typed key: every choice a list of the element type
    ("model.mixer_stages: {dist: choice, values: [[4], 4]}",
     r"space.model.mixer_stages.values\[1\]: 4 can be sampled .*model.mixer_stages: expected a list, got 4$"),
    ("model.mixer_stages: {dist: choice, values: [[4], [3, x]]}",
     r"space.model.mixer_stages.values\[1\]: \[3, 'x'\] can be sampled .*mixer_stages\[1\]: expected an integer"),
    ("train.image_size: {dist: choice, values: [[32, 32, 8], [32, 0.5]]}",
     r"space.train.image_size.values\[1\]: \[32, 0.5\] can be sampled .*image_size\[1\]: expected an integer"),
    # a scalar key: no list among its choices
    ("model.dim: {dist: choice, values: [32, [64]]}",
     r"space.model.dim.values\[1\]: \[64\] can be sampled .*model.dim: expected an integer, got \[64\]$"),
    ("model.variant: {dist: choice, values: [cfcml, [image_only]]}",
     r"space.model.variant.values\[1\]: \['image_only'\] can be sampled .*expected one of"),
])
def test_every_choice_is_checked_as_a_value_of_its_key(tmp_path, base, space, match):
    path = write(tmp_path, f"space:\n  {space}\n")
    with pytest.raises(ConfigError, match=match) as info:
        load_search(path, base)
    assert str(info.value).startswith(f"{path}: ")


def test_choices_are_held_as_the_config_holds_them(tmp_path, base):
    search = load_search(write(tmp_path, "space:\n  model.mixer_stages: {dist: choice, values: [[4], [3, 4]]}\n"
                                         "  optim.lr: {dist: choice, values: [5e-4, 1.0e-3]}\n"), base)
    stages, lr = search.space
    assert stages.values == ((4,), (3, 4)) and lr.values == (5e-4, 1e-3)  # YAML reads 5e-4 as a string
    assert stages.labelled and not lr.labelled


def test_a_sampled_list_choice_makes_a_valid_config(tmp_path):
    """The bug report: a list-valued choice failed after Ray started (Optuna: "'(4,)' not in ([4],
    [3, 4])"). Optuna's own searcher, as the search builds it, proposes the first point and then
    samples; every proposal Tune would hand a trial decodes into a valid experiment."""
    from tuning.hpo.driver import search_algorithms
    from tuning.hpo.run import SearchRun

    path = write(tmp_path, "space:\n  model.mixer_stages: {dist: choice, values: [[4], [3, 4]]}\n"
                           "  train.image_size: {dist: choice, values: [null, [32, 32, 8]]}\n"
                           "  loss.tau_sam: {dist: loguniform, low: 0.02, high: 0.5}\n")
    run = SearchRun.build("men", path, overrides={"model.mixer_stages": [4]}, runs_dir=tmp_path, num_samples=12)
    searcher, _ = search_algorithms(run, "selected_cv_macro_auc")
    assert searcher.set_search_properties("selected_cv_macro_auc", "max", run.search.param_space())
    seen = set()
    for i in range(12):
        proposal = searcher.suggest(f"t{i}")
        cfg = run.experiment.replace(run.search.decode(proposal))
        if i == 0:  # the experiment's own values come first
            assert (cfg.model.mixer_stages, cfg.train.image_size, cfg.loss.tau_sam) == ((4,), None, 0.07)
        seen.add((cfg.model.mixer_stages, cfg.train.image_size))
        assert cfg.model.mixer_stages in ((4,), (3, 4)) and cfg.train.image_size in (None, (32, 32, 8))
        searcher.on_trial_complete(f"t{i}", {"selected_cv_macro_auc": 0.5 + 0.01 * i})
    assert {s for s, _ in seen} == {(4,), (3, 4)}


def test_a_choice_without_the_experiment_value_starts_from_its_first_value(tmp_path, base):
    """Optuna cannot evaluate a choice it does not have (it failed the first trial after Ray
    started); the other searched keys keep the experiment's values."""
    search = load_search(write(tmp_path, "space:\n  model.mixer_stages: {dist: choice, values: [[4], [3, 4]]}\n"
                                         "  loss.tau_sam: {dist: loguniform, low: 0.02, high: 0.5}\n"), base)
    assert base.model.mixer_stages == (2, 3, 4)
    assert initial_point(search, base) == {"model.mixer_stages": "[4]", "loss.tau_sam": 0.07}
    assert search.decode(initial_point(search, base)) == {"model.mixer_stages": (4,), "loss.tau_sam": 0.07}


# ------------------------------------------------------------------ the fine stage off, sampled and trained


@pytest.fixture(scope="module")
def tiny_men(tmp_path_factory: pytest.TempPathFactory):
    return prepare_tiny_men(tmp_path_factory.mktemp("space"), patients=30, seed=5)


def test_a_sampled_trial_with_the_fine_stage_off_trains_without_fine_stage_loss(tmp_path, tiny_men):
    """The default search as Optuna proposes it (the searcher the search builds): the first trial is the
    published point (fine stage on), a later proposal switches the fine stage off, and that
    configuration, applied over the tiny model, trains a step whose only loss term is the
    cross-entropy (L_sam, L_up, L_cp reported as 0), while the published point's are not 0."""
    from cfcml.training import CrossValidation, Split
    from tuning.hpo.driver import search_algorithms
    from tuning.hpo.run import SearchRun

    run = SearchRun.build("men", "default", runs_dir=tmp_path, num_samples=24)
    searcher, _ = search_algorithms(run, "selected_cv_macro_auc")
    assert searcher.set_search_properties("selected_cv_macro_auc", "max", run.search.param_space())
    proposals = []
    for i in range(24):
        proposals.append(run.search.decode(searcher.suggest(f"t{i}")))
        searcher.on_trial_complete(f"t{i}", {"selected_cv_macro_auc": 0.5 + 0.01 * (i % 5)})
        if not proposals[-1]["loss.fine"]:
            break
    first, off = proposals[0], proposals[-1]
    assert first == {key: run.experiment.value(key) for key in run.search.keys}  # the published point first
    assert first["loss.fine"] is True and off["loss.fine"] is False

    splits = [Split(*tiny_men.fold_frames(k)) for k in range(2)]
    terms = {}
    for name, proposal in (("published", first), ("fine off", off)):
        cfg = tiny_experiment().replace(proposal)
        assert cfg.loss.fine is proposal["loss.fine"] and cfg.optim.lr == proposal["optim.lr"] and cfg.loss.w_cls == 1
        torch.manual_seed(0)
        terms[name] = CrossValidation(tiny_men, splits, cfg).train_epoch(0)
    on, no_fine = terms["published"], terms["fine off"]
    assert all(on[f"train_{t}"] > 0 for t in ("sam", "up", "cp"))
    assert all(no_fine[f"train_{t}"] == 0 for t in ("sam", "up", "cp"))
    assert no_fine["train_ce"] > 0
    assert no_fine["train_loss"] == pytest.approx(no_fine["train_ce"])  # w_cls * CE, w_cls = 1


def test_the_primary_objective_selects_and_the_others_are_checked_against_the_task(tmp_path):
    """The first objective becomes train.selection_metric (it picks each trial's epoch); a metric
    the dataset's task lacks fails before Ray starts; a --set selection metric that contradicts the
    primary is refused; the Tune keys are each objective's value at the selected epoch."""
    from cfcml.data.spec import load_dataset_spec
    from tuning.hpo.run import SearchRun

    spec = load_dataset_spec("men")  # multiclass
    run = SearchRun.build("men", write(tmp_path, "objectives: [balanced_accuracy, macro_auc, brier]\n"),
                          runs_dir=tmp_path)
    assert run.search.multi_objective and run.experiment.train.selection_metric == "balanced_accuracy"
    assert run.metric(spec) == "cv_balanced_accuracy"
    assert run.objective_keys == ["selected_cv_balanced_accuracy", "selected_cv_macro_auc", "selected_cv_brier"]
    binary_only = SearchRun.build("men", write(tmp_path, "objectives: [macro_auc, g_mean]\n"), runs_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"objectives\[1\]: 'g_mean' is not a validation figure of this multiclass"):
        binary_only.metric(spec)
    with pytest.raises(ConfigError, match=r"--set train.selection_metric: 'macro_auc' differs from the search's "
                                          r"primary objective 'balanced_accuracy'"):
        SearchRun.build("men", write(tmp_path, "objectives: [balanced_accuracy, macro_auc]\n"), runs_dir=tmp_path,
                        overrides={"train.selection_metric": "macro_auc"})
    single = SearchRun.build("men", "smoke", runs_dir=tmp_path)  # no objectives: today's selection metric
    assert not single.search.multi_objective and single.search.objectives == () and single.objective_keys == []
