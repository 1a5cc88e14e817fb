"""Dataset specs: the shipped YAMLs load, bad keys fail naming the key path."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from cfcml.config import ConfigError
from cfcml.data.spec import load_dataset_spec, spec_from_dict, spec_to_dict

MEN_YAML = Path(__file__).resolve().parents[2] / "conf" / "datasets" / "men.yaml"


def test_men_spec() -> None:
    spec = load_dataset_spec("men")
    assert spec.task == "multiclass" and spec.selection_metric == "macro_auc"
    assert spec.classes == ("Grade_1", "Grade_2_invasion", "Grade_2_noninvasion")
    assert [(m.name, m.dims, m.channels, m.size) for m in spec.modalities] == [
        ("t1", 3, 1, (128, 128, 24)), ("t2", 3, 1, (128, 128, 24)), ("adc", 3, 1, (128, 128, 24))]
    assert [f.name for f in spec.categorical_fields] == ["location", "sex"]
    assert [f.name for f in spec.numeric_fields] == ["age", "adc_value", "tumour_area", "oedema_area"]
    assert spec.categorical_fields[0].categories == ("1", "2", "3")  # YAML ints -> vocabulary strings
    assert spec.intensity.mode == "zscore_nonzero" and spec.intensity.clip == (0.0, 1200.0)
    assert spec.augment.random_resized_crop and spec.augment.flip and spec.augment.gaussian_noise


def test_derm7pt_spec() -> None:
    spec = load_dataset_spec("derm7pt")
    assert spec.task == "binary" and spec.selection_metric == "auc" and spec.classes == ("NEV", "MEL")
    assert [(m.name, m.dims, m.channels, m.size) for m in spec.modalities] == [
        ("clinic", 2, 3, (224, 224)), ("derm", 2, 3, (224, 224))]
    # the honest default leaves out the fields recorded with or after the diagnosis
    assert [f.name for f in spec.fields] == ["elevation", "location", "sex"] and not spec.numeric_fields
    assert spec.class_of("reed or spitz nevus") == "NEV" and spec.class_of("melanoma (in situ)") == "MEL"
    assert spec.class_of("lentigo") is None and "lentigo" in spec.source.ignored_labels
    aug = spec.augment
    assert aug.flip and aug.rotate90 and aug.shift_scale_rotate and aug.brightness_contrast


def test_derm7pt_public_adds_the_leaky_fields_and_inherits_the_rest() -> None:
    public, honest = load_dataset_spec("derm7pt_public"), load_dataset_spec("derm7pt")
    assert public.name == "derm7pt_public" and public.source == honest.source and public.augment == honest.augment
    assert {f.name for f in public.fields} - {f.name for f in honest.fields} == {
        "management", "level_of_diagnostic_difficulty"}


def test_extends_names_a_file_of_the_same_folder(tmp_path) -> None:
    (tmp_path / "child.yaml").write_text("extends: nowhere\n")
    with pytest.raises(ConfigError, match="extends: no config 'nowhere'"):
        load_dataset_spec(tmp_path / "child.yaml")
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_dataset_spec(tmp_path / "a.yaml")


def test_image_size_override() -> None:
    assert load_dataset_spec("men", image_size=(32, 32, 8)).modalities[2].size == (32, 32, 8)
    assert load_dataset_spec("derm7pt", image_size=(64, 64)).modalities[0].size == (64, 64)
    with pytest.raises(ConfigError, match="image_size"):
        load_dataset_spec("men", image_size=(32, 32))


def test_spec_round_trips_through_plain_data() -> None:
    spec = load_dataset_spec("derm7pt", image_size=(64, 64))
    assert spec_from_dict(spec_to_dict(spec)) == spec


def _bad(tmp_path: Path, edit) -> str:
    data = yaml.safe_load(MEN_YAML.read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as info:
        load_dataset_spec(path)
    return str(info.value)


@pytest.mark.parametrize("edit, message", [
    (lambda d: d["fields"][2].update(kind="num"),
     "fields[2].kind: expected one of ['numeric', 'categorical'], got 'num'"),
    (lambda d: d.update(colour="red"), "colour: unknown key"),
    (lambda d: d["augment"]["flip"].update(prob=1.5), "augment.flip.prob: must be in [0, 1]"),
    (lambda d: d["augment"]["flip"].update(axes=[0, 3]), "augment.flip.axes"),
    (lambda d: d["modalities"][1].update(dims=4), "modalities[1].dims: expected 2 or 3"),
    (lambda d: d["modalities"][1].update(name="t1"), "modalities[1].name"),
    (lambda d: d["fields"][0].update(categories=[]), "fields[0].categories"),
    (lambda d: d["fields"][1].update(name="label"), "fields[1].name"),
    (lambda d: d.update(task="binary"), "task: 'binary' needs exactly 2 classes"),
    (lambda d: d["intensity"].update(clip=[5, 1]), "intensity.clip"),
    (lambda d: d["intensity"].update(mode="minmax"), "intensity.mode"),
    (lambda d: d.update(classes=["a"]), "classes: need at least 2"),
    (lambda d: d["source"].update(label_groups=[{"name": "X", "values": ["x"]}]), "source.label_groups[0].name"),
    (lambda d: d["evaluation"].update(subgroups=["age"]), "evaluation.subgroups[0]: 'age' is neither"),
    (lambda d: d["evaluation"].update(subgroups=["colour"]), "evaluation.subgroups[0]"),
    (lambda d: d["evaluation"]["bands"][0].update(field="sex"), "evaluation.bands[0].field"),
    (lambda d: d["evaluation"]["bands"][0].update(edges=[65, 50]), "evaluation.bands[0].edges"),
    (lambda d: d["evaluation"]["bands"][0].update(name="sex"), "evaluation.bands[0].name"),
    (lambda d: d["evaluation"].update(target_sensitivity=1.2), "evaluation.target_sensitivity"),
    (lambda d: d["evaluation"].update(ece_bins=1), "evaluation.ece_bins"),
    # non-finite numbers (written as YAML's .nan / .inf): nan passed every range check before
    (lambda d: d["intensity"].update(clip=[0, float("nan")]), "intensity.clip[1]: expected a finite number, got nan"),
    (lambda d: d["augment"]["gaussian_noise"].update(std=float("inf")),
     "augment.gaussian_noise.std: expected a finite number, got inf"),
    (lambda d: d["evaluation"]["bands"][0].update(edges=[-float("inf"), 50]),
     "evaluation.bands[0].edges[0]: expected a finite number, got -inf"),
])
def test_bad_key_fails_naming_the_key(tmp_path: Path, edit, message: str) -> None:
    text = _bad(tmp_path, edit)
    assert text.startswith(str(tmp_path / "bad.yaml") + ": ")
    assert message in text


def test_missing_spec_file() -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_dataset_spec("no_such_dataset")
