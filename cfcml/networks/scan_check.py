"""The self-check of the `triton` scan: on first use on a CUDA device, compare it with `chunked`.

The fused Triton kernels (cfcml/networks/scan_triton.py) were proven under Triton's CPU interpreter,
which does not model everything a GPU does (fast-math exponentials, atomics, register limits, the
compiler's own passes). So the first time a process would run the Triton scan on a CUDA device it
runs the kernels forward and backward at one small shape with every feature on, against the
`chunked` backend on the same device and the same values:

- both directions (`reverse` False and True);
- strided inputs, laid out as the Mamba block hands them over: u and z halves of one [B, L, 2D]
  projection seen as [B, D, L], delta a transposed [B, L, D], B and C slices of one [B, L, R + 2N]
  projection;
- the D skip, the z gate and delta_bias all non-trivial;
- several tiles with a ragged last one (L = 3 T + T / 2 + 1 tokens for the tile length T), a ragged
  channel block (D = 6 channels in blocks of 4) and a state size that is not a power of two (N = 5).

The tolerance (`TOLERANCE`, `SCALE_FLOOR`): for the output and each of the eight gradients (u,
delta, A, B, C, D, z, delta_bias), in both directions (18 tensors), the error is

    max |candidate - chunked| / max(max |chunked|, SCALE_FLOOR)

(relative to the tensor's largest magnitude; absolute where the tensor is smaller than
SCALE_FLOOR = 1e-6); a non-finite value counts as an infinite error. The check passes when every
error is at most TOLERANCE = 1e-3. Both backends compute in float32: under the interpreter the two
agree to about 1e-6 at this shape, and a real fault (a wrong tile carry, a misread stride, a lost
atomic add) is off by 1e-1 or more, so 1e-3 leaves a wide margin either way. Only float32 is
checked; the bfloat16 path of the kernels is not part of the check.

The verdict is kept per process and device (`ScanSelfCheck`): a pass costs the check once, the
kernels' compilation included (Triton's on-disk cache makes later processes faster), then a
dictionary look-up. The check uses a fixed channel block (`CHECK_BLOCK_D`), so it compiles one
configuration per kernel and direction instead of autotuning them. On a compile error, a launch
error or a mismatch, `model.scan: auto` falls back to `chunked` for that process and device with
one `ScanSelfCheckWarning` naming the reason and the largest error; `model.scan: triton` raises
`ScanSelfCheckError` instead. A launch error that leaves the CUDA context unusable (an illegal
memory access) also breaks the fallback; the error then surfaces at the next CUDA call.

No GPU has run this check yet (docs/gpu.md); its logic is tested on CPU with candidates that are
deliberately wrong or raise, and with the real kernels under the interpreter.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

from cfcml.networks.scan_torch import selective_scan_torch

TOLERANCE = 1e-3  # largest error allowed, relative to each tensor's largest magnitude
SCALE_FLOOR = 1e-6  # below this magnitude the error is absolute
CHECK_BLOCK_D = 4  # channels per program in the check (D = 6: a ragged second block)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
Candidate = Callable[..., torch.Tensor]


class ScanSelfCheckError(RuntimeError):
    """`model.scan: triton` was named explicitly and the self-check failed on this device."""


class ScanSelfCheckWarning(UserWarning):
    """`model.scan: auto` fell back from `triton` to `chunked` because the self-check failed."""


@dataclass(frozen=True)
class CheckResult:
    """The verdict of one self-check.

    Attributes:
        device: the device it ran on, e.g. "cuda:0".
        reason: "passed", "mismatch", "compile error" or "launch error" (any other exception).
        errors: the error of each compared tensor ("forward out", "reverse dB", ...); empty when the
            candidate raised.
        detail: for an error, the exception's type and first line; else "".
    """

    device: str
    reason: str
    errors: dict[str, float] = field(default_factory=dict)
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.reason == "passed"

    @property
    def largest(self) -> tuple[str, float] | None:
        """(name, error) of the largest error, None when nothing was compared."""
        if not self.errors:
            return None
        name = max(self.errors, key=lambda k: self.errors[k])
        return name, self.errors[name]

    def describe(self) -> str:
        """One line: the reason, the largest error against the tolerance, the exception if any."""
        largest = self.largest
        where = f"largest error {largest[1]:.2e} ({largest[0]}, tolerance {TOLERANCE:.0e})" if largest \
            else "largest error: none measured (the kernel did not run to the end)"
        text = f"{self.reason} on {self.device}: {where}"
        return f"{text}; {self.detail}" if self.detail else text


def error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max(max |expected|, SCALE_FLOOR); inf when `actual` is not finite."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if actual.shape != expected.shape or not bool(torch.isfinite(actual).all()):
        return math.inf
    scale = max(float(expected.abs().max()) if expected.numel() else 0.0, SCALE_FLOOR)
    return float((actual - expected).abs().max()) / scale if expected.numel() else 0.0


def check_shape(tile: int) -> tuple[int, int, int, int]:
    """(batch, channels, states, length) of the check for tile length `tile`: several tiles, the
    last one ragged, a ragged channel block and a state size that is not a power of two."""
    return 2, 6, 5, 3 * tile + tile // 2 + 1


def _inputs(batch: int, d: int, n: int, length: int, seed: int) -> list[torch.Tensor]:
    """Float32 CPU values with realistic ranges (softplus steps around 0.3, A in about [-8, -0.1])."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    return [rand(batch, d, length), rand(batch, d, length, scale=0.5, shift=-1.0), -torch.exp(rand(d, n)),
            rand(batch, n, length), rand(batch, n, length), rand(d), rand(batch, d, length), rand(d, scale=0.1)]


