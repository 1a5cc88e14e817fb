"""The `triton` selective scan: our own fused Mamba-1 scan, forward and backward, in Triton.

    out = (scan(u, softplus(delta + delta_bias), A, B, C) + D u) * silu(z),   shape [B, D, L]

the same function as every backend of cfcml/networks/scan.py (its docstring has the recurrence), and
the semantics of mamba-ssm's `selective_scan_fn(..., delta_softplus=True)` (Gu and Dao, 2023;
github.com/state-spaces/mamba, csrc/selective_scan). The kernels are in `_scan_triton_kernels.py`:

- forward: one program per (sequence, block of BD channels) walks the sequence in tiles of T tokens,
  each tile one `tl.associative_scan`, the fp32 state [BD, N] carried in registers between tiles.
  Fused: softplus(delta + bias), exp(dt A) (as exp2, log2 e folded into A), the D skip and the
  silu(z) gate. Writes the output in u's dtype and one fp32 state per tile, [B, D, N, L/T]: nothing
  of size [B, L, D, N] ever reaches memory.
- backward: walks the tiles the other way, recomputes each tile's states from its saved start
  state, runs the state gradient as a second scan (carried between tiles), and writes all eight
  gradients in one pass.
- `reverse=True` scans from the last token to the first (h[t] = a[t] h[t+1] + b[t]) by walking the
  tiles from the end and loading each tile in descending order, so no flipped copy is made.

Inputs are read through their strides (u, z may be views of the in-projection's output), in fp32,
bf16 or fp16; state and accumulation are fp32. On CPU tensors the kernels run under Triton's
interpreter (NumPy underneath, slow: for tests only), which needs `TRITON_INTERPRET=1` in the
environment; `scan_reference` is the float64 sequential definition the tests compare against.

The pair of kernels is registered as the custom operators `cfcml::selective_scan_fwd` /
`cfcml::selective_scan_bwd` with autograd (torch.library.custom_op + register_autograd +
register_fake), so torch.compile treats the scan as one opaque node, with no graph break, and CUDA
graphs capture its launches.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.util
import os
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

# Tile length T (tokens per scan tile and per saved state) and channel block BD. On CUDA the forward
# and backward each autotune (BD, num_warps) over the configs below. A program holds BD * N * T fp32
# values per [BD, N, T] tensor, several of them live at once (the backward about twice the forward's),
# so these were picked from ptxas's register report of kernels compiled for sm_90 on a machine without
# a GPU (Triton 3.9 and 3.6, N = 16, T = 32, fp32 and bf16, both directions): every config below uses
# 72-128 registers (forward) or 96-251 (backward) with no spills, where T = 64 with BD >= 2, or BD 8 in
# the backward, spilled. Their speed is not measured. Under the interpreter one small fixed shape is used.
TILE = 32
INTERPRET_TILE, INTERPRET_BLOCK_D = 8, 4
_FWD_CONFIGS = ((2, 4), (4, 4), (4, 8), (8, 8))  # (BD, num_warps)
_BWD_CONFIGS = ((1, 4), (2, 4), (2, 8), (4, 8))


# read once (this module is imported only when the backend is used): a plain bool that torch.compile
# traces through, where a cached function call would draw a warning
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set, which lets the kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


@functools.cache
def _kernels(interpret: bool):
    """The kernel module, compiled (interpret False) or interpreted; each is loaded once.

    `triton.jit` decides between a compiled and an interpreted kernel when the kernel is defined, from
    TRITON_INTERPRET; loading the kernel file under two module names with the variable set each way
    gives both flavours in one process, whatever order tests or callers import things in.
    """
    name = "cfcml.networks._scan_triton_kernels" + ("_interpreted" if interpret else "")
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_scan_triton_kernels.py"))
    assert spec is not None and spec.loader is not None  # a .py file always has a source loader
    module: Any = importlib.util.module_from_spec(spec)  # fwd and bwd are set on it below
    before = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
    try:
        sys.modules[name] = module
        spec.loader.exec_module(module)
    finally:
        if before is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = before
    if not interpret:
        import triton

        module.fwd = triton.autotune(
            configs=[triton.Config({"BD": bd}, num_warps=w) for bd, w in _FWD_CONFIGS],
            key=["Dm", "N", "L", "REVERSE"])(module.selective_scan_fwd_kernel)
        # the backward accumulates dB and dC with atomic adds: benchmarking runs must start from zero
        module.bwd = triton.autotune(
            configs=[triton.Config({"BD": bd}, num_warps=w) for bd, w in _BWD_CONFIGS],
            key=["Dm", "N", "L", "REVERSE"], reset_to_zero=["dB_ptr", "dC_ptr"])(module.selective_scan_bwd_kernel)
    return module


def check_can_run(device: torch.device) -> None:
    """Raise ValueError when the triton scan cannot run on `device` (message says what to use instead)."""
    if not _TRITON_INSTALLED:
        raise ValueError("the triton scan needs the triton package (pip install triton; CUDA builds of torch "
                         "ship it); use model.scan auto, chunked or pscan")
    if device.type == "cpu" and not interpreting():
        raise ValueError("the triton scan runs on CUDA tensors, or on CPU tensors only under Triton's interpreter "
                         "(TRITON_INTERPRET=1, slow: for tests); use model.scan auto or chunked on CPU")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"the triton scan runs on CUDA tensors, not {device.type}")


def _npo2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _on(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' (e.g. cuda:1 from cuda:0)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _strides(*tensors: torch.Tensor) -> list[int]:
    return [s for x in tensors for s in x.stride()]


def _shape(u: torch.Tensor, A: torch.Tensor, tile: int | None, block_d: int | None) -> tuple[int, int, int]:
    """(T, NP, BD or 0): the tile length, N padded to a power of two, the channel block (0: autotuned)."""
    interpret = u.device.type == "cpu"
    T = tile or (INTERPRET_TILE if interpret else TILE)
    if T < 1 or T & (T - 1):
        raise ValueError(f"the triton scan's tile must be a power of two, got {T}")
    bd = block_d or (INTERPRET_BLOCK_D if interpret else 0)
    if bd & (bd - 1):
        raise ValueError(f"the triton scan's channel block must be a power of two, got {bd}")
    return T, _npo2(A.shape[1]), bd


@torch.library.custom_op("cfcml::selective_scan_fwd", mutates_args=())
def _fwd_op(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
            D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, reverse: bool, tile: int,
            block_d: int) -> tuple[torch.Tensor, torch.Tensor]:
    bsz, dm, L = u.shape
    N = A.shape[1]
    n_tiles = -(-L // tile)
    out = torch.empty(bsz, dm, L, dtype=u.dtype, device=u.device)
    states = torch.empty(bsz, dm, N, n_tiles, dtype=torch.float32, device=u.device)
    interpret = u.device.type == "cpu"
    mod = _kernels(interpret)
    args = (u, delta, A, B, C, D, z, delta_bias, out, states, dm, N, L, n_tiles,
            *_strides(u, delta, A, B, C, z, out, states))
    meta = {"REVERSE": reverse, "NP": _npo2(N), "T": tile}
    with _on(u.device):
        if block_d:
            mod.selective_scan_fwd_kernel[(bsz, triton_cdiv(dm, block_d))](*args, **meta, BD=block_d)
        else:
            mod.fwd[lambda m: (bsz, triton_cdiv(dm, m["BD"]))](*args, **meta)
    return out, states


@_fwd_op.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, reverse, tile, block_d):
    bsz, dm, L = u.shape
    return (u.new_empty(bsz, dm, L), u.new_empty(bsz, dm, A.shape[1], -(-L // tile), dtype=torch.float32))


@torch.library.custom_op("cfcml::selective_scan_bwd", mutates_args=())
def _bwd_op(g: torch.Tensor, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
            C: torch.Tensor, D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, states: torch.Tensor,
            reverse: bool, tile: int, block_d: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                            torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    bsz, dm, L = u.shape
    N = A.shape[1]
    n_tiles = states.shape[-1]
    dev = u.device
    du = torch.empty(bsz, dm, L, dtype=u.dtype, device=dev)
    ddelta = torch.empty(bsz, dm, L, dtype=delta.dtype, device=dev)
    dz = torch.empty(bsz, dm, L, dtype=z.dtype, device=dev)
    dB = torch.zeros(bsz, N, L, dtype=torch.float32, device=dev)
    dC = torch.zeros(bsz, N, L, dtype=torch.float32, device=dev)
    dA = torch.empty(bsz, dm, N, dtype=torch.float32, device=dev)
    dD = torch.empty(bsz, dm, dtype=torch.float32, device=dev)
    dbias = torch.empty(bsz, dm, dtype=torch.float32, device=dev)
    mod = _kernels(dev.type == "cpu")
    args = (u, delta, A, B, C, D, z, delta_bias, g, states, du, ddelta, dz, dB, dC, dA, dD, dbias,
            dm, N, L, n_tiles, *_strides(u, delta, A, B, C, z, g, states))
    meta = {"REVERSE": reverse, "NP": _npo2(N), "T": tile}
    with _on(dev):
        if block_d:
            mod.selective_scan_bwd_kernel[(bsz, triton_cdiv(dm, block_d))](*args, **meta, BD=block_d)
        else:
            mod.bwd[lambda m: (bsz, triton_cdiv(dm, m["BD"]))](*args, **meta)
    return (du, ddelta, dA.sum(0).to(A.dtype), dB.to(B.dtype), dC.to(C.dtype), dD.sum(0).to(D.dtype), dz,
            dbias.sum(0).to(delta_bias.dtype))


@_bwd_op.register_fake
def _(g, u, delta, A, B, C, D, z, delta_bias, states, reverse, tile, block_d):
    bsz, dm, L = u.shape
    return (u.new_empty(bsz, dm, L), delta.new_empty(bsz, dm, L), A.new_empty(A.shape), B.new_empty(B.shape),
            C.new_empty(C.shape), D.new_empty(D.shape), z.new_empty(bsz, dm, L), delta_bias.new_empty(delta_bias.shape))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, reverse, tile, block_d = inputs
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, output[1])
    ctx.meta = (reverse, tile, block_d)


def _backward(ctx, g_out, g_states):
    u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
    grads = _bwd_op(g_out, u, delta, A, B, C, D, z, delta_bias, states, *ctx.meta)
    return (*grads, None, None, None)


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def selective_scan_triton(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                          D: torch.Tensor, z: torch.Tensor, delta_bias: torch.Tensor, reverse: bool = False,
                          tile: int | None = None, block_d: int | None = None) -> torch.Tensor:
    """The fused scan: out [B, D, L] in u's dtype (module docstring), differentiable in all eight inputs.

    Args:
        u, delta, z: [B, D, L], any strides, float32 / bfloat16 / float16. A: [D, N] (negative).
            B, C: [B, N, L]. D, delta_bias: [D]. All on one device: CUDA, or CPU under TRITON_INTERPRET=1.
        reverse: scan from the last token to the first: out equals the forward scan of the inputs
            flipped along L, flipped back.
        tile: tokens per tile T (a power of two); default TILE on CUDA, INTERPRET_TILE on CPU.
        block_d: channels per program BD (a power of two); default autotuned on CUDA, INTERPRET_BLOCK_D on CPU.

    Raises:
        ValueError: triton missing, CPU tensors without TRITON_INTERPRET=1, mismatched shapes, or a
            tile / block that is not a power of two.
    """
    check_can_run(u.device)
    if u.dim() != 3 or delta.shape != u.shape or z.shape != u.shape:
        raise ValueError(f"u, delta, z must be [B, D, L] alike, got {tuple(u.shape)}, {tuple(delta.shape)}, "
                         f"{tuple(z.shape)}")
    bsz, dm, L = u.shape
    if A.dim() != 2 or A.shape[0] != dm or B.shape != (bsz, A.shape[1], L) or C.shape != B.shape:
        raise ValueError(f"need A [D, N], B and C [B, N, L] for u {tuple(u.shape)}, got A {tuple(A.shape)}, "
                         f"B {tuple(B.shape)}, C {tuple(C.shape)}")
    if D.shape != (dm,) or delta_bias.shape != (dm,):
        raise ValueError(f"D and delta_bias must be [{dm}], got {tuple(D.shape)}, {tuple(delta_bias.shape)}")
    T, _, bd = _shape(u, A, tile, block_d)
    out, _ = _fwd_op(u, delta, A, B, C, D, z, delta_bias, bool(reverse), T, bd)
    return out


def scan_reference(u, delta, A, B, C, D, z, delta_bias, reverse: bool = False) -> torch.Tensor:
    """The definition, one token at a time, in the inputs' dtype (tests run it in float64)."""
    if reverse:
        flip = [x.flip(-1) for x in (u, delta, B, C, z)]
        return scan_reference(flip[0], flip[1], A, flip[2], flip[3], D, flip[4], delta_bias).flip(-1)
    dt = F.softplus(delta + delta_bias[:, None])
    h = u.new_zeros(u.shape[0], u.shape[1], A.shape[1])
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, -1) * F.silu(z)
