"""What every network of `cfcml.networks` shares: its image inputs, its output and its classifier.

CFCML and its variants (cfcml/networks/cfcml.py) and the fusion baselines (cfcml/networks/fusion/)
take the same inputs and return the same `ModelOutput`, so training, metrics and serving treat them
alike.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class ImageInput:
    """What the model needs to know about an image modality."""

    dims: int  # 2 or 3
    channels: int
    size: tuple[int, ...]


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, C]
    # [B, M, D]: CFCML's one pooled vector per modality (table last); a fusion method's one fused vector (M = 1)
    features: torch.Tensor


def classifier_head(in_dim: int, dim: int, num_classes: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, dim), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(dim, max(dim // 8, 1)), nn.ReLU(), nn.Dropout(dropout),
        nn.Linear(max(dim // 8, 1), num_classes),
    )
