"""HEALNet: hybrid early fusion, a shared latent array that attends to each modality in turn.

Hemker, Simidjievski, Jamnik. "HEALNet: Multimodal Fusion for Heterogeneous Biomedical Data."
NeurIPS 2024 (arXiv:2311.09115). A learned latent array S (the shared space, Perceiver style) is
updated by `depth` fusion layers; in each, S attends to every modality in turn with that modality's
own cross-attention weights (modality-specific parameters, shared latent), and refines itself with
self-attention. Information of one modality shapes what S asks the next one: cross-modal
interactions are learned inside the network, early, while each modality keeps its own structure.

    S_0 = learned [L, D] latents (L = `latents`), the same for every patient
    for layer l = 1..depth, for each modality m (every image, then the table):
        S = S + CrossAttention_{l,m}(LN(S), X_m);   S = S + FeedForward_{l,m}(S)
        S = S + SelfAttention_{l,m}(LN(S));        S = S + FeedForward'_{l,m}(S)
    z = LN(mean over the L latents of S)  ->  classifier

X_m for an image modality: its encoder's maps at `stages` as tokens (ImageTokens: Linear C_s -> D
plus a learned (modality, stage) embedding, layer-normalised); for the table, the field tokens.
HEALNet attends to the raw inputs (patches and omics, with Fourier position codes); here, so that
all methods share the project's encoders, it attends to the encoder's stage maps, stage 3 being the
earliest used by default. `share_weights` uses one layer's weights at every depth (HEALNet's weight
sharing option). Settings: `model.fusion.healnet` (`cfcml.config.HealnetConfig`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from cfcml.config import ModelConfig
from cfcml.networks.fusion.base import FeedForward, FusionModel, ImageTokens
from cfcml.networks.parts import ImageInput


class LatentUpdate(nn.Module):
    """One modality's step of a fusion layer: cross-attention from the latents to its tokens, then
    self-attention among the latents, each followed by a feed-forward block (module docstring)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.cross_norm = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.cross_ff = FeedForward(dim)
        self.self_norm = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.self_ff = FeedForward(dim)

    def forward(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        s = s + self.cross(self.cross_norm(s), x, x, need_weights=False)[0]
        s = s + self.cross_ff(s)
        q = self.self_norm(s)
        s = s + self.self_attn(q, q, q, need_weights=False)[0]
        return s + self.self_ff(s)


class HEALNet(FusionModel):
    """HEALNet-style hybrid early fusion (module docstring); arguments as `FusionModel`."""

    def __init__(self, images: Sequence[ImageInput], num_numeric: int, cat_cardinalities: Sequence[int],
                 num_classes: int, cfg: ModelConfig):
        super().__init__(images, num_numeric, cat_cardinalities, num_classes, cfg)
        s = cfg.fusion.healnet
        d = cfg.dim
        self.depth = s.depth
        self.image_tokens = ImageTokens([self.stage_channels(m) for m in range(len(self.images))], s.stages, d)
        self.latents = nn.Parameter(torch.randn(s.latents, d) * 0.02)
        modalities = len(self.images) + 1
        self.layers = nn.ModuleList(
            nn.ModuleList(LatentUpdate(d, s.heads) for _ in range(modalities))
            for _ in range(1 if s.share_weights else s.depth))
        self.out_norm = nn.LayerNorm(d)

    def fuse(self, images: list[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
             cat: torch.Tensor) -> torch.Tensor:
        inputs = self.image_tokens([enc(x) for enc, x in zip(self.encoders, images)])
        inputs.append(self.table_tokens(num, num_missing, cat))
        s = self.latents.expand(inputs[0].shape[0], -1, -1)
        for layer in range(self.depth):
            steps = cast(nn.ModuleList, self.layers[min(layer, len(self.layers) - 1)])
            for step, x in zip(steps, inputs):
                s = step(s, x)
        return self.out_norm(s.mean(1))
