"""What tuning bought: the last step of a search (`search.py`, the search file's `bought_seeds` or
`--bought-seeds N`) compares the published defaults with the configuration the search chose.

Two variants of the comparison machinery (`tuning.evidence.comparison`): `cfcml` (the search's
experiment without the searched values: the published defaults on the search's model and budget)
and `cfcml_tuned` (the same with the chosen trial's searched values). Both train on the search's
prepared folds for the search's epoch budget (`max_epochs`, the trials' budget; no epoch is
selected: each model is taken at its last epoch) on N fresh seeds, `search seed + 1 .. + N`, none of
them the seed every trial of the search trained with (so the selection's own noise does not favour
the winner). Each variant's fold ensemble (K folds x N seeds) predicts the held-out test split once;
the paired bootstrap differences `cfcml_tuned - cfcml` (1000 resamples over patients, the same
resamples for both) of the AUC, the balanced accuracy and the Brier score (lower is better) are the
record. When the primary difference's CI (the AUC's) covers 0, the report says that tuning bought
nothing measurable on this dataset.

The comparison's outputs go under `<search folder>/bought/` (`comparison.md`, `comparison.json`,
figures, and this module's `bought.json`); its MLflow run (kind `comparison`) is tagged
`cfcml.bought_of` with the search's parent run, which gets the differences as metrics
(`cfcml_tuned.diff_<metric>` and CI bounds) and the table (`bought.md`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cfcml.evaluation import metric_keys
from cfcml.evaluation.metric_keys import BRIER, auc_metric
from cfcml.evaluation.metrics import Estimate, format_estimate

if TYPE_CHECKING:
    from cfcml.data.manifest import PreparedDataset
    from tuning.evidence.comparison import ComparisonPlan, ComparisonResult
    from tuning.hpo.run import SearchRun
    from tuning.records.outcome import SearchOutcome

BOUGHT_DIR = "bought"  # under the search folder: the comparison's outputs and `BOUGHT_RECORD`
BOUGHT_RECORD = "bought.json"  # the differences; present = the step finished (a --resume does not rerun it)
BOUGHT_TABLE = "bought.md"  # the section's table, on the search's parent run
REFERENCE, TUNED = "cfcml", "cfcml_tuned"
N_BOOT = 1000
NOTHING_BOUGHT = "Tuning bought nothing measurable on this dataset"


class NoTestPredictions(ValueError):
    """A variant of the step's comparison has no test predictions: every one of its trials failed."""


def fresh_seeds(search_seed: int, n: int) -> tuple[int, ...]:
    """The comparison's seeds: `search_seed + 1 .. search_seed + n` (never the search's own seed).

    Raises:
        ValueError: n < 1.
    """
    if n < 1:
        raise ValueError(f"need at least one seed; got n={n}")
    return tuple(search_seed + 1 + i for i in range(n))


def plan_bought(run: SearchRun, outcome: SearchOutcome) -> ComparisonPlan:
    """The comparison of `cfcml` (the search's experiment, `run.experiment`) and `cfcml_tuned` (it
    with `outcome.best.params`) on `fresh_seeds(train.seed, run.bought_seeds)`, the search's epoch
    budget, runs folder and MLflow store, written to `<search folder>/bought/`.

    Raises:
        ValueError: the search has no best trial, or `run.bought_seeds` < 1.
    """
    from tuning.evidence.comparison import ComparisonPlan, variant_configs

    best = outcome.best
    if best is None:
        raise ValueError("what tuning bought needs a search with a best trial")
    base = run.experiment
    return ComparisonPlan(
        dataset=run.dataset, name=f"{run.name}-bought",
        variants=variant_configs(base, [REFERENCE, TUNED], dict(best.params)),
        seeds=fresh_seeds(base.train.seed, run.bought_seeds), data_root=run.data_root, runs_dir=run.runs_dir,
        out_dir=run.search_dir / BOUGHT_DIR, fold_seed=run.fold_seed, tracking_uri=outcome.tracking_uri,
        address=run.address, verbose=run.verbose, from_search=run.name, search=run.search)


