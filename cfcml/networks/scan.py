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
  triton is installed, else `chunked` (on CPU the fastest path at every MEN stage size measured,
  2-6x mambapy's pscan at the long ones; CHUNK).

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
import math

import torch
import torch.nn.functional as F
from mambapy.pscan import PScan, pscan

SCAN_BACKENDS = ("auto", "sequential", "pscan", "chunked", "mamba_ssm", "triton")
# Tokens per chunk of the chunked scan (powers of two: the sweeps need them). On CPU short chunks stay
# in cache: at the public MEN stage-2 size (8 x 64 x 6144, N 16; one thread) fwd+bwd took 1.4-1.9 s
# with 64-256 tokens, 2.6 s with 512, against 10.2 s for mambapy's pscan. On CUDA every chunk costs
# ~60 kernel launches, so chunks are long there (not measured: no GPU was available, docs/gpu.md).
CHUNK = {"cpu": 128, "cuda": 2048}


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
    if reverse:
        u, delta, B, C, z = (x.flip(-1) for x in (u, delta, B, C, z))
        return selective_scan(u, delta, A, B, C, D, z, delta_bias, backend=name, chunk=chunk).flip(-1)
    if name == "mamba_ssm":
        if u.device.type != "cuda":
            raise ValueError("the mamba_ssm scan runs on CUDA tensors only; use model.scan auto, pscan or chunked")
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn  # optional, CUDA only

        # The kernel's own autocast handling: u/delta/B/C/z in one dtype, A, D, bias in float32.
        dtype = u.dtype
        return selective_scan_fn(u.contiguous(), delta.to(dtype).contiguous(), A.float(), B.to(dtype).contiguous(),
                                 C.to(dtype).contiguous(), D.float(), z=z.to(dtype).contiguous(),
                                 delta_bias=delta_bias.float(), delta_softplus=True)
    with torch.autocast(u.device.type, enabled=False):
        u, z = u.float(), z.float()
        delta = F.softplus(delta.float() + delta_bias.float()[:, None])
        A, B, C = A.float(), B.float(), C.float()
        if name == "sequential":
            y = scan_sequential(u, delta, A, B, C)
        elif name == "pscan":
            y = scan_pscan(u, delta, A, B, C)
        else:
            size = chunk or CHUNK.get(u.device.type, CHUNK["cuda"])
            if size < 1 or size & (size - 1):
                raise ValueError(f"chunk must be a power of two, got {size}")
            y = _ChunkedScan.apply(u, delta, A, B, C, size)
        return (y + D.float()[:, None] * u) * F.silu(z)


# --- the scan proper: y[t] = C[t] . h[t], h[t] = exp(delta[t] A) h[t-1] + delta[t] u[t] B[t] ----------


def scan_sequential(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                    C: torch.Tensor) -> torch.Tensor:
    """One token at a time: [B, D, L] -> [B, D, L]."""
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])  # [B, D, N]
    ys = []
    for t in range(u.shape[-1]):
        dt = delta[..., t, None]  # [B, D, 1]
        h = torch.exp(dt * A) * h + (dt * u[..., t, None]) * B[:, None, :, t]
        ys.append((h * C[:, None, :, t]).sum(-1))
    return torch.stack(ys, dim=-1)


def scan_pscan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
               C: torch.Tensor) -> torch.Tensor:
    """mambapy's parallel scan on the full hidden states: [B, D, L] -> [B, D, L]."""
    dt = delta.transpose(1, 2).unsqueeze(-1)  # [B, L, D, 1]
    decay = torch.exp(dt * A)  # [B, L, D, N]
    drive = (dt * u.transpose(1, 2).unsqueeze(-1)) * B.transpose(1, 2).unsqueeze(2)  # [B, L, D, N]
    h = pscan(decay, drive)  # [B, L, D, N]
    return (h @ C.transpose(1, 2).unsqueeze(-1)).squeeze(-1).transpose(1, 2)


def _npo2(n: int) -> int:
    return 1 << max(math.ceil(math.log2(max(n, 1))), 0)


