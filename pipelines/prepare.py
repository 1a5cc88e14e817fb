"""Validate a raw dataset and write its manifest + preprocessed cache.

    python pipelines/prepare.py --dataset men --root data/men
    python pipelines/prepare.py --dataset derm7pt --root data/derm7pt --image-size 64 64
    python pipelines/prepare.py --dataset manifest --root data/mine --spec mine.yaml --csv data/mine/cases.csv

Exit status 1 with the full problem report when validation fails (nothing is written then).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from cfcml.config import ConfigError  # noqa: E402
from cfcml.data.adapters import ADAPTERS  # noqa: E402
from cfcml.data.prepare import prepare_dataset, summary  # noqa: E402
from cfcml.data.validation import DatasetValidationError  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, choices=sorted(ADAPTERS), help="layout adapter")
    p.add_argument("--root", required=True, type=Path, help="dataset root folder")
    p.add_argument("--out", type=Path, help="output folder (default: <root>/prepared)")
    p.add_argument("--folds", type=int, default=5, help="cross-validation folds (default 5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds (and of a manifest hold-out)")
    p.add_argument("--image-size", type=int, nargs="+", metavar="N",
                   help="override the spec's preprocessed size, e.g. 32 32 8 or 64 64")
    p.add_argument("--spec", type=Path, help="dataset YAML (required for manifest; default conf/datasets/<dataset>.yaml)")
    p.add_argument("--csv", type=Path, help="manifest adapter: the CSV (default <root>/<source.table>)")
    p.add_argument("--workers", type=int, help="decoding threads (default: CPU count, at most 8)")
    args = p.parse_args(argv)
    if args.folds < 2:
        p.error("--folds must be at least 2")
    try:
        prepared = prepare_dataset(args.dataset, args.root, args.out, folds=args.folds, seed=args.seed,
                                   image_size=tuple(args.image_size) if args.image_size else None,
                                   spec=args.spec, csv=args.csv, workers=args.workers, progress=True,
                                   log=lambda msg: print(msg, flush=True))
    except DatasetValidationError as exc:
        print(exc, file=sys.stderr)
        return 1
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(summary(prepared))
    return 0


if __name__ == "__main__":
    sys.exit(main())
