"""Synthetic MEN and Derm7pt datasets, written in exactly the layouts of the real data.

The real cohorts cannot be downloaded here, so these generators write small stand-ins that the
same adapters read (docs/datasets.md): gzipped NIfTI volumes in the MEN folder layout with a
clinical CSV, and JPEG photos with ``meta/meta.csv`` and split index files in the Derm7pt release
layout. Everything is drawn from ``numpy.random.default_rng`` seeded by ``seed``, so one seed gives
the same CSV bytes and the same voxel/pixel arrays on every run.

How the class signal is split between images and table (so that fusion can beat either):

* **MEN** (3 classes). Each patient has two binary latents. ``image_latent`` = 1 for Grade 2
  (both Grade 2 classes), 0 for Grade 1; it is visible only in the volumes: a necrotic-looking dark
  core in the enhancing tumour on T1, heterogeneous tumour texture on T2 and restricted diffusion
  (darker tumour) on ADC, all scaled by ``image_signal = image_latent + N(0, 0.3)``. These are
  contrasts relative to the surrounding tissue, so they survive clipping and the z-score inside
  the non-zero mask. ``table_latent`` = 1 for brain invasion, 0 for non-invasion, and a fair coin
  for Grade 1 (so the table says nothing about Grade 1 vs Grade 2); it is visible only in the
  table, through ``oedema_area`` (peritumoral oedema grows with ``table_signal = table_latent +
  N(0, 0.35)``) and, weakly, ``location`` (invasion is drawn more often at the convexity).
  Images alone separate Grade 1 from Grade 2, the table alone separates invasion from
  non-invasion within Grade 2; only both give all three classes. ``age``, ``sex``, ``adc_value``
  and ``tumour_area`` carry no class signal (``adc_value`` is deliberately independent of the ADC
  volume; ``tumour_area`` only sets the size of the tumour blob).
* **Derm7pt** (NEV vs MEL). Each case has two conditionally independent noisy views of its class
  y (0 NEV, 1 MEL): ``image_signal = y + N(0, 0.7)`` sets how irregular the lesion border is, how
  variegated its colours are (dark and blue-grey patches) and, on the dermoscopic photo, how
  distorted the pigment network is and how many irregular dots it has; ``table_signal = y +
  N(0, 0.7)`` drives ``management`` (excision) and ``elevation`` (palpable/nodular). Either view
  alone gives an AUC around 0.84 at best, both around 0.92. ``level_of_diagnostic_difficulty``,
  ``location`` and ``sex`` carry no signal. The seven-point checklist columns are what a
  dermatologist reads off the dermoscopic photo, so they follow ``image_signal`` (and
  ``seven_point_score`` is their weighted sum); the task's tabular fields do not include them.
  Rows of other diagnoses (basal cell carcinoma, seborrheic keratosis, ...) are mixed in, as in
  the release, for the adapter to exclude.

With ``signal="interaction"`` a class depends on the image and the table jointly, an interaction no
single modality carries (what crossmodal attention exists to learn):

* **MEN**: Grade 1 when ``image_latent == table_latent`` (both 0 or both 1, a fair coin), Grade 2
  with invasion when (1, 0), without invasion when (0, 1). Whether a patient is Grade 1 is then
  independent of either latent alone (an exclusive or); each modality alone only tells the two
  Grade 2 classes apart.
* **Derm7pt**: MEL when ``image_latent != table_latent`` (``image_latent`` a fair coin), so
  neither view alone says anything about the class; both views are drawn with less noise
  (``N(0, 0.35)``) so that the pair is readable.

The latents are written to ``<out>/_synthetic_latents.csv``, outside the dataset layout proper:
adapters and training never read it; it exists for tests and for sanity checks of the generator.
"""
from __future__ import annotations

import gzip
import shutil
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from PIL import Image
from tqdm import tqdm

LATENTS_FILE = "_synthetic_latents.csv"

# --- MEN --------------------------------------------------------------------------------------
MEN_CLASSES = ("Grade_1", "Grade_2_invasion", "Grade_2_noninvasion")
MEN_CLASS_WEIGHTS = (0.5, 0.25, 0.25)  # Grade 1 dominates a real cohort
MEN_MODALITIES = ("t1_bbox", "t2_bbox", "adc_bbox")
MEN_SPLITS = ("train", "test")
MEN_CLINICAL_FILE = "clinical.csv"
MEN_CLINICAL_COLUMNS = ("patient_id", "location", "sex", "age", "adc_value", "tumour_area",
                        "oedema_area")
