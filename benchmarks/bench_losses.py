"""Benchmark: forward + backward time of the batched fine-stage losses against the literal loops.

    python -m benchmarks.bench_losses [--repeats N]

Shape of a MEN training step (B=36, M=4, C=3, D=128, float32). `time_losses()` returns the
timings so that more entries (e.g. the model's forward + backward) can be added next to it in
`main()`. On a small machine shared with other jobs, OpenMP threads waiting for a busy core can
inflate the batched time by orders of magnitude; compare runs on a quiet machine (or --threads 1).
"""
from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from cfcml.losses import hrm_losses
from cfcml.reference import reference_hrm_losses


def _median_seconds(step: Callable[[], None], repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_losses(
    batch: int = 36,
    modalities: int = 4,
    classes: int = 3,
    dim: int = 128,
    repeats: int = 20,
    reference_repeats: int = 3,
    seed: int = 0,
) -> dict[str, float]:
    """Median seconds of one forward + backward of `hrm_losses` and of the literal loops."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(batch) % classes
    labels = labels[torch.randperm(batch, generator=gen)]
    features = torch.randn(batch, modalities, dim, generator=gen).requires_grad_(True)

    def step(fn: Callable[..., dict[str, torch.Tensor]]) -> Callable[[], None]:
        def run() -> None:
            features.grad = None
            out = fn(features, labels, classes)
            (out["sam"] + out["up"] + out["cp"]).backward()

        return run

    batched = _median_seconds(step(hrm_losses), repeats, warmup=5)
    literal = _median_seconds(step(reference_hrm_losses), reference_repeats, warmup=1)
    return {"batched_s": batched, "literal_s": literal, "speedup": literal / batched}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-model", action="store_true", help="skip the public-size model timing")
    parser.add_argument("--model-repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    res = time_losses(repeats=args.repeats)
    print("fine-stage losses, forward + backward, B=36 M=4 C=3 D=128 float32 (median):")
    print(f"  batched hrm_losses : {res['batched_s'] * 1e3:9.3f} ms")
    print(f"  literal loops      : {res['literal_s'] * 1e3:9.3f} ms")
    print(f"  speed-up           : {res['speedup']:9.1f}x")
    if not args.no_model:
        from benchmarks.bench_model import bench

        r = bench("men_public", repeats=args.model_repeats, device=torch.device("cpu"))
        print(f"CFCML model, one MEN training batch at the public size ({r['input']} volumes, batch 2, "
              f"{r['params_m']:.1f}M parameters), forward + loss + backward on CPU: "
              f"{r['median_s']:.2f} s (median of {args.model_repeats}, min {r['min_s']:.2f} s)")


if __name__ == "__main__":
    main()
