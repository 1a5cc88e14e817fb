"""Training throughput on a GPU: the selective scan per backend, the bare step, CrossValidation.run_epoch,
peak memory, FLOPs, MFU and memory bandwidth.

    PYTHONPATH=. python benchmarks/bench_gpu.py          # from a checkout; or python -m benchmarks.bench_gpu
    PYTHONPATH=. python benchmarks/bench_gpu.py --quick  # one bare-step row and one epoch row per dataset
    PYTHONPATH=. python benchmarks/bench_gpu.py --max-batch --compile   # add those rows
    PYTHONPATH=. python benchmarks/bench_gpu.py --sections scan          # only the scan table
    PYTHONPATH=. python benchmarks/bench_gpu.py --datasets men --batches 8 16 32   # MEN step per backend and batch
    PYTHONPATH=. python benchmarks/bench_gpu.py --sections epoch --patients 400     # run_epoch on a larger cohort

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

The scan table (`--sections scan`, first) times `cfcml.networks.scan.selective_scan` alone, forward
and forward + backward, for every backend present (chunked, pscan, triton when this checkout has it,
mamba_ssm when installed; the others are named as skipped, with the reason) at the three public MEN
stage shapes: 32 sequences (batch 8 x four scan orders), N = 16 states, L x D = 6144 x 64 (stage 2),
768 x 128 (stage 3), 128 x 256 (stage 4). Its GB/s is `scan_bytes` (the least traffic a fused scan
needs, below) over the forward + backward time, and its share of the device's memory bandwidth
(PEAK_BANDWIDTH_TBS; `--peak-tbs` for others).

`cuda graphs` rows run the same step with `train.cuda_graphs` (cfcml/graphs.py): the bare-step rows
use a constant learning rate so that they time replays, not captures. run_epoch rows say what share
of the bare step's samples/s (same batch, same graphs setting) the loader-fed epoch reaches.

Without CUDA it runs the same rows at tiny sizes (the smoke search's model: 32x32x8 volumes, 64x64
photos) so that the script is tested on CPU, and says so. Run time is capped by `--budget-s`
(default 540 s): later rows are skipped with a note when it is spent. One table, exit status 0
(1 only when a row failed for a reason other than running out of GPU memory).
"""
from __future__ import annotations

import argparse
import importlib.util
import math
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
from cfcml.networks.scan import SCAN_BACKENDS, resolve_scan, selective_scan  # noqa: E402
from cfcml.training import CrossValidation, Split, largest_batch  # noqa: E402

# Dense bfloat16 peaks (no sparsity) from the vendors' data sheets, by device-name substring.
PEAK_BF16_TFLOPS = [("H200", 989.0), ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0),
                    ("GH200", 989.0), ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0),
                    ("A10G", 70.0), ("RTX 4090", 165.0)]
# Nominal memory bandwidth (TB/s, HBM or GDDR) from the vendors' data sheets, by device-name substring,
# most specific first (the H100 SXM calls itself "H100 80GB HBM3"; "GH200" contains "H200"). GH200: the
# 96 GB HBM3 part (the 144 GB HBM3e one has 4.9).
PEAK_BANDWIDTH_TBS = [("GH200", 4.0), ("H200", 4.8), ("H100 PCIe", 2.0), ("H100 NVL", 3.9), ("H100", 3.35),
                      ("B200", 8.0), ("A100-SXM4-80GB", 2.039), ("A100 80GB PCIe", 1.935), ("A100", 1.555),
                      ("L40S", 0.864), ("L4", 0.3), ("A10G", 0.6), ("RTX 4090", 1.008)]
# The selective scan at the public MEN stage shapes: (tokens L, inner width D); 32 sequences (batch 8
# x four scan orders) of N = 16 states. Without CUDA one tiny shape.
SCAN_SHAPES = {"stage 2": (6144, 64), "stage 3": (768, 128), "stage 4": (128, 256)}
SCAN_SEQUENCES, SCAN_STATES = 32, 16
TINY_SCAN = {"tiny": (64, 16)}, 4
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


