"""The comparison command's one function (`tuning/compare.py`): `compare_variants`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from cfcml.config import ConfigError
from tuning.workflows.errors import CommandFailed

if TYPE_CHECKING:
    from tuning.evidence.comparison import ComparisonPlan, ComparisonResult


def compare_variants(plan: ComparisonPlan) -> ComparisonResult:
    """Train and evaluate every variant of `plan` (`tuning.evidence.comparison.run_comparison`) in a
    Ray session, after the checks that need no data (MLflow store, Ray address, output folder) and
    the prepared data (prepared on the way when needed).

    Args:
        plan: the resolved comparison (`tuning.evidence.comparison.plan_comparison`).

    Returns:
        The `ComparisonResult`, written to `plan.out_dir` and a `comparison` MLflow run.

    Raises:
        ConfigError: a store, address or setting to fix, Ray that did not start, or variants whose
            workers cannot fit on it; OutputPathError: --out cannot be written; nothing ran.
        DatasetValidationError: the data does not validate (its full report).
        CommandFailed: the disk filled up (the comparison's runs are FAILED with the reason).
    """
    from cfcml.outputs import check_output_dir
    from tuning.evidence.comparison import run_comparison
    from tuning.hpo.prepared import load_or_prepare
    from tuning.runtime.preflight import check_ray_address, check_storage
    from tuning.runtime.ray_cluster import ray_session
    from tuning.tracking.lifecycle import disk_full_message

    # before the data is prepared or Ray starts
    check_storage(plan.runs_dir, plan.tracking_uri, experiment=f"cfcml-{plan.dataset}")
    check_ray_address(plan.address)
    check_output_dir(plan.out_dir, what="--out")
    t = plan.base.train
    prepared = load_or_prepare(plan.dataset, plan.data_root, folds=t.folds, fold_seed=plan.fold_seed,
                               image_size=t.image_size)
    print(f"comparing {', '.join(plan.variants)} on {plan.dataset}: {len(plan.seeds)} seed(s) x "
          f"{prepared.folds} folds x {plan.max_epochs} epochs")
    try:
        with ray_session(plan.address, verbose=plan.verbose, train=plan.base.train):
            return run_comparison(plan, prepared)
    except ConfigError:  # Ray did not start, or the variants' workers cannot fit on it
        raise
    except Exception as exc:  # the comparison's runs are FAILED with the reason (tuning.tracking.lifecycle)
        message = disk_full_message(exc, plan.runs_dir, next_step="run it again")
        if message is None:
            raise
        raise CommandFailed(message) from exc
