"""Benchmark: one selective scan, forward + backward, per backend at the public MEN stage sizes.

    python -m benchmarks.bench_scan [--batch 8] [--repeats 20] [--backends triton chunked mamba_ssm]
    python -m benchmarks.bench_scan --dtype bf16 --reverse

Each row is one Mamba layer's scan at batch 8: 32 sequences (the four orders), N = 16, with the
inputs in the layouts the Mamba block hands over (u and z halves of one projection, B and C slices of
x_proj's output). It prints the median milliseconds of forward + backward, and for `triton` the
bytes its kernels must move by our count (docs/gpu.md, "an estimate") with the bandwidth that
implies. On a machine without CUDA it runs the CPU backends at stage 4 only, with 8 sequences (the
triton rows need a GPU: the interpreter is far too slow to time).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from cfcml.networks.scan import resolve_scan, selective_scan

# (stage, tokens L, inner channels D) of public MEN: 128x128x24 volumes, width 16, expand 2
STAGES = [(2, 6144, 64), (3, 768, 128), (4, 128, 256)]
N = 16


def layer_inputs(seqs: int, d: int, length: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, device=device) * scale + shift

    xz = rand(seqs, length, 2 * d).to(dtype).transpose(1, 2)  # in_proj's output seen as [B, 2D, L]
    u, z = xz.chunk(2, dim=1)
    delta = rand(seqs, length, d, scale=0.5, shift=-1.0).to(dtype).transpose(1, 2)
    dbc = rand(seqs, length, 4 + 2 * N).to(dtype).transpose(1, 2)  # x_proj's (dt, B, C)
    B, C = dbc[:, 4:4 + N], dbc[:, 4 + N:]
    A = -torch.exp(rand(d, N))
    inputs = [u, delta, A, B, C, rand(d), z, rand(d, scale=0.1)]
    return [x.detach().requires_grad_() for x in inputs]


def estimated_bytes(seqs: int, d: int, length: int, elem: int) -> float:
    """Our count of the triton kernels' traffic, forward + backward (docs/gpu.md): 11.5 passes of
    B D L inputs and gradients in the input dtype, the states (T = 32: 2 x N/T of B D L) in fp32 and
    6 passes of B N L (B, C, dB, dC); the atomics' extra traffic is not counted."""
    bdl, bnl = seqs * d * length, seqs * N * length
    return 11.5 * bdl * elem + 2 * (N / 32) * bdl * 4 + 6 * bnl * elem


def time_scan(backend: str, inputs: list[torch.Tensor], reverse: bool, repeats: int) -> float:
    device = inputs[0].device
    grad = torch.randn(inputs[0].shape, device=device, dtype=inputs[0].dtype)

    def step() -> None:
        out = selective_scan(*inputs, backend=backend, reverse=reverse)
        torch.autograd.grad(out, inputs, grad.to(out.dtype))

    step()  # warm-up: compilation, autotuning
    if device.type == "cuda":
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8, help="patients; the scan sees 4x as many sequences")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--reverse", action="store_true")
    parser.add_argument("--backends", nargs="+", default=None)
    args = parser.parse_args()
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    backends = args.backends or (["triton", "chunked", "mamba_ssm"] if cuda else ["chunked", "pscan"])
    seqs = 4 * args.batch if cuda else 8
    stages = STAGES if cuda else STAGES[-1:]
    print(f"device {torch.cuda.get_device_name() if cuda else 'cpu'}; {seqs} sequences, N {N}, {args.dtype}, "
          f"reverse {args.reverse}; auto -> {resolve_scan('auto', torch.device(device))}")
    print(f"{'stage':<6} {'L x D':<11} {'backend':<10} {'ms fwd+bwd':>10} {'est. GB':>8} {'GB/s':>8}")
    for stage, length, d in stages:
        inputs = layer_inputs(seqs, d, length, dtype, device)
        for backend in backends:
            try:
                seconds = time_scan(backend, inputs, args.reverse, args.repeats)
            except (ValueError, ImportError) as err:  # mamba_ssm not installed, triton on CPU
                print(f"{stage:<6} {f'{length}x{d}':<11} {backend:<10} skipped: {err}")
                continue
            est = estimated_bytes(seqs, d, length, inputs[0].element_size()) if backend == "triton" else None
            rate = f"{est / seconds / 1e9:8.0f}" if est else f"{'':>8}"
            est_s = f"{est / 1e9:8.2f}" if est else f"{'':>8}"
            print(f"{stage:<6} {f'{length}x{d}':<11} {backend:<10} {seconds * 1e3:10.2f} {est_s} {rate}")


if __name__ == "__main__":
    main()
