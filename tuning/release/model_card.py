"""The model card (markdown) logged with every registered model: on its run (`model_card.md`) and as
the registered version's description, and shown in the search report.

Every number comes from the run's records: the prepared dataset's record (fingerprint, patients
per split and class), the search outcome (trials, selection metric, the best trial and epoch, its
CV metrics), the final test evaluation (bootstrap CIs) and the clinical evidence
(tuning/evidence/clinical.py). The sections follow the items TRIPOD+AI and CLAIM ask a prediction model's
report for: the data, the intended use, the model and how it was selected, discrimination,
calibration, clinical utility, subgroups, missing data, and the known limits; the limits are
derived from the same records (small test split, flagged subgroups, classes the argmax never
predicts, inputs without which the model fails, synthetic data), not typed by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cfcml.evaluation.metrics import Estimate, format_estimate

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

    from cfcml.data.manifest import PreparedDataset
    from cfcml.evaluation.calibrator import Calibrator
    from tuning.evidence.clinical import ClinicalEvidence
    from tuning.records.outcome import SearchOutcome, TrialResult

CARD_FILE = "model_card.md"


@dataclass
class CardInputs:
    """What a card is generated from."""

    model_name: str
    version: str | int | None
    stage: str  # "final" (retrained on all development rows, tested once) or "cv-ensemble" (no test)
    prepared: PreparedDataset
    outcome: SearchOutcome
    best: TrialResult
    test: dict[str, Estimate] | None  # the test metrics with their bootstrap 95% CIs
    evidence: ClinicalEvidence | None  # None: no test evaluation
    calibrator: Calibrator | None  # the one stored in the model
    run_id: str
    modality_dropout: float = 0.0
    field_dropout: float = 0.0


def _counts_table(prepared: PreparedDataset) -> list[str]:
    classes = list(prepared.spec.classes)
    counts = (prepared.info.get("counts") or {}).get("split", {})
    if not counts:  # an older prepared record: count the manifest
        m = prepared.manifest
        counts = {s: {c: int((g["label_name"] == c).sum()) for c in classes} for s, g in m.groupby("split")}
    lines = ["| split | " + " | ".join(classes) + " | patients |", "|---" * (len(classes) + 2) + "|"]
    for split in sorted(counts):
        row = counts[split]
        lines.append(f"| {split} | " + " | ".join(str(row.get(c, 0)) for c in classes) + f" | {sum(row.values())} |")
    return lines


def known_limits(card: CardInputs) -> list[str]:
    """Limits derived from the records (see the module doc)."""
    from cfcml.data.synthetic import LATENTS_FILE

    spec, prepared = card.prepared.spec, card.prepared
    limits = []
    if (prepared.root / LATENTS_FILE).is_file():
        limits.append("Trained and tested on a **synthetic** cohort (the generator's latents are beside the data): "
                      "its figures say the pipeline works, not how the model would do on patients.")
    n_test = len(prepared.test_frame())
    if card.test is None:
        limits.append("Not evaluated on the held-out test split (a fold ensemble registered with --no-final): "
                      "its only figures are cross-validation ones.")
    else:
        test = {k: Estimate.of(v) for k, v in card.test.items()}
        widths = {k: v.width for k, v in test.items() if v.has_interval}
        if widths:
            k = max(widths, key=lambda name: widths[name])
            limits.append(f"The test split has {n_test} patients: the widest 95% CI ({k}) spans {widths[k]:.2f}.")
        if spec.task == "multiclass":
            never = [c for i, c in enumerate(spec.classes) if test.get(f"acc_class_{i}", Estimate(1.0)).point == 0.0]
            if never:
                limits.append(f"At the argmax the model never correctly predicts {', '.join(never)} on the test split; "
                              "use an operating point for that class.")
    ev = card.evidence
    if ev is not None:
        small = [f"{r.field} = {r.category}" for r in ev.subgroups if r.too_small]
        if small:
            limits.append(f"Subgroups too small to judge: {', '.join(small)}.")
        after = ev.calibration.get("test, calibrated")
        if after is not None:
            limits.append(f"Calibration was fitted on {ev.calibrator.temperature.n} out-of-fold predictions; on the "
                          f"test split the ECE ({ev.n_bins} bins) is {format_estimate(after.ece)} after it.")
        metric = spec.selection_metric
        base = ev.withheld[0].metrics.get(metric) if ev.withheld else None
        if base is not None:
            worst = sorted(((r.metrics[metric][0] - base[0], r.name) for r in ev.withheld[1:]
                            if not math.isnan(r.metrics[metric][0])))
            if worst and worst[0][0] < -0.05:
                limits.append(f"Without {worst[0][1]} the test {metric} drops by {-worst[0][0]:.3f}.")
    if card.modality_dropout > 0:
        limits.append(f"Trained with modality dropout {card.modality_dropout:g}: a missing image sequence is accepted "
                      "(as a zero image).")
    else:
        limits.append("Trained without modality dropout: every image modality is required; `predict` refuses a row "
                      "without one.")
    optional = [f.name for f in spec.fields if f.optional]
    required = [f.name for f in spec.fields if not f.optional]
    if required:
        limits.append(f"Required clinical fields (a blank one is refused): {', '.join(required)}"
                      + (f"; optional (a blank one is the missing token): {', '.join(optional)}." if optional else "."))
    limits.append("One development cohort from one source; no external validation.")
    return limits


def model_card(card: CardInputs) -> str:
    """The card's markdown (see the module doc)."""
    from cfcml.data.spec import DatasetSpec
    from cfcml.evaluation import metric_keys
    from tuning.evidence.clinical import report_sections

    prepared, best, outcome = card.prepared, card.best, card.outcome
    spec: DatasetSpec = prepared.spec
    version = f" version {card.version}" if card.version is not None else ""
    scored = [t for t in outcome.trials if t.scored]
    names = metric_keys.headline_metrics(spec.task, len(spec.classes))
    lines = [f"# Model card: `{card.model_name}`{version}", "",
             f"Generated from MLflow run `{card.run_id}` and its records; no figure is typed by hand.", "",
             "## Intended use", "",
             f"Research use: the probability of each of {', '.join(spec.classes)} ({spec.task} task, dataset "
             f"`{spec.name}`) for one patient, from the images {', '.join(m.name for m in spec.modalities)} and the "
             f"clinical fields {', '.join(f.name for f in spec.fields) or '(none)'}, as prepared by this platform. "
             + ("`predict` returns calibrated probabilities (the raw ones with `--raw`) and, at a named operating "
                "point, a decision. " if card.calibrator is not None else
                "`predict` returns the network's probabilities (no temperature or operating points were stored). ")
             + "Not a medical device: a clinician reads it with the figures and limits below.", "",
             "## Data", "",
             f"Dataset `{spec.name}`, fingerprint `{prepared.fingerprint}` (prepared from `{prepared.root}`), "
             f"{prepared.folds} patient-grouped cross-validation folds of the development split (fold seed "
             f"{prepared.fold_seed}); the test split is held out.", ""] + _counts_table(prepared)
    lines += ["", "## Model and how it was selected", "",
              f"CFCML (image + table fusion). Search `{outcome.search_dir.rstrip('/').split('/')[-1]}`: "
              f"{len(outcome.trials)} trials ({len(scored)} scored), selected by `{outcome.metric}` (the mean over "
              f"validation folds). Best trial `{best.trial_id}` at its selected epoch {best.epoch}: "
              f"{metric_keys.selected(outcome.metric)} = {best.score:.4f}."]
    cv = [f"{n} {best.metrics[metric_keys.cv(n)]:.3f}" for n in names if metric_keys.cv(n) in best.metrics]
    if cv:
        lines.append(f"Its cross-validation figures at that epoch (`selected_cv_*`: a maximum over epochs and "
                     f"trials, optimistic): {', '.join(cv)}.")
    last = [f"{n} {best.last_epoch_metrics[metric_keys.cv(n)]:.3f}" for n in names
            if metric_keys.cv(n) in getattr(best, "last_epoch_metrics", {})]
    if last:
        lines.append(f"At its last epoch ({best.epochs_run}; `last_epoch_cv_*`, not maximised over epochs): "
                     f"{', '.join(last)}. Only the test figures below are an unselected estimate.")
    if card.stage == "final":
        lines.append(f"The registered model is that configuration retrained on all {len(prepared.dev_frame())} "
                     f"development patients for {best.epoch} epochs and tested once on {len(prepared.test_frame())} "
                     "held-out patients.")
    else:
        lines.append("The registered model is the best trial's fold ensemble (probabilities averaged).")
    if card.calibrator is not None:
        c = card.calibrator
        lines.append(f"Stored with it: temperature T = {c.temperature.t:.3f} and {len(c.points)} operating points, "
                     f"fitted on the {c.source}.")
    lines.append(f"Training dropout of whole inputs: modality {card.modality_dropout:g}, field {card.field_dropout:g}.")
    lines += ["", "## Discrimination and decisions (test)", ""]
    if card.test:
        lines += ["Bootstrap 95% CIs over patients (1000 resamples); decisions at the argmax.", "",
                  "| metric | value [95% CI] |", "|---|---|"]
        lines += [f"| {n} | {format_estimate(v)} |" for n, v in card.test.items()]
    else:
        lines.append("No test evaluation.")
    if card.evidence is not None:
        lines += [""] + report_sections(card.evidence, names[:2], level="##")
    lines += ["", "## Known limits", ""] + [f"- {x}" for x in known_limits(card)]
    return "\n".join(lines) + "\n"


def log_card(client: MlflowClient, run_id: str, text: str, model_name: str, version: str | int | None) -> None:
    """The card on the run (`model_card.md`) and as the registered version's description."""
    client.log_text(run_id, text, CARD_FILE)
    if version is not None:
        client.update_model_version(model_name, str(version), description=text)