@dataclass(frozen=True)
class Bought:
    """The paired differences `cfcml_tuned - cfcml` on the test split.

    Args:
        diffs: metric name (the task's AUC, "balanced_accuracy", `BRIER`) -> `Estimate` of the
            difference with its paired bootstrap 95% CI; the AUC first (the primary difference).
        test: variant -> metric name -> its own test `Estimate` (bootstrap 95% CI).
        seeds: the fresh seeds; epochs: each model's epochs; folds: the CV folds; n_test: test patients.
        run_id: the comparison's MLflow run.
        chose_defaults: the search's best values are the published defaults: both variants are the
            same models, trained once (`tuning.evidence.comparison.same_configurations`).
    """

    diffs: dict[str, Estimate]
    test: dict[str, dict[str, Estimate]]
    seeds: tuple[int, ...]
    epochs: int
    folds: int
    n_test: int
    run_id: str | None = None
    chose_defaults: bool = False

    @property
    def primary(self) -> str:
        return next(iter(self.diffs))

    @property
    def nothing_bought(self) -> bool:
        """Whether the primary difference's CI covers 0 (or has no interval, or no point)."""
        e = self.diffs[self.primary]
        return not e.has_interval or math.isnan(e.point) or e.low <= 0.0 <= e.high

    def metrics(self) -> dict[str, float]:
        """The parent run's metrics: `cfcml_tuned.diff_<metric>` with its CI bounds."""
        out = {}
        for name, e in self.diffs.items():
            key = metric_keys.variant(TUNED, metric_keys.diff(name))
            out.update({key: e.point, metric_keys.ci_low(key): e.low, metric_keys.ci_high(key): e.high})
        return out

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: each estimate as [point, low, high], NaN as None."""
        return {"diffs": {k: _numbers(e) for k, e in self.diffs.items()},
                "test": {v: {k: _numbers(e) for k, e in m.items()} for v, m in self.test.items()},
                "seeds": list(self.seeds), "epochs": self.epochs, "folds": self.folds, "n_test": self.n_test,
                "run_id": self.run_id, "nothing_bought": self.nothing_bought, "chose_defaults": self.chose_defaults}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Bought:
        return cls({k: _estimate(v) for k, v in data["diffs"].items()},
                   {v: {k: _estimate(x) for k, x in m.items()} for v, m in data["test"].items()},
                   tuple(data["seeds"]), int(data["epochs"]), int(data["folds"]), int(data["n_test"]),
                   data.get("run_id"), bool(data.get("chose_defaults", False)))

    def save(self, folder: Path) -> Path:
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / BOUGHT_RECORD
        path.write_text(json.dumps(self.to_dict(), indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, folder: Path) -> Bought | None:
        """The record of a finished step in `folder` (`<search folder>/bought/`); None without one."""
        path = folder / BOUGHT_RECORD
        return cls.from_dict(json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else None


def _numbers(e: Estimate) -> list[float | None]:
    return [None if math.isnan(x) else float(x) for x in (e.point, e.low, e.high)]


def _estimate(values: list[float | None]) -> Estimate:
    return Estimate.of([math.nan if x is None else float(x) for x in values])


def bought_from(result: ComparisonResult, seeds: tuple[int, ...], n_boot: int = N_BOOT) -> Bought:
    """The paired differences of a finished `plan_bought` comparison.

    Raises:
        NoTestPredictions: a variant has no test predictions (every one of its trials failed).
    """
    from cfcml.evaluation.calibration import paired_brier_diff
    from cfcml.evaluation.metrics import paired_bootstrap_diff

    probs = {v.name: v.test_probs for v in result.variants}
    missing = [n for n in (REFERENCE, TUNED) if probs.get(n) is None]
    if missing:
        raise NoTestPredictions(f"what tuning bought: no test predictions of {', '.join(missing)} (its trials "
                                f"failed; see the comparison run {result.run_id})")
    a, b = probs[TUNED], probs[REFERENCE]
    auc = auc_metric(result.task)
    diffs = {name: Estimate.of(paired_bootstrap_diff(result.task, result.y_test, a, b, name, n_boot=n_boot, seed=0))
             for name in (auc, "balanced_accuracy")}
    diffs[BRIER] = Estimate.of(paired_brier_diff(result.y_test, a, b, n_boot=n_boot, seed=0))
    test = {}
    for v in result.variants:
        figures = {k: Estimate.of(v.test[k]) for k in (auc, "balanced_accuracy") if k in v.test}
        if v.name in result.calibration:
            figures[BRIER] = Estimate.of(result.calibration[v.name].brier)
        test[v.name] = figures
    chose_defaults = any(v.name == TUNED and v.same_as == REFERENCE for v in result.variants)
    return Bought(diffs, test, tuple(seeds), result.epochs, result.folds, len(result.y_test), result.run_id,
                  chose_defaults)


def verdict(bought: Bought) -> str:
    """The plain sentence: nothing measurable when the primary CI covers 0, else which way it went."""
    e = bought.diffs[bought.primary]
    if bought.chose_defaults:
        return (f"{NOTHING_BOUGHT}: the search chose the published defaults, so both rows are the same models "
                f"(trained once) and every difference is 0.")
    if bought.nothing_bought:
        return (f"{NOTHING_BOUGHT}: the {bought.primary} difference's 95% CI {format_estimate(e, 3, signed=True)} "
                f"covers 0.")
    way = "better" if e.point > 0 else "worse"
    return (f"The chosen configuration ranks test patients measurably {way} than the published defaults: "
            f"{bought.primary} {format_estimate(e, 3, signed=True)}.")


def bought_lines(bought: Bought) -> list[str]:
    """Markdown (no heading): how it was measured, the table, and the verdict."""
    seeds = ", ".join(str(s) for s in bought.seeds)
    lines = [f"The published defaults (`{REFERENCE}`) and the chosen configuration (`{TUNED}`) trained again on "
             f"{len(bought.seeds)} fresh seed(s), {seeds} (not the seed the search's trials trained with), the "
             f"search's {bought.folds} folds and epoch budget ({bought.epochs} epochs, last epoch, nothing "
             f"selected). Each variant's fold ensemble predicted the {bought.n_test} test patients once; "
             f"Δ = {TUNED} - {REFERENCE}, paired bootstrap 95% CI over patients ({N_BOOT} resamples). Brier: "
             "lower is better.", "",
             f"| metric | {REFERENCE} [95% CI] | {TUNED} [95% CI] | Δ [95% CI] |", "|---|---|---|---|"]
    no = Estimate(math.nan)
    for name, d in bought.diffs.items():
        lines.append(f"| {name} | {format_estimate(bought.test.get(REFERENCE, {}).get(name, no))} "
                     f"| {format_estimate(bought.test.get(TUNED, {}).get(name, no))} "
                     f"| {format_estimate(d, signed=True)} |")
    return [*lines, "", f"**{verdict(bought)}**"]


def bought_line(bought: Bought) -> str:
    """The console summary's line."""
    parts = "; ".join(f"Δ{n} {format_estimate(e, 3, signed=True)}" for n, e in bought.diffs.items())
    return (f"what tuning bought ({TUNED} - {REFERENCE}, test, {len(bought.seeds)} fresh seed(s)): {parts}. "
            f"{verdict(bought)}")


