"""Training throughput on a GPU: the bare step, CrossValidation.run_epoch, peak memory, FLOPs and MFU.

    PYTHONPATH=. python benchmarks/bench_gpu.py          # from a checkout; or python -m benchmarks.bench_gpu
    PYTHONPATH=. python benchmarks/bench_gpu.py --quick  # one bare-step row and one epoch row per dataset
    PYTHONPATH=. python benchmarks/bench_gpu.py --max-batch --compile   # add those rows

Needs torch and the model's own dependencies (MONAI, mambapy, nibabel, pandas, pyarrow, ...), not
Ray or MLflow: it imports only `cfcml`. Per dataset (MEN: 3 volumes 128x128x24, the public
res_mamba encoder; Derm7pt: 2 photos 224x224, a shared Swin-T) it writes a synthetic cohort at the
public size, prepares it (cache, 2 folds), and measures:

- bare step: `CrossValidation.train_epoch` (the platform's own step: autocast, CFCMLLoss, backward,
  fused Adam, prototype bank, device-side loss sums) over one device-resident batch repeated, so
  no loader is involved: samples/s = batch x steps / seconds, `--warmup` steps first;
- run_epoch: `CrossValidation.run_epoch` over both folds with the DataLoader (4 workers, pinned
  memory) and validation, the second epoch timed: training samples / epoch seconds;
- peak memory (torch.cuda.max_memory_allocated; on CPU the process's peak RSS);
- FLOPs per sample: matrix products and convolutions of one step, forward + backward
  (torch.utils.flop_counter; the selective scan's elementwise work is not counted), and MFU, the
  achieved share of the device's dense bfloat16 peak (a table below; `--peak-tflops` for others).

Without CUDA it runs the same rows at tiny sizes (the smoke search's model: 32x32x8 volumes, 64x64
photos) so that the script is tested on CPU, and says so. Run time is capped by `--budget-s`
(default 540 s): later rows are skipped with a note when it is spent. One table, exit status 0
(1 only when a row failed for a reason other than running out of GPU memory).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/bench_gpu.py` from a checkout that is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from cfcml.config import CONF_DIR, ExperimentConfig, deep_merge, load_experiment, read_yaml  # noqa: E402
from cfcml.data.prepare import prepare_dataset  # noqa: E402
from cfcml.data.synthetic import make_derm7pt, make_men  # noqa: E402
from cfcml.networks.scan import resolve_scan  # noqa: E402
from cfcml.training import CrossValidation, Split, largest_batch  # noqa: E402

# Dense bfloat16 peaks (no sparsity) from the vendors' data sheets, by device-name substring.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
                    ("A10G", 70.0), ("RTX 4090", 165.0)]
PUBLIC = {"men": {"batch": 8, "patients": 120, "raw": (128, 128, 24)},  # 2 folds: 48 train + 48 val rows
          "derm7pt": {"batch": 32, "patients": 120, "raw": (224, 224)}}
TINY = {"men": {"batch": 4, "patients": 30, "raw": (32, 32, 8)},
        "derm7pt": {"batch": 4, "patients": 30, "raw": (64, 64)}}


class Repeat:
    """A stand-in for the training DataLoader: one device-resident batch, `steps` times."""

    sampler = None
    batch_sampler = None

    def __init__(self, batch: dict[str, Any], steps: int):
        self.batch, self.steps = batch, steps

    def __iter__(self):
        return (self.batch for _ in range(self.steps))

    def __len__(self) -> int:
        return self.steps


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: [x.to(device) for x in v] if isinstance(v, list) else v.to(device) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def tile(batch: dict[str, Any], size: int) -> dict[str, Any]:
    """`batch` repeated along the batch axis to `size` samples (a step's cost depends on the size only)."""
    def grow(x: torch.Tensor) -> torch.Tensor:
        reps = -(-size // x.shape[0])
        return x.repeat(reps, *([1] * (x.dim() - 1)))[:size]

    return {k: [grow(x) for x in v] if isinstance(v, list) else grow(v) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_bytes(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0  # Linux: KiB; the process's peak


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_tflops(device: torch.device, override: float | None) -> tuple[float | None, str]:
    if override:
        return override, f"{override:g} TFLOP/s (given)"
    if device.type != "cuda":
        return None, "no bf16 peak for a CPU: MFU not computed"
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return value, f"{value:g} TFLOP/s dense bf16 ({key} data sheet)"
    return None, f"unknown peak for {name!r}: give --peak-tflops"


def experiment(dataset: str, tiny: bool, options: dict[str, Any]) -> ExperimentConfig:
    """The shipped experiment; at tiny sizes with the smoke search's model overrides (conf/search)."""
    overrides: dict[str, Any] = {}
    if tiny:
        smoke = read_yaml(CONF_DIR / "search" / "smoke.yaml")
        overrides = {**smoke.get("overrides", {}), **smoke.get("dataset_overrides", {}).get(dataset, {})}
    overrides = {k: v for k, v in overrides.items() if not k.startswith("train.")}
    cfg = load_experiment(dataset, overrides)
    return cfg.replace(deep_merge({"train": {"folds": 2}}, options))


def prepare(dataset: str, sizes: dict[str, Any], root: Path, tiny: bool):
    maker = make_men if dataset == "men" else make_derm7pt
    raw = maker(root / dataset, patients=sizes["patients"], seed=0, size=sizes["raw"])
    return prepare_dataset(dataset, raw, folds=2, fold_seed=0, image_size=sizes["raw"] if tiny else None)


def bare_step(prepared, cfg: ExperimentConfig, device: torch.device, batch: int, warmup: int, steps: int,
              count_flops: bool, profile: bool = False) -> dict[str, float]:
    """samples/s of the platform's training step on one device-resident batch (no loader)."""
    torch.manual_seed(0)
    cfg = cfg.replace({"train.batch_size": batch})
    cv = CrossValidation(prepared, [Split(prepared.dev_frame(), None)], cfg, device=device)
    fold = cv.folds[0]
    real = next(iter(fold.train_loader))
    data = to_device(tile(real, batch), device)
    flops = float("nan")
    if count_flops:
        fold.train_loader = Repeat(data, 1)
        with FlopCounterMode(display=False) as counter:
            cv.train_epoch(0)
        flops = counter.get_total_flops() / batch
    reset_peak(device)
    fold.train_loader = Repeat(data, warmup)
    cv.train_epoch(0)  # compilation, cuDNN autotuning, allocator warm-up
    fold.train_loader = Repeat(data, steps)
    sync(device)
    start = time.perf_counter()
    stats = cv.train_epoch(0)
    sync(device)
    seconds = time.perf_counter() - start
    if not all(v == v for v in stats.values()):
        raise FloatingPointError(f"non-finite training loss: {stats}")
    if profile:
        profile_steps(cv, fold, data, device)
    return {"step_s": seconds / steps, "samples_s": batch * steps / seconds, "peak": peak_bytes(device),
            "flops": flops}


def profile_steps(cv: CrossValidation, fold, data: dict[str, Any], device: torch.device, steps: int = 2) -> None:
    """Where a step's time goes: torch.profiler's operators by self time, and kernels per step."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    fold.train_loader = Repeat(data, steps)
    with profile(activities=activities) as prof:
        cv.train_epoch(0)
        sync(device)
    events = prof.key_averages()
    key = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=15, max_name_column_width=50), flush=True)
    if device.type == "cuda":
        on_gpu = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]  # kernels, not ops
        kernels = sum(e.count for e in on_gpu)
        busy = sum(e.self_device_time_total for e in on_gpu) / 1e3 / steps
        print(f"profile: {kernels / steps:.0f} CUDA kernels a step, {busy:.0f} ms of GPU time a step", flush=True)


def epoch_row(prepared, cfg: ExperimentConfig, device: torch.device, batch: int, workers: int) -> dict[str, float]:
    """samples/s of CrossValidation.run_epoch (2 folds, loader + validation included), second epoch."""
    torch.manual_seed(0)
    cfg = cfg.replace({"train.batch_size": batch, "train.loader_workers": workers})
    cv = CrossValidation(prepared, [Split(*prepared.fold_frames(k)) for k in range(2)], cfg, device=device)
    trained = 0
    for fold in cv.folds:
        n = len(fold.train_loader.dataset)
        trained += (n // batch) * batch if fold.train_loader.drop_last else n
    validated = sum(len(f.val) for f in cv.folds if f.val is not None)
    cv.run_epoch()  # workers start, kernels tuned
    reset_peak(device)
    sync(device)
    start = time.perf_counter()
    cv.run_epoch()
    sync(device)
    seconds = time.perf_counter() - start
    return {"step_s": seconds, "samples_s": trained / seconds, "peak": peak_bytes(device), "flops": float("nan"),
            "note": f"{trained} train + {validated} val rows"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(PUBLIC), default=list(PUBLIC))
    parser.add_argument("--quick", action="store_true", help="one bare-step row and one epoch row per dataset")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the run_epoch rows (CUDA)")
    parser.add_argument("--max-batch", action="store_true", help="add a row at the largest batch that fits")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (minutes to compile)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of the fp32 step")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip rows once this much time is spent")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 without CUDA, where the box may be shared)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiny = device.type != "cuda"
    if args.threads or tiny:
        torch.set_num_threads(args.threads or 1)
    sizes = TINY if tiny else PUBLIC
    peak, peak_note = peak_tflops(device, args.peak_tflops)
    began = time.perf_counter()

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"device: {name}; torch {torch.__version__}"
          + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")
          + f"; scan auto -> {resolve_scan('auto', device)}; peak: {peak_note}")
    if tiny:
        print("NO CUDA: tiny sizes (MEN 32x32x8, Derm7pt 64x64, the smoke search's model), "
              "a check that the script runs, not GPU figures")
    header = (f"{'dataset':<8} {'row':<30} {'batch':>5} {'step s':>8} {'samples/s':>10} {'peak mem':>9} "
              f"{'GFLOP/sample':>12} {'MFU':>6}  note")
    print(header)
    print("-" * len(header))
    failed = False
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for dataset in args.datasets:
            size = sizes[dataset]
            batch, steps, warmup = size["batch"], args.steps, args.warmup
            if args.quick:
                steps, warmup = max(2, steps // 2), max(1, warmup - 1)
            t0 = time.perf_counter()
            prepared = prepare(dataset, size, Path(tmp), tiny)
            print(f"{dataset:<8} {'(synthetic data + prepare)':<30} {'':>5} {time.perf_counter() - t0:>7.1f}s",
                  flush=True)
            # The fp32 step and the loader-fed epoch first: they answer "how fast, and does the
            # loader keep up" even when --budget-s cuts the optional rows after them.
            rows: list[tuple[str, dict[str, Any], Any]] = [
                ("fp32", {}, None), (f"run_epoch ({args.workers if not tiny else 0} workers)", {}, "epoch")]
            if not args.quick:
                rows += [("bf16 autocast", {"train.amp": True}, None),
                         ("bf16 + channels_last", {"train.amp": True, "train.channels_last": True}, None)]
                if dataset == "men":
                    for scan in ("pscan", "chunked", "mamba_ssm"):
                        if scan == "mamba_ssm" and importlib.util.find_spec("mamba_ssm") is None:
                            print(f"{dataset:<8} {'fp32, scan mamba_ssm':<30} skipped: mamba-ssm is not installed")
                        elif scan != resolve_scan("auto", device) and not (scan == "mamba_ssm" and tiny):
                            rows.append((f"fp32, scan {scan}", {"model.scan": scan}, None))
                if args.max_batch:
                    rows.append(("largest batch (fp32)", {}, "max"))
                if args.compile:
                    rows.append(("fp32 + torch.compile", {"train.compile": True}, None))
            flops = float("nan")
            for label, options, kind in rows:
                if time.perf_counter() - began > args.budget_s:
                    print(f"{dataset:<8} {label:<30} skipped: the --budget-s of {args.budget_s:g} s is spent")
                    continue
                row_batch = batch
                try:
                    cfg = experiment(dataset, tiny, options)
                    if kind == "epoch":
                        r = epoch_row(prepared, cfg, device, batch, 0 if tiny else args.workers)
                    else:
                        if kind == "max":
                            row_batch = find_max_batch(prepared, cfg, device, batch)
                        r = bare_step(prepared, cfg, device, row_batch, warmup, steps,
                                      count_flops=label == "fp32", profile=args.profile and label == "fp32")
                        if label == "fp32":
                            flops = r["flops"]
                except torch.cuda.OutOfMemoryError:
                    print(f"{dataset:<8} {label:<30} {row_batch:>5} out of GPU memory", flush=True)
                    continue
                except Exception as exc:  # report and go on: one broken row should not hide the others
                    failed = True
                    traceback.print_exc(file=sys.stderr)
                    print(f"{dataset:<8} {label:<30} {row_batch:>5} error: {type(exc).__name__}: {exc}", flush=True)
                    continue
                gflop = flops / 1e9
                mfu = (flops * r["samples_s"] / (peak * 1e12)) if peak and flops == flops else None
                print(f"{dataset:<8} {label:<30} {row_batch:>5} {r['step_s']:>8.3f} {r['samples_s']:>10.1f} "
                      f"{r['peak'] / 2**30:>8.2f}G {gflop:>12.2f} {f'{mfu:.1%}' if mfu is not None else 'n/a':>6}  "
                      f"{r.get('note', '')}", flush=True)
    print(f"\nstep s: seconds per step (run_epoch rows: per epoch); peak mem: "
          f"{'torch.cuda.max_memory_allocated' if device.type == 'cuda' else 'process peak RSS'}; "
          f"GFLOP/sample: matmul + conv, forward + backward (the fp32 row's count, used for every row); "
          f"total {time.perf_counter() - began:.0f} s")
    return 1 if failed else 0


def find_max_batch(prepared, cfg: ExperimentConfig, device: torch.device, start: int) -> int:
    """The largest of 16x start, 8x, ... that fits, by cfcml.training.largest_batch on real steps."""
    def step(b: int) -> None:
        bare_step(prepared, cfg, device, b, warmup=1, steps=1, count_flops=False)

    found = largest_batch(step, 16 * start, device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return found


if __name__ == "__main__":
    raise SystemExit(main())
