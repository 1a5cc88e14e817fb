"""Early fusion: the table as extra constant channels of every image, at the encoder's input.

The oldest way to give an image network tabular data (e.g. the "early fusion" baselines of
Pölsterl et al., MICCAI 2021, and of Hemker et al., NeurIPS 2024, and the "channel-wise
concatenation" of fusilli): a vector t from the table is broadcast over the image grid and
concatenated to the image's channels, so the encoder's first convolution (or patch embedding) sees
image and table together and every later layer can mix them.

    t = W flatten(tokens) (`source: tokens`, k = `channels` values)   or   the raw normalised table
    encoder_m([image_m ; t broadcast over the grid])  ->  last stage map G_m
    z = Linear(concat over image modalities of mean over the grid of G_m)  ->  classifier

`source: raw` is the normalised table itself, as a non-learned vector: each numeric value (0 where
missing) and its missing flag, then each categorical field one-hot (all zero where missing); the
tokenizer is then not built. Settings: `model.fusion.early_fusion` (`cfcml.config.EarlyFusionConfig`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cfcml.config import ModelConfig
from cfcml.networks.fusion.base import FusionModel, pooled
from cfcml.networks.parts import ImageInput


class EarlyFusion(FusionModel):
    """Early fusion (module docstring); arguments as `FusionModel`.

    Raises:
        ValueError: `source: raw` without any clinical field.
    """

    cat_offsets: torch.Tensor  # buffer registered in __init__

    def __init__(self, images: Sequence[ImageInput], num_numeric: int, cat_cardinalities: Sequence[int],
                 num_classes: int, cfg: ModelConfig):
        settings = cfg.fusion.early_fusion
        raw = settings.source == "raw"
        width = 2 * num_numeric + sum(cat_cardinalities) if raw else settings.channels
        if width == 0:
            raise ValueError("model.fusion.early_fusion.source raw: the table has no field to add as a channel")
        super().__init__(images, num_numeric, cat_cardinalities, num_classes, cfg, extra_channels=width,
                         tokenizer=not raw)
        self.raw = raw
        if not raw:
            self.table_proj = nn.Linear(self.num_fields * cfg.dim, width)
        offsets = torch.tensor([0, *self.cat_cardinalities[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("cat_offsets", offsets[: len(self.cat_cardinalities)], persistent=False)
        self.readout = nn.Linear(sum(self.stage_channels(m)[-1] for m in range(len(self.images))), cfg.dim)

    def table_vector(self, num: torch.Tensor, num_missing: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """[B, k]: the table's channels (module docstring)."""
        if not self.raw:
            return self.table_proj(self.table_tokens(num, num_missing, cat).flatten(1))
        missing = num_missing.bool()
        values = num.masked_fill(missing, 0.0)  # NaN where missing must not reach the image
        parts = [values, missing.to(values.dtype)]
        if self.cat_cardinalities:
            hot = F.one_hot(cat.clamp(min=0) + self.cat_offsets, sum(self.cat_cardinalities)).to(values.dtype)
            parts.append((hot * (cat >= 0).unsqueeze(-1).to(values.dtype)).sum(1))  # [B, sum of cardinalities]
        return torch.cat(parts, dim=1)

    def fuse(self, images: list[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
             cat: torch.Tensor) -> torch.Tensor:
        t = self.table_vector(num, num_missing, cat)
        pools = []
        for enc, x in zip(self.encoders, images):
            planes = t.reshape(*t.shape, *([1] * (x.dim() - 2))).expand(-1, -1, *x.shape[2:]).to(x.dtype)
            pools.append(pooled(enc(torch.cat([x, planes], dim=1))[-1]))
        return self.readout(torch.cat(pools, dim=1))
