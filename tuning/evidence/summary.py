"""The end-of-search summary printed to the terminal."""
from __future__ import annotations

import math

from cfcml.evaluation import metric_keys
from cfcml.evaluation.metrics import MISSING
from tuning.records.outcome import SearchOutcome


def format_value(value: object, digits: int = 4) -> str:
    """A value in a table of the summary or the search report: a float to `digits` significant
    digits, None or NaN as `MISSING` ("—"), anything else (a searched value, a count) as `str`.
    Figures with an interval are `cfcml.evaluation.metrics.format_estimate`'s."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return MISSING
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def print_summary(outcome: SearchOutcome, seconds: float) -> None:
    from tuning.tracking.callbacks import reason_line  # the one-line verdict of a failed trial

    metric = outcome.metric
    trials = outcome.trials
    print(f"\n=== search finished in {seconds:.0f}s: {len(trials)} trials, selection metric {metric} "
          f"(mean over validation folds) ===")
    scored = sorted((t for t in trials if t.scored), key=lambda t: -(t.score or 0.0))
    if scored:
        keys = outcome.searched
        header = ["trial", f"selected {metric}", "epoch", "last_epoch", "ran", "wall_s", "overhead_s"] + \
            [k.split(".")[-1] for k in keys]
        rows = [[t.trial_id, format_value(t.score), t.epoch, format_value(t.last_epoch_metrics.get(metric)),
                 t.epochs_run, f"{t.wall_s:.1f}",
                 f"{t.wall_s - t.compute_s:.1f}"] + [format_value(t.params.get(k)) for k in keys]
                for t in scored]
        widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
        for r in [header] + rows:
            print("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    for t in trials:
        if t.error:
            print(f"trial {t.trial_id} produced no result: {reason_line(t.error)}")
    best = outcome.best
    if best is None:
        print("no trial produced a score")
        return
    print(f"\nbest: trial {best.trial_id} at epoch {best.epoch}: {metric} = {best.score:.4f} selected (optimistic: "
          f"max over epochs and trials); at its last epoch {best.epochs_run}: "
          f"{format_value(best.last_epoch_metrics.get(metric))}")
    for k, v in best.params.items():
        print(f"  {k} = {format_value(v)}")
    per_fold = metric_keys.per_fold(best.metrics, metric_keys.VAL)
    if per_fold:
        folds = sorted({k for d in per_fold.values() for k in d})
        print("  per-fold validation metrics:")
        print("    " + "metric".ljust(18) + "".join(f"fold{k}".rjust(9) for k in folds) + "mean".rjust(9))
        for name, values in per_fold.items():
            mean = best.metrics.get(metric_keys.cv(name), float("nan"))
            cells = "".join(f"{values.get(k, float('nan')):9.4f}" for k in folds)
            print("    " + name.ljust(18) + cells + f"{mean:9.4f}")
