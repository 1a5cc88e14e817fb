"""Loader throughput: the preprocessed cache against decoding the raw files on every access.

Builds a synthetic MEN-like cohort (gzipped int16 NIfTI, per-patient crop sizes jittered ~10%
around --raw-size, as real bounding-box crops differ), prepares it at --size, then draws the same
sample sequence, with the same training augmentations, through CachedDataset (read the float16
cache + augmentation) and RawDataset (decode NIfTI + clip + resample + z-score, the same code
prepare runs once, + augmentation), in one process with one torch thread (a DataLoader worker's
setting), and prints samples/s of both and their ratio.

    python -m benchmarks.bench_loader                    # 24 patients, 128x128x24
    python -m benchmarks.bench_loader --patients 100 --samples 0   # prepare time only
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from cfcml.data.dataset import CachedDataset, RawDataset
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men


def seconds(dataset, indices: list[int]) -> tuple[float, float]:
    """(wall, CPU) seconds to draw `indices`. CPU time (user + system of this process, one torch
    thread) is what the loader costs; wall time also counts other processes on a shared machine."""
    w0, c0 = time.perf_counter(), time.process_time()
    for i in indices:
        sample = dataset[i]
        assert sample["images"][0].dtype == torch.float32
    return time.perf_counter() - w0, time.process_time() - c0


def compare(datasets: dict, indices: list[int], rounds: int) -> dict[str, dict[str, float]]:
    """samples/s of each dataset, timed in alternating blocks so that all see the same machine
    load: overall (wall and CPU time) and the best block (CPU time; the least disturbed estimate
    on a busy machine, as timeit takes the minimum)."""
    for ds in datasets.values():
        ds[indices[0]]  # warm-up: page cache, lazy imports
    wall = {k: 0.0 for k in datasets}
    cpu = {k: 0.0 for k in datasets}
    best = {k: 0.0 for k in datasets}
    for block in (indices[r::rounds] for r in range(rounds)):
        for name, ds in datasets.items():
            w, c = seconds(ds, block)
            wall[name] += w
            cpu[name] += c
            best[name] = max(best[name], len(block) / max(c, 1e-9))
    n = len(indices)
    return {k: {"wall": n / wall[k], "cpu": n / cpu[k], "best": best[k]} for k in datasets}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=24)
    p.add_argument("--size", type=int, nargs=3, default=[128, 128, 24], help="prepared (training) size")
    p.add_argument("--raw-size", type=int, nargs=3, help="raw crop size (default: --size), jittered per patient")
    p.add_argument("--samples", type=int, default=192, help="samples drawn from each dataset (0: prepare only)")
    p.add_argument("--rounds", type=int, default=8, help="alternating timing blocks per dataset")
    p.add_argument("--no-augment", action="store_true", help="time loading without augmentation")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (both paths alike)")
    p.add_argument("--workdir", type=Path, help="keep the data here instead of a temporary folder")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        t0 = time.perf_counter()
        root = make_men(work / "men", patients=args.patients, seed=0, size=tuple(args.raw_size or args.size),
                        vary_size=True, overwrite=True)
        t_make = time.perf_counter() - t0
        t0 = time.perf_counter()
        prepared = prepare_dataset("men", root, work / "prepared", folds=2, fold_seed=0, image_size=tuple(args.size))
        t_prepare = time.perf_counter() - t0
        result = {"patients": args.patients, "size": args.size, "raw_size": args.raw_size or args.size,
                  "make_seconds": round(t_make, 2), "prepare_seconds": round(t_prepare, 2),
                  "prepare_validate_seconds": prepared.info["seconds"]["validate"]}
        print(f"make_men: {t_make:.1f}s; prepare ({args.patients} patients at {args.size}): {t_prepare:.1f}s "
              f"(validation {result['prepare_validate_seconds']:.1f}s)")
        if args.samples > 0:
            frame = prepared.dev_frame()
            norm = prepared.fit_normalizer(frame)
            augment = not args.no_augment
            cached = CachedDataset(frame, prepared.spec, prepared.cache_dir, norm, augment=augment, seed=0)
            raw = RawDataset(frame, prepared.spec, prepared.root, norm, augment=augment, seed=0)
            indices = [i % len(frame) for i in range(args.samples)]
            rates = compare({"cached": cached, "raw": raw}, indices, args.rounds)
            ratio = {k: rates["cached"][k] / rates["raw"][k] for k in ("wall", "cpu", "best")}
            result.update(samples=args.samples, augment=augment, threads=args.threads, rounds=args.rounds,
                          samples_per_s={k: {m: round(v, 1) for m, v in r.items()} for k, r in rates.items()},
                          ratio={k: round(v, 2) for k, v in ratio.items()})
            print(f"{args.samples} samples each, augment={augment}, {args.threads} torch thread(s), "
                  f"{args.rounds} alternating rounds\n"
                  f"           samples/s   per CPU-second   best round (CPU)")
            for name in ("cached", "raw"):
                r = rates[name]
                print(f"{name:<8} {r['wall']:11.1f} {r['cpu']:16.1f} {r['best']:18.1f}")
            print(f"{'ratio':<8} {ratio['wall']:10.1f}x {ratio['cpu']:15.1f}x {ratio['best']:17.1f}x")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
