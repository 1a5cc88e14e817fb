"""Image encoders returning four stages of feature maps, chosen by name (`model.encoder`).

- `res_mamba` (cfcml/networks/res_mamba.py): the public CFCML code's MEN encoder, a residual CNN
  whose layers share a four-order Mamba layer; the MEN default.
- `mamba_resnet`: this platform's earlier MEN encoder, kept as an option: MONAI residual units with
  instance norm, each stage in `mixer_stages` ending in a bidirectional Mamba mixer (d_state 8).
  Not the public encoder; cheaper per block, but with stage 1 in `mixer_stages` its mixer over the
  largest grid dominates a step (docs/gpu.md).
- `swin`: MONAI's Swin transformer (2D photos or 3D volumes); the four stages are the outputs of
  its four layers' transformer blocks, taken before each layer's patch merging (grids /p, /2p, /4p,
  /8p for patch size p, as the stage outputs of a standard Swin-T).

All work for 2D and 3D inputs and accept local pretrained weights; nothing is downloaded. The Mamba
blocks of both CNNs run the selective scan chosen by `model.scan` (cfcml/networks/scan.py).

Every encoder passes its last stage map through `cam_tap`, an identity module: the one layer name
(`encoders.<m>.cam_tap`) that Grad-CAM hooks to explain a prediction, whatever the encoder.
"""
from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import cast

import torch
import torch.nn.functional as F

from cfcml import _monai

_monai.light()  # only the MONAI modules used, not all of MONAI (see cfcml._monai)
from monai.networks.blocks import ResidualUnit  # noqa: E402
from monai.networks.nets.swin_unetr import BasicLayer, SwinTransformer, compute_mask, get_window_size  # noqa: E402
from torch import nn  # noqa: E402

from cfcml.config import ConfigError, ModelConfig  # noqa: E402
from cfcml.networks.mamba import Mamba  # noqa: E402
from cfcml.networks.res_mamba import ResMambaEncoder  # noqa: E402


class MambaMixer(nn.Module):
    """Global token mixing: x + Mamba(norm(x)) scanned both ways over the flattened grid."""

    def __init__(self, channels: int, scan: str = "auto"):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        # mambapy's MambaBlock until the scan became selectable: same layer names and maths
        self.mamba = Mamba(channels, d_state=8, scan=scan)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [B, C, *grid]
        b, c = x.shape[:2]
        seq = self.norm(x.flatten(2).transpose(1, 2))  # [B, N, C]
        if self.mamba.native_reverse(x.device):  # the triton scan's reverse flag: no flipped copies
            mixed = self.mamba(seq) + self.mamba(seq, reverse=True)
        else:
            both = self.mamba(torch.cat([seq, seq.flip(1)]))  # one call for both scan directions
            mixed = both[:b] + both[b:].flip(1)
        return x + mixed.transpose(1, 2).reshape(x.shape)


class MambaResEncoder(nn.Module):
    """Stem (stride 2, w channels) then stages of 2w, 4w, 8w channels, each stride 2."""

    def __init__(self, dims: int, in_channels: int, width: int, mixer_stages: tuple[int, ...], scan: str = "auto"):
        super().__init__()
        chans = [width, 2 * width, 4 * width, 8 * width]
        blocks = []
        prev = in_channels
        for stage, ch in enumerate(chans, start=1):
            layers: list[nn.Module] = [
                ResidualUnit(dims, prev, ch, strides=2, kernel_size=3, subunits=2,
                             norm="instance", act="leakyrelu"),
            ]
            if stage in mixer_stages:
                layers.append(MambaMixer(ch, scan))
            blocks.append(nn.Sequential(*layers))
            prev = ch
        self.stages = nn.ModuleList(blocks)
        self.out_channels = tuple(chans)
        self.cam_tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        feats[-1] = self.cam_tap(feats[-1])
        return feats


