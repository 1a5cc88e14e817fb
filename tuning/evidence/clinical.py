"""The registered model's clinical evidence beyond AUC: calibration, operating points, decision
curves, subgroups and missing inputs (docs/evaluation.md), computed from the run's own records and
logged on its MLflow run under `clinical/`.

What is fitted and on what (the test split stays behind its one door):
- the temperature and the operating-point thresholds are fitted on the best trial's out-of-fold
  predictions at its selected epoch (the checkpoint Ray Train kept for that epoch), never on test
  rows: `fit_from_oof` takes nothing else;
- the final model's test predictions are then only evaluated: calibration before and after the
  temperature, each operating point's sensitivity, specificity, PPV and NPV, the decision curves,
  the subgroup table and the test metrics with each input withheld, all with bootstrap 95% CIs.

The maths lives in `cfcml/` (calibration, operating_points, decision_curves, subgroups,
missing_inputs); this module gathers it for one model, renders the tables and logs the files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from cfcml.evaluation import metric_keys
from cfcml.evaluation.calibration import (
    CalibrationSummary,
    calibration_summary,
    fit_temperature,
    plot_reliability,
)
from cfcml.evaluation.calibrator import Calibrator
from cfcml.evaluation.decision_curves import DecisionCurve, decision_curves, plot_decision_curves
from cfcml.evaluation.metrics import bootstrap_ci, format_estimate
from cfcml.evaluation.operating_points import (
    RATES,
    OperatingPointResult,
    evaluate_operating_point,
    fit_operating_points,
)
from cfcml.evaluation.subgroups import SubgroupResult, band_labels, category_labels, subgroup_metrics

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow.tracking import MlflowClient

    from cfcml.data.dataset import CachedDataset
    from cfcml.data.manifest import PreparedDataset
    from cfcml.data.spec import DatasetSpec
    from cfcml.networks import CFCML
    from cfcml.networks.fusion import FusionModel
    from tuning.records.checkpoints import FoldWeights
    from tuning.records.outcome import TrialResult

ARTIFACT_DIR = "clinical"
EVIDENCE_FILE = f"{ARTIFACT_DIR}/evidence.json"
CALIBRATION_SETS = ("out-of-fold, raw", "out-of-fold, calibrated", "test, raw", "test, calibrated")


def fit_from_oof(oof: pd.DataFrame, classes: list[str], target_sensitivity: float, source: str) -> Calibrator:
    """Temperature and operating points fitted on out-of-fold predictions (a `prediction_frame`
    with a `label` column); nothing else is read."""
    from cfcml.training import frame_probs

    probs = frame_probs(oof, classes)
    labels = oof["label"].to_numpy()
    temperature = fit_temperature(labels, probs)
    points = fit_operating_points(labels, temperature.apply(probs), classes, target_sensitivity, skip_unfittable=True)
    return Calibrator(temperature, points, source, target_sensitivity)


@dataclass
class WithheldResult:
    """The test metrics with one input withheld (`kind` "modality" or "field"; "none" = all given)."""

    name: str
    kind: str
    metrics: dict[str, tuple[float, float, float]]


@dataclass
class ClinicalEvidence:
    """Every figure of one evaluated model (see the module doc)."""

    task: str
    classes: list[str]
    calibrator: Calibrator
    n_bins: int
    calibration: dict[str, CalibrationSummary]  # keyed by CALIBRATION_SETS
    operating: list[OperatingPointResult]  # on the calibrated test predictions
    curves: list[DecisionCurve]
    subgroups: list[SubgroupResult]
    withheld: list[WithheldResult] = field(default_factory=list)
    n_test: int = 0
    figures: dict[str, Any] = field(default_factory=dict)  # artifact name -> Figure


def subgroup_labels(frame: pd.DataFrame, spec: DatasetSpec) -> dict[str, list[str]]:
    """Category label per row for each of the spec's `evaluation.subgroups` (fields as they are,
    bands cut from their numeric field)."""
    bands = {b.name: b for b in spec.evaluation.bands}
    out: dict[str, list[str]] = {}
    for name in spec.evaluation.subgroups:
        if name in bands:
            out[name] = band_labels(frame[bands[name].field].tolist(), bands[name].edges)
        else:
            out[name] = category_labels(frame[name].tolist())
    return out


def subgroup_orders(spec: DatasetSpec) -> dict[str, list[str]]:
    """The order categories are shown in: a band's from low to high, a categorical field's as the
    spec lists its categories (then "missing")."""
    from cfcml.evaluation.subgroups import MISSING, band_names

    fields = {f.name: f for f in spec.fields}
    orders = {b.name: [*band_names(b.edges), MISSING] for b in spec.evaluation.bands}
    for name in spec.evaluation.subgroups:
        if name in fields:
            orders[name] = [*fields[name].categories, MISSING]
    return orders


def evaluate(spec: DatasetSpec, calibrator: Calibrator, oof: pd.DataFrame, test: pd.DataFrame, test_rows: pd.DataFrame,
             withheld: dict[str, tuple[str, np.ndarray]] | None = None, n_boot: int = 1000) -> ClinicalEvidence:
    """Every figure for the model whose out-of-fold predictions were `oof` (fitted on already:
    `calibrator`) and whose test predictions are `test` (one row per row of `test_rows`, the
    manifest rows, in the same order). `withheld`: name -> (kind, raw test probabilities with that
    input withheld)."""
    from cfcml.training import frame_probs

    classes = list(spec.classes)
    bins = spec.evaluation.ece_bins
    t = calibrator.temperature
    y_oof, p_oof = oof["label"].to_numpy(), frame_probs(oof, classes)
    y, p_raw = test["label"].to_numpy(), frame_probs(test, classes)
    if list(test["patient_id"].astype(str)) != list(test_rows["patient_id"].astype(str)):
        raise ValueError("test predictions and test rows are not the same patients in the same order")
    p = t.apply(p_raw)
    sets = {CALIBRATION_SETS[0]: (y_oof, p_oof), CALIBRATION_SETS[1]: (y_oof, t.apply(p_oof)),
            CALIBRATION_SETS[2]: (y, p_raw), CALIBRATION_SETS[3]: (y, p)}
    calibration = {name: calibration_summary(yy, pp, bins, n_boot) for name, (yy, pp) in sets.items()}
    operating = [evaluate_operating_point(q, y, p, n_boot) for q in calibrator.points]
    curves = decision_curves(y, p, classes)
    ev = spec.evaluation
    subgroups = subgroup_metrics(spec.task, y, p, subgroup_labels(test_rows, spec), ev.min_subgroup_n,
                                 ev.min_subgroup_per_class, n_boot, order=subgroup_orders(spec)) if ev.subgroups else []
    results = [WithheldResult("none (all inputs)", "none", bootstrap_ci(spec.task, y, p, n_boot))]
    for name, (kind, probs) in (withheld or {}).items():
        results.append(WithheldResult(name, kind, bootstrap_ci(spec.task, y, t.apply(probs), n_boot)))
    evidence = ClinicalEvidence(spec.task, classes, calibrator, bins, calibration, operating, curves, subgroups,
                                results, len(y))
    evidence.figures = {
        f"{ARTIFACT_DIR}/reliability_oof.png": plot_reliability(
            {k: sets[k] for k in CALIBRATION_SETS[:2]}, bins, f"Out-of-fold (T = {t.t:.3f})"),
        f"{ARTIFACT_DIR}/reliability_test.png": plot_reliability(
            {k: sets[k] for k in CALIBRATION_SETS[2:]}, bins, f"Test (T = {t.t:.3f} from out-of-fold)"),
        f"{ARTIFACT_DIR}/decision_curve_test.png": plot_decision_curves(curves, "Decision curves (test, calibrated)"),
    }
    if len(results) > 1:
        evidence.figures[f"{ARTIFACT_DIR}/missing_inputs_test.png"] = plot_withheld(results, headline(spec))
    return evidence


def clinical_evidence(spec: DatasetSpec, oof: pd.DataFrame, source: str, test: pd.DataFrame, test_rows: pd.DataFrame,
                      withheld: dict[str, tuple[str, np.ndarray]] | None = None,
                      n_boot: int = 1000) -> ClinicalEvidence:
    """`fit_from_oof` on `oof` (the only predictions anything is fitted on), then `evaluate` on the
    test predictions."""
    calibrator = fit_from_oof(oof, list(spec.classes), spec.evaluation.target_sensitivity, source)
    return evaluate(spec, calibrator, oof, test, test_rows, withheld, n_boot)


def headline(spec: DatasetSpec) -> str:
    """The ranking metric the withheld-input figure shows: the dataset's selection metric."""
    return spec.selection_metric


