"""Tensor fusion: the outer product of the modalities' vectors, full or low-rank.

Zadeh, Chen, Poria, Cambria, Morency. "Tensor Fusion Network for Multimodal Sentiment Analysis."
EMNLP 2017 (arXiv:1707.07250): each modality m gives a vector z_m; a 1 is appended to each and
their outer product Z = [z_1; 1] x [z_2; 1] x ... holds every unimodal term, every pair's products,
every triple's, and so on: the interactions are explicit, and a linear layer on Z reads them.
Liu, Shen, Lakshminarasimhan, Liang, Zadeh, Morency. "Efficient Low-rank Multimodal Fusion with
Modality-Specific Factors." ACL 2018 (arXiv:1806.00064): the linear layer on Z is factorised into
`rank` modality-specific factors, W = sum over r of W_1^(r) x W_2^(r) x ..., so Z is never formed:

    out = sum over r = 1..rank of  prod over m of  ([z_m; 1] W_m^(r))         (each W_m^(r): (h + 1) x D)

Here the modalities are every image (its last stage, averaged over the grid, then Linear -> h and
ReLU) and the table (its field tokens flattened, Linear -> h, ReLU); h = `hidden`. The full product
has (h + 1)^M entries over M modalities (17^3 = 4913 for Derm7pt's two photos and the table at
h = 16, 17^4 = 83521 for MEN's three volumes and the table): it is used when at most `max_full`,
else the low-rank form. z = LN(Linear(Z)) or LN(the low-rank sum), width D  ->  classifier.
Settings: `model.fusion.tensor_fusion` (`cfcml.config.TensorFusionConfig`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cfcml.config import ModelConfig
from cfcml.networks.fusion.base import FusionModel, pooled
from cfcml.networks.parts import ImageInput


def with_one(z: torch.Tensor) -> torch.Tensor:
    """[B, h] -> [B, h + 1], a 1 appended."""
    return torch.cat([z, z.new_ones(z.shape[0], 1)], dim=1)


def outer_product(vectors: Sequence[torch.Tensor]) -> torch.Tensor:
    """[B, n_1], [B, n_2], ... -> [B, n_1 n_2 ...]: the flattened outer product of each row's vectors."""
    out = vectors[0]
    for v in vectors[1:]:
        out = (out.unsqueeze(-1) * v.unsqueeze(1)).flatten(1)
    return out


class LowRankFusion(nn.Module):
    """Liu et al.'s low-rank multimodal fusion of M vectors [B, n_m] (1 already appended) into [B, D]."""

    def __init__(self, widths: Sequence[int], dim: int, rank: int):
        super().__init__()
        # unit-variance entries: the appended 1 alone gives each factor's projection unit variance,
        # so the product of M projections neither vanishes nor explodes at the start
        self.factors = nn.ParameterList(nn.Parameter(torch.randn(rank, n, dim)) for n in widths)
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, vectors: Sequence[torch.Tensor]) -> torch.Tensor:
        prod = None
        for v, factor in zip(vectors, self.factors):
            proj = torch.einsum("bn,rnd->brd", v, factor)  # [B, rank, D]
            prod = proj if prod is None else prod * proj
        assert prod is not None
        return torch.einsum("brd,r->bd", prod, self.rank_weights) + self.bias


class TensorFusion(FusionModel):
    """Tensor fusion (module docstring); arguments as `FusionModel`. `full` says which form is used."""

    def __init__(self, images: Sequence[ImageInput], num_numeric: int, cat_cardinalities: Sequence[int],
                 num_classes: int, cfg: ModelConfig):
        super().__init__(images, num_numeric, cat_cardinalities, num_classes, cfg)
        s = cfg.fusion.tensor_fusion
        h = s.hidden
        self.image_proj = nn.ModuleList(
            nn.Sequential(nn.Linear(self.stage_channels(m)[-1], h), nn.ReLU()) for m in range(len(self.images)))
        self.table_proj = nn.Sequential(nn.Linear(self.num_fields * cfg.dim, h), nn.ReLU())
        modalities = len(self.images) + 1
        self.product_size = (h + 1) ** modalities
        self.full = self.product_size <= s.max_full
        if self.full:
            self.fusion: nn.Module = nn.Linear(self.product_size, cfg.dim)
        else:
            self.fusion = LowRankFusion([h + 1] * modalities, cfg.dim, s.rank)
        self.out_norm = nn.LayerNorm(cfg.dim)  # a product of M factors varies in scale over M orders

    def fuse(self, images: list[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
             cat: torch.Tensor) -> torch.Tensor:
        vectors = [proj(pooled(enc(x)[-1])) for proj, enc, x in zip(self.image_proj, self.encoders, images)]
        vectors.append(self.table_proj(self.table_tokens(num, num_missing, cat).flatten(1)))
        vectors = [with_one(v) for v in vectors]
        return self.out_norm(self.fusion(outer_product(vectors)) if self.full else self.fusion(vectors))
