"""HEALNet: hybrid early fusion, a shared latent array that attends to each modality in turn.

Hemker, Simidjievski, Jamnik. "HEALNet: Multimodal Fusion for Heterogeneous Biomedical Data."
NeurIPS 2024 (arXiv:2311.09115); the layer order and the normalisations follow the authors' public
code (github.com/konst-int-i/healnet, `healnet/models/healnet.py`, itself built on lucidrains'
perceiver-pytorch). A learned latent array S (the shared space, Perceiver style) is
updated by `depth` fusion layers; in each, S attends to every modality in turn with that modality's
own cross-attention weights (modality-specific parameters, shared latent), then refines itself with
one self-attention. Information of one modality shapes what S asks the next one: cross-modal
interactions are learned inside the network, early, while each modality keeps its own structure.

    S_0 = learned [L, D] latents (L = `latents`, drawn from N(0, 0.02^2)), the same for every patient
    for layer l = 1..depth:
        for each modality m (every image, then the table):
            S = S + CrossAttention_{l,m}(LN(S), LN_{l,m}(X_m));   S = S + FeedForward_{l,m}(S)
        S = S + SelfAttention_l(LN(S));   S = S + FeedForward'_l(S)
    z = LN(mean over the L latents of S)  ->  classifier

X_m for an image modality: its encoder's maps at `stages` as tokens (ImageTokens: Linear C_s -> D
plus a learned (modality, stage) embedding, layer-normalised); for the table, the field tokens.
Each cross-attention normalises its context as well as its queries (the tokenizer's field tokens
are not normalised otherwise). HEALNet attends to the raw inputs (patches and omics, with Fourier
position codes); here, so that all methods share the project's encoders, it attends to the
encoder's stage maps, stage 3 being the earliest used by default. `share_weights` uses one layer's
weights at every depth (HEALNet's weight sharing option). Settings: `model.fusion.healnet`
(`cfcml.config.HealnetConfig`).

The authors' code draws the latents from N(0, 1) and ends in LayerNorm + Linear. Here they end in
the project's classifier head (a ReLU layer of D/8 units), and unit-scale latents, the same for
every patient, dominated the mean latent: on the split-signal cohort of the tests one of five
seeds predicted one constant (held-out macro AUC 0.50), none at N(0, 0.02^2) (lowest 0.82).

An earlier version of this module followed every modality's cross-attention with a self-attention
of its own (4 per layer for three MRI sequences and a table) and left the table's tokens
unnormalised as context. It learned slowly or not at all: held-out macro AUC 0.54 to 0.86 over
seeds 0 to 4 on the tests' split-signal cohort (this version 0.82 to 0.93), and CV macro AUC 0.59
and 0.75 for seeds 0 and 1 on the demo cohort at the demo budget (this version 0.78 and 0.75).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cfcml.config import ModelConfig
from cfcml.networks.fusion.base import FeedForward, FusionModel, ImageTokens
from cfcml.networks.parts import ImageInput


class ModalityUpdate(nn.Module):
    """One modality's step of a fusion layer: cross-attention from the latents (layer-normalised) to
    its tokens (layer-normalised), then a feed-forward block; both residual.

    Args:
        dim: token width D.
        heads: attention heads, dividing `dim`.
    """

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.query_norm = nn.LayerNorm(dim)
        self.context_norm = nn.LayerNorm(dim)
        self.cross = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = FeedForward(dim)

    def forward(self, s: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """s [B, L, D] latents, x [B, N, D] the modality's tokens -> [B, L, D]."""
        context = self.context_norm(x)
        s = s + self.cross(self.query_norm(s), context, context, need_weights=False)[0]
        return s + self.ff(s)


class LatentSelfAttention(nn.Module):
    """The latents' own refinement at the end of a fusion layer: self-attention (pre-norm), then a
    feed-forward block; both residual. Arguments as `ModalityUpdate`."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = FeedForward(dim)

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s [B, L, D] -> [B, L, D]."""
        q = self.norm(s)
        s = s + self.attn(q, q, q, need_weights=False)[0]
        return s + self.ff(s)


class FusionLayer(nn.Module):
    """One fusion layer: a `ModalityUpdate` per modality, in order, then one `LatentSelfAttention`."""

    def __init__(self, dim: int, heads: int, modalities: int):
        super().__init__()
        self.modalities = nn.ModuleList(ModalityUpdate(dim, heads) for _ in range(modalities))
        self.latent = LatentSelfAttention(dim, heads)

    def forward(self, s: torch.Tensor, inputs: Sequence[torch.Tensor]) -> torch.Tensor:
        """s [B, L, D]; inputs: per modality [B, N_m, D] -> [B, L, D]."""
        for step, x in zip(self.modalities, inputs, strict=True):
            s = step(s, x)
        return self.latent(s)


class HEALNet(FusionModel):
    """HEALNet-style hybrid early fusion (module docstring); arguments as `FusionModel`."""

    def __init__(self, images: Sequence[ImageInput], num_numeric: int, cat_cardinalities: Sequence[int],
                 num_classes: int, cfg: ModelConfig):
        super().__init__(images, num_numeric, cat_cardinalities, num_classes, cfg)
        s = cfg.fusion.healnet
        d = cfg.dim
        self.depth = s.depth
        self.image_tokens = ImageTokens([self.stage_channels(m) for m in range(len(self.images))], s.stages, d)
        self.latents = nn.Parameter(torch.randn(s.latents, d) * 0.02)  # not N(0, 1): module docstring
        modalities = len(self.images) + 1
        self.layers = nn.ModuleList(FusionLayer(d, s.heads, modalities)
                                    for _ in range(1 if s.share_weights else s.depth))
        self.out_norm = nn.LayerNorm(d)

    def fuse(self, images: list[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
             cat: torch.Tensor) -> torch.Tensor:
        inputs = self.image_tokens([enc(x) for enc, x in zip(self.encoders, images)])
        inputs.append(self.table_tokens(num, num_missing, cat))
        s = self.latents.expand(inputs[0].shape[0], -1, -1)
        for layer in range(self.depth):
            s = self.layers[min(layer, len(self.layers) - 1)](s, inputs)
        return self.out_norm(s.mean(1))
