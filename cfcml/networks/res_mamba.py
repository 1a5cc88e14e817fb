"""`res_mamba`: the public CFCML code's MEN image encoder (a residual CNN with shared Mamba layers).

    stem     double 3x3(x3) conv block, stride 2, `width` channels, no Mamba     -> stage 1  (/2)
    layer 1  `blocks` basic blocks, 2 width channels, the first one stride 2     -> stage 2  (/4)
    layer 2  `blocks` basic blocks, 4 width channels                             -> stage 3  (/8)
    layer 3  `blocks` basic blocks, 8 width channels                             -> stage 4  (/16)

A basic block is conv 3x3 -> BatchNorm -> ReLU -> conv 3x3 -> BatchNorm, plus the shortcut (the
identity, or a strided 1x1 conv + BatchNorm in a layer's first block), then ReLU. In the blocks after
the first, a layer's Mamba layer adds its output, computed from the block's input, before that ReLU;
one Mamba layer instance serves all blocks of its layer (their weights are shared).

The Mamba layer (nnMamba's, as the public code): 1x1 conv -> BatchNorm -> ReLU gives a; the tokens
of a (the flattened grid) run through one Mamba block in four orders (as they are, tokens reversed,
channels reversed, both), each output is flipped back, the four are averaged and a is added; then
1x1 conv -> BatchNorm -> ReLU. The four orders go through the block as one batch of 4B sequences:
the block has no batch statistics, so this is exactly four calls, with a quarter of the kernel
launches. With the `triton` scan the two token-reversed orders instead run as one reverse call of
the block on 2B sequences (`Mamba.forward(x, reverse=True)`: anti-causal convolution, reverse scan),
so no token-flipped copies are made; the result is the same function.

For a 128x128x24 volume and width 16 the stages are 64x64x12 (16 channels), 32x32x6 (32), 16x16x3
(64) and 8x8x2 (128). 2D images (dims 2) use the same layers in 2D.
"""
from __future__ import annotations

import torch
from torch import nn

from cfcml.networks.mamba import Mamba

