"""What the fusion methods share: the project's image encoders and tabular tokenizer, the classifier.

Each method of this package is a `FusionModel`: one image encoder per image modality, built by
`cfcml.networks.encoders.build_encoder` exactly as CFCML builds them (`model.encoder`,
`model.share_encoder`, `model.pretrained`), the `TabularTokenizer` (one D-dim token per clinical
field, a learned token where a value is missing), and CFCML's classifier head on one fused vector
of width D = `model.dim`. Only `fuse` differs between methods.

`run_encoder` runs an encoder stage by stage with two optional taps, so a method can act inside the
encoder without a copy of it: `after_stage(s, F)` replaces stage s's map F ([B, C_s, *grid]; as
the stage's output and as the next stage's input), and `before_last_block(F)` replaces the input of
the encoder's last residual block. With no tap it is `encoder(x)`, the same function.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import cast

import torch
import torch.nn.functional as F

from cfcml import _monai

_monai.light()  # only the MONAI modules used, not all of MONAI (see cfcml._monai)
from monai.networks.nets.swin_unetr import BasicLayer, compute_mask, get_window_size  # noqa: E402
from torch import nn  # noqa: E402

from cfcml.config import ModelConfig  # noqa: E402
from cfcml.networks.encoders import MambaResEncoder, SwinEncoder, build_encoder  # noqa: E402
from cfcml.networks.parts import ImageInput, ModelOutput, classifier_head, stage_grids  # noqa: E402
from cfcml.networks.res_mamba import ResMambaEncoder  # noqa: E402
from cfcml.networks.tabular import TabularTokenizer  # noqa: E402

StageTap = Callable[[int, torch.Tensor], torch.Tensor]
BlockTap = Callable[[torch.Tensor], torch.Tensor]


def run_encoder(encoder: nn.Module, x: torch.Tensor, after_stage: StageTap | None = None,
                before_last_block: BlockTap | None = None) -> list[torch.Tensor]:
    """The four stage maps of `encoder` (as `encoder(x)` returns them), with the taps of the module
    docstring applied. The last residual block is: res_mamba's last basic block of its last layer;
    mamba_resnet's residual unit of stage 4 (before that stage's Mamba mixer); swin's last
    transformer block of its last layer (which adds attention and then an MLP to its input: two
    residual branches). A tap receives and returns channels-first maps, whatever the encoder.

    Raises:
        TypeError: an encoder this function does not know, with a tap.
    """
    if after_stage is None and before_last_block is None:
        return encoder(x)
    stage_tap: StageTap = after_stage or (lambda _s, f: f)
    if isinstance(encoder, ResMambaEncoder):
        x = stage_tap(1, encoder.stem(x))
        feats = [x]
        for s, layer in zip((2, 3, 4), cast(Iterable[nn.Sequential], encoder.layers)):
            if s == 4 and before_last_block is not None:
                for block in cast(nn.Sequential, layer[:-1]):  # a slice of a Sequential is one
                    x = block(x)
                x = layer[-1](before_last_block(x))
            else:
                x = layer(x)
            x = stage_tap(s, x)
            feats.append(x)
    elif isinstance(encoder, MambaResEncoder):
        feats = []
        for s, stage in enumerate(cast(Iterable[nn.Sequential], encoder.stages), start=1):
            if s == 4 and before_last_block is not None:
                x = stage[0](before_last_block(x))
                for module in cast(nn.Sequential, stage[1:]):
                    x = module(x)
            else:
                x = stage(x)
            x = stage_tap(s, x)
            feats.append(x)
    elif isinstance(encoder, SwinEncoder):
        swin = encoder.swin
        x = swin.pos_drop(swin.patch_embed(x)).movedim(1, -1)  # [B, *grid, C]
        feats = []
        for s, layers in enumerate((swin.layers1, swin.layers2, swin.layers3, swin.layers4), start=1):
            basic = cast(BasicLayer, layers[0])
            x = _swin_blocks(basic, x, before_last_block if s == 4 else None)
            x = stage_tap(s, x.movedim(-1, 1)).movedim(1, -1)
            feats.append(F.layer_norm(x, x.shape[-1:]).movedim(-1, 1))
            if basic.downsample is not None:
                x = basic.downsample(x)
    else:
        raise TypeError(f"run_encoder does not know the stages of {type(encoder).__name__}")
    feats[-1] = encoder.cam_tap(feats[-1])
    return feats


def _swin_blocks(layer: BasicLayer, x: torch.Tensor, before_last: BlockTap | None) -> torch.Tensor:
    """`cfcml.networks.encoders._swin_blocks` (channels last), with `before_last` (channels first)
    applied to the last block's input."""
    grid = tuple(x.shape[1:-1])
    window, shift = get_window_size(grid, layer.window_size, layer.shift_size)
    padded = [math.ceil(g / w) * w for g, w in zip(grid, window)]
    mask = compute_mask(padded, window, shift, x.device)
    last = len(layer.blocks) - 1
    for i, block in enumerate(layer.blocks):
        if i == last and before_last is not None:
            x = before_last(x.movedim(-1, 1)).movedim(1, -1)
        x = block(x, mask)
    return x


def pooled(fmap: torch.Tensor) -> torch.Tensor:
    """Global average over the grid: [B, C, *grid] -> [B, C]."""
    return fmap.flatten(2).mean(-1)


def channelwise(v: torch.Tensor, fmap: torch.Tensor) -> torch.Tensor:
    """[B, C] -> [B, C, 1, ...], broadcastable against `fmap` [B, C, *grid]."""
    return v.reshape(*v.shape, *([1] * (fmap.dim() - 2)))


