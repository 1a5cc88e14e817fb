"""Compare CFCML with its published defaults, a tuned configuration, its ablations and baselines.

    python tuning/compare.py --dataset men --data-root data/men --search smoke
    python tuning/compare.py --dataset men --data-root data/men --from-search men-default --seeds 3

With --tune-each N every variant is first searched (N trials of its own space, the same folds and
budget; `tuning.workflows.compare.tune_variants`) and compared at its defaults and as
`<variant>_tuned`. Every variant trains on the same folds with the same seeds and epoch budget, as
Ray trials (in parallel as resources allow); each is evaluated by out-of-fold CV (mean and sd over seeds) and
once on the held-out test split (its fold ensemble, bootstrap 95% CIs, paired AUC difference
against `cfcml`). Writes comparison.md, comparison.json and plots into --out and onto a
`comparison` MLflow run, and prints the table. See `tuning/evidence/comparison.py`; this file parses
the arguments and calls `tuning.workflows.compare.compare_variants` inside the error shell
(`tuning.cli.shell`).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING

from tuning.cli import args as cli_args
from tuning.cli.shell import run_command
from tuning.evidence.comparison import VARIANTS
from tuning.hpo.run import parse_set

if TYPE_CHECKING:
    from tuning.evidence.comparison import ComparisonPlan


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", required=True, help="conf/datasets/NAME.yaml and conf/experiments/NAME.yaml")
    cli_args.add_data_root(p, help="dataset folder (raw or prepared); default data/<dataset>")
    p.add_argument("--variants", help=f"comma list of {', '.join(VARIANTS)} (default: all; cfcml_tuned only "
                                      "with --from-search)")
    p.add_argument("--from-search", help="a finished search of the same dataset (its name, the folder under "
                                         "--runs-dir/ray): its best trial's searched values are the "
                                         "cfcml_tuned variant")
    p.add_argument("--seeds", type=int, default=3, help="training seeds per variant")
    p.add_argument("--tune-each", type=int, default=0, metavar="N",
                   help="first search N trials of every variant's own space on the comparison's folds "
                        "(the searches at once as the Ray cluster's trial slots allow, each named "
                        "<name>-tune-<variant> under --runs-dir/ray; "
                        "a finished one is reused, an interrupted one continued), then compare each variant "
                        "at its defaults and as <variant>_tuned (not with --from-search)")
    cli_args.add_folds(p)
    p.add_argument("--max-epochs", type=int, help="epochs per model (sets train.epochs)")
    p.add_argument("--search", help="a search config whose overrides and budget apply (e.g. smoke)")
    cli_args.add_image_size(p, help="preprocessed image size (sets train.image_size)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override any experiment key")
    p.add_argument("--name", help="the comparison's name (default <dataset>-<search>)")
    p.add_argument("--out", help="where comparison.md/json and plots go (default runs/compare/<name>)")
    cli_args.add_runtime(p)
    return p.parse_args(argv)


def build_plan(args: argparse.Namespace) -> ComparisonPlan:
    """The resolved comparison the arguments describe (ConfigError naming a bad flag or setting)."""
    from tuning.evidence.comparison import plan_comparison
    from tuning.runtime.preflight import check_utf8

    check_utf8(("--runs-dir", args.runs_dir), ("--name", args.name), ("--data-root", args.data_root),
               ("--out", args.out), ("--tracking-uri", args.tracking_uri), ("--from-search", args.from_search))
    return plan_comparison(
        args.dataset, args.data_root, variants=args.variants, from_search=args.from_search, seeds=args.seeds,
        folds=args.folds, max_epochs=args.max_epochs, search=args.search, runs_dir=args.runs_dir,
        tracking_uri=args.tracking_uri, out=args.out, fold_seed=args.fold_seed, image_size=args.image_size,
        overrides=parse_set(args.set), address=args.address, verbose=args.verbose, name=args.name,
        tune_each=args.tune_each)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.time()

    def compare() -> None:
        from tuning.evidence.comparison import markdown
        from tuning.workflows.compare import compare_variants

        plan = build_plan(args)
        result = compare_variants(plan)
        print()
        print(markdown(result))
        print(f"written to {plan.out_dir} and MLflow run {result.run_id} in {time.time() - t0:.0f} s")

    return run_command(compare, name="compare")


if __name__ == "__main__":
    sys.exit(main())
