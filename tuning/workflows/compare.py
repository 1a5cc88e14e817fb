"""The comparison command's one function (`tuning/compare.py`): `compare_variants`."""
from __future__ import annotations

from typing import TYPE_CHECKING

from cfcml.config import ConfigError
from tuning.workflows.errors import CommandFailed, CommandInterrupted

if TYPE_CHECKING:
    from cfcml.data.manifest import PreparedDataset
    from tuning.evidence.comparison import ComparisonPlan, ComparisonResult
    from tuning.hpo.run import SearchRun


def compare_variants(plan: ComparisonPlan) -> ComparisonResult:
    """Train and evaluate every variant of `plan` (`tuning.evidence.comparison.run_comparison`) in a
    Ray session, after the checks that need no data (MLflow store, Ray address, output folder) and
    the prepared data (prepared on the way when needed); with `plan.tune_each`, after every
    variant's own search (`tune_variants`), each variant also as `<variant>_tuned`.

    Args:
        plan: the resolved comparison (`tuning.evidence.comparison.plan_comparison`).

    Returns:
        The `ComparisonResult`, written to `plan.out_dir` and a `comparison` MLflow run.

    Raises:
        ConfigError: a store, address or setting to fix, Ray that did not start, or variants whose
            workers cannot fit on it; OutputPathError: --out cannot be written; nothing ran.
        DatasetValidationError: the data does not validate (its full report).
        CommandFailed: the disk filled up (the comparison's runs are FAILED with the reason), or
            no trial of a variant's search scored.
        CommandInterrupted: Ctrl-C during a variant's search (the same command continues it).
    """
    from cfcml.outputs import check_output_dir
    from tuning.evidence.comparison import run_comparison
    from tuning.hpo.prepared import load_or_prepare
    from tuning.runtime.preflight import (
        check_free_space,
        check_ray_address,
        check_storage,
        model_parameters,
        search_bytes,
    )
    from tuning.runtime.ray_cluster import ray_session
    from tuning.tracking.lifecycle import disk_full_message

    # before the data is prepared or Ray starts
    check_storage(plan.runs_dir, plan.tracking_uri, experiment=f"cfcml-{plan.dataset}")
    check_ray_address(plan.address)
    check_output_dir(plan.out_dir, what="--out")
    t = plan.base.train
    # room for every variant's search and every variant x seed's checkpoints, before the data is prepared
    from cfcml.data.spec import load_dataset_spec

    searches = len(plan.tuned_variants)
    rows = len(plan.variants) + searches  # <variant> and <variant>_tuned
    check_free_space(plan.runs_dir, search_bytes(model_parameters(plan.base, load_dataset_spec(
        plan.dataset, t.image_size)), t.folds, plan.tune_each, searches=searches, cv_runs=rows * len(plan.seeds)))
    prepared = load_or_prepare(plan.dataset, plan.data_root, folds=t.folds, fold_seed=plan.fold_seed,
                               image_size=t.image_size)
    print(f"comparing {', '.join(plan.variants)} on {plan.dataset}: {len(plan.seeds)} seed(s) x "
          f"{prepared.folds} folds x {plan.max_epochs} epochs")
    try:
        with ray_session(plan.address, verbose=plan.verbose, train=plan.base.train):
            if plan.tune_each:
                plan = tune_variants(plan, prepared)
            return run_comparison(plan, prepared)
    except ConfigError:  # Ray did not start, or the variants' workers cannot fit on it
        raise
    except Exception as exc:  # the comparison's runs are FAILED with the reason (tuning.tracking.lifecycle)
        message = disk_full_message(exc, plan.runs_dir, next_step="run it again")
        if message is None:
            raise
        raise CommandFailed(message) from exc


