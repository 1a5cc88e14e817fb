"""The CFCML network: image encoders + tabular tokenizer -> coarse stage (MG-CIE) -> classifier.

docs/model.md, "The network". The fine stage (relationship mining) is a loss on the pooled per-modality
features this module returns, see `cfcml.losses`. Baselines and ablations share this module:

- variant "cfcml": all modalities, coarse stage with the multi-granularity / CIE switches;
- variant "image_only" / "tabular_only": the same coarse stage over a subset of modalities;
- variant "late_concat": each modality encoded alone (last stage pooled), concatenated.

The established fusion methods (`cfcml.config.FUSION_VARIANTS`) are separate networks under
cfcml/networks/fusion/; `build_model` builds whichever `model.variant` names.
"""
from __future__ import annotations

from typing import Sequence, cast

import torch
from torch import nn

from cfcml.config import FUSION_VARIANTS, ModelConfig
from cfcml.networks.encoders import build_encoder
from cfcml.networks.fusion import FUSION_MODELS, FusionModel
from cfcml.networks.parts import ImageInput, ModelOutput, classifier_head, stage_grids
from cfcml.networks.tabular import TabularTokenizer

__all__ = ["CFCML", "CrossmodalEnhancer", "ImageInput", "ModelOutput", "TokenCompressor", "build_model",
           "classifier_head"]


class TokenCompressor(nn.Module):
    """[B, N, C] -> [B, L, D]: a 1D conv treating the N tokens as channels, then Linear C -> D."""

    def __init__(self, n_tokens: int, channels: int, latents: int, dim: int):
        super().__init__()
        self.conv = nn.Conv1d(n_tokens, latents, kernel_size=3, padding=1)
        self.proj = nn.Linear(channels, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(self.conv(x)))


