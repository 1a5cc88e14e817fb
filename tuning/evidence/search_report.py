"""The report every search ends with: `search_report.md` plus plots, in the search folder and on
the search's MLflow parent run.

It shows what the search bought: the best configuration and how it was chosen (CV metrics per
fold, the trials table, the optimisation history, a parallel-coordinates plot and each searched
parameter's importance by Optuna's default importance evaluator over the finished trials), the final model's
one test evaluation with bootstrap 95% CIs, and, for a synthetic dataset, the oracle's figures
from the generator's latents. Every metric block shows the ranking (AUC) next to the decisions
(balanced accuracy, the recall of every class).
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

from cfcml.data.manifest import PreparedDataset
from cfcml.evaluation import metric_keys
from cfcml.evaluation.metric_keys import headline_metrics
from cfcml.evaluation.metrics import Estimate, format_estimate, format_number
from tuning.evidence.summary import format_value
from tuning.hpo.space import SearchConfig
from tuning.records.outcome import SearchOutcome, TrialResult

if TYPE_CHECKING:
    from cfcml.evaluation.oracle import OracleScores
    from tuning.evidence.bought import Bought
    from tuning.evidence.clinical import ClinicalEvidence
    from tuning.evidence.nested import NestedEstimate

REPORT_FILE = "search_report.md"


class FinalStep(Protocol):
    """What the report reads of the search's final step: `tuning.release.final.Release` (this
    package sits below `tuning.release`, so it names the fields it reads rather than the class).

    run_id: the final run's MLflow id.
    test: the test metrics with their bootstrap 95% CIs; None when this call did not test (an
        earlier run of the final step did).
    evidence: the clinical evidence on the test split (None without it).
    card: the registered model's card (markdown), None when not written by this call.
    """

    @property
    def run_id(self) -> str: ...

    @property
    def test(self) -> Mapping[str, Estimate] | None: ...

    @property
    def evidence(self) -> ClinicalEvidence | None: ...

    @property
    def card(self) -> str | None: ...


def param_importance(trials: list[TrialResult], search: SearchConfig) -> dict[str, float] | str:
    """Importance of each searched key over the scored trials by Optuna's default evaluator
    (PED-ANOVA in Optuna 5), or why there is none."""
    import optuna
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    scored = [t for t in trials if t.scored and all(k in t.params for k in search.keys)]
    if len(scored) < 3 or not search.space:
        return f"needs at least 3 scored trials (have {len(scored)})"
    dists: dict[str, Any] = {}
    for p in search.space:
        if p.dist == "choice":  # as Optuna held them: a list value by its label (Param.to_tune)
            dists[p.key] = CategoricalDistribution([p.to_tune(v) for v in p.values])
        elif p.dist == "int":
            dists[p.key] = IntDistribution(int(p.range[0]), int(p.range[1]))
        else:
            dists[p.key] = FloatDistribution(*p.range, log=p.dist == "loguniform")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    for t in scored:
        params = {p.key: p.to_tune(t.params[p.key]) for p in search.space}
        study.add_trial(optuna.trial.create_trial(params=params, distributions=dists, value=t.score))
    try:
        return dict(optuna.importance.get_param_importances(study))
    except Exception as exc:  # e.g. every trial scored the same: a report must not fail for it
        return f"not computable ({type(exc).__name__}: {exc})"


def _per_fold_table(best: TrialResult, names: list[str]) -> list[str]:
    per_fold = metric_keys.per_fold(best.metrics, metric_keys.VAL)
    folds = sorted({k for d in per_fold.values() for k in d})
    if not folds:
        return ["(no per-fold metrics)"]
    order = [n for n in names if n in per_fold] + sorted(n for n in per_fold if n not in names)
    lines = ["| metric | " + " | ".join(f"fold {k}" for k in folds) + " | mean (selected) | mean at last epoch |",
             "|---" * (len(folds) + 3) + "|"]
    for name in order:
        cells = " | ".join(format_value(per_fold[name].get(k)) for k in folds)
        lines.append(f"| {name} | {cells} | {format_value(best.metrics.get(metric_keys.cv(name)))} "
                     f"| {format_value(best.last_epoch_metrics.get(metric_keys.cv(name)))} |")
    return lines


def _front_section(outcome: SearchOutcome, figures: dict[str, Any]) -> list[str]:
    """A multi-objective search's Pareto front: the rule, a table (the chosen point marked) and,
    with two objectives or more, `report/pareto_front.png` (the first two) added to `figures`."""
    from tuning.evidence.plots import plot_front
    from tuning.records.outcome import FRONT_RULE

    best, front = outcome.best, outcome.front
    objectives = [f"{n} ({m})" for n, m in zip(outcome.objectives, outcome.modes, strict=True)]
    lines = ["## Pareto front", "",
             f"Objectives {', '.join(objectives)} at each trial's selected epoch (chosen by the primary "
             f"`{outcome.objectives[0]}`), CV means; ASHA stopped trials on the primary alone. "
             f"{len(front)} of {sum(t.scored for t in outcome.trials)} scored trials are on the front. "
             f"The retrained and registered point: {FRONT_RULE}.", "",
             "| trial | " + " | ".join(outcome.objectives) + " | chosen | "
             + " | ".join(k.split(".")[-1] for k in outcome.searched) + " |",
             "|---" * (2 + len(outcome.objectives) + len(outcome.searched)) + "|"]
    for t in front:
        values = outcome.objective_values(t) or []
        chosen = "**yes**" if best is not None and t.trial_id == best.trial_id else ""
        lines.append(f"| {t.trial_id} | " + " | ".join(f"{v:.4f}" for v in values) + f" | {chosen} | "
                     + " | ".join(format_value(t.params.get(k)) for k in outcome.searched) + " |")
    rated = [t for t in outcome.trials if t.scored and outcome.objective_values(t) is not None]
    if front:
        ids = [t.trial_id for t in rated]
        figures["report/pareto_front.png"] = plot_front(
            [outcome.objective_values(t) or [] for t in rated], [ids.index(t.trial_id) for t in front],
            ids.index(best.trial_id) if best is not None and best.trial_id in ids else None,
            outcome.objectives, outcome.modes)
    return lines


def build_report(outcome: SearchOutcome, prepared: PreparedDataset, search: SearchConfig,
                 final: FinalStep | None, oracle: OracleScores | None = None) -> tuple[str, dict[str, Any]]:
    """The report's markdown and its figures.

    Args:
        outcome: the finished search.
        prepared: the dataset it searched on.
        search: its search configuration (the searched space, for the importance of each key).
        final: the final step (retrained, tested once, registered); None when the search ran with
            --no-final (its fold ensemble was registered untested).
        oracle: `cfcml.evaluation.oracle.OracleScores` of a synthetic dataset, None otherwise.

    Returns:
        (markdown, {file name under the search folder: matplotlib Figure}).
    """
    from tuning.evidence.plots import plot_history, plot_importance, plot_parallel_coordinates

    spec = prepared.spec
    names = headline_metrics(spec.task, len(spec.classes))
    metric = outcome.metric
    scored = [t for t in outcome.trials if t.scored]
    scores = cast(list[float], [t.score for t in scored])  # a scored trial's score is not None
    failed = [t for t in outcome.trials if not t.scored]
    best = outcome.best
    max_epochs = max((t.epochs_run for t in scored), default=0)
    lines = [f"# Search `{Path(outcome.search_dir).name}` on {outcome.dataset}", "",
             f"{len(outcome.trials)} trials ({len(scored)} scored, {len(failed)} without a score), selection "
             f"metric `{metric}` (the mean over validation folds; the test split is never used to select). "
             f"Classes: {', '.join(spec.classes)}.", ""]
    figures: dict[str, Any] = {}
    if best is None:
        return "\n".join(lines + ["No trial produced a score."]) + "\n", figures

    last = best.last_epoch_metrics.get(metric)
    test = final.test if final is not None else None
    unselected = "The test figures below are the estimate nothing was selected on." if test \
        else "Only a test evaluation gives an estimate nothing was selected on."
    lines += ["## Best configuration", "",
              f"Trial `{best.trial_id}` at epoch {best.epoch} of {best.epochs_run}: {metric} = {best.score:.4f}, "
              + (f"**selected** (optimistic: the maximum over its epochs; the trial is the Pareto front's point "
                 f"that the rule below chose of the {len(scored)} trials). " if outcome.multi_objective else
                 f"**selected** (optimistic: the maximum over its epochs and over the {len(scored)} trials). ") +
              f"At its last epoch ({best.epochs_run}), not maximised over epochs: {format_value(last)}"
              + (". " if outcome.multi_objective else " (still the best of the trials). ") + unselected, "",
              "| parameter | value |", "|---|---|"]
    lines += [f"| {k} | {format_value(v)} |" for k, v in best.params.items()]
    lines += ["", f"### CV metrics of the best trial at its selected epoch {best.epoch}, per validation fold", ""] \
        + _per_fold_table(best, names)
    if outcome.multi_objective:
        lines += [""] + _front_section(outcome, figures)

    lines += ["", "## Test (the final model, evaluated once)", ""]
    if test:
        lines += [f"The best configuration retrained on all {len(prepared.dev_frame())} development patients for "
                  f"{best.epoch} epochs, tested once on {len(prepared.test_frame())} held-out patients "
                  "(bootstrap 95% CI, 1000 resamples).", "", "| metric | value | 95% CI |", "|---|---|---|"]
        order = [n for n in names if n in test] + [n for n in test if n not in names]
        lines += [f"| {n} | {format_number(test[n].point, 4)} | {format_estimate(test[n], 4, interval_only=True)} |"
                  for n in order]
    elif final is not None:
        lines.append(f"Evaluated by an earlier run of this search's final step: see MLflow run {final.run_id}.")
    else:
        lines.append("Not evaluated: the search ran with --no-final (the best trial's fold ensemble was "
                     "registered without touching the test split).")
    evidence = final.evidence if final is not None else None
    if evidence is not None:  # calibration, operating points, decision curves, subgroups, missing inputs
        from tuning.evidence.clinical import report_sections

        lines += [""] + report_sections(evidence, names[:2], level="###")
        figures.update({f"report/{Path(name).name}": fig for name, fig in evidence.figures.items()})
    if oracle is not None:
        auc = names[0]
        lines += ["", "## Oracle (synthetic data)", "",
                  f"A logistic regression on the generator's latent signals ({', '.join(oracle.features)}), on the "
                  f"same folds: CV {auc} {oracle.cv[auc]:.4f}, balanced accuracy {oracle.cv['balanced_accuracy']:.4f}; "
                  f"test {auc} {format_estimate(oracle.test[auc], 4)}. "
                  "Read by this report only, never by training."]

    header = [f"selected {metric}", "bal. acc.", "epoch", f"{metric} at last epoch", "ran",
              *[k.split(".")[-1] for k in outcome.searched]]
    lines += ["", "## Trials", "", f"Sorted by the selected {metric} (each trial's maximum over its epochs, at "
              f"`epoch`; what ASHA, Optuna and the choice of the best trial act on); `ran` < {max_epochs} means "
              "ASHA stopped the trial early.", "",
              "| trial | " + " | ".join(header) + " |", "|---" * (1 + len(header)) + "|"]
    for t in sorted(scored, key=lambda t: -(t.score or 0.0)):
        cells = [f"{t.score:.4f}", format_value(t.metrics.get(metric_keys.cv("balanced_accuracy"))), t.epoch,
                 format_value(t.last_epoch_metrics.get(metric)), t.epochs_run,
                 *[format_value(t.params.get(k)) for k in outcome.searched]]
        lines.append(f"| {t.trial_id} | " + " | ".join(str(c) for c in cells) + " |")
    for t in failed:
        lines.append(f"| {t.trial_id} | no score: {(t.error or '')[:120]} |" + " |" * (5 + len(outcome.searched)))

    # outcome.trials is in the order the trials were created, i.e. the order Optuna proposed them
    figures["report/history.png"] = plot_history(scores, f"selected {metric}")
    if len(search.space) >= 1 and len(scored) >= 2:
        log_keys = [p.key for p in search.space if p.dist == "loguniform"]
        numeric = [p.key for p in search.space if p.dist != "choice"]
        if numeric:
            figures["report/parallel_coordinates.png"] = plot_parallel_coordinates(
                [t.params for t in scored], scores, numeric, log_keys)
    importance = param_importance(outcome.trials, search)
    lines += ["", "## Parameter importance", ""]
    if isinstance(importance, dict):
        lines += ["Optuna's default importance evaluator (PED-ANOVA) over the scored trials (each trial's "
                  "selected score, its maximum over epochs):", "",
                  "| parameter | importance |", "|---|---|"]
        lines += [f"| {k} | {v:.3f} |" for k, v in importance.items()]
        figures["report/importance.png"] = plot_importance(importance)
    else:
        lines.append(f"Not shown: {importance}.")
    lines += ["", "Plots: " + ", ".join(f"`{n}`" for n in figures)]
    card = final.card if final is not None else None
    if card:  # the registered model's card, its headings one level down
        lines += ["", "## Model card of the registered model", "",
                  *[("#" + line if line.startswith("#") else line) for line in card.splitlines()[1:]]]
    return "\n".join(lines) + "\n", figures


def write_report(outcome: SearchOutcome, prepared: PreparedDataset, search: SearchConfig,
                 final: FinalStep | None, nested: NestedEstimate | None = None, bought: Bought | None = None) -> Path:
    """Write search_report.md (+ plots) into the search folder and onto the parent run; with
    `nested` (`search.py --outer-folds`), a "Nested cross-validation" section at its end; with
    `bought` (`bought_seeds`), a "What tuning bought" section last."""
    from mlflow.tracking import MlflowClient

    from cfcml.evaluation.oracle import oracle_scores

    text, figures = build_report(outcome, prepared, search, final, oracle_scores(prepared))
    if nested is not None:
        from tuning.evidence.nested import nested_table

        text += "\n".join(["", f"## Nested cross-validation ({len(nested.folds)} outer folds)", "",
                           *nested_table(nested, outcome)]) + "\n"
    if bought is not None:
        from tuning.evidence.bought import bought_lines

        text += "\n".join(["", "## What tuning bought", "", *bought_lines(bought)]) + "\n"
    folder = Path(outcome.search_dir)
    path = folder / REPORT_FILE
    path.write_text(text, encoding="utf-8")
    client = MlflowClient(outcome.tracking_uri)
    client.log_artifact(outcome.parent_run_id, str(path))
    for name, fig in figures.items():
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(target, dpi=110)
        client.log_artifact(outcome.parent_run_id, str(target), str(Path(name).parent))
    return path
