"""A Mamba block (Gu and Dao, 2023) whose selective scan is chosen by name (cfcml/networks/scan.py).

The layers, their names and their initialisation are those of `mamba_simple.Mamba` in the
`mamba-ssm` package (which the public CFCML code imports) and of mambapy's `MambaBlock`, so a state
dict of either loads: in_proj (no bias) -> x and gate z; causal depthwise conv1d (kernel d_conv)
and SiLU on x; x_proj -> (dt_rank, B, C); dt_proj (dt_rank -> d_inner, bias through softplus);
A = -exp(A_log) with the S4D-real initialisation; skip D; y * silu(z); out_proj (no bias).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cfcml.networks.scan import SCAN_BACKENDS, checked_scan, selective_scan


class Mamba(nn.Module):
    """[B, L, d_model] -> [B, L, d_model]; a causal scan over L.

    Args:
        d_model: token width, >= 1.
        d_state: state size N per inner channel, >= 1 (public MEN code: 16).
        d_conv: causal depthwise convolution width, >= 1 (4).
        expand: inner width d_inner = expand * d_model, >= 1 (2).
        scan: selective scan backend, one of "auto", "sequential", "pscan", "chunked",
            "mamba_ssm", "triton" (cfcml/networks/scan.py); an attribute, so it can be changed after
            building.
        dt_min, dt_max: range of the initial step sizes softplus(dt bias), 0 < dt_min <= dt_max.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, scan: str = "auto",
                 dt_min: float = 0.001, dt_max: float = 0.1, dt_init_floor: float = 1e-4):
        super().__init__()
        for name, value in (("d_model", d_model), ("d_state", d_state), ("d_conv", d_conv), ("expand", expand)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if scan not in SCAN_BACKENDS:
            raise ValueError(f"scan must be one of {', '.join(SCAN_BACKENDS)}, got {scan!r}")
        if not 0 < dt_min <= dt_max:
            raise ValueError(f"need 0 < dt_min <= dt_max, got {dt_min}, {dt_max}")
        self.scan = scan
        self.d_inner = d_inner = expand * d_model
        self.d_state = d_state
        self.dt_rank = dt_rank = math.ceil(d_model / 16)
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=d_conv - 1)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner)
        # mamba_simple's initialisation: small random dt weights; the bias is the inverse softplus of
        # step sizes log-uniform in [dt_min, dt_max], so every channel starts with its own time scale.
        std = dt_rank ** -0.5
        nn.init.uniform_(self.dt_proj.weight, -std, std)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        # S4D-real: A[d, n] = -(n + 1), stored as a log so that A stays negative (a decaying state).
        self.A_log = nn.Parameter(torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).repeat(d_inner, 1))
        self.D = nn.Parameter(torch.ones(d_inner))
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def native_reverse(self, device: torch.device) -> bool:
        """Whether `forward(x, reverse=True)` runs without flipped copies on `device` (the triton scan,
        after its self-check on CUDA: `checked_scan`)."""
        return checked_scan(self.scan, device) == "triton"

    def forward(self, x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
        """x [B, L, d_model] -> [B, L, d_model].

        reverse=True is the block run on the tokens in reverse order, its output flipped back, i.e.
        `forward(x.flip(1)).flip(1)`, computed without the flips: an anti-causal convolution (the
        kernel flipped, taking the last L outputs) and the scan's reverse flag.
        """
        L = x.shape[1]
        xz = self.in_proj(x).transpose(1, 2)  # [B, 2 d_inner, L]
        u, z = xz.chunk(2, dim=1)
        if reverse:  # y[t] = sum_k w[k] u[t + K-1-k]: the flipped kernel, right-padded
            conv = self.conv1d
            u = F.silu(F.conv1d(u, conv.weight.flip(-1), conv.bias, padding=conv.padding, groups=conv.groups)
                       [..., conv.padding[0]:])
        else:
            u = F.silu(self.conv1d(u)[..., :L])  # causal: the left-padded convolution's first L outputs
        dbc = self.x_proj(u.transpose(1, 2))  # [B, L, dt_rank + 2N]
        dt, B, C = dbc.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # [B, d_inner, L]; bias added in the scan
        A = -torch.exp(self.A_log.float())
        y = selective_scan(u, delta, A, B.transpose(1, 2), C.transpose(1, 2), self.D, z, self.dt_proj.bias,
                           backend=self.scan, reverse=reverse)  # [B, d_inner, L]
        # the scan returns float32 (triton, mamba_ssm: u's dtype); the projection's own dtype (autocast
        # casts it further if on)
        return self.out_proj(y.transpose(1, 2).to(self.out_proj.weight.dtype))


def model_scan_backend(model: nn.Module, device: torch.device | str) -> str:
    """The selective scan that `model`'s Mamba blocks actually run on `device` (`checked_scan`: on
    CUDA this runs the triton self-check if it has not run yet in this process).

    Args:
        model: any module; its `Mamba` blocks are looked up.
        device: where the model runs.

    Returns:
        "sequential", "pscan", "chunked", "mamba_ssm" or "triton"; several of them joined by ","
        (sorted) when the blocks differ; "none" when the model has no Mamba block.

    Raises:
        ScanSelfCheckError: a block names `triton` explicitly and its self-check failed on `device`.
    """
    device = torch.device(device)
    names = {checked_scan(m.scan, device) for m in model.modules() if isinstance(m, Mamba)}
    return ",".join(sorted(names)) or "none"