class CrossmodalEnhancer(nn.Module):
    """Per modality m: attention with queries m and keys/values all other modalities' tokens;
    the attended tokens are appended to m's own (L_m -> 2 L_m tokens)."""

    def __init__(self, num_modalities: int, dim: int, heads: int):
        super().__init__()
        self.attn = nn.ModuleList(
            nn.MultiheadAttention(dim, heads, batch_first=True) for _ in range(num_modalities)
        )

    def forward(self, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for m, attn in enumerate(self.attn):
            others = torch.cat([t for k, t in enumerate(tokens) if k != m], dim=1)
            enhanced, _ = attn(tokens[m], others, others, need_weights=False)
            out.append(torch.cat([tokens[m], enhanced], dim=1))
        return out


class CFCML(nn.Module):
    """The network of docs/model.md: one encoder per image modality and a tokenizer of the clinical
    fields, the coarse stage (multi-granularity token compression and crossmodal information
    enhancement, MG-CIE) over them, and a classifier on the concatenated per-modality features.

    Args:
        images: the image modalities in the dataset spec's order (`ImageInput`: 2 or 3 spatial dims,
            channels, the preprocessed size); ignored (may be empty) for variant "tabular_only".
        num_numeric: numeric clinical fields F_num (each one token: value * weight + bias).
        cat_cardinalities: categories of each categorical field, in order (F_cat fields; one
            embedding table shared, each field at its offset).
        num_classes: C, the classes of the task (2 for a binary one).
        cfg: `cfcml.config.ModelConfig`: the encoder, token width `dim` (D), latents per stage,
            attention `heads`, `variant` ("cfcml", "image_only", "tabular_only", "late_concat"; the
            fusion variants are networks of their own, `build_model`), and the ablation switches
            `multi_granularity` (off: stage 4 only) and `cie`.

    Raises:
        ValueError: an image variant without image modalities; `share_encoder` over modalities of
            different dims or channels; a table variant without any field (`TabularTokenizer`).
        cfcml.config.ConfigError: an image size too small for the encoder's four stages (the dry
            run that counts each stage's tokens fails; at least 32 along each in-plane axis).
    """

    def __init__(
        self,
        images: Sequence[ImageInput],
        num_numeric: int,
        cat_cardinalities: Sequence[int],
        num_classes: int,
        cfg: ModelConfig,
    ):
        super().__init__()
        self.cfg = cfg
        self.use_images = cfg.variant != "tabular_only"
        self.use_table = cfg.variant != "image_only"
        self.images = tuple(images) if self.use_images else ()
        if self.use_images and not self.images:
            raise ValueError(f"variant {cfg.variant!r} needs at least one image modality")
        if cfg.share_encoder and len({(i.dims, i.channels) for i in self.images}) > 1:
            raise ValueError("model.share_encoder needs image modalities of the same dims and channels")
        d = cfg.dim

        if cfg.share_encoder and self.images:
            shared = build_encoder(cfg, self.images[0].dims, self.images[0].channels)
            self.encoders = nn.ModuleList([shared] * len(self.images))
        else:
            self.encoders = nn.ModuleList(build_encoder(cfg, i.dims, i.channels) for i in self.images)
        self.tokenizer = TabularTokenizer(num_numeric, tuple(cat_cardinalities), d) if self.use_table else None
        n_tab = num_numeric + len(cat_cardinalities)

        self.num_modalities = len(self.images) + int(self.use_table)
        grids = stage_grids(self.encoders, self.images, cfg.encoder)  # per image modality: [(N_s, C_s), s = 1..4]
        if cfg.variant == "late_concat":
            self.late_proj = nn.ModuleList(nn.Linear(g[-1][1], d) for g in grids)
            if self.use_table:
                self.late_proj.append(nn.Linear(d, d))
        else:
            self.stage_ids = [0, 1, 2, 3] if cfg.multi_granularity else [3]
            latents = [cfg.latents_img] * len(self.images) + ([cfg.latents_tab] if self.use_table else [])
            self.compress = nn.ModuleList()
            for s in self.stage_ids:
                per_mod = [TokenCompressor(g[s][0], g[s][1], cfg.latents_img, d) for g in grids]
                if self.use_table:
                    per_mod.append(TokenCompressor(n_tab, d, cfg.latents_tab, d))
                self.compress.append(nn.ModuleList(per_mod))
            self.cie = cfg.cie and self.num_modalities > 1
            if self.cie:
                self.enhance = nn.ModuleList(
                    CrossmodalEnhancer(self.num_modalities, d, cfg.heads) for _ in self.stage_ids
                )
            factor = len(self.stage_ids) * (2 if self.cie else 1)
            self.fuse = nn.ModuleList(
                nn.Conv1d(factor * lat, lat, kernel_size=3, padding=1) for lat in latents
            )
        self.head = classifier_head(self.num_modalities * d, d, num_classes, cfg.dropout)

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Image encoder parameters (they may train at a smaller learning rate)."""
        return list({id(p): p for p in self.encoders.parameters()}.values())

    def forward(
        self,
        images: Sequence[torch.Tensor],
        num: torch.Tensor,
        num_missing: torch.Tensor,
        cat: torch.Tensor,
    ) -> ModelOutput:
        """Class logits and per-modality features of a batch of B patients.

        Args:
            images: one float tensor [B, channels, *size] per image modality, in `images`' order,
                as `cfcml.data` prepares them (an all-zero image stands for a withheld modality:
                `train.modality_dropout`). Ignored for variant "tabular_only".
            num: float [B, F_num], the numeric fields z-scored with the training fold's mean and
                sd (`cfcml.data.normalize`); 0.0 (any value) where missing.
            num_missing: bool [B, F_num], True where a numeric field is missing (its learned
                missing token replaces it).
            cat: long [B, F_cat], each categorical field's category index, -1 where missing.

        Returns:
            `ModelOutput`: `logits` [B, C] (softmax gives the class probabilities) and `features`
            [B, M, D], one pooled D-vector per modality (image modalities first, the table last;
            M of them), what the fine-stage losses of `cfcml.losses` act on.
        """
        maps = [enc(x) for enc, x in zip(self.encoders, images)] if self.use_images else []
        table = self.tokenizer(num, num_missing, cat) if self.tokenizer is not None else None  # [B, T, D]
        if self.cfg.variant == "late_concat":
            z = [proj(m[-1].flatten(2).mean(-1)) for proj, m in zip(self.late_proj, maps)]
            if table is not None:
                z.append(self.late_proj[-1](table.mean(1)))
        else:
            z = self._coarse(maps, table)
        features = torch.stack(z, dim=1)  # [B, M, D]
        return ModelOutput(self.head(features.flatten(1)), features)

    def _coarse(self, maps: list[list[torch.Tensor]], table: torch.Tensor | None) -> list[torch.Tensor]:
        per_mod: list[list[torch.Tensor]] = [[] for _ in range(self.num_modalities)]
        for k, s in enumerate(self.stage_ids):
            tokens = [m[s].flatten(2).transpose(1, 2) for m in maps]  # [B, N_s, C_s]
            if table is not None:
                tokens.append(table)
            tokens = [comp(t) for comp, t in zip(cast(nn.ModuleList, self.compress[k]), tokens)]  # [B, L_m, D]
            if self.cie:
                tokens = self.enhance[k](tokens)  # [B, 2 L_m, D]
            for m, t in enumerate(tokens):
                per_mod[m].append(t)
        # [B, n_stages * 2 L_m, D] -> [B, L_m, D] -> mean over tokens -> [B, D]
        return [fuse(torch.cat(ts, dim=1)).mean(1) for fuse, ts in zip(self.fuse, per_mod)]


def build_model(spec, cfg: ModelConfig) -> CFCML | FusionModel:
    """Build the network `cfg.variant` names for a `cfcml.data.spec.DatasetSpec`: CFCML (and its
    ablations and simple baselines) or one of the fusion methods of cfcml/networks/fusion/."""
    images = [ImageInput(m.dims, m.channels, tuple(m.size)) for m in spec.modalities]
    network = FUSION_MODELS[cfg.variant] if cfg.variant in FUSION_VARIANTS else CFCML
    return network(
        images,
        num_numeric=len(spec.numeric_fields),
        cat_cardinalities=[len(f.categories) for f in spec.categorical_fields],
        num_classes=len(spec.classes),
        cfg=cfg,
    )
