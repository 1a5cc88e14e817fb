"""Search efficiency: TPE + ASHA against random search + ASHA at the same trial-epoch budget.

    python -m benchmarks.bench_search [--seeds 3] [--trials 8] [--epochs 8] [--patients 90] [--space smoke]

Runs the platform's own search (`tuning.hpo.driver.run_search`: real Ray Tune, OptunaSearch, ASHA,
Ray Train trials, MLflow in a throwaway SQLite store) on a cheap configuration — the smoke
search's tiny model on a synthetic MEN cohort at 32x32x8 — once per searcher and seed. Every
epoch every trial reports is put on one time line (Tune's timestamps), and the best mean-CV
selection metric found so far is read off at a ladder of budgets counted in trial-epochs (one
epoch of one trial over all its folds). Both searchers start from the published defaults (Optuna
evaluates them first) and differ only in how they propose the rest: TPE proposes at random for
its first `startup_trials` (the search file's; by default a third of the trials, here 2 of 8) and
from its model after that. With Optuna's own default of 10 startup trials, an 8-trial TPE search
proposed exactly the random search's configurations. `--space default` searches the space of
conf/search/default.yaml (the fine stage on/off, optimiser, dropout, width, class weights, input
dropouts beside the fine-stage settings) on the same cheap model and budget. Beside the
searchers, the published defaults: the selected score of the first trial of each search (Optuna
evaluates the published point first; as ASHA left it). Prints the table and writes a plot
(`--out`, default runs/bench_search.png).
"""
from __future__ import annotations

import argparse
import dataclasses
import tempfile
import time
from pathlib import Path

import numpy as np


def budget_curve(outcome, metric: str) -> tuple[np.ndarray, np.ndarray]:
    """(trial-epochs spent, best score so far) over every reported epoch in time order."""
    events = sorted((h["timestamp"], h[metric]) for t in outcome.trials for h in t.history)
    spent = np.arange(1, len(events) + 1)
    best = np.fmax.accumulate(np.array([s for _, s in events], dtype=float))
    return spent, best


def at_budget(spent: np.ndarray, best: np.ndarray, budget: int) -> float:
    """The best score after `budget` trial-epochs (NaN if the search never spent that much)."""
    idx = np.searchsorted(spent, budget, side="right") - 1
    return float(best[idx]) if 0 <= idx and spent[-1] >= budget else float("nan")


def defaults_score(outcome) -> float:
    """The selected score of the search's first trial (the published point), NaN if it scored nothing."""
    started = [t for t in outcome.trials if t.history]
    if not started:
        return float("nan")
    first = min(started, key=lambda t: min(h["timestamp"] for h in t.history))
    return float("nan") if first.score is None else float(first.score)


def search_file(space: str, folder: Path) -> str:
    """The search to run: the smoke search, or one extending it with `space`'s search space."""
    if space == "smoke":
        return "smoke"
    import yaml

    from cfcml.config import CONF_DIR

    source = yaml.safe_load((CONF_DIR / "search" / f"{space}.yaml").read_text(encoding="utf-8"))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "smoke.yaml").write_text((CONF_DIR / "search" / "smoke.yaml").read_text(encoding="utf-8"))
    path = folder / f"smoke-{space}-space.yaml"  # `extends` reads beside the file
    path.write_text(yaml.safe_dump({"extends": "smoke", "space": source["space"]}), encoding="utf-8")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    from cfcml.data.prepare import prepare_dataset
    from cfcml.data.synthetic import make_men
    from tuning.hpo.driver import run_search
    from tuning.hpo.run import SearchRun
    from tuning.runtime.ray_cluster import ray_session

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=8, help="trials per search")
    p.add_argument("--epochs", type=int, default=8, help="ASHA max_t")
    p.add_argument("--patients", type=int, default=90)
    p.add_argument("--space", choices=["smoke", "default"], default="smoke",
                   help="whose search space (conf/search/NAME.yaml) on the smoke model and budget")
    p.add_argument("--out", type=Path, default=Path("runs/bench_search.png"))
    args = p.parse_args(argv)
    t0 = time.time()
    curves: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {"tpe": [], "random": []}
    defaults: list[float] = []  # per search: the published point's selected score
    with tempfile.TemporaryDirectory() as tmp:
        search = search_file(args.space, Path(tmp) / "search")
        root = make_men(Path(tmp) / "men", patients=args.patients, seed=1, size=(32, 32, 8))
        prepared = prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(32, 32, 8))
        with ray_session():
            for seed in range(args.seeds):
                for searcher in ("tpe", "random"):
                    run = SearchRun.build("men", search, data_root=prepared.out_dir, runs_dir=Path(tmp) / "runs",
                                          name=f"{searcher}-{seed}", num_samples=args.trials,
                                          max_epochs=args.epochs, folds=2, seed=seed,
                                          tracking_uri=f"sqlite:///{tmp}/mlflow.db")
                    run = dataclasses.replace(run, search=dataclasses.replace(
                        run.search, searcher=searcher, grace_period=1, reduction_factor=2))
                    outcome = run_search(run, prepared)
                    metric = outcome.metric
                    curves[searcher].append(budget_curve(outcome, metric))
                    defaults.append(defaults_score(outcome))
                    spent, best = curves[searcher][-1]
                    print(f"{searcher:6s} seed {seed}: best {metric} {best[-1]:.4f} after {spent[-1]} trial-epochs",
                          flush=True)
    total = min(c[0][-1] for cs in curves.values() for c in cs)
    ladder = sorted({b for b in (args.epochs, 2 * args.epochs, total // 4, total // 2, 3 * total // 4, total)
                     if 0 < b <= total})
    print(f"\nbest mean-CV {metric} found within a budget of trial-epochs; mean ± sd over {args.seeds} seeds "
          f"({args.trials} trials x up to {args.epochs} epochs per search, ASHA grace 1, reduction 2, "
          f"the {args.space} space; {time.time() - t0:.0f} s in all)")
    print(f"{'budget':>8s} " + " ".join(f"{s:>17s}" for s in curves) + "   tpe - random")
    for b in ladder:
        cells, means = [], {}
        for searcher, cs in curves.items():
            values = np.array([at_budget(sp, be, b) for sp, be in cs])
            means[searcher] = np.nanmean(values)
            cells.append(f"{means[searcher]:.4f} ± {np.nanstd(values):.4f}")
        print(f"{b:8d} " + " ".join(f"{c:>17s}" for c in cells) + f"   {means['tpe'] - means['random']:+.4f}")
    for searcher, cs in curves.items():
        print(f"{searcher}: trial-epochs spent per search {[int(sp[-1]) for sp, _ in cs]}; best after all trials "
              f"{np.mean([be[-1] for _, be in cs]):.4f} ± {np.std([be[-1] for _, be in cs]):.4f}")
    print(f"published defaults (each search's first trial, as ASHA left it): {np.nanmean(defaults):.4f} ± "
          f"{np.nanstd(defaults):.4f} over {len(defaults)} searches")

    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    for searcher, color in (("tpe", "tab:red"), ("random", "tab:blue")):
        for i, (sp, be) in enumerate(curves[searcher]):
            ax.step(sp, be, where="post", color=color, alpha=0.7, label=searcher if i == 0 else None)
    if not np.isnan(defaults).all():
        ax.axhline(float(np.nanmean(defaults)), color="grey", linestyle="--", label="published defaults (mean)")
    ax.set(xlabel="budget spent (trial-epochs)", ylabel=f"best {metric} so far",
           title=f"TPE vs random, with ASHA ({args.space} space)")
    ax.legend()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"plot: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
