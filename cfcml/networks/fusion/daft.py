"""DAFT: the dynamic affine feature-map transform inside the image encoder's last residual block.

Pölsterl, Wolf, Wachinger. "Combining 3D Image and Tabular Data via the Dynamic Affine Feature Map
Transform." MICCAI 2021 (arXiv:2107.05990); extended in Wolf et al., NeuroImage 260 (2022). An
auxiliary network looks at both the image's feature maps F (globally average-pooled) and the
patient's table, and outputs a scale alpha and an offset beta per channel; the maps become
alpha * F + beta. The paper places DAFT in the last residual block of a 3D ResNet, where the maps
hold high-level concepts that the table can then excite or suppress.

    h = ReLU(Linear([mean over the grid of F ; flatten(tokens)]))     (C + T D) / r units, r = `bottleneck`
    alpha = act(Linear(h)), beta = Linear(h)                          act = `scale_activation`
    F <- alpha * F + beta            F: the input of the encoder's last residual block
    z = Linear(concat over image modalities of mean over the grid of the last stage)  ->  classifier

The last residual block is that of `cfcml.networks.fusion.base.run_encoder`: res_mamba's last basic
block (3D MEN and 2D alike; the block's shortcut and Mamba layer read the transformed map too),
mamba_resnet's stage-4 residual unit, swin's last transformer block (the Derm7pt encoder; its two
residual branches read the transformed tokens). The table here is the tokenizer's field tokens (the
paper feeds the raw tabular vector), so the tokenizer learns with the rest. With `scale_activation`
linear the scale's bias starts at 1, so the transform starts near the identity; `scale: false` or
`shift: false` leave alpha = 1 or beta = 0 (the paper's ablations). Each image modality has its own
auxiliary network. Settings: `model.fusion.daft` (`cfcml.config.DaftConfig`).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn

from cfcml.config import ModelConfig
from cfcml.networks.fusion.base import FusionModel, channelwise, pooled, run_encoder
from cfcml.networks.parts import ImageInput

_ACTIVATIONS = {"linear": nn.Identity, "sigmoid": nn.Sigmoid, "tanh": nn.Tanh}


class AffineTransform(nn.Module):
    """One DAFT: F [B, C, *grid] and the table vector [B, P] -> alpha * F + beta (module docstring)."""

    def __init__(self, channels: int, table_width: int, bottleneck: int, scale_activation: str = "linear",
                 scale: bool = True, shift: bool = True):
        super().__init__()
        hidden = max(1, round((channels + table_width) / bottleneck))
        self.channels, self.scale, self.shift = channels, scale, shift
        self.aux = nn.Sequential(nn.Linear(channels + table_width, hidden), nn.ReLU(),
                                 nn.Linear(hidden, channels * (int(scale) + int(shift))))
        self.activation = _ACTIVATIONS[scale_activation]()
        if scale and scale_activation == "linear":
            with torch.no_grad():
                cast(nn.Linear, self.aux[-1]).bias[:channels].fill_(1.0)

    def forward(self, fmap: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        out = self.aux(torch.cat([pooled(fmap), table], dim=1))
        if self.scale:
            fmap = channelwise(self.activation(out[:, :self.channels]), fmap) * fmap
        if self.shift:
            fmap = fmap + channelwise(out[:, -self.channels:], fmap)
        return fmap


class DAFT(FusionModel):
    """DAFT (module docstring); arguments as `FusionModel`."""

    def __init__(self, images: Sequence[ImageInput], num_numeric: int, cat_cardinalities: Sequence[int],
                 num_classes: int, cfg: ModelConfig):
        super().__init__(images, num_numeric, cat_cardinalities, num_classes, cfg)
        s = cfg.fusion.daft
        self.transforms = nn.ModuleList(
            AffineTransform(self._last_block_channels(m), self.num_fields * cfg.dim, s.bottleneck,
                            s.scale_activation, s.scale, s.shift)
            for m in range(len(self.images)))
        self.readout = nn.Linear(sum(self.stage_channels(m)[-1] for m in range(len(self.images))), cfg.dim)

    def _last_block_channels(self, m: int) -> int:
        """Channels of the last residual block's input: stage 4's (res_mamba with more than one
        block a layer; swin) or stage 3's (the block that opens stage 4)."""
        enc = self.encoders[m]
        seen: list[int] = []

        def record(fmap: torch.Tensor) -> torch.Tensor:
            seen.append(fmap.shape[1])
            return fmap

        with torch.no_grad():
            was_training = enc.training
            enc.eval()
            try:
                x = torch.zeros(1, self.images[m].channels, *self.images[m].size)
                run_encoder(enc, x, before_last_block=record)
            finally:
                enc.train(was_training)
        return seen[0]

    def fuse(self, images: list[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
             cat: torch.Tensor) -> torch.Tensor:
        table = self.table_tokens(num, num_missing, cat).flatten(1)
        pools = []
        for enc, transform, x in zip(self.encoders, self.transforms, images):
            def tap(f: torch.Tensor, t: nn.Module = transform) -> torch.Tensor:  # this modality's transform
                return t(f, table)

            maps = run_encoder(enc, x, before_last_block=tap)
            pools.append(pooled(maps[-1]))
        return self.readout(torch.cat(pools, dim=1))
