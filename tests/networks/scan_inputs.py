"""Selective-scan inputs shared by the scan tests (tests/networks/test_scan.py, test_scan_triton.py)."""
from __future__ import annotations

import torch


def make_inputs(batch: int, d: int, n: int, length: int, seed: int = 0, device: str = "cpu") -> list[torch.Tensor]:
    """Scan inputs in float64 with realistic ranges: softplus steps around 0.3, A in about [-8, -0.1]."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift).to(device)

    return [rand(batch, d, length), rand(batch, d, length, scale=0.5, shift=-1.0), -torch.exp(rand(d, n)),
            rand(batch, n, length), rand(batch, n, length), rand(d), rand(batch, d, length), rand(d, scale=0.1)]