def peak_bandwidth(name: str, override: float | None = None) -> float | None:
    """The device's nominal memory bandwidth in bytes/s: `override` (TB/s), else the table by name."""
    if override:
        return override * 1e12
    for key, value in PEAK_BANDWIDTH_TBS:
        if key in name:
            return value * 1e12
    return None


def scan_bytes(sequences: int, dim: int, length: int, states: int, elem: int = 4) -> tuple[int, int]:
    """(forward, backward) bytes a fused selective scan must move at the least, for `elem`-byte values.

    With BDL = sequences x dim x length and BNL = sequences x states x length (mamba-ssm's layouts:
    u, delta, z, out are [B, D, L]; B, C are [B, N, L]):

    - forward: read u, delta, z (3 BDL) and B, C (2 BNL), write out (BDL): (4 BDL + 2 BNL) x elem;
    - backward (recomputing the states, as mamba-ssm's kernel does): read u, delta, z, d_out (4 BDL)
      and B, C (2 BNL), write du, d_delta, dz (3 BDL) and dB, dC (2 BNL): (7 BDL + 4 BNL) x elem.

    A, D and delta_bias (D x N + 2 D values, and their gradients) are left out: under 0.1% here.
    The hidden states [B, D, N, L] never touch memory in a fused kernel; the chunked and pscan
    backends write and read them, so their achieved GB/s by this count is an effective figure.
    """
    bdl, bnl = sequences * dim * length, sequences * states * length
    return (4 * bdl + 2 * bnl) * elem, (7 * bdl + 4 * bnl) * elem


def scan_backends(device: torch.device) -> list[tuple[str, str | None]]:
    """[(backend, None to run it, or the reason it is skipped)] for the scan and MEN step rows."""
    out: list[tuple[str, str | None]] = [("chunked", None), ("pscan", None)]
    if "triton" not in SCAN_BACKENDS:
        out.append(("triton", "this checkout has no triton scan backend yet"))
    elif device.type != "cuda":
        out.append(("triton", "CUDA only"))
    else:
        out.append(("triton", None))
    if importlib.util.find_spec("mamba_ssm") is None:
        out.append(("mamba_ssm", "mamba-ssm is not installed"))
    elif device.type != "cuda":
        out.append(("mamba_ssm", "CUDA only"))
    else:
        out.append(("mamba_ssm", None))
    return out


