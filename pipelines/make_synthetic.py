"""Write a synthetic MEN or Derm7pt dataset in the real layout, for demos and tests.

    python pipelines/make_synthetic.py --dataset men --data-root data/men_synth
    python pipelines/make_synthetic.py --dataset men --data-root data/men_128 --patients 100 --image-size 128 128 24
    python pipelines/make_synthetic.py --dataset derm7pt --data-root data/derm_synth --image-size 224 224

(--out and --size are the older spellings of --data-root and --image-size.)
"""
from __future__ import annotations

import argparse
import sys
import time

import pandas as pd

from cfcml.data.synthetic import LATENTS_FILE, SIGNALS, make_derm7pt, make_men
from cfcml.outputs import check_output_dir
from tuning.cli import args as cli_args
from tuning.cli.shell import run_command

DEFAULTS = {  # patients, size (the public code trains on 128x128x24 volumes / 224x224 photos)
    "men": (60, (32, 32, 8)),
    "derm7pt": (80, (64, 64)),
}
PROGRESS_FROM = 50  # show a progress bar from this many patients on


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, choices=sorted(DEFAULTS))
    cli_args.add_data_root(parser, required=True, help="folder to write the dataset into", alias="--out")
    parser.add_argument("--patients", type=int, help="MEN patients / Derm7pt NEV+MEL cases "
                        "(default 60 / 80)")
    parser.add_argument("--seed", type=int, default=0)
    cli_args.add_image_size(parser, help="MEN: H W D (default 32 32 8; public 128 128 24); "
                                         "Derm7pt: H W (default 64 64; public 224 224; may be non-square)")
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--vary-size", action="store_true",
                        help="jitter each volume/photo size by ~10%%, like real crops")
    parser.add_argument("--signal", choices=SIGNALS, default="split",
                        help="split: each modality carries part of the class (fusion helps); interaction: "
                             "a class depends on image and table jointly, no modality alone carries it")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a dataset already generated in --out")
    args = parser.parse_args(argv)
    patients, size = DEFAULTS[args.dataset]
    args.patients = patients if args.patients is None else args.patients
    args.image_size = size if args.image_size is None else tuple(args.image_size)
    if len(args.image_size) != len(size):
        parser.error(f"--image-size for {args.dataset} takes {len(size)} integers, got {len(args.image_size)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # a bad setting or output folder: one line, exit 2
    return run_command(lambda: _make(args), name="make_synthetic", usage=(ValueError, FileExistsError))


def _make(args: argparse.Namespace) -> None:
    make = make_men if args.dataset == "men" else make_derm7pt
    start = time.perf_counter()
    check_output_dir(args.data_root, what="--data-root")
    out = make(args.data_root, patients=args.patients, seed=args.seed, size=args.image_size,
               test_fraction=args.test_fraction, vary_size=args.vary_size,
               overwrite=args.overwrite, progress=args.patients >= PROGRESS_FROM, signal=args.signal)
    seconds = time.perf_counter() - start
    latents = pd.read_csv(out / LATENTS_FILE)
    counts = pd.crosstab(latents["label"], latents["split"], margins=True, margins_name="total")
    size = "x".join(map(str, args.image_size)) + (" (jittered)" if args.vary_size else "")
    print(f"wrote synthetic {args.dataset} to {out} in {seconds:.1f}s "
          f"(seed {args.seed}, size {size}, {args.signal} signal)")
    print(counts.to_string())
    if args.dataset == "men":
        print(f"  {out}/<train|test>/<class>/<patient>/{{t1_bbox,t2_bbox,adc_bbox}}.nii.gz")
        print(f"  {out / 'clinical.csv'}")
    else:
        print(f"  {out / 'meta' / 'meta.csv'} and {{train,valid,test}}_indexes.csv")
        print(f"  {out / 'images'}/<clinic|derm path>.jpg")
    print(f"  {out / LATENTS_FILE} (generator latents; adapters and training never read it)")


if __name__ == "__main__":
    sys.exit(main())
