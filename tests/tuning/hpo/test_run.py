"""SearchRun: one precedence (command line > search file > experiment file > defaults), resolved
once; the fold seed and fold count belong to the prepared data."""
from __future__ import annotations

from pathlib import Path

import pytest

from cfcml.config import ConfigError
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.hpo.prepared import load_or_prepare
from tuning.hpo.run import SearchRun
from tuning.records.outcome import SearchOutcome, TrialResult
from tuning.search import build_run, parse_args


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(text)
    return str(path)


def test_each_level_overrides_the_one_below(tmp_path: Path) -> None:
    search = write(tmp_path, "max_epochs: 7\nfolds: 3\nnum_samples: 4\n"
                             "overrides: {train.batch_size: 4, model.dim: 64}\n"
                             "dataset_overrides: {men: {model.dim: 32}}\n")
    run = SearchRun.build("men", search)
    t = run.experiment.train
    assert (t.epochs, t.folds, t.batch_size) == (7, 3, 4)  # search file over experiment file (100, 5, 8)
    assert run.experiment.model.dim == 32  # dataset_overrides over overrides
    assert run.experiment.loss.w_cp == 0.24  # experiment file (the public MEN weights)
    assert run.experiment.optim.step_size == 5 and run.num_samples == 4 and run.max_epochs == 7
    run = SearchRun.build("men", search, max_epochs=9, folds=4, num_samples=2, seed=3,
                          overrides={"train.epochs": 8, "train.batch_size": 2, "model.dim": 16})
    t = run.experiment.train
    assert (t.epochs, t.folds, t.batch_size, t.seed) == (9, 4, 2, 3)  # a flag beats --set of the same key
    assert run.experiment.model.dim == 16 and run.num_samples == 2
    assert run.name == "men-s" and run.search_dir == run.runs_dir / "ray" / "men-s"


def test_command_line_maps_onto_the_run() -> None:
    args = parse_args(["--dataset", "men", "--search", "smoke", "--image-size", "32", "32", "8", "--set",
                       "loss.fine=false", "--folds", "3", "--fold-seed", "5", "--no-final", "--verbose"])
    run = build_run(args)
    assert run.experiment.train.image_size == (32, 32, 8) and not run.experiment.loss.fine
    assert run.experiment.train.folds == 3 and run.fold_seed == 5 and not run.final and run.verbose
    assert run.experiment.train.seed == 0  # --seed not given: the experiment's


def test_bad_values_name_their_key() -> None:
    with pytest.raises(ConfigError, match=r"train.folds: cross-validation needs at least 2 folds"):
        SearchRun.build("men", "smoke", folds=1)
    with pytest.raises(ConfigError, match=r"model.dimm: unknown key"):
        SearchRun.build("men", "smoke", overrides={"model.dimm": 3})
    with pytest.raises(ConfigError, match="--num-samples"):
        SearchRun.build("men", "smoke", num_samples=0)


