"""Loader throughput: the preprocessed cache against decoding the raw files on every access.

Builds a synthetic MEN-like cohort (gzipped int16 NIfTI, per-patient crop sizes jittered ~10%
around --raw-size, as real bounding-box crops differ), prepares it at --size, then draws the same
sample sequence, with the same training augmentations, through CachedDataset (memory-mapped
float16 cache + augmentation) and RawDataset (decode NIfTI + clip + z-score + resample +
augmentation), in one process, and prints samples/s of both and their ratio.

    python benchmarks/bench_loader.py                    # 24 patients, 128x128x24
    python benchmarks/bench_loader.py --patients 100 --samples 0   # prepare time only
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from cfcml.data.dataset import CachedDataset, RawDataset  # noqa: E402
from cfcml.data.prepare import prepare_dataset  # noqa: E402
from cfcml.data.synthetic import make_men  # noqa: E402


def seconds(dataset, indices: list[int]) -> tuple[float, float]:
    """(wall, CPU) seconds to draw `indices`. CPU time (user + system of this process, one torch
    thread) is what the loader costs; wall time also counts other processes on a shared machine."""
    w0, c0 = time.perf_counter(), time.process_time()
    for i in indices:
        sample = dataset[i]
        assert sample["images"][0].dtype == torch.float32
    return time.perf_counter() - w0, time.process_time() - c0


def compare(cached, raw, indices: list[int], rounds: int) -> dict[str, float]:
    """samples/s of both (wall and CPU time), timed in alternating blocks so that both see the
    same machine load."""
    cached[indices[0]], raw[indices[0]]  # warm-up: page cache, lazy imports
    t = {"cached": [0.0, 0.0], "raw": [0.0, 0.0]}
    for block in (indices[r::rounds] for r in range(rounds)):
        for name, ds in (("cached", cached), ("raw", raw)):
            wall, cpu = seconds(ds, block)
            t[name][0] += wall
            t[name][1] += cpu
    n = len(indices)
    return {"cached_samples_per_s": n / t["cached"][0], "raw_samples_per_s": n / t["raw"][0],
            "cached_samples_per_cpu_s": n / t["cached"][1], "raw_samples_per_cpu_s": n / t["raw"][1]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--patients", type=int, default=24)
    p.add_argument("--size", type=int, nargs=3, default=[128, 128, 24], help="prepared (training) size")
    p.add_argument("--raw-size", type=int, nargs=3, help="raw crop size (default: --size), jittered per patient")
    p.add_argument("--samples", type=int, default=96, help="samples drawn from each dataset (0: prepare only)")
    p.add_argument("--rounds", type=int, default=4, help="alternating timing blocks per dataset")
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
        prepared = prepare_dataset("men", root, work / "prepared", folds=2, seed=0, image_size=tuple(args.size))
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
            rates = compare(cached, raw, indices, args.rounds)
            ratio = rates["cached_samples_per_s"] / rates["raw_samples_per_s"]
            ratio_cpu = rates["cached_samples_per_cpu_s"] / rates["raw_samples_per_cpu_s"]
            result.update({k: round(v, 1) for k, v in rates.items()})
            result.update(samples=args.samples, augment=augment, threads=args.threads,
                          ratio=round(ratio, 2), ratio_cpu=round(ratio_cpu, 2))
            print(f"{args.samples} samples each, augment={augment}, {args.threads} torch thread(s)\n"
                  f"           samples/s (wall)  samples per CPU-second\n"
                  f"cached:    {rates['cached_samples_per_s']:12.1f}  {rates['cached_samples_per_cpu_s']:12.1f}\n"
                  f"raw:       {rates['raw_samples_per_s']:12.1f}  {rates['raw_samples_per_cpu_s']:12.1f}\n"
                  f"ratio:     {ratio:11.1f}x  {ratio_cpu:11.1f}x")
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