MEN_LOCATIONS = (1, 2, 3)  # 1 convexity, 2 skull base, 3 other
MEN_SEXES = (0, 1)  # 0 female, 1 male
MEN_SPACING = (0.9, 0.9, 5.0)  # mm; thick-slice clinical MRI
MEN_MAX_INTENSITY = 1500
MEN_IMAGE_NOISE = 0.3
MEN_TABLE_NOISE = 0.35

# --- Derm7pt ----------------------------------------------------------------------------------
DERM_CLASSES = ("NEV", "MEL")
DERM_CLASS_WEIGHTS = (0.7, 0.3)
# Release strings and their rough frequencies in the 1011-case release.
DERM_NEV_DIAGNOSES = {"blue nevus": 28, "clark nevus": 399, "combined nevus": 13,
                      "congenital nevus": 17, "dermal nevus": 33, "recurrent nevus": 6,
                      "reed or spitz nevus": 79}
DERM_MEL_DIAGNOSES = {"melanoma": 2, "melanoma (in situ)": 64,
                      "melanoma (less than 0.76 mm)": 102, "melanoma (0.76 to 1.5 mm)": 53,
                      "melanoma (more than 1.5 mm)": 28, "melanoma metastasis": 4}
DERM_OTHER_DIAGNOSES = {"basal cell carcinoma": 42, "seborrheic keratosis": 45,
                        "dermatofibroma": 20, "lentigo": 24, "melanosis": 16,
                        "miscellaneous": 8, "vascular lesion": 29}
DERM_META_COLUMNS = ("case_num", "diagnosis", "seven_point_score", "pigment_network", "streaks",
                     "pigmentation", "regression_structures", "dots_and_globules",
                     "blue_whitish_veil", "vascular_structures",
                     "level_of_diagnostic_difficulty", "elevation", "location", "sex", "clinic",
                     "derm", "management")
DERM_VOCAB: dict[str, tuple[str, ...]] = {
    "pigment_network": ("absent", "typical", "atypical"),
    "streaks": ("absent", "regular", "irregular"),
    "pigmentation": ("absent", "diffuse regular", "localized regular", "diffuse irregular",
                     "localized irregular"),
    "regression_structures": ("absent", "blue areas", "white areas", "combinations"),
    "dots_and_globules": ("absent", "regular", "irregular"),
    "blue_whitish_veil": ("absent", "present"),
    "vascular_structures": ("absent", "arborizing", "comma", "hairpin", "within regression",
                            "wreath", "dotted", "linear irregular"),
    "level_of_diagnostic_difficulty": ("low", "medium", "high"),
    "elevation": ("flat", "palpable", "nodular"),
    "location": ("upper limbs", "head neck", "back", "lower limbs", "chest", "abdomen",
                 "buttocks", "acral", "genital areas"),
    "sex": ("female", "male"),
    "management": ("excision", "clinical follow up", "no further examination"),
}
# Seven-point checklist: which answers score, and how much (major criteria 2, minor 1).
DERM_SEVEN_POINT = {
    "pigment_network": {"atypical": 2},
    "blue_whitish_veil": {"present": 2},
    "vascular_structures": {"dotted": 2, "linear irregular": 2},
    "pigmentation": {"diffuse irregular": 1, "localized irregular": 1},
    "streaks": {"irregular": 1},
    "dots_and_globules": {"irregular": 1},
    "regression_structures": {"blue areas": 1, "white areas": 1, "combinations": 1},
}
DERM_SPLITS = ("train", "valid", "test")
DERM_IMAGE_NOISE = 0.7
DERM_TABLE_NOISE = 0.7
DERM_INTERACTION_NOISE = 0.35

SIGNALS = ("split", "interaction")  # how the class signal is spread over the modalities


# --- shared helpers ---------------------------------------------------------------------------
def _check_signal(signal: str) -> None:
    if signal not in SIGNALS:
        raise ValueError(f"signal must be one of {SIGNALS}, got {signal!r}")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {value}")


