"""The pure-PyTorch backends of the selective scan (`sequential`, `pscan`, `chunked`; the maths and
the layouts are in `cfcml.networks.scan`'s docstring). The chunked one is the reference the fused
Triton kernels are checked against at run time (`cfcml.networks.scan_check`) and in the tests.

They compute in float32 whatever the autocast dtype: exp(delta * A) and a long product of them lose
too much in bfloat16.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from mambapy.pscan import PScan, pscan

TORCH_BACKENDS = ("sequential", "pscan", "chunked")
# Tokens per chunk of the chunked scan (powers of two: the sweeps need them). On CPU short chunks stay
# in cache; on CUDA every chunk costs ~60 kernel launches, so chunks are long there (not tuned on a
# GPU). The CPU timings that chose 128: docs/gpu.md, "The selective scan".
CHUNK = {"cpu": 128, "cuda": 2048}




def selective_scan_torch(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, backend: str = "chunked",
                         chunk: int | None = None, reverse: bool = False) -> torch.Tensor:
    """y = (scan(u, softplus(delta + delta_bias), A, B, C) + D u) * silu(z) in float32, shape [B, D, L].

    Args:
        u, delta, z: [B, D, L]. A: [D, N] (negative). B, C: [B, N, L]. D, delta_bias: [D].
        backend: "sequential", "pscan" or "chunked".
        chunk: tokens per chunk of `chunked`, a power of two; default CHUNK for the device.
        reverse: scan from the last token to the first (through flipped copies).

    Raises:
        ValueError: another backend; a chunk that is not a power of two.
    """
    if backend not in TORCH_BACKENDS:
        raise ValueError(f"not a PyTorch scan backend: {backend!r}; expected one of {', '.join(TORCH_BACKENDS)}")
    if reverse:
        u, delta, B, C, z = (x.flip(-1) for x in (u, delta, B, C, z))
        return selective_scan_torch(u, delta, A, B, C, D, z, delta_bias, backend, chunk).flip(-1)
    name = backend
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
