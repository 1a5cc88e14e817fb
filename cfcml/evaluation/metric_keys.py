"""The one owner of metric names: every key a run reports, logs, tags or reads is built and parsed here.

A metric's own name is what `cfcml.evaluation.metrics.compute_metrics` returns ("macro_auc",
"balanced_accuracy", "acc_class_0", ...), a loss term of the training loop ("loss", ...) or a system
figure ("cpu_utilization_percentage"). A key says where the figure comes from:

=====================  ==========================  ===============================================
kind                   key                         produced by
=====================  ==========================  ===============================================
train                  `train_<loss>`              `cfcml.training.CrossValidation` (mean over folds)
train, per fold        `train_<loss>_fold<k>`      `cfcml.training.CrossValidation`
val, per fold          `val_<metric>_fold<k>`      `cfcml.training.CrossValidation`
cv                     `cv_<metric>`               `cfcml.training.CrossValidation` (mean over folds)
selected               `selected_<key>`            `tuning.records.outcome` (the selected epoch's value)
selected epoch         `selected_epoch`            `tuning.records.outcome.EpochSelection`
last epoch             `last_epoch_<key>`          `tuning.records.outcome.published_cv`
test                   `test_<metric>`             `tuning.release.final` (the held-out split, once)
CI bounds              `<key>_ci_low`, `_ci_high`  `tuning.release.final`, `tuning.evidence.clinical`
paired difference      `diff_<metric>`             `tuning.evidence.comparison`
nested                 `nested_<metric>`           `tuning.evidence.nested` (outer-held-out, mean over outer folds)
variant                `<variant>.<key>`           `tuning.evidence.comparison`
system                 `system/<name>`             `tuning.hpo.trainer.SystemMetrics` (MLflow's names)
=====================  ==========================  ===============================================

`<key>` is itself a key: `selected_cv_macro_auc`, `selected_val_auc_fold0`, `last_epoch_cv_auc`.
These names are what MLflow, Tune's metric, Optuna and `outcome.json` hold; renaming one here
renames it everywhere. `tests/test_layers.py` fails on a metric prefix spelt as a string literal
anywhere else in `cfcml/`, `tuning/` or `pipelines/`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

TRAIN = "train"
VAL = "val"
CV = "cv"
SELECTED = "selected"
LAST_EPOCH = "last_epoch"
TEST = "test"
DIFF = "diff"
NESTED = "nested"
SYSTEM = "system"
OTHER = "other"  # a key of no kind above ("epoch", "temperature", Tune's own keys)

# kind -> the prefix of its keys; `selected` before `last_epoch` and the rest: parse tries them in order
PREFIXES: dict[str, str] = {SELECTED: "selected_", LAST_EPOCH: "last_epoch_", TRAIN: "train_", VAL: "val_",
                            CV: "cv_", TEST: "test_", DIFF: "diff_", NESTED: "nested_",
                            SYSTEM: "system/"}
KINDS = (*PREFIXES, OTHER)

SELECTED_EPOCH = "selected_epoch"  # reported every epoch of a CV run: the epoch the `selected_*` values come from
SELECTED_FIGURES = "selected_figures"  # the version tag (and `cfcml.` run tag) naming which figures are selected
CI_LOW, CI_HIGH = "_ci_low", "_ci_high"  # suffixes of a bootstrap 95% CI's bounds
_FOLD = re.compile(r"(.+)_fold(\d+)")


def train(name: str) -> str:
    """`train_<name>`: a training-loss term (mean over the epoch's steps). Args: name: "loss", "sam", ..."""
    return PREFIXES[TRAIN] + name


TRAIN_LOSS = train("loss")  # the mean over folds of the training loss: what Tune's console table shows


def val(name: str) -> str:
    """`val_<name>`: a validation metric of one fold, before `fold` adds the fold (`val_<name>_fold<k>`)."""
    return PREFIXES[VAL] + name


def cv(name: str) -> str:
    """`cv_<name>`: the mean over validation folds of metric `name` (NaN folds skipped; NaN if all
    are). `cv(selection metric)` is the key model selection maximises."""
    return PREFIXES[CV] + name


def selected(key: str) -> str:
    """`selected_<key>`: `key`'s value at the selected epoch (a maximum over epochs: optimistic).
    Args: key: a key of the trial's reports ("cv_macro_auc", "val_auc_fold0", "train_loss")."""
    return PREFIXES[SELECTED] + key


def last_epoch(key: str) -> str:
    """`last_epoch_<key>`: `key`'s value at the trial's last epoch (not maximised over epochs)."""
    return PREFIXES[LAST_EPOCH] + key


def test(name: str) -> str:
    """`test_<name>`: metric `name` on the held-out test split (or a test-split figure such as
    `test_op_<class>_<point>_<rate>`)."""
    return PREFIXES[TEST] + name


test.__test__ = False  # type: ignore[attr-defined]  # not a test for pytest, when a test module imports it


def diff(name: str) -> str:
    """`diff_<name>`: a paired bootstrap difference of metric `name` against the reference variant."""
    return PREFIXES[DIFF] + name


def nested(name: str) -> str:
    """`nested_<name>`: metric `name` of nested cross-validation, on the outer-held-out patients
    (mean over outer folds; `fold` adds one outer fold's value: `nested_<name>_fold<k>`)."""
    return PREFIXES[NESTED] + name


def system(name: str) -> str:
    """`system/<name>`: a machine figure, under MLflow's own system-metric name."""
    return PREFIXES[SYSTEM] + name


def fold(key: str, k: int) -> str:
    """`<key>_fold<k>`: fold k's value of `key` ("val_auc" -> "val_auc_fold0"). Args: k: 0-based fold."""
    return f"{key}_fold{k}"


def ci_low(key: str) -> str:
    """`<key>_ci_low`: the lower bound of `key`'s bootstrap 95% CI."""
    return key + CI_LOW


def ci_high(key: str) -> str:
    """`<key>_ci_high`: the upper bound of `key`'s bootstrap 95% CI."""
    return key + CI_HIGH


def variant(name: str, key: str) -> str:
    """`<name>.<key>`: a comparison variant's figure on the comparison's run ("cfcml.cv_auc")."""
    return f"{name}.{key}"


def prefixes(*kinds: str) -> tuple[str, ...]:
    """The key prefixes of `kinds`, for `str.startswith` (`prefixes(CV, VAL)` -> ("cv_", "val_")).

    Raises:
        ValueError: for a kind without a prefix (see `PREFIXES`).
    """
    unknown = [k for k in kinds if k not in PREFIXES]
    if unknown:
        raise ValueError(f"kinds must be among {tuple(PREFIXES)}; got {unknown}")
    return tuple(PREFIXES[k] for k in kinds)


def is_kind(key: str, *kinds: str) -> bool:
    """Whether `key` starts with the prefix of one of `kinds` (`is_kind("selected_epoch", SELECTED)` is True)."""
    return key.startswith(prefixes(*kinds))


def is_cv(key: str) -> bool:
    """Whether `key` is a mean over validation folds (`cv_<name>`)."""
    return is_kind(key, CV)


@dataclass(frozen=True)
class MetricKey:
    """A parsed key (`parse`). `str(key)` builds it back.

    Args:
        kind: one of `KINDS`.
        name: for train/val/cv/test/diff/system the metric's own name ("macro_auc", "loss"); for
            selected/last_epoch the key it qualifies ("cv_macro_auc", "epoch"); for other the whole key.
        fold: the 0-based fold of a per-fold key, else None.
        bound: "low" or "high" for a CI bound, else None.
    """

    kind: str
    name: str
    fold: int | None = None
    bound: str | None = None

    def __str__(self) -> str:
        key = self.name if self.kind == OTHER else PREFIXES[self.kind] + self.name
        if self.fold is not None:
            key = fold(key, self.fold)
        if self.bound is not None:
            key = ci_low(key) if self.bound == "low" else ci_high(key)
        return key


def parse(key: str) -> MetricKey:
    """The kind, name, fold and CI bound of `key`. Never raises: a key of no known kind is `OTHER`.

    `parse("val_macro_auc_fold2")` -> MetricKey("val", "macro_auc", 2);
    `parse("test_auc_ci_low")` -> MetricKey("test", "auc", bound="low");
    `parse("selected_cv_auc")` -> MetricKey("selected", "cv_auc") (parse `.name` again for the inner key).
    """
    kind = next((k for k, p in PREFIXES.items() if key.startswith(p) and len(key) > len(p)), OTHER)
    rest = key if kind == OTHER else key[len(PREFIXES[kind]):]
    if kind in (SELECTED, LAST_EPOCH, SYSTEM, OTHER):
        return MetricKey(kind, rest)
    bound = None
    for suffix, which in ((CI_LOW, "low"), (CI_HIGH, "high")):
        if rest.endswith(suffix) and len(rest) > len(suffix):
            rest, bound = rest[:-len(suffix)], which
    m = _FOLD.fullmatch(rest)
    if m:
        return MetricKey(kind, m.group(1), int(m.group(2)), bound)
    return MetricKey(kind, rest, None, bound)


def per_fold(values: Mapping[str, float], kind: str = VAL) -> dict[str, dict[int, float]]:
    """metric name -> {fold: value} for the per-fold keys of `kind` in `values`, in their order
    (`{"val_auc_fold0": 0.8, "val_auc_fold1": 0.9}` -> `{"auc": {0: 0.8, 1: 0.9}}`)."""
    out: dict[str, dict[int, float]] = {}
    for key, value in values.items():
        parsed = parse(key)
        if parsed.kind == kind and parsed.fold is not None and parsed.bound is None:
            out.setdefault(parsed.name, {})[parsed.fold] = value
    return out


BRIER = "brier"  # the validation Brier score of a fold (`cfcml.training.CrossValidation`), lower is better
LOSS = "loss"  # the validation negative log-likelihood of a fold, lower is better
MINIMISED = (BRIER, LOSS)  # the validation figures a search objective minimises; every other one is maximised


def objective_mode(name: str) -> str:
    """"min" for a validation figure that is better lower (`MINIMISED`: the Brier score, the NLL
    loss), "max" for every other metric name (AUCs, balanced accuracy, recalls)."""
    return "min" if name in MINIMISED else "max"


def auc_metric(task: str) -> str:
    """The ranking metric of `task`: "macro_auc" (multiclass, one-vs-rest) or "auc" (binary)."""
    return "macro_auc" if task == "multiclass" else "auc"


def headline_metrics(task: str, num_classes: int) -> list[str]:
    """What every report shows: the ranking (AUC), the decisions (balanced accuracy) and the
    recall of every class ("acc_class_<k>" for multiclass; specificity, sensitivity for binary)."""
    recalls = [f"acc_class_{k}" for k in range(num_classes)] if task == "multiclass" else ["specificity", "sensitivity"]
    return [auc_metric(task), "balanced_accuracy", *recalls]