class FusionModel(nn.Module):
    """Base of the fusion methods: encoders, tokenizer and head as the module docstring says.

    A subclass implements `fuse(images, num, num_missing, cat) -> [B, D]`. The output's `features`
    is that fused vector as one "modality" ([B, 1, D]; `num_modalities` = 1), so CFCML's fine-stage
    loss, meant for per-modality features, is off for these methods (`loss.fine: false`).

    Args:
        images: the image modalities (at least one).
        num_numeric: numeric clinical fields.
        cat_cardinalities: categories of each categorical clinical field.
        num_classes: classes C.
        cfg: the model settings (`variant` one of `cfcml.config.FUSION_VARIANTS`).
        extra_channels: input channels each encoder takes beyond its image's (early fusion).
        tokenizer: build the tabular tokenizer (early fusion from the raw table does without).

    Raises:
        ValueError: no image modality; `share_encoder` over modalities of different dims or channels.
        ConfigError: an image too small for the encoder.
    """

    num_modalities = 1
    use_images = True  # both modalities always (tuning.release.explain reads these)
    use_table = True

    def __init__(self, images: Sequence[ImageInput], num_numeric: int, cat_cardinalities: Sequence[int],
                 num_classes: int, cfg: ModelConfig, *, extra_channels: int = 0, tokenizer: bool = True):
        super().__init__()
        self.cfg = cfg
        self.images = tuple(images)
        if not self.images:
            raise ValueError(f"variant {cfg.variant!r} fuses images with the table: "
                             "it needs at least one image modality")
        if cfg.share_encoder and len({(i.dims, i.channels) for i in self.images}) > 1:
            raise ValueError("model.share_encoder needs image modalities of the same dims and channels")
        self.num_numeric, self.cat_cardinalities = num_numeric, tuple(cat_cardinalities)
        self.num_fields = num_numeric + len(self.cat_cardinalities)
        self.extra_channels = extra_channels
        if cfg.share_encoder:
            shared = build_encoder(cfg, self.images[0].dims, self.images[0].channels + extra_channels)
            self.encoders = nn.ModuleList([shared] * len(self.images))
        else:
            self.encoders = nn.ModuleList(build_encoder(cfg, i.dims, i.channels + extra_channels) for i in self.images)
        self.tokenizer = TabularTokenizer(num_numeric, self.cat_cardinalities, cfg.dim) if tokenizer else None
        self.grids = stage_grids(self.encoders, self.images, cfg.encoder, extra_channels)
        self.head = classifier_head(cfg.dim, cfg.dim, num_classes, cfg.dropout)

    def stage_channels(self, m: int) -> tuple[int, ...]:
        """C_1..C_4 of image modality m's encoder."""
        return tuple(c for _, c in self.grids[m])

    def encoder_parameters(self) -> list[nn.Parameter]:
        """Image encoder parameters (they may train at a smaller learning rate)."""
        return list({id(p): p for p in self.encoders.parameters()}.values())

    def table_tokens(self, num: torch.Tensor, num_missing: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """The tokenizer's field tokens, [B, T, D]."""
        assert self.tokenizer is not None
        return self.tokenizer(num, num_missing, cat)

    def fuse(self, images: list[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
             cat: torch.Tensor) -> torch.Tensor:
        """The fused vector [B, D] that the classifier reads."""
        raise NotImplementedError

    def forward(self, images: Sequence[torch.Tensor], num: torch.Tensor, num_missing: torch.Tensor,
                cat: torch.Tensor) -> ModelOutput:
        """images: per modality [B, C_m, *size]; num [B, Fn] (NaN allowed where missing), num_missing
        [B, Fn] bool, cat [B, Fc] long (-1 = missing) -> logits [B, C], features [B, 1, D]."""
        z = self.fuse(list(images), num, num_missing, cat)
        return ModelOutput(self.head(z), z.unsqueeze(1))


class ImageTokens(nn.Module):
    """Every image modality's maps at `stages` as one token set per modality: [B, N_s, C_s] -> Linear
    C_s -> D, plus a learned embedding of its (modality, stage); then layer-normalised.

    Returns a list over modalities of [B, sum over stages of N_s, D] tokens (no positional code:
    the encoder's receptive fields already place each token).
    """

    def __init__(self, channels: Sequence[Sequence[int]], stages: Sequence[int], dim: int):
        super().__init__()
        self.stages = tuple(stages)
        self.proj = nn.ModuleList(
            nn.ModuleList(nn.Linear(chans[s - 1], dim) for s in self.stages) for chans in channels)
        self.source = nn.Parameter(torch.randn(len(channels), len(self.stages), dim) * 0.02)
        self.norm = nn.LayerNorm(dim)

    def forward(self, maps: list[list[torch.Tensor]]) -> list[torch.Tensor]:
        out = []
        for m, (projs, fmaps) in enumerate(zip(self.proj, maps)):
            parts = [proj(fmaps[s - 1].flatten(2).transpose(1, 2)) + self.source[m, k]
                     for k, (s, proj) in enumerate(zip(self.stages, cast(nn.ModuleList, projs)))]
            out.append(self.norm(torch.cat(parts, dim=1)))
        return out


class FeedForward(nn.Sequential):
    """Pre-norm transformer MLP: LayerNorm -> Linear D -> 2D -> GELU -> Linear 2D -> D."""

    def __init__(self, dim: int):
        super().__init__(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