def _class_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder allocation of ``total`` to classes, at least one patient each."""
    k = len(weights)
    w = np.asarray(weights, dtype=float) / sum(weights)
    counts = np.ones(k, dtype=int)
    raw = w * (total - k)
    counts += np.floor(raw).astype(int)
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    for i in order[: total - counts.sum()]:
        counts[i] += 1
    return counts.tolist()


def _held_out(n: int, fraction: float) -> int:
    """Patients of one class to hold out: round(n * fraction), keeping one on each side if n >= 2."""
    if fraction <= 0 or n < 2:
        return 0
    return int(min(max(round(n * fraction), 1), n - 1))


def _prepare_out(out: Path, owned: Iterable[str], overwrite: bool) -> Path:
    """Create ``out``; refuse to write into a folder that already holds any of our paths."""
    out = Path(out)
    existing = [out / name for name in owned if (out / name).exists()]
    if existing and not overwrite:
        raise FileExistsError(
            f"{out} already holds a generated dataset ({existing[0].name}); pass overwrite=True "
            "(--overwrite) or choose an empty folder")
    for path in existing:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _resize_linear(a: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """Separable linear interpolation of ``a`` to ``shape`` (smooth noise without scipy)."""
    for axis, n in enumerate(shape):
        m = a.shape[axis]
        pos = np.linspace(0.0, m - 1, n)
        i0 = np.minimum(np.floor(pos).astype(int), m - 2)
        frac = (pos - i0).reshape([-1 if d == axis else 1 for d in range(a.ndim)])
        a = np.take(a, i0, axis=axis) * (1 - frac) + np.take(a, i0 + 1, axis=axis) * frac
    return a


def _smooth_noise(rng: np.random.Generator, shape: Sequence[int],
                  cells: Sequence[int]) -> np.ndarray:
    """Unit-ish variance noise, smooth over about ``shape / cells`` voxels per axis."""
    coarse = rng.standard_normal([max(2, c) for c in cells])
    return _resize_linear(coarse, shape)


def _sigmoid(x: np.ndarray | float) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.asarray(x, dtype=float)))


def _jitter_shape(rng: np.random.Generator, size: Sequence[int], vary: bool) -> tuple[int, ...]:
    """Real crops differ in size per patient; jitter each axis by up to ~10% when asked."""
    if not vary:
        return tuple(int(s) for s in size)
    return tuple(int(max(4, s + int(rng.integers(-max(1, round(0.1 * s)), max(1, round(0.1 * s)) + 1))))
                 for s in size)


def _check_size(size: Sequence[int], dims: int, name: str) -> tuple[int, ...]:
    size = tuple(int(s) for s in size)
    if len(size) != dims or min(size) < 4:
        raise ValueError(f"{name} size must be {dims} integers >= 4, got {size}")
    return size


# --- MEN --------------------------------------------------------------------------------------
def men_latents(patients: int = 60, seed: int = 0, test_fraction: float = 0.2,
                signal: str = "split") -> pd.DataFrame:
    """The cohort plan: one row per patient with id, split, class and the latents of each modality.

    Columns: patient_id, split, label, image_latent, table_latent, image_signal, table_signal
    (``*_signal`` = latent + noise, what the renderer actually shows), signal (the mode). Sorted
    by patient_id. ``signal``: "split" or "interaction" (see the module docstring).
    """
    if patients < len(MEN_CLASSES):
        raise ValueError(f"MEN needs at least {len(MEN_CLASSES)} patients, got {patients}")
    _check_fraction("test_fraction", test_fraction)
    _check_signal(signal)
    rng = np.random.default_rng([seed, 0])
    label_list: list[str] = []
    split_list: list[str] = []
    for cls, n in zip(MEN_CLASSES, _class_counts(patients, MEN_CLASS_WEIGHTS)):
        n_test = _held_out(n, test_fraction)
        label_list += [cls] * n
        split_list += ["test"] * n_test + ["train"] * (n - n_test)
    order = rng.permutation(patients)  # ids carry no class information
    labels = np.asarray(label_list)[order]
    splits = np.asarray(split_list)[order]
    coin = rng.integers(0, 2, patients)
    if signal == "split":
        image_latent = (labels != "Grade_1").astype(int)
        table_latent = np.where(labels == "Grade_2_invasion", 1, np.where(labels == "Grade_2_noninvasion", 0, coin))
    else:  # Grade 1 iff the latents agree
        image_latent = np.where(labels == "Grade_1", coin, (labels == "Grade_2_invasion").astype(int))
        table_latent = np.where(labels == "Grade_1", coin, (labels == "Grade_2_noninvasion").astype(int))
    return pd.DataFrame({
        "patient_id": [f"MEN_{i + 1:04d}" for i in range(patients)],
        "split": splits,
        "label": labels,
        "image_latent": image_latent,
        "table_latent": table_latent,
        "image_signal": np.round(image_latent + rng.normal(0, MEN_IMAGE_NOISE, patients), 4),
        "table_signal": np.round(table_latent + rng.normal(0, MEN_TABLE_NOISE, patients), 4),
        "signal": signal,
    })


def _men_clinical(plan: pd.DataFrame, rng: np.random.Generator,
                  missing_fraction: float) -> pd.DataFrame:
    n = len(plan)
    t = plan["table_signal"].to_numpy()
    b = plan["table_latent"].to_numpy()
    # location: invasive tumours sit at the convexity more often (weak table signal)
    p_loc = np.where(b[:, None] == 1, [[0.55, 0.25, 0.20]], [[0.35, 0.45, 0.20]])
    location = (rng.random((n, 1)) > np.cumsum(p_loc, axis=1)).sum(axis=1) + 1
    clinical = pd.DataFrame({
        "patient_id": plan["patient_id"],
        "location": location.astype(int),
        "sex": (rng.random(n) < 0.3).astype(int),  # meningioma: female predominance
        "age": np.clip(np.round(rng.normal(58, 12, n)), 20, 90).astype(int),
        "adc_value": np.round(np.clip(rng.normal(850, 120, n), 450, 1400), 1),  # 1e-6 mm^2/s
        "tumour_area": np.round(np.clip(rng.lognormal(np.log(8.0), 0.6, n), 1.0, 40.0), 2),  # cm^2
        "oedema_area": np.round(np.clip(2.0 + 10.0 * t + rng.normal(0, 1.5, n), 0, None), 2),
    })
    if missing_fraction > 0:
        for column in ("adc_value", "tumour_area", "oedema_area"):
            clinical.loc[rng.random(n) < missing_fraction, column] = np.nan
    return clinical


def _men_volumes(rng: np.random.Generator, shape: tuple[int, ...], image_signal: float,
                 tumour_area: float) -> dict[str, np.ndarray]:
    """Three co-registered int16 volumes [H, W, D] of a bounding-box crop around a tumour.

    Zero outside an ellipsoidal field of view, so the non-zero mask is the tissue; inside,
    intensities are in [1, 1500]. ``severity`` (0 Grade-1-like .. 1 Grade-2-like) sets the
    tumour's contrast pattern relative to the surrounding tissue.
    """
    severity = float(np.clip(0.15 + 0.7 * image_signal, 0.0, 1.0))
    axes = [np.linspace(-1, 1, s) for s in shape]
    x, y, z = np.meshgrid(*axes, indexing="ij", sparse=True)
    head = (x / rng.uniform(1.0, 1.25)) ** 2 + (y / rng.uniform(1.0, 1.25)) ** 2 \
        + (z / rng.uniform(1.1, 1.5)) ** 2 <= 1.0  # [H, W, D]
    area = 8.0 if not np.isfinite(tumour_area) else tumour_area
    radius = 0.35 + 0.35 * np.clip((area - 1.0) / 30.0, 0.0, 1.0)
    centre = rng.uniform(-0.15, 0.15, 3)
    radii = radius * rng.uniform(0.85, 1.15, 3)
    cells = [max(2, s // 6) for s in shape]
    dist = np.sqrt(((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2
                   + ((z - centre[2]) / radii[2]) ** 2)
    dist = dist * (1.0 + 0.08 * _smooth_noise(rng, shape, cells))  # lobulated surface
    tumour = _sigmoid((1.0 - dist) / 0.06)
    core = _sigmoid((0.5 - dist) / 0.08)
    tissue_texture = 0.05 * _smooth_noise(rng, shape, cells)
    tumour_texture = _smooth_noise(rng, shape, [max(2, s // 3) for s in shape])

    levels = {  # (tissue, tumour) before the patient's scanner gain
        "t1_bbox": (420.0, 820.0 * (1.0 - 0.55 * severity * core)),
        "t2_bbox": (620.0, 720.0 * (1.0 + (0.04 + 0.30 * severity) * tumour_texture)),
        "adc_bbox": (820.0, 870.0 * (1.0 - 0.30 * severity) * (1.0 + 0.03 * tumour_texture)),
    }
    volumes = {}
    for name in MEN_MODALITIES:
        tissue_level, tumour_level = levels[name]
        vol = tissue_level * (1.0 + tissue_texture) * (1.0 - tumour) + tumour_level * tumour
        vol = vol * rng.uniform(0.85, 1.15) + rng.normal(0.0, 25.0, shape)
        vol = np.where(head, np.clip(vol, 1.0, MEN_MAX_INTENSITY), 0.0)
        volumes[name] = np.round(vol).astype(np.int16)
    return volumes


def _save_nifti(volume: np.ndarray, path: Path) -> None:
    image = nib.Nifti1Image(volume, np.diag([*MEN_SPACING, 1.0]))
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(image.affine, code=1)
    image.set_sform(image.affine, code=1)
    # gzip with a fixed mtime: one seed gives byte-identical files (content hashes stay stable)
    path.write_bytes(gzip.compress(image.to_bytes(), compresslevel=1, mtime=0))


def make_men(out: Path, patients: int = 60, seed: int = 0,
             size: Sequence[int] = (32, 32, 8), test_fraction: float = 0.2, *,
             vary_size: bool = False, missing_fraction: float = 0.0, overwrite: bool = False,
             progress: bool = False, signal: str = "split") -> Path:
    """Write a synthetic MEN cohort under ``out`` in the public code's layout; returns ``out``.

    ``<out>/<train|test>/<class>/<patient>/{t1_bbox,t2_bbox,adc_bbox}.nii.gz`` (int16, [H, W, D]
    = ``size``, or jittered by ~10% per patient with ``vary_size``), ``<out>/clinical.csv`` and
    ``<out>/_synthetic_latents.csv``. ``missing_fraction`` blanks that share of adc_value,
    tumour_area and oedema_area cells, as real clinical exports have gaps. ``signal``: "split"
    or "interaction" (module docstring).
    """
    size = _check_size(size, 3, "MEN")
    _check_fraction("missing_fraction", missing_fraction)
    plan = men_latents(patients, seed, test_fraction, signal)
    out = _prepare_out(out, [*MEN_SPLITS, MEN_CLINICAL_FILE, LATENTS_FILE], overwrite)
    clinical = _men_clinical(plan, np.random.default_rng([seed, 1]), missing_fraction)
    rows = zip(plan.itertuples(index=False), clinical["tumour_area"])
    for i, (row, area) in enumerate(tqdm(rows, total=len(plan), desc="MEN patients",
                                         unit="patient", disable=not progress)):
        rng = np.random.default_rng([seed, 2, i])  # per patient: independent of the others
        shape = _jitter_shape(rng, size, vary_size)
        folder = out / row.split / row.label / row.patient_id
        folder.mkdir(parents=True)
        for name, volume in _men_volumes(rng, shape, row.image_signal, area).items():
            _save_nifti(volume, folder / f"{name}.nii.gz")
    clinical.to_csv(out / MEN_CLINICAL_FILE, index=False)
    plan.to_csv(out / LATENTS_FILE, index=False)
    return out


# --- Derm7pt ----------------------------------------------------------------------------------
def _pick(rng: np.random.Generator, table: Mapping[str, float], n: int) -> np.ndarray:
    names = list(table)
    p = np.asarray([table[k] for k in names], dtype=float)
    return np.asarray(names, dtype=object)[rng.choice(len(names), size=n, p=p / p.sum())]


def derm7pt_latents(patients: int = 80, seed: int = 0, test_fraction: float = 0.2, *,
                    valid_fraction: float = 0.2, other_cases: int | None = None,
                    signal: str = "split") -> pd.DataFrame:
    """The case plan, one row per meta.csv row in order (row index = position).

    ``patients`` counts the NEV + MEL cases; ``other_cases`` (default 10% of ``patients``, at
    least 1) rows of other diagnoses are mixed in. Columns: case_num, diagnosis, label
    (NEV / MEL / other), split (train / valid / test), image_signal, table_signal, signal.
    ``signal``: "split" or "interaction" (module docstring).
    """
    _check_signal(signal)
    if patients < len(DERM_CLASSES):
        raise ValueError(f"Derm7pt needs at least {len(DERM_CLASSES)} NEV/MEL cases, got {patients}")
    _check_fraction("test_fraction", test_fraction)
    _check_fraction("valid_fraction", valid_fraction)
    if test_fraction + valid_fraction >= 1.0:
        raise ValueError(f"test_fraction + valid_fraction must be < 1, got "
                         f"{test_fraction} + {valid_fraction}")
    n_other = max(1, round(0.1 * patients)) if other_cases is None else int(other_cases)
    if n_other < 0:
        raise ValueError(f"other_cases must be >= 0, got {other_cases}")
    rng = np.random.default_rng([seed, 0])
    n_nev, n_mel = _class_counts(patients, DERM_CLASS_WEIGHTS)
    labels = np.asarray(["NEV"] * n_nev + ["MEL"] * n_mel + ["other"] * n_other)
    diagnosis = np.concatenate([_pick(rng, DERM_NEV_DIAGNOSES, n_nev),
                                _pick(rng, DERM_MEL_DIAGNOSES, n_mel),
                                _pick(rng, DERM_OTHER_DIAGNOSES, n_other)])
    splits = np.empty(len(labels), dtype=object)
    for cls in ("NEV", "MEL", "other"):  # stratified split per class
        idx = np.flatnonzero(labels == cls)
        n_test = _held_out(len(idx), test_fraction)
        n_valid = _held_out(len(idx) - n_test, valid_fraction / (1.0 - test_fraction))
        splits[idx] = ["test"] * n_test + ["valid"] * n_valid + ["train"] * (len(idx) - n_test - n_valid)
    order = rng.permutation(len(labels))  # the release interleaves diagnoses
    labels, diagnosis, splits = labels[order], diagnosis[order], splits[order]
    n = len(labels)
    y = (labels == "MEL").astype(float)
    if signal == "split":  # two noisy views of the class
        y[labels == "other"] = rng.uniform(0.0, 0.6, (labels == "other").sum())
        image, table = y, y
        noise = (DERM_IMAGE_NOISE, DERM_TABLE_NOISE)
    else:  # MEL iff the views disagree; other diagnoses: two independent coins
        image = rng.integers(0, 2, n).astype(float)
        table = np.where(labels == "other", rng.integers(0, 2, n), np.abs(image - y))
        noise = (DERM_INTERACTION_NOISE, DERM_INTERACTION_NOISE)
    return pd.DataFrame({
        "case_num": np.arange(1, n + 1),
        "diagnosis": diagnosis,
        "label": labels,
        "split": splits,
        "image_signal": np.round(image + rng.normal(0, noise[0], n), 4),
        "table_signal": np.round(table + rng.normal(0, noise[1], n), 4),
        "signal": signal,
    })


def _derm_checklist(rng: np.random.Generator, image_signal: np.ndarray) -> dict[str, np.ndarray]:
    """Seven-point answers as read off the dermoscopic photo: positive findings follow the image."""
    n = len(image_signal)
    p = _sigmoid(3.0 * (image_signal - 0.5))  # [n] how melanoma-like the photo looks

    def answer(positive: dict[str, float], negative: dict[str, float], rate: float) -> np.ndarray:
        hit = rng.random(n) < rate * p
        return np.where(hit, _pick(rng, positive, n), _pick(rng, negative, n))

    return {
        "pigment_network": answer({"atypical": 1}, {"absent": 0.4, "typical": 0.6}, 0.8),
        "streaks": answer({"irregular": 1}, {"absent": 0.8, "regular": 0.2}, 0.5),
        "pigmentation": answer({"diffuse irregular": 0.5, "localized irregular": 0.5},
                               {"absent": 0.5, "diffuse regular": 0.3, "localized regular": 0.2},
                               0.7),
        "regression_structures": answer({"blue areas": 0.3, "white areas": 0.4,
                                         "combinations": 0.3}, {"absent": 1}, 0.5),
        "dots_and_globules": answer({"irregular": 1}, {"absent": 0.5, "regular": 0.5}, 0.7),
        "blue_whitish_veil": answer({"present": 1}, {"absent": 1}, 0.6),
        "vascular_structures": answer({"dotted": 0.6, "linear irregular": 0.4},
                                      {"absent": 0.85, "arborizing": 0.03, "comma": 0.04,
                                       "hairpin": 0.03, "within regression": 0.03, "wreath": 0.02},
                                      0.25),
    }


def _derm_table(plan: pd.DataFrame, rng: np.random.Generator) -> pd.DataFrame:
    n = len(plan)
    t = plan["table_signal"].to_numpy()
    checklist = _derm_checklist(rng, plan["image_signal"].to_numpy())
    score = sum(np.vectorize(lambda v, s=scores: s.get(v, 0))(checklist[col])
                for col, scores in DERM_SEVEN_POINT.items())
    # management and elevation carry the table's view of the class
    excise = rng.random(n) < _sigmoid(3.0 * (t - 0.5))
    management = np.where(excise, "excision",
                          _pick(rng, {"clinical follow up": 0.7, "no further examination": 0.3}, n))
    e = t + rng.normal(0, 0.6, n)
    elevation = np.where(e < 0.35, "flat", np.where(e < 1.0, "palpable", "nodular"))
    difficulty = _pick(rng, {"low": 0.45, "medium": 0.35, "high": 0.2}, n)
    location = _pick(rng, {"upper limbs": 0.12, "head neck": 0.1, "back": 0.25,
                           "lower limbs": 0.2, "chest": 0.1, "abdomen": 0.1, "buttocks": 0.04,
                           "acral": 0.05, "genital areas": 0.04}, n)
    sex = _pick(rng, {"female": 0.5, "male": 0.5}, n)
    folders = [_derm_folder(i) for i in range(n)]
    meta = pd.DataFrame({
        "case_num": plan["case_num"],
        "diagnosis": plan["diagnosis"],
        "seven_point_score": np.asarray(score, dtype=int),
        **checklist,
        "level_of_diagnostic_difficulty": difficulty,
        "elevation": elevation,
        "location": location,
        "sex": sex,
        # release style: clinic "Nel/Nel026.jpg", derm "NEL/NEL027.JPG"
        "clinic": [f"{f}/{f}{2 * i + 1:03d}.jpg" for i, f in enumerate(folders)],
        "derm": [f"{f}/{f.upper()}{2 * i + 2:03d}.JPG" for i, f in enumerate(folders)],
        "management": management,
    })
    return meta[list(DERM_META_COLUMNS)]


def _derm_folder(i: int) -> str:
    """Release-like three-letter subfolder ("Aaa", "Aab", ...), 10 cases per folder."""
    k = i // 10
    return "A" + chr(ord("a") + (k // 26) % 26) + chr(ord("a") + k % 26)


def _derm_photo(rng: np.random.Generator, shape: tuple[int, ...], signal: float,
                skin: np.ndarray, dermoscopic: bool) -> np.ndarray:
    """One RGB photo [H, W, 3] uint8 of a pigmented lesion on skin.

    ``signal`` (about 0 nevus-like .. 1 melanoma-like) raises border irregularity, colour
    variegation and, on dermoscopy, pigment-network distortion and irregular dots.
    """
    h, w = shape
    s = float(np.clip(signal, -0.5, 1.5))
    sev = float(np.clip(s, 0.0, 1.5)) / 1.5  # 0..1
    half = min(h, w) / 2.0
    yy = ((np.arange(h) - (h - 1) / 2.0) / half)[:, None]  # [H, 1], aspect-correct units
    xx = ((np.arange(w) - (w - 1) / 2.0) / half)[None, :]  # [1, W]
    cy, cx = rng.uniform(-0.12, 0.12, 2)
    dy, dx = yy - cy, xx - cx
    rho = np.sqrt(dy ** 2 + dx ** 2)
    theta = np.arctan2(dy, dx)
    r0 = rng.uniform(0.55, 0.75) if dermoscopic else rng.uniform(0.22, 0.38)
    ks = np.arange(2, 7)
    amps = rng.normal(0, 1, len(ks)) / ks
    phases = rng.uniform(0, 2 * np.pi, len(ks))
    wobble = (amps[:, None, None] * np.cos(ks[:, None, None] * theta + phases[:, None, None])).sum(0)
    border = r0 * (1.0 + (0.03 + 0.35 * sev) * wobble / np.abs(amps).sum())
    lesion = _sigmoid((border - rho) / (0.015 + 0.01 * rng.random()))[..., None]  # [H, W, 1]

    light = 1.0 + 0.08 * (rng.normal() * xx + rng.normal() * yy)
    img = np.broadcast_to(skin * light[..., None], (h, w, 3)).copy()
    base = np.array([112.0, 72.0, 48.0]) * rng.uniform(0.8, 1.2)
    pigment = base * (1.0 + 0.1 * _smooth_noise(rng, shape, (4, 4))[..., None])
    # colour variegation: dark-brown and blue-grey patches appear with the signal
    patches = _smooth_noise(rng, shape, (5, 5))
    dark = _sigmoid((patches - (1.8 - 1.5 * sev)) / 0.15)[..., None]
    blue = _sigmoid((-patches - (2.2 - 1.8 * sev)) / 0.15)[..., None]
    pigment = pigment * (1 - dark) + np.array([52.0, 36.0, 32.0]) * dark
    pigment = pigment * (1 - blue) + np.array([96.0, 108.0, 138.0]) * blue
    if dermoscopic:
        # pigment network: a grid of dark lines, warped and uneven for melanoma-like lesions
        warp = (0.2 + 3.0 * sev) * _smooth_noise(rng, shape, (6, 6))  # radians
        freq = rng.uniform(40.0, 50.0)  # mesh of ~0.14 half-widths
        lines = np.maximum(np.cos(freq * xx + warp), np.cos(freq * yy - warp)).clip(0) ** 6
        pigment = pigment * (1.0 - (0.3 + 0.2 * sev) * lines[..., None])
        n_dots = rng.poisson(1 + 10 * sev)
        for _ in range(n_dots):  # irregular dots, scattered towards the border
            a, r = rng.uniform(0, 2 * np.pi), r0 * rng.uniform(0.4, 1.0)
            d = np.sqrt((dx - r * np.cos(a)) ** 2 + (dy - r * np.sin(a)) ** 2)
            pigment = pigment * (1.0 - 0.6 * _sigmoid((0.04 - d) / 0.01)[..., None])
    img = img * (1 - lesion) + pigment * lesion
    if dermoscopic:  # circular field of view of the dermatoscope
        img = img * _sigmoid((1.35 - np.sqrt(yy ** 2 + xx ** 2)) / 0.03)[..., None]
    img = img + rng.normal(0, 4.0, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8)


def make_derm7pt(out: Path, patients: int = 80, seed: int = 0, size: Sequence[int] = (64, 64),
                 test_fraction: float = 0.2, *, valid_fraction: float = 0.2,
                 other_cases: int | None = None, vary_size: bool = False,
                 overwrite: bool = False, progress: bool = False, signal: str = "split") -> Path:
    """Write a synthetic Derm7pt release under ``out``; returns ``out``.

    ``<out>/meta/meta.csv`` (one row per case, release columns and vocabularies),
    ``<out>/meta/{train,valid,test}_indexes.csv`` (column ``indexes``: 0-based rows of meta.csv,
    covering every row, other diagnoses included, like the release), ``<out>/images/<clinic|derm
    path>`` JPEG photos of ``size`` = (H, W) (non-square allowed; ``vary_size`` jitters each photo
    by ~10%) and ``<out>/_synthetic_latents.csv``. ``patients`` counts NEV + MEL cases.
    """
    size = _check_size(size, 2, "Derm7pt")
    plan = derm7pt_latents(patients, seed, test_fraction, valid_fraction=valid_fraction,
                           other_cases=other_cases, signal=signal)
    out = _prepare_out(out, ["meta", "images", LATENTS_FILE], overwrite)
    meta = _derm_table(plan, np.random.default_rng([seed, 1]))
    for i, row in enumerate(tqdm(meta.itertuples(index=False), total=len(meta),
                                 desc="Derm7pt cases", unit="case", disable=not progress)):
        rng = np.random.default_rng([seed, 2, i])
        skin = np.array([226.0, 178.0, 146.0]) * rng.uniform(0.8, 1.05) \
            + rng.normal(0, 6.0, 3)
        image_signal = plan["image_signal"].iat[i]
        for rel, dermoscopic in ((row.clinic, False), (row.derm, True)):
            shape = _jitter_shape(rng, size, vary_size)
            path = out / "images" / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(_derm_photo(rng, shape, image_signal, skin, dermoscopic), "RGB") \
                .save(path, format="JPEG", quality=90)
    (out / "meta").mkdir()
    meta.to_csv(out / "meta" / "meta.csv", index=False)
    for split in DERM_SPLITS:
        rows = np.flatnonzero(plan["split"].to_numpy() == split)
        pd.DataFrame({"indexes": rows}).to_csv(out / "meta" / f"{split}_indexes.csv", index=False)
    plan.to_csv(out / LATENTS_FILE, index=False)
    return out
