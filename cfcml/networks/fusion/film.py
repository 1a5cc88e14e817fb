"""FiLM: the table scales and shifts the image encoder's feature maps, channel by channel.

Perez, Strub, de Vries, Dumoulin, Courville. "FiLM: Visual Reasoning with a General Conditioning
Layer." AAAI 2018 (arXiv:1709.07871). A FiLM generator maps the conditioning input to a scale
gamma and shift beta per feature map; the FiLM layer computes gamma * F + beta, so the condition
can amplify, suppress or flip what each channel detects, everywhere in the image.

Here the condition is the table (the tokenizer's field tokens, flattened), and the modulated maps
are the outputs of the encoder stages in `model.fusion.film.stages` (default all four; Perez et al.
put a FiLM layer in each residual block of their visual pipeline, after its batch norm). Each image
modality has its own generator, one MLP for all its stages:

    (d_gamma_s, beta_s for s in stages) = Linear(ReLU(Linear(flatten(tokens))))   (hidden width `hidden`)
    F_s <- (1 + d_gamma_s) * F_s + beta_s          after stage s, before stage s + 1
    z = Linear(concat over image modalities of mean over the grid of the last stage)  ->  classifier

The scale is written 1 + d_gamma so that a small generator output is close to the identity (our
choice; the paper predicts gamma directly). The table reaches the classifier only through the
modulation. On Swin the running tokens of a stage are modulated before its layer norm and patch
merging. Settings: `model.fusion.film` (`cfcml.config.FilmConfig`).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cfcml.config import ModelConfig
from cfcml.networks.fusion.base import FusionModel, channelwise, pooled, run_encoder
from cfcml.networks.parts import ImageInput


class FiLM(FusionModel):
    """FiLM (module docstring); arguments as `FusionModel`."""

    def __init__(self, images: Sequence[ImageInput], num_numeric: int, cat_cardinalities: Sequence[int],
                 num_classes: int, cfg: ModelConfig):
        super().__init__(images, num_numeric, cat_cardinalities, num_classes, cfg)
        settings = cfg.fusion.film
        self.stages = tuple(sorted(settings.stages))
        self.widths = [[self.stage_channels(m)[s - 1] for s in self.stages] for m in range(len(self.images))]
        self.generators = nn.ModuleList(
            nn.Sequential(nn.Linear(self.num_fields * cfg.dim, settings.hidden), nn.ReLU(),
                          nn.Linear(settings.hidden, 2 * sum(widths)))
            for widths in self.widths)
        self.readout = nn.Linear(sum(self.stage_channels(m)[-1] for m in range(len(self.images))), cfg.dim)

    def fuse(self, images: list[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
             cat: torch.Tensor) -> torch.Tensor:
        table = self.table_tokens(num, num_missing, cat).flatten(1)
        pools = []
        for m, (enc, x) in enumerate(zip(self.encoders, images)):
            params = self.generators[m](table).split([w for w in self.widths[m] for _ in (0, 1)], dim=1)
            film = {s: (params[2 * k], params[2 * k + 1]) for k, s in enumerate(self.stages)}

            def modulate(s: int, fmap: torch.Tensor, film: dict = film) -> torch.Tensor:
                if s not in film:
                    return fmap
                d_gamma, beta = film[s]
                return (1 + channelwise(d_gamma, fmap)) * fmap + channelwise(beta, fmap)

            pools.append(pooled(run_encoder(enc, x, after_stage=modulate)[-1]))
        return self.readout(torch.cat(pools, dim=1))
