"""The prepared dataset a search or comparison trains on: a prepared folder as it is, or a raw
dataset folder validated and prepared first (its cache reused when unchanged).

A prepared folder records every setting that shaped it (its prepare record): the fold count and
fold seed, and the dataset config it was prepared with (`spec`: classes, modalities and their
image sizes, fields, intensity/clip window, augmentation, source). `prepare_settings` gives the
settings a run asks for in the same form and `settings_mismatch` compares the two, one comparison
for every setting:

- `--data-root` at a prepared folder: used only when every asked setting matches its record;
  otherwise refused, naming each setting with the recorded and the asked value. A setting the
  run does not ask for (no `--fold-seed`, no `train.image_size`) takes the folder's own.
- `--data-root` at a raw dataset: prepared into `<root>/prepared` (or `prepared-<config name>`);
  when that folder already holds a prepare with other settings it is left as it is and the data is
  prepared anew beside it, in `<that folder>-<hash of the settings>`, so that nothing another
  search trains on is overwritten.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from cfcml.config import ConfigError
from cfcml.data.manifest import MANIFEST_FILE, PreparedDataset

# The name a setting of the prepare record goes by on a search's command line.
SETTING_NAMES = {"folds": "train.folds (--folds)", "fold_seed": "--fold-seed",
                 "image_size": "train.image_size (--image-size)"}


def _plain(value: object) -> Any:
    return json.loads(json.dumps(value, default=str))


def prepare_settings(dataset: str, *, folds: int, fold_seed: int | None,
                     image_size: tuple[int, ...] | None) -> dict[str, Any]:
    """What a run asks a prepared folder to hold: `folds`, `fold_seed` (None: not asked),
    `image_size` (per modality; None: not asked) and `spec`, the dataset config `dataset` (a name
    under conf/datasets or a YAML path) at that image size, as plain data without its sizes."""
    from cfcml.data.spec import load_dataset_spec, spec_to_dict

    spec = load_dataset_spec(dataset, tuple(image_size) if image_size is not None else None)
    return {"folds": folds, "fold_seed": fold_seed,
            "image_size": None if image_size is None else {m.name: list(m.size) for m in spec.modalities},
            "spec": _without_sizes(_plain(spec_to_dict(spec)))}


def recorded_settings(prepared: PreparedDataset) -> dict[str, Any]:
    """The same settings as `prepare_settings`, from a prepared folder's record (its spec read
    back through the current DatasetSpec, so a key added since with its default is no difference)."""
    from cfcml.data.spec import spec_to_dict

    return {"folds": prepared.folds, "fold_seed": prepared.fold_seed,
            "image_size": {m.name: list(m.size) for m in prepared.spec.modalities},
            "spec": _without_sizes(_plain(spec_to_dict(prepared.spec)))}


def _without_sizes(spec: dict[str, Any]) -> dict[str, Any]:
    """The spec less its image sizes: those are compared as `image_size`, per modality."""
    spec = {k: v for k, v in spec.items() if k != "image_size"}
    spec["modalities"] = [{k: v for k, v in m.items() if k != "size"} for m in spec.get("modalities") or []]
    return spec


def _flat(prefix: str, value: object) -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, item in value.items() for k, v in _flat(f"{prefix}.{key}", item).items()} or {prefix: {}}
    if isinstance(value, list) and any(isinstance(x, (dict, list)) for x in value):
        return {k: v for i, item in enumerate(value) for k, v in _flat(f"{prefix}[{i}]", item).items()}
    return {prefix: value}


def settings_mismatch(recorded: dict[str, Any], asked: dict[str, Any], dataset: str) -> list[str]:
    """One 'SETTING: RECORDED there, ASKED asked' entry per asked setting that differs from the
    record (settings asked as None are not asked). Dataset-config keys are named as in the
    dataset YAML, e.g. `conf/datasets/men.yaml: intensity.clip`."""
    from cfcml.data.spec import spec_path

    out = []
    for key in ("folds", "fold_seed", "image_size"):
        if asked.get(key) is not None and _plain(asked[key]) != _plain(recorded.get(key)):
            out.append(f"{SETTING_NAMES[key]}: {recorded.get(key)} there, {asked[key]} asked")
    mine, theirs = _flat("", asked["spec"]), _flat("", recorded["spec"])
    for key in sorted(set(mine) | set(theirs)):
        if mine.get(key, "<absent>") != theirs.get(key, "<absent>"):
            out.append(f"{spec_path(dataset)}: {key.lstrip('.')}: {theirs.get(key, '<absent>')!r} there, "
                       f"{mine.get(key, '<absent>')!r} asked")
    return out


def check_cache(prepared: PreparedDataset, what: str = "--data-root") -> PreparedDataset:
    """Raise ConfigError (one line naming `what`, the file and its patient) unless every cache file
    of `prepared` is there at the size its shape needs (`cfcml.data.cache.damaged_entries`: one
    `stat` a file). A truncated or deleted file was otherwise found by a trial, after Ray started.
    Returns `prepared`."""
    from cfcml.data.cache import damaged_entries

    bad = damaged_entries(prepared.manifest, prepared.spec, prepared.cache_dir)
    if bad:
        pid, modality, path, problem = bad[0]
        more = f" (and {len(bad) - 1} more cache file(s))" if len(bad) > 1 else ""
        sizes = {tuple(m.size) for m in prepared.spec.modalities}
        size = f" --image-size {' '.join(map(str, sizes.pop()))}" if len(sizes) == 1 else ""
        raise ConfigError(f"{what} {prepared.out_dir}: the cached {modality} image of patient {pid!r}, {path}, "
                          f"{problem}{more}; prepare it again (only damaged or changed images are rebuilt): "
                          f"python pipelines/prepare.py --dataset {prepared.spec.name} --data-root {prepared.root} "
                          f"--out {prepared.out_dir} --folds {prepared.folds} --fold-seed {prepared.fold_seed}{size}")
    return prepared


def load_or_prepare(dataset: str, root: Path, *, folds: int, fold_seed: int | None,
                    image_size: tuple[int, ...] | None, log: Callable[[str], None] = print) -> PreparedDataset:
    """`root` holding manifest.parquet is used as prepared when its prepare record matches every
    asked setting (`folds`; `fold_seed` and `image_size` when given; the dataset config).
    Otherwise `root` is a raw dataset: it is validated and prepared into `<root>/prepared` with
    `folds` folds drawn with `fold_seed` (default 0), or beside that folder when it holds a
    prepare with other settings (see the module docstring).

    Raises ConfigError naming every mismatched setting with its recorded and asked values, a
    missing folder or an unwritable output folder; DatasetValidationError (the whole report) on bad
    data; both before anything expensive starts and before anything is written.
    """
    from cfcml.data.prepare import default_prepared_name, prepare_dataset
    from cfcml.data.spec import load_dataset_spec

    root = Path(root)
    asked = prepare_settings(dataset, folds=folds, fold_seed=fold_seed, image_size=image_size)
    if (root / MANIFEST_FILE).is_file():
        prepared = PreparedDataset.load(root)
        problems = settings_mismatch(recorded_settings(prepared), asked, dataset)
        if problems:
            raise ConfigError(f"--data-root: {root} was prepared with other settings ({'; '.join(problems)}); "
                              f"pass the recorded values, or point --data-root at the raw dataset "
                              f"{prepared.root} to prepare it anew beside this folder")
        return check_cache(prepared)
    if not root.is_dir():
        raise ConfigError(f"--data-root: no dataset at {root}. Generate one with "
                          f"`python pipelines/make_synthetic.py --dataset {dataset} --data-root {root}` "
                          f"or point --data-root at your data")
    fold_seed = 0 if fold_seed is None else fold_seed
    spec = load_dataset_spec(dataset, tuple(image_size) if image_size is not None else None)
    # A raw root prepares at the config's sizes when none is asked: compare those too.
    asked = {**asked, "fold_seed": fold_seed, "image_size": {m.name: list(m.size) for m in spec.modalities}}
    out = root.resolve() / default_prepared_name(spec)
    if (out / MANIFEST_FILE).is_file():
        try:
            problems = settings_mismatch(recorded_settings(PreparedDataset.load(out)), asked, dataset)
        except (ValueError, KeyError, ConfigError) as exc:  # an unreadable record: keep it, go beside it
            problems = [f"its prepare record cannot be read ({exc})"]
        if problems:
            digest = hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()[:8]
            beside = out.with_name(f"{out.name}-{digest}")
            log(f"{out} holds a prepare with other settings ({'; '.join(problems)}); "
                f"left as it is, preparing anew in {beside}")
            out = beside
    from cfcml.outputs import OutputPathError

    try:
        prepared = prepare_dataset(dataset, root, out, folds=folds, fold_seed=fold_seed,
                                   image_size=image_size, progress=True, log=log)
    except OutputPathError as exc:  # e.g. <root>/prepared is a file: one line, before any image is read
        raise ConfigError(f"--data-root: {exc}") from None
    return check_cache(prepared)