_CONV = {2: nn.Conv2d, 3: nn.Conv3d}
_NORM = {2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def _conv_bn(dims: int, cin: int, cout: int, kernel: int, stride: int = 1, bias: bool = False) -> list[nn.Module]:
    return [_CONV[dims](cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias), _NORM[dims](cout)]


class MambaLayer(nn.Module):
    """Global token mixing over the grid, [B, C, *grid] -> [B, C, *grid] (module docstring).

    Args:
        dims: 2 or 3 spatial dimensions.
        channels: C, >= 1.
        d_state, d_conv, expand: the Mamba block's (public code: 16, 4, 2).
        scan: the selective scan backend (cfcml/networks/scan.py).
    """

    def __init__(self, dims: int, channels: int, d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan: str = "auto"):
        super().__init__()
        if dims not in _CONV:
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        self.proj_in = nn.Sequential(*_conv_bn(dims, channels, channels, 1), nn.ReLU(inplace=True))
        self.mamba = Mamba(channels, d_state=d_state, d_conv=d_conv, expand=expand, scan=scan)
        self.proj_out = nn.Sequential(*_conv_bn(dims, channels, channels, 1), nn.ReLU(inplace=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.proj_in(x)
        b = a.shape[0]
        seq = a.flatten(2).transpose(1, 2)  # [B, N, C]
        # token order (dim 1) and channel order (dim 2): as is, tokens reversed, channels reversed, both
        orders = ((), (1,), (2,), (1, 2))
        if self.mamba.native_reverse(x.device):
            # the triton scan runs the token-reversed orders with its reverse flag: no token flips
            ahead = torch.cat([seq, seq.flip(2)])  # orders () and (2,): [2B, N, C]
            fwd, rev = self.mamba(ahead).split(b), self.mamba(ahead, reverse=True).split(b)
            mixed = (fwd[0] + rev[0] + fwd[1].flip(2) + rev[1].flip(2)) / len(orders)
        else:
            out = self.mamba(torch.cat([seq.flip(f) if f else seq for f in orders]))  # [4B, N, C]
            parts = out.split(b)
            mixed = sum(p.flip(f) if f else p for p, f in zip(parts, orders)) / len(orders)
        return self.proj_out(mixed.transpose(1, 2).reshape(a.shape) + a)


class BasicBlock(nn.Module):
    """ResNet basic block; `mixer` (shared with the layer's other blocks) adds mixer(input)."""

    def __init__(self, dims: int, cin: int, cout: int, stride: int = 1, mixer: MambaLayer | None = None):
        super().__init__()
        self.body = nn.Sequential(*_conv_bn(dims, cin, cout, 3, stride), nn.ReLU(inplace=True),
                                  *_conv_bn(dims, cout, cout, 3))
        self.shortcut = nn.Sequential(*_conv_bn(dims, cin, cout, 1, stride)) if stride != 1 or cin != cout else None
        self.mixer = mixer
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.body(x) + (x if self.shortcut is None else self.shortcut(x))
        if self.mixer is not None:
            out = out + self.mixer(x)
        return self.relu(out)


class ResMambaEncoder(nn.Module):
    """Four stages: the stem and three residual layers (module docstring).

    Args:
        dims: 2 or 3.
        in_channels: image channels, >= 1.
        width: stem channels, >= 1 (public: 16); the layers have 2, 4 and 8 times as many.
        blocks: basic blocks per layer, >= 1 (public: 3); the Mamba layer acts in blocks 2..blocks,
            so a layer with mixing needs blocks >= 2.
        mixer_stages: stages (2, 3, 4: the three layers) that get a Mamba layer (public: all three).
        d_state, d_conv, expand: each Mamba block's (public: 16, 4, 2).
        scan: the selective scan backend (cfcml/networks/scan.py).
    """

    def __init__(self, dims: int, in_channels: int, width: int = 16, blocks: int = 3,
                 mixer_stages: tuple[int, ...] = (2, 3, 4), d_state: int = 16, d_conv: int = 4, expand: int = 2,
                 scan: str = "auto"):
        super().__init__()
        if dims not in _CONV:
            raise ValueError(f"dims must be 2 or 3, got {dims}")
        if min(in_channels, width, blocks) < 1:
            raise ValueError(f"in_channels, width and blocks must be >= 1, got {in_channels}, {width}, {blocks}")
        if not set(mixer_stages) <= {2, 3, 4}:
            raise ValueError(f"res_mamba has Mamba layers in stages 2..4 only (the stem has none), got {mixer_stages}")
        if mixer_stages and blocks < 2:
            raise ValueError("res_mamba's Mamba layer acts in a layer's blocks 2.., so mixing needs blocks >= 2")
        self.stem = nn.Sequential(*_conv_bn(dims, in_channels, width, 3, stride=2, bias=True), nn.ReLU(inplace=True),
                                  *_conv_bn(dims, width, width, 3, bias=True), nn.ReLU(inplace=True))
        chans = [width, 2 * width, 4 * width, 8 * width]
        self.layers = nn.ModuleList()
        for stage in (2, 3, 4):
            cin, cout = chans[stage - 2], chans[stage - 1]
            mixer = (MambaLayer(dims, cout, d_state, d_conv, expand, scan) if stage in mixer_stages else None)
            self.layers.append(nn.Sequential(
                BasicBlock(dims, cin, cout, stride=2),
                *(BasicBlock(dims, cout, cout, mixer=mixer) for _ in range(blocks - 1)),
            ))
        self.out_channels = tuple(chans)
        self.cam_tap = nn.Identity()

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]
        for layer in self.layers:
            feats.append(layer(feats[-1]))
        feats[-1] = self.cam_tap(feats[-1])
        return feats
