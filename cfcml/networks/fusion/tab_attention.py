"""Table-guided attention: the table's field tokens attend over the image tokens (MCAT style).

Chen, Lu, Weng, Chen, Williamson, Manz, Shady, Mahmood. "Multimodal Co-Attention Transformer for
Survival Prediction in Gigapixel Whole Slide Images." ICCV 2021: genomic embeddings are the
queries of an attention over the whole-slide image's patch embeddings, so each genomic token
gathers the image regions that matter to it. Here the clinical fields play the genomic role: each
field token asks the images what it needs, which lets a field's meaning depend on what the images
show (the interaction a late fusion cannot represent). TabAttention (Grzeszczyk et al., MICCAI
2023) conditions a CNN's attention modules on the table for the same purpose, inside the encoder.

    K/V = image tokens: every image modality's maps at `stages` (ImageTokens: Linear C_s -> D plus
          a learned (modality, stage) embedding, layer-normalised), all modalities concatenated
    q_0 = the table's field tokens [B, T, D]
    q_l = q_{l-1} + MultiheadAttention(LN(q_{l-1}), K/V);  q_l = q_l + FeedForward(q_l)   l = 1..`layers`
    z = LN(mean over the T fields of q_L)  ->  classifier

MCAT goes on with a transformer over each path and a Kronecker or concatenation fusion; here the
attended field tokens are read out directly. Settings: `model.fusion.tab_attention`
(`cfcml.config.TabAttentionConfig`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cfcml.config import ModelConfig
from cfcml.networks.fusion.base import FeedForward, FusionModel, ImageTokens
from cfcml.networks.parts import ImageInput


class TabAttention(FusionModel):
    """Table-guided cross-attention (module docstring); arguments as `FusionModel`."""

    def __init__(self, images: Sequence[ImageInput], num_numeric: int, cat_cardinalities: Sequence[int],
                 num_classes: int, cfg: ModelConfig):
        super().__init__(images, num_numeric, cat_cardinalities, num_classes, cfg)
        s = cfg.fusion.tab_attention
        d = cfg.dim
        self.image_tokens = ImageTokens([self.stage_channels(m) for m in range(len(self.images))], s.stages, d)
        self.query_norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(s.layers))
        self.attention = nn.ModuleList(nn.MultiheadAttention(d, s.heads, batch_first=True) for _ in range(s.layers))
        self.feed_forward = nn.ModuleList(FeedForward(d) for _ in range(s.layers))
        self.out_norm = nn.LayerNorm(d)

    def fuse(self, images: list[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
             cat: torch.Tensor) -> torch.Tensor:
        kv = torch.cat(self.image_tokens([enc(x) for enc, x in zip(self.encoders, images)]), dim=1)
        q = self.table_tokens(num, num_missing, cat)
        for norm, attn, ff in zip(self.query_norms, self.attention, self.feed_forward):
            q = q + attn(norm(q), kv, kv, need_weights=False)[0]
            q = q + ff(q)
        return self.out_norm(q.mean(1))