def _chunk_states(u, delta, A, Bt, h0):
    """Hidden states of one chunk, [B, D, T, N], from the state h0 [B, D, N] before its first token.

    Bt is B transposed to [B, T, N] (contiguous, so the products below come out contiguous, as the
    in-place sweeps need). mambapy's Blelloch sweeps need a power-of-two length: a short chunk is
    padded with zero decay and zero drive at its end, which leaves the real tokens' states unchanged.
    """
    T = u.shape[-1]
    pad = _npo2(T) - T
    if pad:
        u, delta, Bt = F.pad(u, (0, pad)), F.pad(delta, (0, pad)), F.pad(Bt, (0, 0, 0, pad))
    dt = delta.unsqueeze(-1)  # [B, D, T, 1]
    decay = torch.exp(dt * A[:, None, :])  # [B, D, T, N]
    if pad:
        decay[:, :, T:] = 0
    h = (dt * u.unsqueeze(-1)) * Bt.unsqueeze(1)  # the drive delta u B: [B, D, T, N]
    h[:, :, 0] += decay[:, :, 0] * h0
    if h.shape[2] > 1:
        PScan.pscan(decay, h)  # in place: h becomes the states, decay is overwritten
    return h[:, :, :T]


class _ChunkedScan(torch.autograd.Function):
    """Chunk-by-chunk Blelloch scan that saves only its inputs and one state per chunk."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        bsz, d, L = u.shape
        ctx.chunk = chunk
        Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # [B, L, N]
        h = u.new_zeros(bsz, d, A.shape[1])
        starts, ys = [], []
        for s in range(0, L, chunk):
            e = min(s + chunk, L)
            starts.append(h)
            states = _chunk_states(u[..., s:e], delta[..., s:e], A, Bt[:, s:e], h)
            ys.append((states * Ct[:, None, s:e]).sum(-1))  # y = C . h: [B, D, T]
            h = states[:, :, -1]
        ctx.save_for_backward(u, delta, A, B, C, torch.stack(starts))
        return torch.cat(ys, dim=-1)

    @staticmethod
    def backward(ctx, gy):
        """Per chunk, last first: recompute its states h, then with g[t] = dLoss/dh[t] (the reverse
        scan g[t] = C[t] gy[t] + exp(delta[t+1] A) g[t+1]) the gradients are local products. The
        decay's share uses exp(delta[t] A) h[t-1] = h[t] - delta[t] u[t] B[t], so the shifted states
        are never built."""
        u, delta, A, B, C, starts = ctx.saved_tensors
        L = u.shape[-1]
        Bt, Ct = B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous()  # [B, L, N]
        gu, gdelta = torch.empty_like(u), torch.empty_like(delta)
        gBt, gCt = torch.empty_like(Bt), torch.empty_like(Ct)
        gA = torch.zeros_like(A)
        carry = torch.zeros_like(starts[0])  # dLoss/dh at the end of the chunk, from later tokens
        for k in reversed(range(len(starts))):
            s = k * ctx.chunk
            e = min(s + ctx.chunk, L)
            T = e - s
            uc, dc, Bc, Cc, gyc = u[..., s:e], delta[..., s:e], Bt[:, s:e], Ct[:, s:e], gy[..., s:e]
            states = _chunk_states(uc, dc, A, Bc, starts[k])
            pad = _npo2(T) - T
            # g starts as the direct share C[t] gy[t] (+ the carry into the last token), [B, D, T, N]
            g = F.pad(gyc, (0, pad)).unsqueeze(-1) * F.pad(Cc, (0, 0, 0, pad)).unsqueeze(1)
            g[:, :, T - 1] += carry
            if T > 1:
                # a[t] = exp(delta[t + 1] A), 0 from the chunk's last token on
                a = torch.exp(F.pad(dc[..., 1:], (0, 1 + pad)).unsqueeze(-1) * A[:, None, :])
                a[:, :, T - 1:] = 0
                PScan.pscan_rev(a, g)
            g = g[:, :, :T]
            dcu = dc * uc
            g_log_decay = g * (states - dcu.unsqueeze(-1) * Bc.unsqueeze(1))  # dLoss/d(delta[t] A)
            gBu = (g * Bc.unsqueeze(1)).sum(-1)  # sum_n g B: [B, D, T]
            gu[..., s:e] = gBu * dc
            gdelta[..., s:e] = (g_log_decay * A[:, None, :]).sum(-1) + gBu * uc
            gBt[:, s:e] = (g * dcu.unsqueeze(-1)).sum(1)
            gCt[:, s:e] = (states * gyc.unsqueeze(-1)).sum(1)
            gA += (g_log_decay * dc.unsqueeze(-1)).sum((0, 2))
            carry = torch.exp(dc[..., :1].unsqueeze(-1) * A[:, None, :])[:, :, 0] * g[:, :, 0]
        return gu, gdelta, gA, gBt.transpose(1, 2), gCt.transpose(1, 2), None
