"""What every network of `cfcml.networks` shares: its image inputs, its output and its classifier.

CFCML and its variants (cfcml/networks/cfcml.py) and the fusion baselines (cfcml/networks/fusion/)
take the same inputs and return the same `ModelOutput`, so training, metrics and serving treat them
alike.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from cfcml.config import ConfigError


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


@torch.no_grad()
def stage_grids(encoders: Iterable[nn.Module], images: Sequence[ImageInput], encoder: str,
                extra_channels: int = 0) -> list[list[tuple[int, int]]]:
    """Per image modality, (tokens N_s, channels C_s) of each encoder stage, from one dry run of
    a batch of 1 in eval mode (each encoder's mode restored after).

    Args:
        encoders: one image encoder per modality, returning its stages' feature maps.
        images: the modalities (channels, spatial size).
        encoder: the `model.encoder` name, for the error message.
        extra_channels: channels added to every image's input (early fusion's table channels).

    Raises:
        ConfigError: an image too small for the encoder (instance norm needs more than one voxel
            per channel even in eval mode, so a single-voxel stride-16 stage fails in the dry run).
    """
    out = []
    for enc, img in zip(encoders, images):
        was_training = enc.training
        enc.eval()
        try:
            feats = enc(torch.zeros(1, img.channels + extra_channels, *img.size))
        except ValueError as exc:
            raise ConfigError(
                f"image size {tuple(img.size)} is too small for the {encoder} encoder "
                f"({exc}); use at least 32 along each in-plane axis "
                f"(train.image_size / prepare --image-size)") from None
        finally:
            enc.train(was_training)
        out.append([(int(f[0, 0].numel()), int(f.shape[1])) for f in feats])
    return out