def test_max_failures_is_in_the_search_help(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "train.max_failures" in capsys.readouterr().out


def test_prepared_folder_keeps_its_folds_and_fold_seed(tmp_path: Path) -> None:
    root = make_men(tmp_path / "men", patients=12, seed=0, size=(16, 16, 4))
    prepared = prepare_dataset("men", root, folds=2, fold_seed=7, image_size=(16, 16, 4))
    assert prepared.fold_seed == 7 and prepared.info["fold_seed"] == 7
    again = load_or_prepare("men", prepared.out_dir, folds=2, fold_seed=None, image_size=None)
    assert again.fold_seed == 7  # not given: the folder's own
    same = load_or_prepare("men", prepared.out_dir, folds=2, fold_seed=7, image_size=(16, 16, 4))
    assert same.fingerprint == prepared.fingerprint
    with pytest.raises(ConfigError, match=r"--data-root: .*--fold-seed: 7 there, 1 asked"):
        load_or_prepare("men", prepared.out_dir, folds=2, fold_seed=1, image_size=None)
    with pytest.raises(ConfigError, match=r"train.folds \(--folds\): 2 there, 3 asked"):
        load_or_prepare("men", prepared.out_dir, folds=3, fold_seed=None, image_size=None)
    with pytest.raises(ConfigError, match=r"--data-root: no dataset at"):
        load_or_prepare("men", tmp_path / "nowhere", folds=2, fold_seed=None, image_size=None)
    raw = make_men(tmp_path / "raw", patients=12, seed=0, size=(16, 16, 4))
    (raw / "prepared").write_text("not a folder\n")  # where the raw dataset's preparation would go
    with pytest.raises(ConfigError, match=r"^--data-root: prepare's output folder .*prepared is a file, not a folder$"):
        load_or_prepare("men", raw, folds=2, fold_seed=None, image_size=(16, 16, 4))


@pytest.fixture(scope="module")
def men_16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A raw MEN-like dataset (12 patients, 16x16x4) and its prepare at 2 folds, fold seed 0."""
    root = make_men(tmp_path_factory.mktemp("men16") / "men", patients=12, seed=0, size=(16, 16, 4))
    prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(16, 16, 4))
    return root


@pytest.mark.parametrize("asked,match", [
    (dict(image_size=(32, 32, 8)), r"train.image_size \(--image-size\): \{'t1': \[16, 16, 4\].* there, "
                                   r"\{'t1': \[32, 32, 8\].* asked"),
    (dict(image_size=(16, 16, 4), folds=3), r"train.folds \(--folds\): 2 there, 3 asked"),
    (dict(fold_seed=5), r"--fold-seed: 0 there, 5 asked"),
    # a dataset config edited since (the clip window) or another config of the same data
    (dict(dataset="clip"), r"clip.yaml: intensity.clip: \[0.0, 1200.0\] there, \[0.0, 1.0\] asked"),
    (dict(dataset="derm7pt"), r"derm7pt.yaml: classes"),
])
def test_a_prepared_folder_refuses_every_setting_it_was_not_prepared_with(men_16: Path, tmp_path: Path,
                                                                          asked: dict, match: str) -> None:
    """One line naming the setting, the recorded and the asked value; the folder is untouched."""
    import yaml

    from cfcml.data.spec import spec_path

    dataset = asked.pop("dataset", "men")
    if dataset == "clip":
        spec = yaml.safe_load(spec_path("men").read_text())
        spec["intensity"] = {**(spec.get("intensity") or {}), "clip": [0.0, 1.0]}
        (tmp_path / "clip.yaml").write_text(yaml.safe_dump({**spec, "name": "men"}))
        dataset = str(tmp_path / "clip.yaml")
    prepared_dir = men_16 / "prepared"
    before = {p: p.stat().st_mtime_ns for p in prepared_dir.rglob("*")}
    kwargs = {"folds": 2, "fold_seed": None, "image_size": None, **asked}
    with pytest.raises(ConfigError, match=match) as info:
        load_or_prepare(dataset, prepared_dir, **kwargs)
    assert "\n" not in str(info.value) and str(prepared_dir) in str(info.value)
    assert {p: p.stat().st_mtime_ns for p in prepared_dir.rglob("*")} == before


def test_a_raw_root_prepares_other_settings_beside_the_existing_prepare(men_16: Path) -> None:
    prepared_dir = men_16 / "prepared"
    before = {p: p.stat().st_mtime_ns for p in prepared_dir.rglob("*")}
    lines: list[str] = []
    other = load_or_prepare("men", men_16, folds=2, fold_seed=None, image_size=(8, 8, 4), log=lines.append)
    assert other.out_dir != prepared_dir and other.out_dir.parent == men_16
    assert other.out_dir.name.startswith("prepared-")
    assert {m.size for m in other.spec.modalities} == {(8, 8, 4)}
    assert any("left as it is, preparing anew in" in line for line in lines)
    assert {p: p.stat().st_mtime_ns for p in prepared_dir.rglob("*")} == before  # nothing overwritten
    # the same settings again find the existing prepare
    same = load_or_prepare("men", men_16, folds=2, fold_seed=0, image_size=(16, 16, 4), log=lines.append)
    assert same.out_dir == prepared_dir.resolve()


def test_outcome_round_trips_with_typed_trials(tmp_path: Path) -> None:
    run = SearchRun.build("men", "smoke")
    good = TrialResult("a", params={"loss.tau_sam": 0.1}, score=0.8, epoch=2, metrics={"cv_macro_auc": 0.8},
                       experiment=run.experiment.replace({"loss.tau_sam": 0.1}))
    outcome = SearchOutcome("men", "cv_macro_auc", [TrialResult("b", error="boom"), good,
                                                    TrialResult("c", score=0.7, epoch=1)],
                            str(tmp_path), "prep", "sqlite:///x.db", "1", "run", ["loss.tau_sam"])
    back = SearchOutcome.load(outcome.save())
    assert back == outcome
    assert back.best.trial_id == "a" and back.best.experiment.loss.tau_sam == 0.1
    assert not back.trials[0].scored


def test_selection_metric_is_configurable_and_checked() -> None:
    from cfcml.data.spec import load_dataset_spec

    spec = load_dataset_spec("men")
    assert SearchRun.build("men", "smoke").metric(spec) == "cv_macro_auc"
    run = SearchRun.build("men", "smoke", overrides={"train.selection_metric": "balanced_accuracy"})
    assert run.metric(spec) == "cv_balanced_accuracy"
    with pytest.raises(ConfigError, match=r"train.selection_metric: 'auc' is not a multiclass metric"):
        SearchRun.build("men", "smoke", overrides={"train.selection_metric": "auc"}).metric(spec)