def log_bought(client: Any, run_id: str, bought: Bought) -> None:
    """On the search's parent run: `Bought.metrics` and the table (`BOUGHT_TABLE`); the comparison's
    own run tagged `cfcml.bought_of` = `run_id`."""
    from tuning.tracking.store import log_metrics

    log_metrics(client, run_id, {k: v for k, v in bought.metrics().items() if math.isfinite(v)})
    client.log_text(run_id, "\n".join(bought_lines(bought)) + "\n", BOUGHT_TABLE)
    if bought.run_id is not None:
        client.set_tag(bought.run_id, "cfcml.bought_of", run_id)


def what_it_bought(run: SearchRun, prepared: PreparedDataset, outcome: SearchOutcome) -> Bought:
    """Run the step (Ray running: `tuning.runtime.ray_cluster.ray_session`), or read its record when
    an earlier run of this search finished it (`--resume`: nothing trained or logged again)."""
    from mlflow.tracking import MlflowClient

    from tuning.evidence.comparison import run_comparison

    folder = run.search_dir / BOUGHT_DIR
    done = Bought.load(folder)
    if done is not None:
        print(f"what tuning bought: finished earlier ({folder / BOUGHT_RECORD}); not run again")
        return done
    plan = plan_bought(run, outcome)
    print(f"\nwhat tuning bought: {REFERENCE} and {TUNED} on fresh seeds {list(plan.seeds)}, "
          f"{plan.max_epochs} epochs, {prepared.folds} folds")
    result = run_comparison(plan, prepared)
    bought = bought_from(result, plan.seeds)
    log_bought(MlflowClient(outcome.tracking_uri), outcome.parent_run_id, bought)
    bought.save(folder)
    return bought
