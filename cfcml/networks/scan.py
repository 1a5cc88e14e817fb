"""The selective scan of a Mamba block, with interchangeable backends (`model.scan`).

For every batch row b, channel d and state n, with the sequence along the last axis:

    h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t],     h[-1] = 0
    y[t] = sum_n C[t, n] * h[t, n] + D * u[t]                        then  y * silu(z)

where delta = softplus(delta_raw + delta_bias). Layouts follow the CUDA kernel of `mamba-ssm`:
u, delta, z are [B, D, L]; A is [D, N]; B and C are [B, N, L]; D and delta_bias are [D].

Backends (all give the same numbers to float32 rounding; tests/networks/test_scan.py checks it):

- `sequential`: the recurrence as written, one step per token. The reference; slow for long
  sequences (autograd records L steps).
- `pscan`: mambapy's parallel (Blelloch) scan under autograd, on the full [B, L, D, N] hidden
  states, which autograd keeps for the backward pass.
- `chunked`: mambapy's Blelloch sweeps run chunk by chunk (CHUNK tokens) inside one autograd
  function whose backward recomputes each chunk's hidden states from the state saved at the chunk's
  start, instead of keeping [B, L, D, N] tensors alive from forward to backward. Memory per scan
  drops from several copies of the hidden states to one chunk's worth; the backward is the
  reverse scan of the same sweeps (see `_ChunkedScan.backward`). Runs on CPU and CUDA.
- `mamba_ssm`: the fused CUDA kernel of the `mamba-ssm` package (optional; CUDA tensors only). It
  never writes the hidden states to memory at all and fuses softplus, D and the silu gate.
- `triton`: our own fused kernels in Triton (cfcml/networks/scan_triton.py): forward and backward
  each one kernel that keeps the state in registers, saves one state per tile of 64 tokens and
  recomputes the rest in the backward; fuses softplus, D and the silu gate; a `reverse` flag scans
  from the end without a flipped copy. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1 (tests).
- `auto`: `mamba_ssm` for CUDA tensors when the package is installed, else `triton` on CUDA when
  triton is installed, else `chunked` (on CPU the fastest path at every MEN stage size, faster
  than mambapy's pscan most at the long ones; the timings are in docs/gpu.md, "The selective scan").

The self-check (cfcml/networks/scan_check.py): the first time a process would run `triton` on a
CUDA device (through `auto` or by name) it compares the kernels with `chunked` at a small shape,
forward and backward, once per device. On a failure `auto` falls back to `chunked` with one warning,
and `triton` named explicitly raises `ScanSelfCheckError`. `checked_scan` says what runs.

The pure-PyTorch backends compute in float32 whatever the autocast dtype: exp(delta * A) and a
long product of them lose too much in bfloat16. `mamba_ssm` and `triton` take bfloat16 inputs and
keep their state and sums in float32 inside the kernel.

`reverse=True` runs every backend from the last token to the first (the forward scan of the inputs
flipped along L, flipped back): `triton` natively, the others through flipped copies.
"""
from __future__ import annotations

import functools
import importlib.util

import torch

from cfcml.networks.scan_torch import (  # noqa: F401 (the PyTorch backends, re-exported)
    CHUNK,
    TORCH_BACKENDS,
    scan_pscan,
    scan_sequential,
    selective_scan_torch,
)

SCAN_BACKENDS = ("auto", "sequential", "pscan", "chunked", "mamba_ssm", "triton")
@functools.cache
def mamba_ssm_available() -> bool:
    """Whether the optional `mamba-ssm` package (the fused CUDA selective scan) is installed."""
    return importlib.util.find_spec("mamba_ssm") is not None


@functools.cache
def triton_available() -> bool:
    """Whether `triton` (the compiler of the `triton` backend) is installed; checked without importing it."""
    return importlib.util.find_spec("triton") is not None


