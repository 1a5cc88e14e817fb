"""Retrain the best configuration of a finished search on all development data, test it once,
register it (the step `tuning/search.py` runs at its end; see `tuning/release/final.py`).

    python pipelines/train_final.py --dataset men                 # the newest finished men search
    python pipelines/train_final.py --dataset men --search smoke  # the search named men-smoke
    python pipelines/train_final.py --dataset men --name my-search

This file parses the arguments and calls `tuning.workflows.train_final.finish_search` inside the
error shell (`tuning.cli.shell`).
"""
from __future__ import annotations

import argparse
import sys

from tuning.cli import args as cli_args
from tuning.cli.shell import run_command


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="the dataset the search tuned")
    p.add_argument("--search", help="the search config's name; the search is then <dataset>-<search>")
    p.add_argument("--name", help="the search's name (default: <dataset>-<search> with --search, else the "
                                  "newest finished search of the dataset)")
    cli_args.add_runtime(p)
    cli_args.add_explain(p)
    return p.parse_args(argv)


def search_name(args: argparse.Namespace) -> str | None:
    """The search the arguments name (None: the newest finished one); ConfigError for a name that
    is not a plain folder name."""
    from tuning.runtime.preflight import check_name, check_utf8

    check_utf8(("--runs-dir", args.runs_dir), ("--name", args.name))
    name = args.name or (f"{args.dataset}-{args.search}" if args.search else None)
    if name is not None:
        check_name(name, "--name" if args.name else "--search")
    return name


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def final() -> None:
        from tuning.workflows.train_final import finish_search

        finish_search(args.dataset, search_name(args), runs_dir=args.runs_dir, address=args.address,
                      verbose=args.verbose, explain=args.explain_test_patients)

    return run_command(final, name="the final step")


if __name__ == "__main__":
    sys.exit(main())
