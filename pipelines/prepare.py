"""Validate a raw dataset and write its manifest + preprocessed cache.

    python pipelines/prepare.py --dataset men --data-root data/men
    python pipelines/prepare.py --dataset derm7pt --data-root data/derm7pt --image-size 64 64
    python pipelines/prepare.py --dataset mine.yaml --data-root data/mine --csv data/mine/cases.csv

--dataset names conf/datasets/NAME.yaml or a dataset YAML of your own; its `source.layout` picks
the reader (men, derm7pt or manifest). Exit status 1 with the full problem report when validation
fails (nothing is written then). Ctrl-C prints one line, removes the partial output folder the run
created (never one that existed before) and exits with status 130.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cfcml.config import ConfigError
from cfcml.data.prepare import prepare_dataset, summary
from tuning.cli import args as cli_args
from tuning.cli.shell import run_command


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, help="conf/datasets/NAME.yaml, or a dataset YAML path")
    cli_args.add_data_root(p, required=True, help="the raw dataset folder")
    p.add_argument("--out", type=Path, help="output folder (default: <data-root>/prepared)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--fold-seed", "--seed", dest="fold_seed", type=int, default=0,
                   help="seed of the folds (and of a manifest hold-out); recorded in the manifest")
    cli_args.add_image_size(p, help="override the spec's preprocessed size, e.g. 32 32 8 or 64 64")
    p.add_argument("--spec", type=Path, help="a dataset YAML replacing --dataset's (older spelling: "
                                            "--dataset manifest --spec mine.yaml)")
    p.add_argument("--csv", type=Path, help="manifest layout: the CSV (default <data-root>/<source.table>)")
    p.add_argument("--workers", type=int, help="decoding threads (default: CPU count, at most 8)")
    args = p.parse_args(argv)
    if args.folds < 2:
        p.error("--folds must be at least 2")

    def prepare() -> None:
        prepared = prepare_dataset(args.dataset, args.data_root, args.out, folds=args.folds, fold_seed=args.fold_seed,
                                   image_size=tuple(args.image_size) if args.image_size else None,
                                   spec=args.spec, csv=args.csv, workers=args.workers, progress=True,
                                   log=lambda msg: print(msg, flush=True))
        print(summary(prepared))

    # Ctrl-C: PrepareInterrupted's one line (the partial output removed), exit 130; a dataset that
    # does not validate: its report, 1; a bad spec, folder or file: one line, 1 (prepare's own status)
    return run_command(prepare, name="prepare", failed=(ConfigError, ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