def _strided(values: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """The Mamba block's layouts on `device`, every sequence tensor a non-contiguous view."""
    u, delta, A, B, C, D, z, bias = values
    bsz, d, length = u.shape
    n = A.shape[1]
    xz = torch.cat([u, z], 1).transpose(1, 2).contiguous().to(device).transpose(1, 2)  # [B, 2D, L] view
    u_v, z_v = xz.chunk(2, dim=1)
    delta_v = delta.transpose(1, 2).contiguous().to(device).transpose(1, 2)
    dbc = torch.cat([torch.zeros(bsz, 3, length), B, C], 1).transpose(1, 2).contiguous().to(device).transpose(1, 2)
    B_v, C_v = dbc[:, 3:3 + n], dbc[:, 3 + n:]
    return [x.detach().requires_grad_() for x in (u_v, delta_v, A.to(device), B_v, C_v, D.to(device), z_v,
                                                   bias.to(device))]


def _reason(exc: BaseException) -> str:
    """"compile error" for Triton's CompilationError and its kinds (matched by class name, so that
    triton need not be imported), "launch error" for anything else."""
    return "compile error" if any("CompilationError" in c.__name__ for c in type(exc).__mro__) else "launch error"


def _one_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[-1] if lines else ''}"[:300]


def compare_with_chunked(candidate: Candidate, device: torch.device | str, tile: int, seed: int = 0) -> CheckResult:
    """Run `candidate` and the `chunked` scan forward and backward on `device`, both directions.

    Args:
        candidate: called as candidate(u, delta, A, B, C, D, z, delta_bias, reverse=bool) and
            returning out [B, D, L]; the Triton scan (`default_candidate`), or in tests a
            deliberately wrong or raising one.
        device: where both run, e.g. "cuda:0" (or "cpu": tests, the interpreter).
        tile: the candidate's tile length T, which sets the check's length (`check_shape`).
        seed: of the input values and the output gradient.

    Returns:
        The `CheckResult`; never raises for what the candidate raises (that is its verdict).
    """
    device = torch.device(device)
    batch, d, n, length = check_shape(tile)
    values = _inputs(batch, d, n, length, seed)
    grad_out = torch.randn(batch, d, length, generator=torch.Generator().manual_seed(seed + 1)).to(device)
    errors: dict[str, float] = {}
    # the first use may come inside validation (no_grad, inference mode) or under autocast
    with torch.inference_mode(False), torch.enable_grad(), torch.autocast(device.type, enabled=False):
        for reverse in (False, True):
            direction = "reverse" if reverse else "forward"
            ref_in = [x.to(device).requires_grad_() for x in values]
            # mypy cannot tell that the unpacked list holds exactly the eight tensor arguments
            ref = selective_scan_torch(*ref_in, backend="chunked", reverse=reverse)  # type: ignore[misc, arg-type]
            ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
            inputs = _strided(values, device)
            try:
                out = candidate(*inputs, reverse=reverse)
                grads = torch.autograd.grad(out, inputs, grad_out.to(out.dtype))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)  # a launch fails asynchronously: surface it here
            except Exception as exc:  # what a failing kernel raises is the verdict, not a crash
                return CheckResult(str(device), _reason(exc), errors, _one_line(exc))
            errors[f"{direction} out"] = error(out, ref)
            errors.update({f"{direction} d{name}": error(g, r) for name, g, r in zip(NAMES, grads, ref_grads)})
    bad = any(not v <= TOLERANCE for v in errors.values())
    return CheckResult(str(device), "mismatch" if bad else "passed", errors)


