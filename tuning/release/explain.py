"""A look inside the final model: Grad-CAM heatmaps over the images and an occlusion attribution
per clinical field, for a few held-out test patients per class, logged as PNGs on the `final` run.

- Images: MONAI's `GradCAM` on `encoders.<m>.cam_tap`, the identity every encoder passes its last
  stage map through (cfcml/networks/encoders.py), for the predicted class. The network is wrapped
  as a function of one modality's image, the other images and the table held fixed. A shared
  encoder (Derm7pt's two photos) runs once per modality in one forward pass, so the hooks keep
  only modality m's pass, and take its gradient from that very tensor.
- Table: each field in turn is set to missing (the tabular tokenizer's learned missing token);
  the drop in the predicted class's probability is the field's attribution (positive: the
  patient's value supported the prediction; 0 for a value that was missing anyway).

The figures are for people to look at: nothing here feeds model selection, and the patients are
the test rows the final model was just evaluated on.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from cfcml import _monai

_monai.light()  # only the MONAI modules used, not all of MONAI (see cfcml._monai)
from monai.visualize import GradCAM  # noqa: E402
from monai.visualize.class_activation_maps import ModelWithHooks  # noqa: E402
from torch import nn  # noqa: E402

from cfcml.predict import ModelInputs, predict_proba  # noqa: E402

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    from cfcml.config import ExperimentConfig
    from cfcml.data.manifest import PreparedDataset
    from cfcml.data.normalize import TabularNormalizer
    from cfcml.data.spec import DatasetSpec
    from cfcml.networks import CFCML
    from cfcml.networks.fusion import FusionModel
    from tuning.records.checkpoints import FoldWeights

ARTIFACT_DIR = "explanations"
FIELDS_FIGURE = f"{ARTIFACT_DIR}/table_fields.png"
FIELDS_TABLE = f"{ARTIFACT_DIR}/table_fields.csv"


@dataclass
class Explanation:
    """One patient's explanation (modalities in spec order; fields in `field_names` order)."""

    patient_id: str
    label: int  # true class index
    predicted: int
    probs: np.ndarray  # [C]
    images: list[np.ndarray]  # per image modality: [C_m, *size], as the model saw it
    heatmaps: list[np.ndarray]  # per image modality: Grad-CAM [*size], scaled to [0, 1]
    field_drops: np.ndarray  # [F]: probability of `predicted` lost when the field is missing


def field_names(spec: DatasetSpec) -> list[str]:
    """Clinical fields in the tokenizer's order: numeric first, then categorical."""
    return [f.name for f in spec.numeric_fields] + [f.name for f in spec.categorical_fields]


class _OneImage(nn.Module):
    """The network as a function of modality m's image alone (batch of one), returning logits."""

    def __init__(self, model: CFCML | FusionModel, inputs: ModelInputs, m: int):
        super().__init__()
        self.model = model
        self.inputs, self.m = inputs, m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        images = list(self.inputs.images)
        images[self.m] = x
        return self.model(images, self.inputs.num, self.inputs.num_missing, self.inputs.cat).logits


