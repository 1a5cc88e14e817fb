"""The synthetic generators write the real MEN / Derm7pt layouts, deterministically, with a class
signal split between images and table."""
from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from cfcml.data.synthetic import (
    DERM_MEL_DIAGNOSES,
    DERM_META_COLUMNS,
    DERM_NEV_DIAGNOSES,
    DERM_OTHER_DIAGNOSES,
    DERM_SEVEN_POINT,
    DERM_VOCAB,
    LATENTS_FILE,
    MEN_CLASSES,
    MEN_CLINICAL_COLUMNS,
    MEN_MODALITIES,
    derm7pt_latents,
    make_derm7pt,
    make_men,
    men_latents,
)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --- MEN --------------------------------------------------------------------------------------
def test_men_layout_volumes_and_clinical_csv(tmp_path: Path) -> None:
    root = make_men(tmp_path / "men", patients=9, seed=3, size=(12, 10, 6))
    latents = pd.read_csv(root / LATENTS_FILE)
    assert len(latents) == 9 and latents["patient_id"].is_unique

    # exactly <split>/<class>/<patient>/{t1,t2,adc}_bbox.nii.gz, nothing else
    assert sorted(p.name for p in root.iterdir()) == sorted(["train", "test", "clinical.csv",
                                                             LATENTS_FILE])
    expected = {f"{r.split}/{r.label}/{r.patient_id}/{m}.nii.gz"
                for r in latents.itertuples() for m in MEN_MODALITIES}
    found = {str(p.relative_to(root)) for p in root.glob("*/*/*/*")}
    assert found == expected
    for split in ("train", "test"):
        assert {p.name for p in (root / split).iterdir()} <= set(MEN_CLASSES)
    for cls in MEN_CLASSES:  # every class on both sides of the split, ~20% held out
        assert set(latents.loc[latents["label"] == cls, "split"]) == {"train", "test"}
    assert (latents["split"] == "test").sum() == 3

    for path in sorted(root.glob("*/*/*/*.nii.gz")):
        image = nib.load(path)
        volume = np.asarray(image.dataobj)
        assert volume.shape == (12, 10, 6) and volume.dtype == np.int16, path
        assert volume.min() >= 0 and volume.max() <= 1500, path
        assert volume[0, 0, 0] == 0 and 0.4 < (volume > 0).mean() < 1.0, path  # zero background

    clinical = pd.read_csv(root / "clinical.csv")
    assert tuple(clinical.columns) == MEN_CLINICAL_COLUMNS
    assert list(clinical["patient_id"]) == list(latents["patient_id"])
    assert set(clinical["location"]) <= {1, 2, 3} and set(clinical["sex"]) <= {0, 1}
    assert clinical["age"].between(20, 90).all()
    for column in ("adc_value", "tumour_area", "oedema_area"):
        assert clinical[column].notna().all() and (clinical[column] >= 0).all(), column


def test_men_default_cohort_supports_five_folds() -> None:
    plan = men_latents()
    assert len(plan) == 60 and set(plan["label"]) == set(MEN_CLASSES)
    development = plan[plan["split"] == "train"]
    assert development["label"].value_counts().min() >= 10
    assert 0.15 <= (plan["split"] == "test").mean() <= 0.25


def test_men_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = make_men(tmp_path / "a", patients=4, seed=7, size=(8, 8, 4))
    b = make_men(tmp_path / "b", patients=4, seed=7, size=(8, 8, 4))
    c = make_men(tmp_path / "c", patients=4, seed=8, size=(8, 8, 4))
    assert _files(a) == _files(b)  # byte-identical CSVs and NIfTI files
    assert (a / "clinical.csv").read_bytes() != (c / "clinical.csv").read_bytes()


def test_men_vary_size_and_missing_values(tmp_path: Path) -> None:
    root = make_men(tmp_path / "men", patients=6, seed=1, size=(20, 20, 10), vary_size=True,
                    missing_fraction=0.5)
    shapes = set()
    for patient in root.glob("*/*/*"):
        patient_shapes = {np.asarray(nib.load(p).dataobj).shape for p in patient.iterdir()}
        assert len(patient_shapes) == 1, patient  # modalities of one patient stay co-registered
        shape = patient_shapes.pop()
        assert all(abs(s - 20) <= 2 for s in shape[:2]) and abs(shape[2] - 10) <= 1, shape
        shapes.add(shape)
    assert len(shapes) > 1
    clinical = pd.read_csv(root / "clinical.csv")
    assert clinical[["adc_value", "tumour_area", "oedema_area"]].isna().any().any()
    assert clinical[["patient_id", "location", "sex", "age"]].notna().all().all()


