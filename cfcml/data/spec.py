"""Dataset specs: what a dataset holds (modalities, clinical fields, classes) and how it is prepared.

A spec is `conf/datasets/<name>.yaml` loaded into the frozen dataclasses below. Every key is checked
at load time (unknown key, wrong type, bad value), and the error names the key path, e.g.
"conf/datasets/men.yaml: fields[2].kind: expected one of ['numeric', 'categorical'], got 'num'".
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from cfcml.config import CONF_DIR, ConfigError, from_dict, read_config

# Manifest columns the pipeline owns; a clinical field or modality may not shadow them.
RESERVED_COLUMNS = ("patient_id", "label", "label_name", "split", "fold")


@dataclass(frozen=True)
class ImageModality:
    name: str
    dims: int  # 2 or 3 spatial dimensions
    channels: int
    size: tuple[int, ...] = ()  # (H, W) or (H, W, D) after preprocessing; defaults to image_size
    file: str = ""  # folder layouts (MEN): file name inside each patient folder
    column: str = ""  # table layouts (Derm7pt, manifest): column holding the image path


@dataclass(frozen=True)
class TabularField:
    name: str
    kind: Literal["numeric", "categorical"]
    categories: tuple[str, ...] = ()  # categorical vocab, as strings; index = position
    optional: bool = False  # a missing value is allowed and becomes the missing-value token


@dataclass(frozen=True)
class IntensitySpec:
    # zscore_nonzero: z-score per channel inside the non-zero mask (MRI); scale: divide by `scale`
    mode: Literal["zscore_nonzero", "zscore", "scale", "none"] = "none"
    clip: tuple[float, ...] | None = None  # [low, high], applied before normalisation
    scale: float = 1.0


@dataclass(frozen=True)
class RandomResizedCrop:
    prob: float = 0.5
    scale: tuple[float, ...] = (0.8, 1.0)  # crop side as a fraction of each image side


@dataclass(frozen=True)
class Flip:
    prob: float = 0.5
    axes: tuple[int, ...] = (0, 1)  # spatial axes, each flipped independently


@dataclass(frozen=True)
class GaussianNoise:
    prob: float = 0.5
    std: float = 0.1
    # false: one noise field shared by all modalities of a sample (MONAI RandGaussianNoised with
    # several keys); true: one field per modality (costs a Gaussian draw per modality)
    independent: bool = False


@dataclass(frozen=True)
class ShiftScaleRotate:
    prob: float = 0.5
    shift: float = 0.0625  # fraction of the image side
    scale: float = 0.1  # zoom in [1 - scale, 1 + scale]
    rotate: float = 45.0  # degrees, uniform in [-rotate, rotate]


@dataclass(frozen=True)
class Rotate90:
    prob: float = 0.5


@dataclass(frozen=True)
class BrightnessContrast:
    prob: float = 0.5
    brightness: float = 0.2  # additive shift in [-b, b] (images in [0, 1])
    contrast: float = 0.2  # multiplicative factor in [1 - c, 1 + c]


@dataclass(frozen=True)
class AugmentSpec:
    """Training augmentations; absent = off. Geometric ones run first, with one random draw shared
    by all image modalities of a sample (co-registered MRI sequences, the two photos of a case)."""

    random_resized_crop: RandomResizedCrop | None = None
    flip: Flip | None = None
    rotate90: Rotate90 | None = None
    shift_scale_rotate: ShiftScaleRotate | None = None
    brightness_contrast: BrightnessContrast | None = None
    gaussian_noise: GaussianNoise | None = None


@dataclass(frozen=True)
class LabelGroup:
    name: str  # a class of the spec
    values: tuple[str, ...]  # raw labels (e.g. diagnoses) that belong to it


@dataclass(frozen=True)
class SourceSpec:
    """Where the adapter finds things in the raw layout.

    layout: which adapter reads the raw data (cfcml.data.adapters): "men" (class folders of NIfTI
    volumes + a clinical CSV), "derm7pt" (the release's meta.csv + split index files) or "manifest"
    (any CSV with one row per patient).
    """

    layout: Literal["men", "derm7pt", "manifest"] = "manifest"
    table: str = ""  # MEN: clinical CSV; Derm7pt: meta CSV; manifest: default CSV (root-relative)
    id_column: str = "patient_id"
    image_dir: str = ""  # table layouts: folder (root-relative) the image path columns are relative to
    label_groups: tuple[LabelGroup, ...] = ()  # raw label -> class; empty: raw label is the class
    ignored_labels: tuple[str, ...] = ()  # known raw labels outside the task: rows are dropped
    split_column: str = ""  # manifest: "dev"/"train"/"valid"/"test" per row; "" = auto ("split")
    test_fraction: float = 0.2  # manifest without a split column: seeded stratified hold-out


@dataclass(frozen=True)
class BandSpec:
    """A numeric field cut into bands for subgroup figures (cfcml.evaluation.subgroups.band_labels), e.g.
    {name: age_band, field: age, edges: [50, 65]} -> "<50", "50-65", ">=65"."""

    name: str  # the subgroup's name (may be listed in `evaluation.subgroups`)
    field: str  # a numeric field of the spec
    edges: tuple[float, ...]  # strictly increasing cut points


@dataclass(frozen=True)
class EvaluationSpec:
    """How the final model's clinical figures are computed (docs/evaluation.md).

    Args:
        subgroups: categorical fields and band names (`bands`) whose categories get their own
            metrics, in this order; empty: no subgroup table.
        bands: numeric fields cut into bands.
        min_subgroup_n: a subgroup with fewer patients is flagged too small (>= 1).
        min_subgroup_per_class: ... or with fewer patients of some class (>= 0).
        target_sensitivity: the sensitivity the `sensitivity_<target>` operating point is fitted to
            reach on out-of-fold predictions, in (0, 1].
        ece_bins: equal-width bins of the expected calibration error and reliability diagram (>= 2).
    """

    subgroups: tuple[str, ...] = ()
    bands: tuple[BandSpec, ...] = ()
    min_subgroup_n: int = 20
    min_subgroup_per_class: int = 3
    target_sensitivity: float = 0.9
    ece_bins: int = 10


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    task: Literal["multiclass", "binary"]
    selection_metric: str  # key of cfcml.evaluation.metrics.compute_metrics output used for model selection
    label: str  # label column of the source table (folder layouts: a name only)
    classes: tuple[str, ...]
    modalities: tuple[ImageModality, ...]
    fields: tuple[TabularField, ...] = ()
    image_size: tuple[int, ...] = ()
    intensity: IntensitySpec = dataclasses.field(default_factory=IntensitySpec)
    augment: AugmentSpec = dataclasses.field(default_factory=AugmentSpec)
    missing_values: tuple[str, ...] = ("", "NA", "N/A", "NaN", "nan", "null", "None")
    source: SourceSpec = dataclasses.field(default_factory=SourceSpec)
    evaluation: EvaluationSpec = dataclasses.field(default_factory=EvaluationSpec)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def numeric_fields(self) -> tuple[TabularField, ...]:
        return tuple(f for f in self.fields if f.kind == "numeric")

    @property
    def categorical_fields(self) -> tuple[TabularField, ...]:
        return tuple(f for f in self.fields if f.kind == "categorical")

    def modality(self, name: str) -> ImageModality:
        for m in self.modalities:
            if m.name == name:
                return m
        raise KeyError(name)

    def class_of(self, raw_label: str) -> str | None:
        """The class a raw label belongs to, or None when it is unknown or ignored."""
        if self.source.label_groups:
            for group in self.source.label_groups:
                if raw_label in group.values:
                    return group.name
            return None
        return raw_label if raw_label in self.classes else None


def spec_path(name_or_path: str | Path) -> Path:
    """conf/datasets/<name>.yaml for a bare name, else the path itself."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        return path
    return CONF_DIR / "datasets" / f"{name_or_path}.yaml"


def load_dataset_spec(name_or_path: str | Path, image_size: tuple[int, ...] | None = None) -> DatasetSpec:
    """Load and validate a dataset spec; `image_size` overrides the preprocessed size of every
    modality with that many dimensions (e.g. (32, 32, 8) for tiny demos)."""
    path = spec_path(name_or_path)
    data = read_config(path)
    data.setdefault("name", path.stem)
    return spec_from_dict(data, str(path), image_size)


def spec_from_dict(data: dict[str, Any], source: str = "spec",
                   image_size: tuple[int, ...] | None = None) -> DatasetSpec:
    """Validate plain data (a parsed YAML, or `spec_to_dict` output) into a DatasetSpec; `source`
    prefixes error messages."""
    data = copy.deepcopy(data)
    for f in data.get("fields") or ():  # YAML reads `categories: [1, 2]` as ints; vocab is strings
        if isinstance(f, dict) and isinstance(f.get("categories"), list):
            f["categories"] = [str(c) if isinstance(c, (int, float)) and not isinstance(c, bool) else c
                               for c in f["categories"]]
    if isinstance(data.get("missing_values"), list):
        data["missing_values"] = [str(v) if v is not None else "" for v in data["missing_values"]]
    try:
        spec = from_dict(DatasetSpec, data, "$")
        if image_size is not None:
            size = tuple(int(s) for s in image_size)
            mods = tuple(dataclasses.replace(m, size=size) if m.dims == len(size) else m
                         for m in spec.modalities)
            spec = dataclasses.replace(spec, image_size=size, modalities=mods)
        return _finish(spec)
    except ConfigError as exc:  # "$.fields[2].kind: ..." -> "<file>: fields[2].kind: ..."
        msg = str(exc)
        msg = msg[2:] if msg.startswith("$.") else msg.removeprefix("$")
        raise ConfigError(f"{source}: {msg}") from None


def _finish(spec: DatasetSpec) -> DatasetSpec:
    """Cross-key checks, and every modality's size filled in from image_size."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"$.{key}: {msg}")

    if len(spec.classes) < 2 or len(set(spec.classes)) != len(spec.classes):
        fail("classes", f"need at least 2 distinct classes, got {list(spec.classes)}")
    if spec.task == "binary" and len(spec.classes) != 2:
        fail("task", f"'binary' needs exactly 2 classes, got {len(spec.classes)}")
    if not spec.modalities:
        fail("modalities", "at least one image modality is required")
    if not spec.selection_metric:
        fail("selection_metric", "a metric name is required")
    names: set[str] = set()
    modalities = []
    for i, m in enumerate(spec.modalities):
        key = f"modalities[{i}]"
        if not m.name.isidentifier() or m.name in names:
            fail(f"{key}.name", f"must be a unique identifier, got {m.name!r}")
        names.add(m.name)
        if m.dims not in (2, 3):
            fail(f"{key}.dims", f"expected 2 or 3, got {m.dims}")
        if m.channels < 1:
            fail(f"{key}.channels", f"must be >= 1, got {m.channels}")
        size = m.size or spec.image_size
        if len(size) != m.dims or any(s < 1 for s in size):
            fail(f"{key}.size" if m.size else "image_size",
                 f"expected {m.dims} positive sizes for a {m.dims}D modality, got {list(size)}")
        modalities.append(dataclasses.replace(m, size=tuple(size)))
    field_names: set[str] = set()
    for i, f in enumerate(spec.fields):
        key = f"fields[{i}]"
        if not f.name or f.name in field_names or f.name in RESERVED_COLUMNS or f.name.startswith("path_"):
            fail(f"{key}.name", f"must be unique and not one of {RESERVED_COLUMNS} or path_*, got {f.name!r}")
        field_names.add(f.name)
        if f.kind == "categorical" and (not f.categories or len(set(f.categories)) != len(f.categories)):
            fail(f"{key}.categories", "a categorical field needs a list of distinct categories")
        if f.kind == "numeric" and f.categories:
            fail(f"{key}.categories", "a numeric field has no categories")
    it = spec.intensity
    if it.clip is not None and (len(it.clip) != 2 or it.clip[0] >= it.clip[1]):
        fail("intensity.clip", f"expected [low, high] with low < high, got {list(it.clip)}")
    if it.mode == "scale" and it.scale <= 0:
        fail("intensity.scale", f"must be > 0, got {it.scale}")
    _check_augment(spec.augment, modalities)
    for i, g in enumerate(spec.source.label_groups):
        if g.name not in spec.classes:
            fail(f"source.label_groups[{i}].name", f"{g.name!r} is not one of classes {list(spec.classes)}")
    if not 0.0 < spec.source.test_fraction < 1.0:
        fail("source.test_fraction", f"must be in (0, 1), got {spec.source.test_fraction}")
    _check_evaluation(spec, fail)
    return dataclasses.replace(spec, modalities=tuple(modalities))


def _check_evaluation(spec: DatasetSpec, fail: Callable[[str, str], None]) -> None:
    ev = spec.evaluation
    kinds = {f.name: f.kind for f in spec.fields}
    band_names = set()
    for i, b in enumerate(ev.bands):
        if kinds.get(b.field) != "numeric":
            fail(f"evaluation.bands[{i}].field", f"{b.field!r} is not a numeric field of the spec")
        if not b.edges or any(y <= x for x, y in zip(b.edges, b.edges[1:])):
            fail(f"evaluation.bands[{i}].edges", f"expected strictly increasing cut points, got {list(b.edges)}")
        if not b.name or b.name in kinds or b.name in band_names:
            fail(f"evaluation.bands[{i}].name", f"must be a new, unique name (not a field), got {b.name!r}")
        band_names.add(b.name)
    for i, name in enumerate(ev.subgroups):
        if name not in band_names and kinds.get(name) != "categorical":
            fail(f"evaluation.subgroups[{i}]", f"{name!r} is neither a categorical field nor a band "
                 f"(categorical: {[f.name for f in spec.categorical_fields]}, bands: {sorted(band_names)})")
    if ev.min_subgroup_n < 1 or ev.min_subgroup_per_class < 0:
        fail("evaluation.min_subgroup_n", "need min_subgroup_n >= 1 and min_subgroup_per_class >= 0")
    if not 0.0 < ev.target_sensitivity <= 1.0:
        fail("evaluation.target_sensitivity", f"must be in (0, 1], got {ev.target_sensitivity}")
    if ev.ece_bins < 2:
        fail("evaluation.ece_bins", f"must be >= 2, got {ev.ece_bins}")


def _check_augment(aug: AugmentSpec, modalities: list[ImageModality]) -> None:
    dims = {m.dims for m in modalities}
    sizes = {m.size for m in modalities}
    for f in dataclasses.fields(aug):
        step = getattr(aug, f.name)
        if step is None:
            continue
        if not 0.0 <= step.prob <= 1.0:
            raise ConfigError(f"$.augment.{f.name}.prob: must be in [0, 1], got {step.prob}")
        if len(dims) > 1 or len(sizes) > 1:
            raise ConfigError(f"$.augment.{f.name}: augmentations need all modalities to share one size")
    if aug.flip and any(a < 0 or a >= min(dims) for a in aug.flip.axes):
        raise ConfigError(f"$.augment.flip.axes: spatial axes are 0..{min(dims) - 1}, got {list(aug.flip.axes)}")
    if aug.random_resized_crop:
        s = aug.random_resized_crop.scale
        if len(s) != 2 or not 0.0 < s[0] <= s[1] <= 1.0:
            raise ConfigError(f"$.augment.random_resized_crop.scale: expected [min, max] in (0, 1], got {list(s)}")
    if (aug.shift_scale_rotate or aug.rotate90) and dims != {2}:
        raise ConfigError("$.augment: shift_scale_rotate and rotate90 are implemented for 2D images only")
    if aug.gaussian_noise and aug.gaussian_noise.std < 0:
        raise ConfigError(f"$.augment.gaussian_noise.std: must be >= 0, got {aug.gaussian_noise.std}")


def spec_to_dict(spec: DatasetSpec) -> dict[str, Any]:
    """Plain-data form (YAML/JSON-able) that `load_dataset_spec` reads back into an equal spec."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(spec))