class _TapHooks(ModelWithHooks):
    """MONAI's hooks on one tap, keeping only its `call`-th use in a forward pass (a shared encoder
    is called once per modality). The gradient is taken with a hook on that use's output tensor:
    a module backward hook would fire for every use, in an order autograd does not promise."""

    def __init__(self, module: nn.Module, layer: str, call: int):
        self.call, self._seen = call, 0
        super().__init__(module, layer, register_forward=True, register_backward=True)

    def forward_hook(self, name: str) -> Any:
        def hook(_module: nn.Module, _input: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            if self._seen == self.call:
                self.activations[name] = output
                output.register_hook(lambda grad: self.gradients.__setitem__(name, grad))
            self._seen += 1

        return hook

    def backward_hook(self, name: str) -> Any:
        return lambda *_: None  # the tensor hook above records the gradient

    def __call__(self, x: torch.Tensor, class_idx: int | None = None, retain_graph: bool = False, **kwargs: Any) -> Any:
        self._seen = 0
        self.gradients.clear()
        return super().__call__(x, class_idx=class_idx, retain_graph=retain_graph, **kwargs)


def _unit_range(cam: torch.Tensor) -> torch.Tensor:
    """Each map scaled to [0, 1], largest activation 1 (MONAI's default normaliser maps the
    largest to 0); a flat map (no positive evidence) stays 0."""
    flat = cam.flatten(1)
    low, high = flat.min(1).values, flat.max(1).values
    span = (high - low).clamp(min=1e-12)
    scaled = (flat - low[:, None]) / span[:, None]
    return torch.where((high > low)[:, None], scaled, torch.zeros_like(scaled)).view_as(cam)


def grad_cam(model: CFCML | FusionModel, inputs: ModelInputs, m: int, class_idx: int) -> np.ndarray:
    """Grad-CAM of image modality `m` for class `class_idx`, on one patient's `inputs` (batch of
    one): float32 [*size] in [0, 1], upsampled to the image grid."""
    wrapped = _OneImage(model, inputs, m)
    tap = model.encoders[m].cam_tap
    layer = next(name for name, module in wrapped.named_modules() if module is tap)
    call = sum(1 for j in range(m) if model.encoders[j] is model.encoders[m])  # earlier uses of a shared one
    # CAMBase uses a ModelWithHooks as it is (it checks for one), though its annotation says nn.Module
    cam = GradCAM(_TapHooks(wrapped, layer, call), layer, postprocessing=_unit_range)  # type: ignore[arg-type]
    with torch.enable_grad():
        heat = cam(inputs.images[m], class_idx=class_idx)  # [1, 1, *size]
    model.zero_grad(set_to_none=True)
    return heat[0, 0].detach().float().cpu().numpy()


def occlusion(model: CFCML | FusionModel, inputs: ModelInputs,
              class_idx: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities [C] as given, drop [F] of class `class_idx`'s probability when each clinical
    field in turn is set to missing) for one patient; `class_idx` defaults to the predicted class.
    The F + 1 variants run as one batch."""
    n_num, n_cat = inputs.num.shape[1], inputs.cat.shape[1]
    n = 1 + n_num + n_cat
    num, num_missing, cat = inputs.num.repeat(n, 1), inputs.num_missing.repeat(n, 1), inputs.cat.repeat(n, 1)
    for j in range(n_num):  # variant 1 + j: field j missing, as the normaliser encodes a blank
        num_missing[1 + j, j] = True
        num[1 + j, j] = 0.0
    for j in range(n_cat):
        cat[1 + n_num + j, j] = -1
    batch = {"images": [x.repeat(n, *[1] * (x.ndim - 1)) for x in inputs.images],
             "num": num, "num_missing": num_missing, "cat": cat}
    probs = predict_proba(model, [batch], inputs.num.device, num_classes=0)  # one non-empty batch
    k = int(np.argmax(probs[0])) if class_idx is None else class_idx
    return probs[0], probs[0, k] - probs[1:, k]


def pick_patients(rows: pd.DataFrame, per_class: int) -> pd.DataFrame:
    """Up to `per_class` rows of every class, in the frame's order (deterministic)."""
    return rows.groupby("label", sort=True, group_keys=False).head(per_class).sort_values(["label", "patient_id"])


def explain_rows(model: CFCML | FusionModel, prepared: PreparedDataset, rows: pd.DataFrame,
                 normalizer: TabularNormalizer, progress: bool = False) -> list[Explanation]:
    """Grad-CAM per image modality and field occlusion for each of `rows` (manifest rows of
    `prepared`), read from its cache as in the test evaluation."""
    from torch.utils.data import default_collate
    from tqdm import tqdm

    spec = prepared.spec
    dataset = prepared.dataset(rows, normalizer)
    use_images = bool(getattr(model, "use_images", True)) and len(spec.modalities) > 0
    model.eval()
    out = []
    for i in tqdm(range(len(dataset)), desc="explaining", unit="patient", disable=not progress):
        sample = dataset[i]
        inputs = ModelInputs.from_batch(default_collate([sample]), "cpu")
        probs, drops = occlusion(model, inputs)  # for the predicted class
        predicted = int(np.argmax(probs))
        heatmaps = [grad_cam(model, inputs, m, predicted) for m in range(len(spec.modalities))] if use_images else []
        out.append(Explanation(str(dataset.frame["patient_id"].iloc[i]), int(sample["label"]), predicted, probs,
                               [x.numpy() for x in sample["images"]], heatmaps, np.asarray(drops, np.float64)))
    return out


def _show(ax: Axes, image: np.ndarray) -> None:
    """A [C, H, W] slice: RGB as colour, anything else as grey (first channel), min-max scaled."""
    img = image if image.shape[0] == 3 else image[:1]
    low, high = float(img.min()), float(img.max())
    img = (img - low) / (high - low) if high > low else np.zeros_like(img)
    if img.shape[0] == 3:
        ax.imshow(np.moveaxis(img, 0, -1))
    else:
        ax.imshow(img[0], cmap="gray")


def _slices(image: np.ndarray, heat: np.ndarray) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(label, image [C, H, W], heat [H, W]) to draw: a 2D photo whole; a 3D volume's middle axial
    slice and the slice holding the most Grad-CAM."""
    if heat.ndim == 2:
        return [("", image, heat)]
    mid = heat.shape[-1] // 2
    top = int(np.argmax(heat.reshape(-1, heat.shape[-1]).sum(0)))
    return [(f"slice {mid} (middle)", image[..., mid], heat[..., mid]),
            (f"slice {top} (most CAM)", image[..., top], heat[..., top])]


def plot_patient(e: Explanation, spec: DatasetSpec) -> Figure:
    """One figure: a column per image modality (a photo, or a volume's middle and most-CAM
    slices) with the Grad-CAM overlaid, and a last column with the fields' occlusion bars."""
    from matplotlib.figure import Figure

    classes = list(spec.classes)
    columns = [(m.name, _slices(image, heat)) for m, image, heat in zip(spec.modalities, e.images, e.heatmaps)]
    rows = max([len(slices) for _, slices in columns], default=1)
    table = len(e.field_drops) > 0
    cols = max(1, len(columns) + int(table))
    fig = Figure(figsize=(2.6 * len(columns) + (4.0 if table else 0.0), 2.6 * rows + 0.6))
    grid = fig.add_gridspec(rows, cols, width_ratios=[1.0] * len(columns) + ([1.6] if table else []) or None)
    for c, (name, slices) in enumerate(columns):
        for r, (label, image, heat) in enumerate(slices):
            ax = fig.add_subplot(grid[r, c])
            _show(ax, image)
            ax.imshow(heat, cmap="jet", alpha=0.4, vmin=0.0, vmax=1.0)
            ax.set_title(f"{name} {label}".strip(), fontsize="small")
            ax.axis("off")
    if table:
        ax = fig.add_subplot(grid[:, -1])
        _field_bars(ax, field_names(spec), e.field_drops[None], f"p({classes[e.predicted]}) lost without the field")
    fig.suptitle(f"patient {e.patient_id}: true {classes[e.label]}, predicted {classes[e.predicted]} "
                 f"(p = {e.probs[e.predicted]:.2f})", fontsize="medium")
    fig.tight_layout()
    return fig


def _field_bars(ax: Axes, names: list[str], drops: np.ndarray, xlabel: str) -> None:
    """Horizontal bars of the mean drop per field (first field on top), one dot per patient."""
    y = np.arange(len(names))[::-1]
    mean = drops.mean(0)
    ax.barh(y, mean, color=np.where(mean >= 0, "tab:red", "tab:blue"), alpha=0.8)
    if len(drops) > 1:
        for row in drops:
            ax.scatter(row, y, s=8, color="black", zorder=3)
    ax.axvline(0, color="grey", linewidth=0.8)
    ax.set_yticks(y, names, fontsize="small")
    ax.set_xlabel(xlabel, fontsize="small")


def plot_fields(explanations: list[Explanation], spec: DatasetSpec) -> Figure:
    """Mean drop of the predicted class's probability per field over the explained patients."""
    from matplotlib.figure import Figure

    names = field_names(spec)
    fig = Figure(figsize=(6, 0.4 * len(names) + 1.6))
    ax = fig.add_subplot()
    _field_bars(ax, names, np.stack([e.field_drops for e in explanations]),
                "drop in the predicted class's probability when the field is missing")
    ax.set_title(f"clinical fields by occlusion, {len(explanations)} test patients (mean, dots per patient)",
                 fontsize="medium")
    fig.tight_layout()
    return fig


def attribution_frame(explanations: list[Explanation], spec: DatasetSpec) -> pd.DataFrame:
    """patient_id, true and predicted class, its probability, and one drop column per field."""
    classes = list(spec.classes)
    rows = [{"patient_id": e.patient_id, "label": classes[e.label], "predicted": classes[e.predicted],
             "probability": float(e.probs[e.predicted]), **dict(zip(field_names(spec), e.field_drops.tolist()))}
            for e in explanations]
    return pd.DataFrame(rows)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "patient"


def log_explanations(client: MlflowClient, run_id: str, prepared: PreparedDataset, experiment: ExperimentConfig,
                     weights: FoldWeights, rows: pd.DataFrame, per_class: int = 2,
                     progress: bool = True) -> list[str]:
    """Explain the model of `weights` (a FoldWeights trained with `experiment`) on up to
    `per_class` patients of every class among `rows`, and log on `run_id` under explanations/:
    one `<patient_id>.png` per patient, `table_fields.png` and `table_fields.csv`. Returns the
    artifact paths."""
    from cfcml.data.normalize import TabularNormalizer
    from cfcml.networks import build_trained
    from tuning.tracking.store import log_figure

    spec = prepared.spec
    model = build_trained(spec, experiment.model, weights.model)
    normalizer = TabularNormalizer.from_state(spec, weights.normalizer)
    chosen = pick_patients(rows, per_class)
    if chosen.empty:
        return []
    explanations = explain_rows(model, prepared, chosen, normalizer, progress=progress)
    names = []
    for e in explanations:
        name = f"{ARTIFACT_DIR}/{_safe(e.patient_id)}.png"
        log_figure(client, run_id, plot_patient(e, spec), name)
        names.append(name)
    if len(field_names(spec)):
        log_figure(client, run_id, plot_fields(explanations, spec), FIELDS_FIGURE)
        client.log_text(run_id, attribution_frame(explanations, spec).to_csv(index=False), FIELDS_TABLE)
        names += [FIELDS_FIGURE, FIELDS_TABLE]
    return names