def tune_variants(plan: ComparisonPlan, prepared: PreparedDataset) -> ComparisonPlan:
    """`--tune-each`: a search of `plan.tune_each` trials for every variant (`ComparisonPlan.variant_search`:
    its own space, the comparison's prepared data, folds, fold seed, epoch budget and seed; Optuna TPE
    and ASHA selecting on `selected_cv_<metric>`, development folds only). Ray must be running.

    The searches run at once as the cluster allows (`tuning.runtime.concurrent`: each in a child
    process joined to the cluster, the cluster's trial slots shared out so that no trial waits for
    another search's CPUs); one after another in this process when the cluster holds one trial at a
    time. The comparison holds every variant search's lock meanwhile.

    A variant's search is named `<comparison>-tune-<variant>` (a folder under runs/ray, a `search`
    MLflow run with a `trial` child run per trial). Running the comparison again with the same name:
    a finished search (its `outcome.json`) is reused, not rerun; an interrupted one (Ctrl-C, a killed
    driver) is continued from its saved Tune state like `search.py --resume`. Either must have been
    started with the same resolved settings (data by content, space, budget, experiment).

    Args:
        plan: the comparison (`plan.tune_each` > 0).
        prepared: its prepared dataset.

    Returns:
        `plan` with `<variant>_tuned` after every variant: its search's best trial's values.

    Raises:
        ConfigError: a variant's search folder holds a search started with other settings (each
            named), or another command holds its lock.
        CommandInterrupted: Ctrl-C during a search (the finished ones stay; the same command continues).
        CommandFailed: a variant's search failed, or none of its trials produced a score.
    """
    import contextlib

    from tuning.hpo import driver
    from tuning.hpo.tuner import open_store, trial_concurrency
    from tuning.records.outcome import OUTCOME_FILE, SearchOutcome
    from tuning.runtime.concurrent import SearchJob, run_concurrently
    from tuning.runtime.locks import search_lock
    from tuning.workflows.errors import raise_child_failures

    pending = []
    with contextlib.ExitStack() as held:
        for variant in plan.tuned_variants:
            run = plan.variant_search(variant)
            held.enter_context(search_lock(run.storage, run.name))
            state = driver.SearchState.load(run.search_dir)
            changed = [] if state is None else state.changed(run.settings(prepared.fingerprint))
            if changed:
                raise ConfigError(f"the search of variant {variant} at {run.search_dir} was started with other "
                                  f"settings ({'; '.join(changed)}); give the comparison another --name",
                                  "--tune-each")
            if (run.search_dir / OUTCOME_FILE).is_file():
                print(f"variant {variant}: its search {run.name!r} has finished, reused")
            else:
                pending.append((variant, plan.variant_search(variant, resume=run.search_dir.exists())))
        slots = trial_concurrency(plan.base.train) if len(pending) > 1 else 1
        if slots > 1:
            open_store(pending[0][1])
            print(f"the searches of {len(pending)} variants, {min(slots, len(pending))} at once "
                  f"({slots} trial slots shared out)")
            failures = run_concurrently([SearchJob(variant, search_variant, (variant, run, str(prepared.out_dir)))
                                         for variant, run in pending],
                                        slots, verbose=plan.verbose)
            raise_child_failures(failures, "variant", "the same compare command reuses the finished variant "
                                                      "searches and continues these")
        else:
            for variant, run in pending:
                search_variant(variant, run, prepared)
    params = {}
    for variant in plan.tuned_variants:
        run = plan.variant_search(variant)
        outcome = SearchOutcome.load(run.search_dir / OUTCOME_FILE)
        if outcome.best is None:
            raise CommandFailed(f"no trial of the search of variant {variant} ({run.name!r}) produced a score")
        params[variant] = dict(outcome.best.params)
    return plan.with_tuned(params)


def search_variant(variant: str, run: SearchRun, prepared: PreparedDataset | str,
                   max_concurrent: int | None = None) -> None:
    """Run (or continue, `run.resume`) `variant`'s search `run` of `tune_variants`; its outcome is its
    folder's `outcome.json`. `prepared`: the dataset, or its folder (in a child process).
    `max_concurrent`: its trials at once (None: as many as the cluster fits).

    Raises:
        CommandInterrupted: Ctrl-C (its state saved).
    """
    import dataclasses

    from cfcml.data.manifest import PreparedDataset
    from tuning.hpo import driver

    data = prepared if isinstance(prepared, PreparedDataset) else PreparedDataset.load(prepared)
    print(f"variant {variant}: {'continuing' if run.resume else 'running'} its search {run.name!r} "
          f"({run.num_samples} trials, {len(run.search.space)} keys"
          f"{'' if max_concurrent is None else f', {max_concurrent} at once'})")
    try:
        driver.run_search(dataclasses.replace(run, max_concurrent=max_concurrent), data)
    except driver.SearchInterrupted:
        raise CommandInterrupted(f"the search of variant {variant} ({run.name!r}) was interrupted; the same compare "
                                 f"command reuses the finished variant searches and continues this one",
                                 apart=True) from None

