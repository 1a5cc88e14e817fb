"""Forward + backward time of the CFCML network with its full loss, for one training batch.

    .venv/bin/python -m benchmarks.bench_model [--repeats 3] [--only men_public ...] [--device cpu]

Configurations come from the shipped experiment and dataset configs (conf/), so the figures follow
them: `men_public` (3 volumes 128x128x24, the public res_mamba encoder: width 16, 3 blocks a layer,
Mamba layers in stages 2-4, D 128, latents 48/16), `derm7pt_public` (2 photos 224x224, one shared
Swin-T: width 96, depths 2,2,6,2, patch 4, window 7, latents 32/24), `men_tiny` (32x32x8, the smoke
search's tiny MEN model: width 2, 2 blocks a layer, a Mamba layer in stage 4; the e2e tests' size), and the earlier
mamba_resnet encoder for comparison: `men_tiny_mamba_resnet` (width 4, Mamba in stages 3-4, the old
smoke model) and `men_public_mamba_resnet` (width 16, Mamba in all four stages, the old MEN default;
minutes a step on 2 CPU cores).
Each timing is one optimiser-free training step (zero grads, forward, CFCMLLoss, backward): the
median over `--repeats` runs after one warm-up run. Other processes on the machine skew CPU
figures, so the thread count and the load average are printed with them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import resource
import statistics
import time

import torch

from cfcml.config import load_experiment
from cfcml.data.spec import load_dataset_spec
from cfcml.losses import CFCMLLoss
from cfcml.networks import build_model

BATCH = 2
TINY = {"dim": 32, "latents_img": 4, "latents_tab": 4}
CONFIGS = {  # name -> (dataset, image size override, model overrides)
    "men_tiny": ("men", (32, 32, 8), {"encoder_width": 2, "encoder_blocks": 2, "mixer_stages": (4,), **TINY}),
    "men_tiny_mamba_resnet": ("men", (32, 32, 8), {"encoder": "mamba_resnet", "encoder_width": 4,
                                                   "mixer_stages": (3, 4), **TINY}),
    "derm7pt_public": ("derm7pt", None, {}),
    "men_public": ("men", None, {}),
    "men_public_mamba_resnet": ("men", None, {"encoder": "mamba_resnet", "mixer_stages": (1, 2, 3, 4)}),
}
DEFAULT = ["men_tiny", "men_tiny_mamba_resnet", "derm7pt_public", "men_public"]


def make_batch(spec, batch: int, device: torch.device) -> tuple[list[torch.Tensor], ...]:
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(batch, m.channels, *m.size, generator=g).to(device) for m in spec.modalities]
    n_num = len(spec.numeric_fields)
    num = torch.randn(batch, n_num, generator=g).to(device)
    num_missing = torch.zeros(batch, n_num, dtype=torch.bool, device=device)
    cat = torch.stack([torch.randint(0, len(f.categories), (batch,), generator=g)
                       for f in spec.categorical_fields], 1).to(device)
    labels = (torch.arange(batch) % len(spec.classes)).to(device)
    return images, num, num_missing, cat, labels


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(name: str, repeats: int, device: torch.device) -> dict:
    dataset, image_size, overrides = CONFIGS[name]
    exp = load_experiment(dataset)
    spec = load_dataset_spec(dataset, image_size=image_size)
    cfg = dataclasses.replace(exp.model, **overrides)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(spec, cfg).to(device).train()
    build_s = time.perf_counter() - t0
    w = exp.loss
    loss_fn = CFCMLLoss(model.num_modalities, len(spec.classes), cfg.dim, w_cls=w.w_cls, w_sam=w.w_sam,
                        w_up=w.w_up, w_cp=w.w_cp, tau_sam=w.tau_sam, tau_up=w.tau_up, tau_cp=w.tau_cp,
                        momentum=w.momentum, fine=w.fine).to(device)
    images, num, num_missing, cat, labels = make_batch(spec, BATCH, device)

    def step() -> float:
        model.zero_grad(set_to_none=True)
        sync(device)
        start = time.perf_counter()
        out = model(images, num, num_missing, cat)
        loss_fn(out.logits, out.features, labels)["loss"].backward()
        sync(device)
        return time.perf_counter() - start

    step()  # warm-up: allocator, kernel selection
    times = [step() for _ in range(repeats)]
    return {
        "config": name,
        "input": f"{len(spec.modalities)}x{'x'.join(map(str, spec.modalities[0].size))}",
        "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        "build_s": build_s,
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # process peak so far
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", nargs="+", choices=list(CONFIGS), default=DEFAULT)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    load = "/".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"torch {torch.__version__}, device {device}, torch.get_num_threads() = {torch.get_num_threads()}, "
          f"cpus {os.cpu_count()}, load average {load}")
    print(f"one training step (forward + CFCMLLoss + backward), batch {BATCH}, "
          f"median of {args.repeats} after 1 warm-up\n")
    header = (f"{'config':<16} {'images':<12} {'params':>8} {'build':>7} {'fwd+bwd':>9} {'min':>7} {'max':>7} "
              f"{'peak RSS':>9}")
    print(header)
    print("-" * len(header))
    for name in args.only:
        r = bench(name, args.repeats, device)
        print(f"{r['config']:<16} {r['input']:<12} {r['params_m']:>7.2f}M {r['build_s']:>6.1f}s "
              f"{r['median_s']:>8.2f}s {r['min_s']:>6.2f}s {r['max_s']:>6.2f}s {r['max_rss_gb']:>8.1f}G", flush=True)
    print(f"\nload average after: {'/'.join(f'{v:.1f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
