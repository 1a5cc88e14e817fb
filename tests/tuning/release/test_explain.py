"""Explanations of a model: MONAI Grad-CAM per image modality (a shared encoder explained per
modality), occlusion of each clinical field, and the PNGs logged on an MLflow run. Real tiny
networks on real synthetic MEN volumes and Derm7pt photos."""
from __future__ import annotations

import copy

import mlflow
import numpy as np
import pytest
import torch
from monai.visualize import GradCAM
from monai.visualize.class_activation_maps import ModelWithHooks
from torch.utils.data import default_collate

from cfcml.config import load_experiment
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_derm7pt, make_men
from cfcml.networks import build_model
from cfcml.predict import ModelInputs, predict_proba
from tuning.hpo.space import load_search
from tuning.records.checkpoints import FoldWeights
from tuning.release.explain import (
    FIELDS_FIGURE,
    FIELDS_TABLE,
    _OneImage,
    _TapHooks,
    _unit_range,
    explain_rows,
    field_names,
    grad_cam,
    log_explanations,
    occlusion,
    plot_patient,
)

MEN_SIZE = (32, 32, 8)
DERM_SIZE = (64, 64)


def tiny(dataset: str, size: tuple[int, ...], **overrides):
    base = load_experiment(dataset)
    search = load_search("smoke", base)
    return base.replace({**search.overrides, **search.dataset_overrides.get(dataset, {}),
                         "train.image_size": list(size), **overrides})


@pytest.fixture(scope="module")
def men(tmp_path_factory: pytest.TempPathFactory):
    raw = make_men(tmp_path_factory.mktemp("explain") / "men", patients=12, seed=0, size=MEN_SIZE)
    return prepare_dataset("men", raw, folds=2, fold_seed=0, image_size=MEN_SIZE, workers=1)


@pytest.fixture(scope="module")
def men_model(men):
    experiment = tiny("men", MEN_SIZE)
    torch.manual_seed(0)
    return experiment, build_model(men.spec, experiment.model).eval(), men.fit_normalizer(men.dev_frame())


def inputs_of(prepared, normalizer, frame, i: int = 0) -> ModelInputs:
    return ModelInputs.from_batch(default_collate([prepared.dataset(frame, normalizer)[i]]), "cpu")


def test_grad_cam_is_monais_map_on_each_modalitys_image_grid(men, men_model) -> None:
    _, model, normalizer = men_model
    inputs = inputs_of(men, normalizer, men.test_frame())
    peaks = []
    for m in range(len(men.spec.modalities)):
        heat = grad_cam(model, inputs, m, class_idx=1)
        assert all(p.grad is None for p in model.parameters())  # explaining leaves no gradients behind
        assert heat.shape == MEN_SIZE and np.isfinite(heat).all()
        assert heat.min() >= 0.0 and heat.max() <= 1.0
        # unshared encoders: the same as MONAI's own hooks on encoders.<m>.cam_tap
        reference = GradCAM(_OneImage(model, inputs, m), f"model.encoders.{m}.cam_tap", postprocessing=_unit_range)
        with torch.enable_grad():
            expected = reference(inputs.images[m], class_idx=1)[0, 0].detach().numpy()
        np.testing.assert_allclose(heat, expected, atol=1e-6)
        model.zero_grad(set_to_none=True)  # MONAI's own run leaves its gradients
        peaks.append(heat.max())
    assert max(peaks) == 1.0  # not a flat map compared with a flat map


def test_occluding_a_field_is_the_same_as_leaving_it_blank(men, men_model) -> None:
    _, model, normalizer = men_model
    rows = men.test_frame().head(1).copy()
    probs, drops = occlusion(model, inputs_of(men, normalizer, rows))
    predicted = int(np.argmax(probs))
    names = field_names(men.spec)
    assert drops.shape == (len(names),) and np.isfinite(drops).all()
    for j in (names.index("age"), names.index("location")):  # a numeric and a categorical field
        blank = rows.copy()
        blank[names[j]] = None if names[j] == "location" else np.nan
        p = predict_proba(model, [default_collate([men.dataset(blank, normalizer)[0]])], "cpu", 3)[0]
        assert drops[j] == pytest.approx(probs[predicted] - p[predicted], abs=1e-6)
    assert np.abs(drops).max() > 0  # the table moves the prediction


def test_a_field_missing_already_gets_no_attribution(men, men_model) -> None:
    _, model, normalizer = men_model
    rows = men.test_frame().head(1).copy()
    rows["adc_value"] = np.nan
    _, drops = occlusion(model, inputs_of(men, normalizer, rows))
    assert drops[field_names(men.spec).index("adc_value")] == 0.0