def resolve_scan(backend: str, device: torch.device) -> str:
    """The backend `auto` stands for on `device`; other names are checked and returned as they are.

    `auto` is `mamba_ssm` on CUDA when mamba-ssm is installed, else `triton` on CUDA when triton is,
    else `chunked`. Raises ValueError for an unknown name.
    """
    if backend not in SCAN_BACKENDS:
        raise ValueError(f"unknown scan backend {backend!r}; expected one of {', '.join(SCAN_BACKENDS)}")
    if backend != "auto":
        return backend
    if device.type == "cuda" and mamba_ssm_available():
        return "mamba_ssm"
    if device.type == "cuda" and triton_available():
        return "triton"
    return "chunked"


def checked_scan(backend: str, device: torch.device) -> str:
    """The backend that actually runs for `backend` on `device`: `resolve_scan`, then for `triton` on a
    CUDA device the self-check's verdict (cfcml/networks/scan_check.py; run on the first call per
    device and process, then cached).

    Args:
        backend: a `model.scan` value: "auto", "sequential", "pscan", "chunked", "mamba_ssm" or "triton".
        device: where the scan runs.

    Returns:
        One of "sequential", "pscan", "chunked", "mamba_ssm", "triton": "chunked" where `auto`
        resolved to `triton` on CUDA and the self-check failed (one ScanSelfCheckWarning).

    Raises:
        ValueError: an unknown backend.
        ScanSelfCheckError: `triton` named explicitly and its self-check failed on this CUDA device.
    """
    device = torch.device(device)
    name = resolve_scan(backend, device)
    if name != "triton" or device.type != "cuda":
        return name  # CPU: the interpreter path as before (tests), no check
    from cfcml.networks.scan_check import CHECKER

    return CHECKER.backend(backend, device)


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    z: torch.Tensor,
    delta_bias: torch.Tensor,
    backend: str = "auto",
    chunk: int | None = None,
    reverse: bool = False,
) -> torch.Tensor:
    """y = (scan(u, softplus(delta + delta_bias), A, B, C) + D u) * silu(z), shape [B, D, L].

    Args:
        u, delta, z: [B, D, L]. A: [D, N] (negative). B, C: [B, N, L]. D, delta_bias: [D].
        backend: "auto", "sequential", "pscan", "chunked", "mamba_ssm" or "triton" (module docstring).
        chunk: tokens per chunk of the chunked scan, a power of two; default CHUNK for the device.
        reverse: scan from the last token to the first (h[t] depends on t..L-1); the same as flipping
            u, delta, B, C, z along L, scanning, and flipping the output back.

    Returns:
        [B, D, L]: float32 from the PyTorch backends, u's dtype from `triton` and `mamba_ssm`.

    Raises:
        ValueError: an unknown backend; `mamba_ssm` on CPU tensors; `triton` without the triton
            package or on CPU tensors without TRITON_INTERPRET=1; a chunk that is not a power of two.
        ScanSelfCheckError: `triton` named explicitly and its self-check failed on this CUDA device
            (`checked_scan`; `auto` falls back to `chunked` instead).
    """
    name = checked_scan(backend, u.device)
    if name == "triton":
        from cfcml.networks.scan_triton import selective_scan_triton  # lazy: imports triton on first use

        return selective_scan_triton(u, delta, A, B, C, D, z, delta_bias, reverse=reverse)
    if name in ("sequential", "pscan", "chunked"):
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, backend=name, chunk=chunk,
                                    reverse=reverse)
    if reverse:
        u, delta, B, C, z = (x.flip(-1) for x in (u, delta, B, C, z))
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, backend=name).flip(-1)
    if name == "mamba_ssm":
        if u.device.type != "cuda":
            raise ValueError("the mamba_ssm scan runs on CUDA tensors only; use model.scan auto, pscan or chunked")
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # optional, CUDA only

        # The kernel's own autocast handling: u/delta/B/C/z in one dtype, A, D, bias in float32.
        dtype = u.dtype
        return selective_scan_fn(u.contiguous(), delta.to(dtype).contiguous(), A.float(), B.to(dtype).contiguous(),
                                 C.to(dtype).contiguous(), D.float(), z=z.to(dtype).contiguous(),
                                 delta_bias=delta_bias.float(), delta_softplus=True)
    raise AssertionError(f"checked_scan returned an unknown scan {name!r}")  # unreachable