def default_candidate(*args, reverse: bool = False) -> torch.Tensor:
    """The Triton scan as the check runs it: the default tile, channel block `CHECK_BLOCK_D`."""
    from cfcml.networks.scan_triton import selective_scan_triton  # imports triton

    return selective_scan_triton(*args, reverse=reverse, block_d=CHECK_BLOCK_D)  # type: ignore[misc]


def default_tile(device: torch.device) -> int:
    """The tile length the Triton scan uses on `device` (scan_triton.TILE; INTERPRET_TILE on CPU)."""
    from cfcml.networks import scan_triton

    return scan_triton.INTERPRET_TILE if device.type == "cpu" else scan_triton.TILE


class ScanSelfCheck:
    """Per-process verdicts of the self-check, one per device, and what they make the scan run.

    Args:
        candidate: the backend under test (`compare_with_chunked`); default the Triton scan.
        tile: its tile length; default `default_tile` of the device.
    """

    def __init__(self, candidate: Candidate | None = None, tile: int | None = None):
        self.candidate = candidate or default_candidate
        self.tile = tile
        self.verdicts: dict[str, CheckResult] = {}
        self._warned: set[str] = set()

    def verdict(self, device: torch.device | str) -> CheckResult:
        """The check's result on `device`, run the first time only (each device once)."""
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        key = str(device)
        if key not in self.verdicts:
            tile = self.tile or default_tile(device)
            self.verdicts[key] = compare_with_chunked(self.candidate, device, tile)
        return self.verdicts[key]

    def backend(self, requested: str, device: torch.device | str) -> str:
        """What runs when `requested` resolved to `triton` on `device`.

        Args:
            requested: the `model.scan` asked for: "auto" or "triton".
            device: the device the scan runs on.

        Returns:
            "triton" when the check passed; "chunked" when it failed and `requested` is "auto"
            (one `ScanSelfCheckWarning` per device and process, naming the reason and the largest error).

        Raises:
            ScanSelfCheckError: the check failed and `requested` is "triton" (every call).
            ValueError: `requested` is neither "auto" nor "triton".
        """
        if requested not in ("auto", "triton"):
            raise ValueError(f"the self-check applies to model.scan auto or triton, not {requested!r}")
        result = self.verdict(device)
        if result.ok:
            return "triton"
        if requested == "triton":
            raise ScanSelfCheckError(
                f"model.scan: triton failed its self-check against chunked: {result.describe()}. "
                f"Use model.scan auto (falls back to chunked) or chunked; see docs/gpu.md")
        if result.device not in self._warned:
            self._warned.add(result.device)
            warnings.warn(f"the triton scan failed its self-check against chunked ({result.describe()}); "
                          f"model.scan auto runs chunked in this process on {result.device}",
                          ScanSelfCheckWarning, stacklevel=2)
        return "chunked"


CHECKER = ScanSelfCheck()  # this process's verdicts, used by cfcml.networks.scan.checked_scan