def plot_withheld(results: list[WithheldResult], metric: str) -> Figure:
    """Horizontal bars: `metric` on the test split with each input withheld, with its 95% CI."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 0.45 * len(results) + 1.5))
    ax = fig.add_subplot()
    values = np.array([r.metrics[metric] for r in results], dtype=np.float64)
    ypos = np.arange(len(results))[::-1]
    err = np.abs(np.stack([values[:, 0] - values[:, 1], values[:, 2] - values[:, 0]]))
    ax.barh(ypos, values[:, 0], xerr=np.nan_to_num(err), color=["grey"] + ["C0"] * (len(results) - 1), capsize=3)
    ax.set_yticks(ypos, [f"{r.name}" if r.kind == "none" else f"without {r.name} ({r.kind})" for r in results])
    ax.set(xlim=(0, 1), xlabel=f"test {metric} (bootstrap 95% CI)", title="Inputs withheld at test time")
    fig.tight_layout()
    return fig


# ---- the network run with inputs withheld ------------------------------------------------------


def withheld_predictions(model: CFCML | FusionModel, dataset: CachedDataset, spec: DatasetSpec,
                         batch_size: int = 8) -> dict[str, tuple[str, np.ndarray]]:
    """Raw test probabilities [N, C] with each image modality and each clinical field withheld in
    turn (cfcml.evaluation.missing_inputs.withhold), for the rows of `dataset` in order. One pass over the
    data; every variant of a batch runs on the same tensors."""
    import torch
    from torch.utils.data import DataLoader

    from cfcml.evaluation.missing_inputs import withhold
    from cfcml.predict import ModelInputs

    variants: list[tuple[str, str, dict[str, int]]] = [(m.name, "modality", {"modality": i})
                                                       for i, m in enumerate(spec.modalities)]
    variants += [(f.name, "field", {"numeric": i}) for i, f in enumerate(spec.numeric_fields)]
    variants += [(f.name, "field", {"categorical": i}) for i, f in enumerate(spec.categorical_fields)]
    if len(spec.modalities) == 1:  # withholding the only image leaves a table-only model it never was
        variants = [v for v in variants if v[1] != "modality"]
    out: dict[str, list[np.ndarray]] = {name: [] for name, _, _ in variants}
    model.eval()
    with torch.no_grad():
        for batch in DataLoader(dataset, batch_size=batch_size):
            inputs = ModelInputs.from_batch(batch, "cpu")
            for name, _, kw in variants:
                logits = withhold(inputs, **kw)(model).logits
                out[name].append(torch.softmax(logits.float(), 1).numpy())
    return {name: (kind, np.concatenate(out[name])) for name, kind, _ in variants}


# ---- tables ---------------------------------------------------------------------------------------


def calibration_table(ev: ClinicalEvidence) -> list[str]:
    t = ev.calibrator.temperature
    lines = [f"Temperature T = {t.t:.3f}, fitted on the {ev.calibrator.source} (their mean negative "
             f"log-likelihood {t.nll_before:.4f} -> {t.nll_after:.4f}); ECE over {ev.n_bins} equal-width bins of the "
             "top-label confidence; bootstrap 95% CIs over patients.", "",
             "| predictions | patients | Brier | ECE | NLL |", "|---|---|---|---|---|"]
    for name, s in ev.calibration.items():
        lines.append(f"| {name} | {s.n} | {format_estimate(s.brier)} | {format_estimate(s.ece)} | {s.nll:.4f} |")
    return lines


def operating_table(ev: ClinicalEvidence) -> list[str]:
    lines = [f"Thresholds on the calibrated probability of a class (one-vs-rest), fitted on the "
             f"{ev.calibrator.source}: `sensitivity_{ev.calibrator.target_sensitivity:.2f}` (the highest threshold "
             f"reaching that sensitivity there) and `youden` (the maximum of sensitivity + specificity - 1). "
             f"Test figures on {ev.n_test} patients, bootstrap 95% CIs.", "",
             "| class | operating point | threshold | out-of-fold sens / spec | test sensitivity | test specificity "
             "| test PPV | test NPV |", "|---|---|---|---|---|---|---|---|"]
    for r in ev.operating:
        q = r.point
        cells = " | ".join(format_estimate(r.rates[k]) for k in RATES)
        lines.append(f"| {q.class_name} ({r.positives} of {r.n}) | {q.name} | {q.threshold:.3f} | "
                     f"{q.fit_sensitivity:.3f} / {q.fit_specificity:.3f} | {cells} |")
    return lines


def decision_table(ev: ClinicalEvidence, at: tuple[float, ...] = (0.1, 0.2, 0.3, 0.5)) -> list[str]:
    lines = ["Net benefit on the test split (calibrated probabilities) at a few threshold probabilities, "
             "against treat-all (treat-none is 0); the full curves in `decision_curve_test.png`.", "",
             "| class | prevalence | " + " | ".join(f"p_t = {a:g}: model / all" for a in at) + " |",
             "|---" * (2 + len(at)) + "|"]
    for c in ev.curves:
        cells = []
        for a in at:
            i = int(np.argmin(np.abs(c.thresholds - a)))
            cells.append(f"{c.model[i]:.3f} / {c.treat_all[i]:.3f}")
        lines.append(f"| {c.class_name} | {c.prevalence:.3f} | " + " | ".join(cells) + " |")
    return lines


def subgroup_table(ev: ClinicalEvidence, metrics: list[str]) -> list[str]:
    if not ev.subgroups:
        return ["No subgroup fields configured (`evaluation.subgroups` of the dataset spec)."]
    metrics = [*metrics, "brier"]  # every subgroup's calibration next to its discrimination
    lines = ["Test metrics per category (calibrated probabilities), bootstrap 95% CIs; **too small** marks a "
             "subgroup whose figures say little (the reason given).", "",
             "| field | category | patients (per class) | " + " | ".join(metrics) + " | note |",
             "|---" * (4 + len(metrics)) + "|"]
    for r in ev.subgroups:
        cells = " | ".join(format_estimate(r.metrics[m]) for m in metrics)
        note = f"**too small**: {r.reason}" if r.too_small else ""
        lines.append(f"| {r.field} | {r.category} | {r.n} ({', '.join(map(str, r.class_counts))}) | {cells} | {note} |")
    return lines


def withheld_table(ev: ClinicalEvidence, metrics: list[str]) -> list[str]:
    if len(ev.withheld) <= 1:
        return ["No withheld-input evaluation."]
    lines = ["Test metrics with one input withheld at a time (a modality as a zero image, a field as the "
             "missing token; docs/evaluation.md), calibrated, bootstrap 95% CIs.", "",
             "| withheld | kind | " + " | ".join(metrics) + " |", "|---" * (2 + len(metrics)) + "|"]
    for r in ev.withheld:
        lines.append(f"| {r.name} | {r.kind} | " + " | ".join(format_estimate(r.metrics[m]) for m in metrics) + " |")
    return lines


def report_sections(ev: ClinicalEvidence, metrics: list[str], level: str = "##") -> list[str]:
    """The markdown of every table, with headings at `level`."""
    return ([f"{level} Calibration", ""] + calibration_table(ev)
            + ["", f"{level} Operating points", ""] + operating_table(ev)
            + ["", f"{level} Decision curves", ""] + decision_table(ev)
            + ["", f"{level} Subgroups", ""] + subgroup_table(ev, metrics)
            + ["", f"{level} Missing inputs", ""] + withheld_table(ev, metrics))


def to_json(ev: ClinicalEvidence) -> dict[str, Any]:
    """Every number of `ev` as plain data (what `clinical/evidence.json` holds)."""
    return {
        "calibrator": ev.calibrator.to_dict(), "ece_bins": ev.n_bins, "n_test": ev.n_test,
        "calibration": {k: {"n": s.n, "brier": s.brier, "ece": s.ece, "nll": s.nll} for k, s in ev.calibration.items()},
        "operating_points": [{"key": r.point.key, "threshold": r.point.threshold, "n": r.n, "positives": r.positives,
                              **r.rates} for r in ev.operating],
        "decision_curves": [{"class": c.class_name, "prevalence": c.prevalence, "thresholds": c.thresholds.tolist(),
                             "model": c.model.tolist(), "treat_all": c.treat_all.tolist()} for c in ev.curves],
        "subgroups": [{"field": r.field, "category": r.category, "n": r.n, "class_counts": r.class_counts,
                       "too_small": r.too_small, "reason": r.reason, "metrics": r.metrics} for r in ev.subgroups],
        "withheld": [{"name": r.name, "kind": r.kind, "metrics": r.metrics} for r in ev.withheld],
    }


def subgroup_frame(ev: ClinicalEvidence) -> pd.DataFrame:
    rows = []
    for r in ev.subgroups:
        row = {"field": r.field, "category": r.category, "n": r.n, "too_small": r.too_small, "reason": r.reason}
        for name, (point, low, high) in r.metrics.items():
            row |= {name: point, metric_keys.ci_low(name): low, metric_keys.ci_high(name): high}
        rows.append(row)
    return pd.DataFrame(rows)


def withheld_frame(ev: ClinicalEvidence) -> pd.DataFrame:
    rows = []
    for r in ev.withheld:
        row: dict[str, object] = {"withheld": r.name, "kind": r.kind}
        for name, (point, low, high) in r.metrics.items():
            row |= {name: point, metric_keys.ci_low(name): low, metric_keys.ci_high(name): high}
        rows.append(row)
    return pd.DataFrame(rows)


def log_evidence(client: MlflowClient, run_id: str, ev: ClinicalEvidence, metrics: list[str]) -> list[str]:
    """Log the figures, `clinical/evidence.json`, `clinical/clinical.md`, the subgroup and withheld
    tables (CSV) and the headline numbers as metrics on `run_id`. Returns the artifact names."""
    from tuning.tracking.store import log_figure, log_metrics

    names = []
    for name, fig in ev.figures.items():
        log_figure(client, run_id, fig, name)
        names.append(name)
    client.log_text(run_id, json.dumps(to_json(ev), indent=1, default=float), EVIDENCE_FILE)
    client.log_text(run_id, "\n".join(report_sections(ev, metrics)) + "\n", f"{ARTIFACT_DIR}/clinical.md")
    names += [EVIDENCE_FILE, f"{ARTIFACT_DIR}/clinical.md"]
    if ev.subgroups:
        client.log_text(run_id, subgroup_frame(ev).to_csv(index=False), f"{ARTIFACT_DIR}/subgroups_test.csv")
        names.append(f"{ARTIFACT_DIR}/subgroups_test.csv")
    if len(ev.withheld) > 1:
        client.log_text(run_id, withheld_frame(ev).to_csv(index=False), f"{ARTIFACT_DIR}/missing_inputs_test.csv")
        names.append(f"{ARTIFACT_DIR}/missing_inputs_test.csv")
    values: dict[str, float] = {"temperature": ev.calibrator.temperature.t}
    for key, s in ev.calibration.items():
        tag = key.replace("out-of-fold", "oof").replace(", ", "_")
        values |= {f"{tag}_brier": s.brier[0], f"{tag}_ece": s.ece[0], f"{tag}_nll": s.nll}
    for r in ev.operating:
        for rate in RATES:
            values[metric_keys.test(f"op_{r.point.class_name}_{r.point.name}_{rate}")] = r.rates[rate][0]
    log_metrics(client, run_id, values)
    return names


# ---- the registered models' stages ------------------------------------------------------------------


def best_trial_calibrator(spec: DatasetSpec, best: TrialResult) -> tuple[Calibrator, pd.DataFrame] | None:
    """The calibrator fitted on the best trial's out-of-fold predictions at its selected epoch (the
    checkpoint kept for it), and those predictions; None when the checkpoint or its predictions
    are gone (the model is then registered without calibration, which the card says)."""
    from tuning.records.checkpoints import CheckpointError, open_checkpoint

    if not best.checkpoint_path:
        return None
    try:
        with open_checkpoint(best.checkpoint_path) as ckpt:
            oof, epoch = ckpt.oof(), ckpt.epoch
    except (CheckpointError, OSError, ValueError) as exc:
        print(f"warning: no out-of-fold predictions for calibration ({exc})")
        return None
    if oof is None or oof.empty:
        return None
    source = f"out-of-fold predictions of trial {best.trial_id} at epoch {epoch} ({len(oof)} patients)"
    return fit_from_oof(oof, list(spec.classes), spec.evaluation.target_sensitivity, source), oof


def final_evidence(prepared: PreparedDataset, best: TrialResult, test: pd.DataFrame,
                   weights: FoldWeights) -> ClinicalEvidence | None:
    """The final model's evidence: calibrator from the best trial's out-of-fold predictions, then
    the test figures, the withheld-input ones from the final network (`weights`)."""
    from cfcml.data.normalize import TabularNormalizer
    from cfcml.networks import build_trained

    spec = prepared.spec
    fitted = best_trial_calibrator(spec, best)
    if fitted is None:
        print("warning: the best trial's out-of-fold predictions are not available: no calibration or "
              "operating points for this model")
        return None
    calibrator, oof = fitted
    rows = prepared.test_frame()
    assert best.experiment is not None  # train_final checked it
    model = build_trained(spec, best.experiment.model, weights.model)
    dataset = prepared.dataset(rows, TabularNormalizer.from_state(spec, weights.normalizer))
    withheld = withheld_predictions(model, dataset, spec)
    return evaluate(spec, calibrator, oof, test, rows, withheld)
