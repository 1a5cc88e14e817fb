"""Retrain the best configuration of a finished search on all development data, test it once,
register it (the step `tuning/search.py` runs at its end; see `tuning/release/final.py`).

    python pipelines/train_final.py --dataset men                 # the newest finished men search
    python pipelines/train_final.py --dataset men --search smoke  # the search named men-smoke
    python pipelines/train_final.py --dataset men --name my-search
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuning.cli import args as cli_args
from tuning.records.outcome import OUTCOME_FILE, SearchOutcome


def find_outcome(storage: Path, dataset: str, name: str | None) -> Path | None:
    """The outcome file of search `name`, or the newest finished search of `dataset`."""
    if name:
        path = storage / name / OUTCOME_FILE
        return path if path.is_file() else None
    found = [p for p in storage.glob(f"*/{OUTCOME_FILE}") if SearchOutcome.load(p).dataset == dataset]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="the dataset the search tuned")
    p.add_argument("--search", help="the search config's name; the search is then <dataset>-<search>")
    p.add_argument("--name", help="the search's name (default: <dataset>-<search> with --search, else the "
                                  "newest finished search of the dataset)")
    cli_args.add_runtime(p)
    cli_args.add_explain(p)
    args = p.parse_args(argv)
    from cfcml.config import ConfigError
    from tuning.runtime.preflight import check_name, check_utf8

    storage = args.runs_dir.resolve() / "ray"
    name = args.name or (f"{args.dataset}-{args.search}" if args.search else None)
    try:
        check_utf8(("--runs-dir", args.runs_dir), ("--name", args.name))
        if name is not None:
            check_name(name, "--name" if args.name else "--search")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    outcome_file = find_outcome(storage, args.dataset, name)
    if outcome_file is None:
        what = f"search {name!r}" if name else f"finished {args.dataset} search"
        print(f"error: no {what} under {storage} (no {OUTCOME_FILE}); run tuning/search.py first", file=sys.stderr)
        return 2
    from tuning.runtime.locks import search_lock

    try:  # not while the search itself (or another final step of it) runs
        with search_lock(storage, outcome_file.parent.name):
            return _final(args, storage, outcome_file)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _final(args: argparse.Namespace, storage: Path, outcome_file: Path) -> int:
    from cfcml.config import ConfigError

    print(f"final step of the search at {outcome_file.parent}")

    from cfcml.data.manifest import PreparedDataset
    from tuning.release.final import train_final
    from tuning.runtime.preflight import check_ray_address, check_storage
    from tuning.runtime.ray_cluster import ray_session
    from tuning.tracking.lifecycle import disk_full_message

    outcome = SearchOutcome.load(outcome_file)
    try:
        check_storage(args.runs_dir, outcome.tracking_uri, source=f"{outcome_file}: tracking_uri",
                      experiment=f"cfcml-{outcome.dataset}")
        check_ray_address(args.address)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tuning.hpo.prepared import check_cache

    prepared = PreparedDataset.load(outcome.prepared_dir)
    try:
        check_cache(prepared, what=f"{outcome_file}: prepared_dir")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        best = outcome.best
        train = best.experiment.train if best and best.experiment else None
        with ray_session(args.address, verbose=args.verbose, train=train):
            train_final(prepared, outcome, storage=storage, explain=args.explain_test_patients)
    except ConfigError as exc:  # Ray did not start, or the final model's workers cannot fit on it
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # the final run is FAILED with the reason (tuning.tracking.lifecycle)
        message = disk_full_message(exc, args.runs_dir, next_step="run the same command again")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