class SwinEncoder(nn.Module):
    """MONAI Swin transformer; stage s = layer s's blocks, layer-normalised, before its patch merging.

    MONAI's `SwinTransformer.forward` merges at the end of every layer and returns the merged maps,
    so its /p map has seen no attention block and its /8p map skips the last layer; the stage
    outputs of a standard (ImageNet) Swin-T, which the public code uses, are the pre-merge ones.
    Same grids and channels either way. The last layer's merging would only feed a
    /16p map nobody reads, so it is removed: every parameter then gets a gradient (DDP needs that).
    """

    def __init__(self, dims: int, in_channels: int, cfg: ModelConfig):
        super().__init__()
        self.swin = SwinTransformer(
            in_chans=in_channels,
            embed_dim=cfg.encoder_width,
            window_size=(cfg.swin_window,) * dims,
            patch_size=(cfg.swin_patch,) * dims,
            depths=cfg.swin_depths,
            num_heads=cfg.swin_heads,
            spatial_dims=dims,
        )
        cast(BasicLayer, self.swin.layers4[0]).downsample = None
        w = cfg.encoder_width
        self.out_channels = (w, 2 * w, 4 * w, 8 * w)
        self.cam_tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.swin.pos_drop(self.swin.patch_embed(x)).movedim(1, -1)  # [B, *grid, C]
        feats = []
        for layers in (self.swin.layers1, self.swin.layers2, self.swin.layers3, self.swin.layers4):
            layer = cast(BasicLayer, layers[0])
            x = _swin_blocks(layer, x)
            feats.append(F.layer_norm(x, x.shape[-1:]).movedim(-1, 1))  # [B, C, *grid]
            if layer.downsample is not None:
                x = layer.downsample(x)
        feats[-1] = self.cam_tap(feats[-1])
        return feats


def _swin_blocks(layer: BasicLayer, x: torch.Tensor) -> torch.Tensor:
    """The transformer blocks of a MONAI Swin `BasicLayer`, without its downsampling (channels last).

    Mirrors `BasicLayer.forward`: windows shrink to the grid where it is smaller, and the shifted-
    window mask is built for the grid padded to whole windows.
    """
    grid = tuple(x.shape[1:-1])
    window, shift = get_window_size(grid, layer.window_size, layer.shift_size)
    padded = [math.ceil(g / w) * w for g, w in zip(grid, window)]
    mask = compute_mask(padded, window, shift, x.device)
    for block in layer.blocks:
        x = block(x, mask)
    return x


def build_encoder(cfg: ModelConfig, dims: int, in_channels: int) -> nn.Module:
    if dims not in (2, 3):
        raise ConfigError(f"image modality dims must be 2 or 3, got {dims}")
    if cfg.encoder == "res_mamba":
        enc: nn.Module = ResMambaEncoder(dims, in_channels, cfg.encoder_width, cfg.encoder_blocks, cfg.mixer_stages,
                                         cfg.mamba_d_state, cfg.mamba_d_conv, cfg.mamba_expand, cfg.scan)
    elif cfg.encoder == "mamba_resnet":
        enc = MambaResEncoder(dims, in_channels, cfg.encoder_width, cfg.mixer_stages, cfg.scan)
    elif cfg.encoder == "swin":
        enc = SwinEncoder(dims, in_channels, cfg)
    else:  # guarded by the config's Literal, kept for direct callers
        raise ConfigError(f"model.encoder: unknown encoder {cfg.encoder!r}")
    if cfg.pretrained:
        load_pretrained(enc, cfg.pretrained)
    return enc


def load_pretrained(encoder: nn.Module, path: str | Path) -> None:
    """Load a local state dict into `encoder`, tolerating common wrapper prefixes.

    Raises ConfigError when the file is missing or shares no parameter with the encoder, so a
    wrong checkpoint is not silently ignored.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"model.pretrained: weights file not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # not a torch file, truncated, or pickled objects beyond tensors
        raise ConfigError(f"model.pretrained: cannot read {path} as a state dict ({exc})") from None
    for key in ("state_dict", "model", "net"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ConfigError(f"model.pretrained: {path} holds a {type(state).__name__}, not a state dict")
    own = encoder.state_dict()
    matched = {}
    for key, value in state.items():
        for prefix in ("", "module.", "swinViT.", "encoder.", "backbone."):
            name = key[len(prefix):] if key.startswith(prefix) else None
            for candidate in (name, f"swin.{name}" if name else None):
                if candidate in own and own[candidate].shape == value.shape:
                    matched[candidate] = value
    # Scalar buffers (BatchNorm's num_batches_tracked) match any checkpoint with batch norm: not a match.
    if not any(value.dim() > 0 for value in matched.values()):
        raise ConfigError(f"model.pretrained: {path} has no parameter matching the encoder")
    if len(matched) < len(own):  # e.g. an ImageNet Swin without this model's extra layers
        warnings.warn(f"model.pretrained: {path} provided {len(matched)} of the encoder's {len(own)} tensors; "
                      f"the rest keep their random initialisation", stacklevel=2)
    encoder.load_state_dict(matched, strict=False)
