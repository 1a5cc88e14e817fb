"""The final-step command's one function (`pipelines/train_final.py`): `finish_search`, and
`find_outcome`, which finds the search it finishes."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from cfcml.config import ConfigError
from tuning.records.outcome import OUTCOME_FILE, SearchOutcome
from tuning.workflows.errors import CommandFailed

if TYPE_CHECKING:
    from tuning.release.final import Release


def find_outcome(storage: Path, dataset: str, name: str | None) -> Path | None:
    """The outcome file of search `name`, or the newest finished search of `dataset`."""
    if name:
        path = storage / name / OUTCOME_FILE
        return path if path.is_file() else None
    found = [p for p in storage.glob(f"*/{OUTCOME_FILE}") if SearchOutcome.load(p).dataset == dataset]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def finish_search(dataset: str, name: str | None, *, runs_dir: Path, address: str | None = None,
                  verbose: bool = False, explain: bool = False) -> Release | None:
    """Retrain a finished search's best configuration on all development data, test it once and
    register it (`tuning.release.final.train_final`), under the search's lock: not while the search
    itself, or another final step of it, runs.

    Args:
        dataset: the dataset the search tuned.
        name: the search's name (its folder under `<runs_dir>/ray`); None: the newest finished search
            of `dataset`.
        runs_dir: --runs-dir (the search's Ray storage is its `ray/`; the default MLflow store).
        address: the Ray cluster (--address); None: $RAY_ADDRESS, else a local Ray.
        verbose: Ray's own log lines on the console.
        explain: Grad-CAM and field-occlusion figures of a few test patients on the final run.

    Returns:
        The `Release` (reused when the registry holds the final model already); None when the
        search has no best configuration.

    Raises:
        ConfigError: no such finished search, the search in use by another command, its store,
            prepared data or Ray address to fix, Ray that did not start; nothing ran.
        CommandFailed: the configuration diverged on all development data, or the disk filled up
            (the final run is FAILED with the reason).
    """
    storage = runs_dir.resolve() / "ray"
    outcome_file = find_outcome(storage, dataset, name)
    if outcome_file is None:  # said before torch, Ray and MLflow load
        what = f"search {name!r}" if name else f"finished {dataset} search"
        raise ConfigError(f"no {what} under {storage} (no {OUTCOME_FILE}); run tuning/search.py first")
    from cfcml.data.manifest import PreparedDataset
    from cfcml.training import TrainingDiverged
    from tuning.hpo.prepared import check_cache
    from tuning.release.final import train_final
    from tuning.runtime.locks import search_lock
    from tuning.runtime.preflight import check_ray_address, check_storage
    from tuning.runtime.ray_cluster import ray_session
    from tuning.tracking.lifecycle import disk_full_message

    with search_lock(storage, outcome_file.parent.name):  # not while the search (or another final step) runs
        print(f"final step of the search at {outcome_file.parent}")
        outcome = SearchOutcome.load(outcome_file)
        check_storage(runs_dir, outcome.tracking_uri, source=f"{outcome_file}: tracking_uri",
                      experiment=f"cfcml-{outcome.dataset}")
        check_ray_address(address)
        prepared = PreparedDataset.load(outcome.prepared_dir)
        check_cache(prepared, what=f"{outcome_file}: prepared_dir")
        best = outcome.best
        train = best.experiment.train if best and best.experiment else None
        try:
            with ray_session(address, verbose=verbose, train=train):
                return train_final(prepared, outcome, storage=storage, explain=explain)
        except ConfigError:  # Ray did not start, or the final model's workers cannot fit on it
            raise
        except TrainingDiverged as exc:  # the best configuration diverged on all development data
            raise CommandFailed(f"final model: {exc}") from None
        except Exception as exc:  # the final run is FAILED with the reason (tuning.tracking.lifecycle)
            message = disk_full_message(exc, runs_dir, next_step="run the same command again")
            if message is None:
                raise
            raise CommandFailed(message) from exc