def test_explanations_land_as_pngs_under_explanations_on_the_run(men, men_model, tmp_path) -> None:
    experiment, model, normalizer = men_model
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp_id = client.create_experiment("cfcml-men", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(exp_id, run_name="final").info.run_id
    weights = FoldWeights(model.state_dict(), normalizer.state_dict())
    test = men.test_frame()
    names = log_explanations(client, run_id, men, experiment, weights, test, per_class=1, progress=False)

    expected = {f"explanations/{pid}.png" for pid in test.groupby("label").head(1)["patient_id"]}
    assert set(names) == expected | {FIELDS_FIGURE, FIELDS_TABLE}
    assert {a.path for a in client.list_artifacts(run_id, "explanations")} == set(names)
    for name in expected | {FIELDS_FIGURE}:
        local = client.download_artifacts(run_id, name, str(tmp_path / "down"))
        assert open(local, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    table = client.download_artifacts(run_id, FIELDS_TABLE, str(tmp_path / "down"))
    header = open(table).readline().strip().split(",")
    assert header == ["patient_id", "label", "predicted", "probability", *field_names(men.spec)]


@pytest.fixture(scope="module")
def derm(tmp_path_factory: pytest.TempPathFactory):
    raw = make_derm7pt(tmp_path_factory.mktemp("explain") / "derm7pt", patients=16, seed=0, size=DERM_SIZE)
    prepared = prepare_dataset("derm7pt", raw, folds=2, fold_seed=0, image_size=DERM_SIZE, workers=1)
    experiment = tiny("derm7pt", DERM_SIZE)
    assert experiment.model.share_encoder  # one Swin for both photos, as in the public code
    torch.manual_seed(0)
    return prepared, build_model(prepared.spec, experiment.model).eval(), prepared.fit_normalizer(prepared.dev_frame())


def test_a_shared_encoder_is_explained_per_modality(derm) -> None:
    prepared, shared, normalizer = derm
    assert shared.encoders[0] is shared.encoders[1]
    unshared = copy.deepcopy(shared)
    unshared.encoders = torch.nn.ModuleList(copy.deepcopy(shared.encoders[0]) for _ in range(2))
    inputs = inputs_of(prepared, normalizer, prepared.test_frame())
    for m in (0, 1):
        # shared: the one tap module is named encoders.0.cam_tap; keep its m-th call
        got = _TapHooks(_OneImage(shared, inputs, m), "model.encoders.0.cam_tap", call=m)
        want = ModelWithHooks(_OneImage(unshared, inputs, m), f"model.encoders.{m}.cam_tap",
                              register_forward=True, register_backward=True)
        with torch.enable_grad():
            _, (acti, ), (grad, ) = got(inputs.images[m], class_idx=1)
            _, (acti_ref, ), (grad_ref, ) = want(inputs.images[m], class_idx=1)
        torch.testing.assert_close(acti, acti_ref)
        torch.testing.assert_close(grad, grad_ref)
    clinic, dermoscopy = (grad_cam(shared, inputs, m, 1) for m in (0, 1))
    assert clinic.shape == dermoscopy.shape == DERM_SIZE
    assert not np.allclose(clinic, dermoscopy)  # two photos, two maps


def test_a_patient_figure_has_one_panel_per_modality_and_the_fields(derm, men, men_model) -> None:
    prepared, model, normalizer = derm
    (photos,) = explain_rows(model, prepared, prepared.test_frame().head(1), normalizer)
    fig = plot_patient(photos, prepared.spec)
    images = [ax for ax in fig.axes if ax.images]
    assert [ax.get_title() for ax in images] == ["clinic", "derm"]
    assert images[0].images[0].get_array().shape == (*DERM_SIZE, 3)  # the photo whole, in colour
    assert "true" in fig._suptitle.get_text() and "predicted" in fig._suptitle.get_text()

    _, men_net, men_norm = men_model
    (volumes,) = explain_rows(men_net, men, men.test_frame().head(1), men_norm)
    titles = [ax.get_title() for ax in plot_patient(volumes, men.spec).axes if ax.images]
    mid = MEN_SIZE[2] // 2
    assert titles[:2] == [f"t1 slice {mid} (middle)", f"t1 slice {int(np.argmax(volumes.heatmaps[0].sum((0, 1))))} "
                                                      "(most CAM)"]
    assert len(titles) == 6  # two slices of each of the three volumes