def test_men_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    make_men(tmp_path, patients=3, size=(6, 6, 4))
    with pytest.raises(FileExistsError, match=str(tmp_path)):
        make_men(tmp_path, patients=3, size=(6, 6, 4))
    make_men(tmp_path, patients=4, size=(6, 6, 4), overwrite=True)
    assert len(list(tmp_path.glob("*/*/*"))) == 4


@pytest.mark.parametrize("kwargs", [{"patients": 2}, {"test_fraction": 1.0},
                                    {"size": (32, 32)}, {"size": (2, 32, 8)}])
def test_men_rejects_bad_arguments(tmp_path: Path, kwargs: dict) -> None:
    with pytest.raises(ValueError):
        make_men(tmp_path, **kwargs)


def test_men_rendered_files_carry_the_latents(tmp_path: Path) -> None:
    root = make_men(tmp_path / "men", patients=24, seed=5, size=(16, 16, 6))
    latents = pd.read_csv(root / LATENTS_FILE)
    pd.testing.assert_frame_equal(latents, men_latents(24, seed=5))
    # images: tumour ADC relative to the tissue falls with the grade latent
    contrast = []
    for r in latents.itertuples():
        adc = np.asarray(nib.load(root / r.split / r.label / r.patient_id / "adc_bbox.nii.gz")
                         .dataobj, dtype=float)
        contrast.append(adc[6:10, 6:10, 2:4].mean() / adc[adc > 0].mean())
    contrast = np.asarray(contrast)
    assert contrast[latents["image_latent"] == 1].max() < contrast[latents["image_latent"] == 0].min()
    # table: oedema grows with the invasion latent
    oedema = pd.read_csv(root / "clinical.csv")["oedema_area"]
    assert oedema[latents["table_latent"] == 1].mean() > oedema[latents["table_latent"] == 0].mean() + 5


def _accuracy(x: np.ndarray, y: np.ndarray) -> float:
    return LogisticRegression(max_iter=1000).fit(x, y).score(x, y)


def test_men_needs_both_modalities_for_three_classes() -> None:
    plan = men_latents(patients=600, seed=0)
    y = plan["label"].to_numpy()
    image, table = plan[["image_signal"]].to_numpy(), plan[["table_signal"]].to_numpy()
    both = plan[["image_signal", "table_signal"]].to_numpy()
    acc_image, acc_table, acc_both = _accuracy(image, y), _accuracy(table, y), _accuracy(both, y)
    assert acc_both > max(acc_image, acc_table) + 0.15
    assert acc_both < 1.0  # noise: neither the fusion nor a single modality is perfect


def _with_products(x: np.ndarray) -> np.ndarray:
    return np.column_stack([x, x[:, :1] * x[:, 1:]])


@pytest.mark.parametrize("latents,positive", [
    (lambda: men_latents(patients=600, seed=0, signal="interaction"), "Grade_1"),
    (lambda: derm7pt_latents(patients=600, seed=0, signal="interaction"), "MEL"),
])
def test_interaction_mode_class_needs_both_modalities_jointly(latents, positive) -> None:
    """No single modality carries the class (an exclusive or of the two latents); together they do."""
    plan = latents()
    plan = plan[plan["label"] != "other"]
    y = (plan["label"] == positive).to_numpy()
    def auc(x: np.ndarray) -> float:
        return roc_auc_score(y, LogisticRegression(max_iter=1000).fit(x, y).decision_function(x))

    for column in ("image_signal", "table_signal"):
        one = plan[[column]].to_numpy()
        assert auc(np.column_stack([one, one ** 2])) < 0.58, column
    assert auc(_with_products(plan[["image_signal", "table_signal"]].to_numpy())) > 0.9
    assert set(plan["signal"]) == {"interaction"}