def scan_inputs(sequences: int, dim: int, length: int, states: int, device: torch.device) -> list[torch.Tensor]:
    """u, delta, A, B, C, D, z, delta_bias as a Mamba layer feeds them (its initialisation), all with grad."""
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    dt = torch.exp(torch.rand(dim, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
    tensors = [randn(sequences, dim, length), randn(sequences, dim, length, scale=0.5),
               -torch.arange(1, states + 1, dtype=torch.float32).repeat(dim, 1),
               randn(sequences, states, length), randn(sequences, states, length), torch.ones(dim),
               randn(sequences, dim, length), dt + torch.log(-torch.expm1(-dt))]  # softplus^-1(dt)
    return [t.to(device).requires_grad_() for t in tensors]


def scan_row(backend: str, dim: int, length: int, sequences: int, device: torch.device,
             reps: int) -> dict[str, float]:
    """Seconds of one forward (no grad) and of one forward + backward of selective_scan."""
    x = scan_inputs(sequences, dim, length, SCAN_STATES, device)
    grad = torch.randn(sequences, dim, length, generator=torch.Generator().manual_seed(1)).to(device)

    def forward() -> None:
        with torch.no_grad():
            selective_scan(*x, backend=backend)

    def both() -> None:
        selective_scan(*x, backend=backend).backward(grad)

    times = {}
    for name, fn in (("fwd", forward), ("fwd_bwd", both)):
        for _ in range(2):  # kernels compiled and tuned, allocator warm
            fn()
        sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        sync(device)
        times[name] = (time.perf_counter() - start) / reps
    return times


def scan_table(device: torch.device, tiny: bool, bandwidth: float | None, bandwidth_note: str,
               began: float, budget_s: float) -> bool:
    """Print the scan table; returns whether a row failed (not counting out-of-memory)."""
    shapes, sequences = TINY_SCAN if tiny else (SCAN_SHAPES, SCAN_SEQUENCES)
    reps = 3 if tiny else 10
    print(f"\nselective scan, forward + backward, {sequences} sequences, N {SCAN_STATES}, float32; "
          f"GB: scan_bytes (fused minimum); bandwidth: {bandwidth_note}")
    header = (f"{'backend':<10} {'shape':<8} {'L x D':>11} {'fwd ms':>9} {'fwd+bwd ms':>11} {'GB':>7} "
              f"{'GB/s':>8} {'of peak':>8}  note")
    print(header)
    print("-" * len(header))
    failed = False
    for backend, skip in scan_backends(device):
        if skip:
            print(f"{backend:<10} skipped: {skip}")
            continue
        for shape, (length, dim) in shapes.items():
            where = f"{backend:<10} {shape:<8} {f'{length} x {dim}':>11}"
            if time.perf_counter() - began > budget_s:
                print(f"{where} skipped: the --budget-s of {budget_s:g} s is spent")
                continue
            t, error = guarded_row(where, device, scan_row, backend, dim, length, sequences, device, reps)
            failed |= error
            if t is None:
                continue
            moved = sum(scan_bytes(sequences, dim, length, SCAN_STATES))
            rate = moved / t["fwd_bwd"]
            share = f"{rate / bandwidth:.1%}" if bandwidth else "n/a"
            print(f"{where} {t['fwd'] * 1e3:>9.3f} {t['fwd_bwd'] * 1e3:>11.3f} {moved / 1e9:>7.3f} "
                  f"{rate / 1e9:>8.1f} {share:>8}", flush=True)
    print()
    return failed


def guarded_row(where: str, device: torch.device, row: Any, *args: Any) -> tuple[Any, bool]:
    """Run one table row, `row(*args)`: (its result, False); (None, False) when it ran out of GPU memory;
    (None, True) when it raised, with the traceback on stderr and one line naming the row
    (`where`): one broken row must not hide the others. The CUDA cache is emptied after each."""
    try:
        return row(*args), False
    except torch.cuda.OutOfMemoryError:
        print(f"{where} out of GPU memory", flush=True)
        return None, False
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        print(f"{where} error: {type(exc).__name__}: {exc}", flush=True)
        return None, True
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()


def step_table_row(prepared: Any, setting: tuple[str, bool, dict[str, Any]], device: torch.device, kind: str,
                   label: str, row_batch: int, batch: int, warmup: int, steps: int, workers: int, profile: bool,
                   bare: dict[tuple[int, bool], float]) -> tuple[dict[str, Any], int]:
    """One row of the step table, (its figures, the batch it ran at), for the experiment of
    `setting` = (dataset, tiny, row options): a `run_epoch` row (kind "epoch", its note comparing
    it with the bare step at that batch in `bare`), or a bare step at `row_batch` or, for kind
    "max", at the largest batch that fits; the fp32 row at the default `batch` counts the FLOPs
    (and is profiled with `profile`)."""
    cfg = experiment(*setting)
    if kind == "epoch":
        r = epoch_row(prepared, cfg, device, row_batch, workers)
        ref = bare.get((row_batch, bool(cfg.train.cuda_graphs)))
        if ref:
            r["note"] += f"; {r['samples_s'] / ref:.0%} of the bare step"
        if r.get("graphs"):
            r["note"] += f"; {r['graphs']}"
        return r, row_batch
    if kind == "max":
        row_batch = find_max_batch(prepared, cfg, device, batch)
    first = label == "fp32" and row_batch == batch
    return bare_step(prepared, cfg, device, row_batch, warmup, steps, count_flops=first,
                     profile=profile and first), row_batch


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
    # A constant learning rate: the cuda-graphs rows then time replays, not a capture per epoch.
    cfg = cfg.replace({"train.batch_size": batch, "optim.warmup_epochs": 0, "optim.step_size": 10**6})
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
            "flops": flops, "note": graph_note(cv)}


def graph_note(cv: CrossValidation) -> str:
    """What train.cuda_graphs did in a row (captures and replays, or the fallback); "" when off."""
    if not cv.cfg.train.cuda_graphs:
        return ""
    notes = []
    for fold in cv.folds:
        g = fold.graphed
        notes.append("eager (no CUDA)" if g is None else "capture failed, eager" if g.failed
                     else f"{g.captures} capture(s), {g.replays} replays")
    return "graphs: " + "; ".join(dict.fromkeys(notes))  # each distinct outcome once


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
            "note": f"{trained} train + {validated} val rows", "graphs": graph_note(cv)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", choices=list(PUBLIC), default=list(PUBLIC))
    parser.add_argument("--sections", nargs="+", choices=["scan", "step", "epoch"], default=["scan", "step", "epoch"],
                        help="scan: the scan table; step: bare-step rows; epoch: run_epoch rows (with their "
                             "reference bare-step rows)")
    parser.add_argument("--quick", action="store_true", help="one bare-step row and one epoch row per dataset")
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="bare-step batches (default: the dataset's); MEN runs every scan backend at each")
    parser.add_argument("--patients", type=int, default=None, help="synthetic cohort size (default 120; tiny 30)")
    parser.add_argument("--no-graphs", action="store_true", help="leave out the train.cuda_graphs rows")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--workers", type=int, default=4, help="DataLoader workers of the run_epoch rows (CUDA)")
    parser.add_argument("--max-batch", action="store_true", help="add a row at the largest batch that fits")
    parser.add_argument("--compile", action="store_true", help="add a torch.compile row (minutes to compile)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top operators of the fp32 step")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the device's dense bf16 peak")
    parser.add_argument("--peak-tbs", type=float, default=None, help="the device's memory bandwidth, TB/s")
    parser.add_argument("--budget-s", type=float, default=540.0, help="skip rows once this much time is spent")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads (default: 1 without CUDA, where the box may be shared)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    tiny = device.type != "cuda"
    if args.threads or tiny:
        torch.set_num_threads(args.threads or 1)
    sizes = {k: dict(v) for k, v in (TINY if tiny else PUBLIC).items()}
    if args.patients:
        for size in sizes.values():
            size["patients"] = args.patients
    peak, peak_note = peak_tflops(device, args.peak_tflops)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    bandwidth = peak_bandwidth(name, args.peak_tbs) if device.type == "cuda" or args.peak_tbs else None
    bandwidth_note = (f"{bandwidth / 1e12:g} TB/s" + (" (given)" if args.peak_tbs else " (data sheet)") if bandwidth
                      else "unknown: give --peak-tbs" if device.type == "cuda" else "no peak for a CPU")
    began = time.perf_counter()

    print(f"device: {name}; torch {torch.__version__}"
          + (f", CUDA {torch.version.cuda}" if device.type == "cuda" else "")
          + f"; scan auto -> {resolve_scan('auto', device)}; peak: {peak_note}; bandwidth: {bandwidth_note}")
    if tiny:
        print("NO CUDA: tiny sizes (MEN 32x32x8, Derm7pt 64x64, the smoke search's model; one tiny scan shape), "
              "a check that the script runs, not GPU figures")
    failed = False
    if "scan" in args.sections:
        failed |= scan_table(device, tiny, bandwidth, bandwidth_note, began, args.budget_s)
    if "step" not in args.sections and "epoch" not in args.sections:
        return 1 if failed else 0
    header = (f"{'dataset':<8} {'row':<30} {'batch':>5} {'step s':>8} {'samples/s':>10} {'peak mem':>9} "
              f"{'GFLOP/sample':>12} {'MFU':>6}  note")
    print(header)
    print("-" * len(header))
    graphs = not args.no_graphs
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as tmp:
        for dataset in args.datasets:
            size = sizes[dataset]
            batch, steps, warmup = size["batch"], args.steps, args.warmup
            if args.quick:
                steps, warmup = max(2, steps // 2), max(1, warmup - 1)
            t0 = time.perf_counter()
            prepared = prepare(dataset, size, Path(tmp), tiny)
            what = f"(synthetic data + prepare, {size['patients']})"
            print(f"{dataset:<8} {what:<30} {'':>5} {time.perf_counter() - t0:>7.1f}s", flush=True)
            rows = plan_rows(dataset, args, device, tiny, batch, graphs)
            flops = float("nan")
            bare: dict[tuple[int, bool], float] = {}  # (batch, graphs) -> samples/s of the bare fp32 step
            for label, options, kind, row_batch in rows:
                if time.perf_counter() - began > args.budget_s:
                    print(f"{dataset:<8} {label:<30} skipped: the --budget-s of {args.budget_s:g} s is spent")
                    continue
                out, error = guarded_row(
                    f"{dataset:<8} {label:<30} {row_batch:>5}", device, step_table_row, prepared,
                    (dataset, tiny, options), device, kind, label, row_batch, batch, warmup, steps,
                    0 if tiny else args.workers, args.profile, bare)
                failed |= error
                if out is None:
                    continue
                r, row_batch = out
                if kind != "epoch" and label == "fp32" and row_batch == batch:
                    flops = r["flops"]
                if kind == "bare":
                    bare[(row_batch, bool(options.get("train.cuda_graphs")))] = r["samples_s"]
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


Row = tuple[str, dict[str, Any], Any, int]  # label, config overrides, kind (bare/None/epoch/max), batch


def plan_rows(dataset: str, args: argparse.Namespace, device: torch.device, tiny: bool, batch: int,
              graphs: bool) -> list[Row]:
    """The rows of one dataset, in the order they run (so that --budget-s cuts the optional ones)."""
    g = {"train.cuda_graphs": True}
    workers = args.workers if not tiny else 0
    # The fp32 step and the loader-fed epoch first: they answer "how fast, and does the loader keep
    # up" even when --budget-s cuts the optional rows after them.
    rows: list[Row] = [("fp32", {}, "bare", batch)]
    if graphs and not args.quick:
        rows.append(("fp32 + cuda graphs", g, "bare", batch))
    if "epoch" in args.sections:
        rows.append((f"run_epoch ({workers} workers)", {}, "epoch", batch))
        if graphs and not args.quick:
            rows.append((f"run_epoch + cuda graphs ({workers} w)", g, "epoch", batch))
    if args.quick or "step" not in args.sections:
        return rows
    batches = args.batches or [batch]
    auto = resolve_scan("auto", device)
    for b in batches:
        if b != batch:
            rows.append(("fp32", {}, "bare", b))
            if graphs:
                rows.append(("fp32 + cuda graphs", g, "bare", b))
        if dataset != "men":
            continue
        for scan, skip in scan_backends(device):
            label = f"fp32, scan {scan}"
            if skip:
                if b == batches[0]:
                    print(f"{dataset:<8} {label:<30} skipped: {skip}")
                continue
            if scan != auto:
                rows.append((label, {"model.scan": scan}, None, b))
            if graphs and scan in ("triton", "mamba_ssm"):
                rows.append((f"{label} + cuda graphs", {"model.scan": scan, **g}, None, b))
    rows += [("bf16 autocast", {"train.amp": True}, None, batch),
             ("bf16 + channels_last", {"train.amp": True, "train.channels_last": True}, None, batch)]
    if args.max_batch:
        rows.append(("largest batch (fp32)", {}, "max", batch))
    if args.compile:
        rows.append(("fp32 + torch.compile", {"train.compile": True}, None, batch))
    return rows


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
