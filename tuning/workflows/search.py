"""The search command's one function (`tuning/search.py`): `search_and_register`.

In order: the checks that need no data (runs folder, MLflow store, Ray address), the search's lock,
a resumed search's state files and settings, the free space for its checkpoints, the prepared data
(prepared on the way when needed); then, holding disk reserves and a disk guard, the Ray session,
the search (`tuning.hpo.driver`), the console summary, the final model or, with --no-final, the
best trial's fold ensemble (`tuning.release.final`), nested cross-validation (`--outer-folds`), what
tuning bought (`bought_seeds`: the published defaults against the chosen configuration on fresh
seeds, `tuning.evidence.bought`), and the search report. Every failure is a
`ConfigError` (fix a setting, nothing ran), a `CommandFailed` or a `CommandInterrupted` for
`tuning.cli.shell`, or a `DatasetValidationError` with its full report.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cfcml.config import ConfigError
from tuning.hpo.driver import STATE_FILE, SearchState
from tuning.hpo.run import SearchRun
from tuning.records.outcome import SearchOutcome
from tuning.workflows.errors import CommandFailed, CommandInterrupted

if TYPE_CHECKING:
    from cfcml.data.manifest import PreparedDataset
    from tuning.evidence.bought import Bought
    from tuning.evidence.nested import NestedEstimate
    from tuning.release.final import Release


@dataclass(frozen=True)
class SearchResult:
    """What a finished search command leaves, for its entry point to print.

    Args:
        run: the resolved search.
        outcome: its trials and best trial (also `outcome.json` in the search folder).
        nested: the nested cross-validation estimate (`--outer-folds`); None without it.
        release: the model it registered: the final model (stage "final"), or with --no-final the
            best trial's fold ensemble ("cv-ensemble"); None when the best trial had nothing to
            register (no configuration or checkpoint recorded).
        report: `search_report.md` in the search folder (also on the parent run).
        bought: what tuning bought (`tuning.evidence.bought`); None when the step is off.
    """

    run: SearchRun
    outcome: SearchOutcome
    release: Release | None
    report: Path
    nested: NestedEstimate | None = None
    bought: Bought | None = None


def search_and_register(run: SearchRun) -> SearchResult:
    """Run the search `run` describes (or continue it with `run.resume`), register its result and
    write its report; the search's lock (`tuning.runtime.locks`) is held until this returns or
    raises (Ctrl-C included).

    Args:
        run: the resolved settings (`SearchRun.build`).

    Returns:
        The `SearchResult`.

    Raises:
        ConfigError: a setting, folder, store, address or resumed state to fix (also Ray that did
            not start, trials that cannot fit on it, a search of that name in use); nothing ran.
        DatasetValidationError: the data does not validate (its full report).
        CommandFailed: every trial failed, the final model diverged, or the disk filled up (the
            runs are FAILED with the reason; --resume continues).
        CommandInterrupted: Ctrl-C during the search (its state is saved for --resume).
    """
    with contextlib.ExitStack() as held:
        return _search(run, held)


def _search(run: SearchRun, held: contextlib.ExitStack) -> SearchResult:
    from cfcml.data.spec import load_dataset_spec
    from tuning.hpo.prepared import load_or_prepare
    from tuning.records.state_files import check_resume_state
    from tuning.runtime.locks import search_lock
    from tuning.runtime.preflight import (
        check_free_space,
        check_ray_address,
        check_runs_dir,
        check_storage,
        model_parameters,
        search_bytes,
    )

    t_start = time.time()
    check_runs_dir(run.runs_dir)
    experiment = f"cfcml-{run.dataset}"
    if not run.resume:  # (a resumed search's store is its state file's, checked below)
        check_storage(run.runs_dir, run.tracking_uri, experiment=experiment)
    # One command at a time on this search (a second one of the same name, a --resume of a
    # running one), before its folder is looked at.
    held.enter_context(search_lock(run.storage, run.name))
    if run.search_dir.exists() and not run.resume:
        raise ConfigError(f"a search named {run.name!r} already exists at {run.search_dir}; pass --resume to "
                          f"continue it, or --name to start a new one")
    if run.resume and not run.search_dir.exists():
        raise ConfigError(f"--resume: no search named {run.name!r} under {run.storage}")
    if run.outer_folds:
        from tuning.workflows.nested import check_outer_folders

        check_outer_folders(run)
    # Where results go, before the data is prepared and Ray starts (a resumed search keeps its store).
    if run.resume:  # state files a full disk or a crash cut short: named, or moved aside
        check_resume_state(run.search_dir, run.storage / "train", STATE_FILE)
    state = SearchState.load(run.search_dir) if run.resume else None
    if state is not None:
        check_storage(run.runs_dir, state.tracking_uri, source=f"{run.search_dir / STATE_FILE}: tracking_uri",
                      experiment=experiment)
    check_ray_address(run.address)
    t = run.experiment.train
    # Room for the checkpoints, before the data is prepared (the dataset file's spec at the
    # search's image size builds the network whose size the estimate needs). A resumed search
    # has its finished trials' checkpoints on disk already: room for one more.
    parameters = model_parameters(run.experiment, load_dataset_spec(run.dataset, t.image_size))
    needed = search_bytes(parameters, t.folds, 1 if run.resume else run.num_samples,
                          searches=1 + (run.outer_folds or 0), cv_runs=2 * (run.bought_seeds or 0))
    check_free_space(run.runs_dir, needed)
    prepared = load_or_prepare(run.dataset, run.data_root, folds=t.folds, fold_seed=run.fold_seed,
                               image_size=t.image_size)
    run.metric(prepared.spec)  # a selection metric the task lacks fails here, before Ray starts
    if state is not None:
        check_resume(run, state, prepared.fingerprint)

    from cfcml.training import TrainingDiverged
    from tuning.evidence.search_report import write_report
    from tuning.evidence.summary import print_summary
    from tuning.hpo import driver
    from tuning.release.final import register_cv_ensemble, train_final
    from tuning.runtime.preflight import checkpoint_bytes, local_store_path, tracking_uri_choice
    from tuning.runtime.ray_cluster import SEARCH_FLAGS, ray_session
    from tuning.tracking.lifecycle import DiskGuard, disk_full_message, release_reserves, reserve_space

    # Room for MLflow to record the runs' end should the disk fill up (released then), and a
    # guard that stops the search while one more checkpoint still fits.
    reserve_space(run.runs_dir)
    store = local_store_path(tracking_uri_choice(state.tracking_uri if state else run.tracking_uri, run.runs_dir)[0])
    if store is not None and store[1] and store[0].parent != run.runs_dir:  # a SQLite store elsewhere
        reserve_space(store[0].parent)
    guard = DiskGuard(run.runs_dir, checkpoint_bytes(parameters, t.folds) + 2**20)
    try:
        # Ray that did not start, or trials that cannot fit on it: one line, before any trial starts
        with ray_session(run.address, verbose=run.verbose, train=t, flags=SEARCH_FLAGS):
            try:
                outcome = driver.run_search(run, prepared, callbacks=[guard])
            except driver.SearchInterrupted as exc:
                raise CommandInterrupted(str(exc), apart=True) from None
            print_summary(outcome, time.time() - t_start)
            stop_on_full_disk(outcome)
            if outcome.best is None:  # every trial failed: nothing to retrain, register or report
                raise CommandFailed(_no_score(run, outcome))
            if run.final:
                try:
                    release = train_final(prepared, outcome, storage=run.storage, explain=run.explain_test_patients)
                except TrainingDiverged as exc:  # the best configuration diverged on all development data
                    raise CommandFailed(f"final model: {exc}") from None
            else:
                release = register_cv_ensemble(prepared, outcome)
            nested = None
            if run.outer_folds:  # nested cross-validation: one whole search per outer fold (its own names)
                from tuning.evidence.nested import nested_line
                from tuning.workflows.nested import run_nested

                nested = run_nested(run, prepared, outcome, callbacks=[guard])
                print("\n" + nested_line(nested, outcome))
            bought = _what_it_bought(run, prepared, outcome, release) if run.bought_seeds else None
        report = write_report(outcome, prepared, run.search, release if run.final else None, nested=nested,
                              bought=bought)
    except (ConfigError, CommandFailed):
        raise
    except Exception as exc:
        message = disk_full_message(exc, run.runs_dir, needed)
        if message is None:
            raise
        # the runs are FAILED with the reason (tuning.tracking.lifecycle)
        raise CommandFailed(message, apart=True) from exc
    finally:
        release_reserves()
    return SearchResult(run, outcome, release, report, nested, bought)


def _what_it_bought(run: SearchRun, prepared: PreparedDataset, outcome: SearchOutcome,
                    release: Release | None) -> Bought | None:
    """The search's last step (`tuning.evidence.bought`): the published defaults against the chosen
    configuration on fresh seeds; its line on the console and its section in the model card this
    call wrote (a card written by an earlier run is left as it is). None, with a warning, when a
    variant's every trial failed (its comparison run is FAILED with the reasons; the search's model
    stays registered and its report is written; --resume runs the step again)."""
    from mlflow.tracking import MlflowClient

    from tuning.evidence.bought import NoTestPredictions, bought_line, bought_lines, what_it_bought
    from tuning.release.model_card import log_card

    try:
        bought = what_it_bought(run, prepared, outcome)
    except NoTestPredictions as exc:
        print(f"warning: {exc}; the report has no 'What tuning bought' section (--resume runs it again)",
              file=sys.stderr)
        return None
    print("\n" + bought_line(bought))
    if release is not None and release.card is not None:
        card = release.card + "\n".join(["", "## What tuning bought", "", *bought_lines(bought)]) + "\n"
        log_card(MlflowClient(outcome.tracking_uri), release.run_id, card, release.model_name, release.version)
    return bought


def _no_score(run: SearchRun, outcome: SearchOutcome) -> str:
    from tuning.tracking.callbacks import reason_line

    reasons = sorted({reason_line(t.error) for t in outcome.trials})
    return (f"no trial of search {run.name!r} produced a score ({len(outcome.trials)} trial(s) failed: "
            f"{'; '.join(reasons[:3])}{'; ...' if len(reasons) > 3 else ''})")


def check_resume(run: SearchRun, state: SearchState, fingerprint: str) -> None:
    """A resumed search continues the experiment it started, or nothing: ConfigError naming every
    resolved setting that differs from the state file's record (both values), before Ray starts.
    Only `tuning.hpo.run.RESUME_MAY_CHANGE` (and --verbose, --address, --no-final) may differ."""
    source = run.search_dir / STATE_FILE
    if run.tracking_uri is not None and run.tracking_uri != state.tracking_uri:
        raise ConfigError(f"--resume: --tracking-uri {run.tracking_uri} is not this search's store "
                          f"{state.tracking_uri} ({source}); leave --tracking-uri out to resume it")
    if state.settings is None:
        print(f"warning: {source} predates recorded settings; resuming without checking that they are unchanged",
              file=sys.stderr)
        return
    changed = state.changed(run.settings(fingerprint))
    if changed:
        raise ConfigError(f"--resume: search {run.name!r} was started with other settings ({'; '.join(changed)}); "
                          f"resume it with the settings it started with (see {source}), or start a new search "
                          f"with --name")


def stop_on_full_disk(outcome: SearchOutcome) -> None:
    """Trials that failed on a full disk (their checkpoints could not be written) make the search's
    result incomplete: its parent run is FAILED with the reason and an OSError(ENOSPC) raised,
    rather than a final model trained from the trials that happened to fit. --resume reruns them."""
    import errno

    from mlflow.tracking import MlflowClient

    from tuning.tracking.lifecycle import end_run, is_disk_full, release_reserves

    full = next((t.error for t in outcome.trials if t.error and is_disk_full(RuntimeError(t.error))), None)
    if full is None:
        return
    line = next((x.strip() for x in reversed(full.splitlines()) if x.strip()), full)[:300]
    release_reserves()
    end_run(MlflowClient(outcome.tracking_uri), outcome.parent_run_id, "FAILED", f"disk full: a trial failed: {line}",
            only_running=False)
    raise OSError(errno.ENOSPC, f"a trial could not write to the disk: {line}")