# --- Derm7pt ----------------------------------------------------------------------------------
def test_derm7pt_layout_vocabularies_and_photos(tmp_path: Path) -> None:
    root = make_derm7pt(tmp_path / "derm", patients=10, seed=2, size=(20, 28))
    assert sorted(p.name for p in root.iterdir()) == sorted(["meta", "images", LATENTS_FILE])
    meta = pd.read_csv(root / "meta" / "meta.csv")
    assert tuple(meta.columns) == DERM_META_COLUMNS
    assert list(meta["case_num"]) == list(range(1, len(meta) + 1))
    for column, vocab in DERM_VOCAB.items():
        assert set(meta[column]) <= set(vocab), column
        assert meta[column].notna().all(), column
    diagnoses = set(DERM_NEV_DIAGNOSES) | set(DERM_MEL_DIAGNOSES) | set(DERM_OTHER_DIAGNOSES)
    assert set(meta["diagnosis"]) <= diagnoses
    task = meta["diagnosis"].isin(set(DERM_NEV_DIAGNOSES) | set(DERM_MEL_DIAGNOSES))
    assert task.sum() == 10 and (~task).sum() >= 1  # other diagnoses mixed in, to be excluded
    assert meta["diagnosis"].isin(DERM_MEL_DIAGNOSES).sum() == 3

    score = sum(meta[column].map(lambda v, s=points: s.get(v, 0))
                for column, points in DERM_SEVEN_POINT.items())
    assert (meta["seven_point_score"] == score).all()

    for rel in [*meta["clinic"], *meta["derm"]]:
        assert "/" in rel and not rel.startswith("/"), rel
        with Image.open(root / "images" / rel) as photo:
            assert photo.format == "JPEG" and photo.mode == "RGB" and photo.size == (28, 20), rel

    splits = {}
    for split in ("train", "valid", "test"):
        frame = pd.read_csv(root / "meta" / f"{split}_indexes.csv")
        assert list(frame.columns) == ["indexes"]
        splits[split] = set(frame["indexes"])
    assert not (splits["train"] & splits["valid"] or splits["train"] & splits["test"]
                or splits["valid"] & splits["test"])
    covered = splits["train"] | splits["valid"] | splits["test"]
    assert covered == set(range(len(meta)))  # like the release: every row, NEV/MEL included
    assert set(np.flatnonzero(task)) <= covered
    for split, rows in splits.items():  # both classes on every side
        labels = meta.loc[sorted(rows), "diagnosis"]
        assert labels.isin(DERM_MEL_DIAGNOSES).any() and labels.isin(DERM_NEV_DIAGNOSES).any(), split


def test_derm7pt_is_deterministic_for_a_seed(tmp_path: Path) -> None:
    a = make_derm7pt(tmp_path / "a", patients=4, seed=11, size=(16, 16))
    b = make_derm7pt(tmp_path / "b", patients=4, seed=11, size=(16, 16))
    c = make_derm7pt(tmp_path / "c", patients=4, seed=12, size=(16, 16))
    assert _files(a) == _files(b)  # byte-identical CSVs and JPEGs
    assert (a / "meta" / "meta.csv").read_bytes() != (c / "meta" / "meta.csv").read_bytes()


def test_derm7pt_vary_size_non_square(tmp_path: Path) -> None:
    root = make_derm7pt(tmp_path, patients=3, seed=0, size=(30, 40), vary_size=True,
                        other_cases=0)
    meta = pd.read_csv(root / "meta" / "meta.csv")
    assert len(meta) == 3
    sizes = {Image.open(root / "images" / rel).size for rel in [*meta["clinic"], *meta["derm"]]}
    assert len(sizes) > 1 and all(abs(w - 40) <= 4 and abs(h - 30) <= 3 for w, h in sizes)


def test_derm7pt_fusion_beats_either_modality(tmp_path: Path) -> None:
    plan = derm7pt_latents(patients=600, seed=0)
    plan = plan[plan["label"] != "other"]
    y = (plan["label"] == "MEL").to_numpy()
    auc_image = roc_auc_score(y, plan["image_signal"])
    auc_table = roc_auc_score(y, plan["table_signal"])
    auc_both = roc_auc_score(y, plan["image_signal"] + plan["table_signal"])
    assert 0.7 < min(auc_image, auc_table) and auc_both > max(auc_image, auc_table) + 0.04
    assert auc_both < 1.0

    # and the written table really carries the table signal (management, elevation)
    root = make_derm7pt(tmp_path, patients=60, seed=0, size=(8, 8))
    meta = pd.read_csv(root / "meta" / "meta.csv")
    latents = pd.read_csv(root / LATENTS_FILE)
    assert (latents["case_num"] == meta["case_num"]).all()
    excision = meta["management"] == "excision"
    high = latents["table_signal"] > 0.5
    assert excision[high].mean() > excision[~high].mean() + 0.3
