"""res_mamba, the public MEN encoder: its stages, shared Mamba layers, four scan orders, training."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from cfcml.config import ConfigError, ModelConfig, from_dict, load_experiment
from cfcml.networks.encoders import build_encoder
from cfcml.networks.mamba import Mamba
from cfcml.networks.res_mamba import BasicBlock, MambaLayer, ResMambaEncoder

TINY = ModelConfig(encoder_width=4, encoder_blocks=3, mixer_stages=(2, 3, 4))


def test_men_default_is_the_public_encoder_at_the_public_size():
    """Public MEN: width 16, 3 blocks a layer, Mamba d_state 16 / d_conv 4 / expand 2 in layers 1-3;
    on 128x128x24 the stages are 64x64x12, 32x32x6, 16x16x3 and 8x8x2 with 16/32/64/128 channels."""
    cfg = load_experiment("men").model
    assert cfg == ModelConfig()
    assert (cfg.encoder, cfg.encoder_width, cfg.encoder_blocks, cfg.mixer_stages) == ("res_mamba", 16, 3, (2, 3, 4))
    assert (cfg.mamba_d_state, cfg.mamba_d_conv, cfg.mamba_expand) == (16, 4, 2)
    torch.manual_seed(0)
    enc = build_encoder(cfg, dims=3, in_channels=1).eval()
    assert isinstance(enc, ResMambaEncoder) and enc.out_channels == (16, 32, 64, 128)
    assert [len(layer) for layer in enc.layers] == [3, 3, 3]
    mamba = enc.layers[0][1].mixer.mamba
    assert (mamba.d_state, mamba.d_inner, mamba.conv1d.kernel_size) == (16, 64, (4,))
    with torch.no_grad():
        shapes = [tuple(f.shape) for f in enc(torch.randn(1, 1, 128, 128, 24))]
    assert shapes == [(1, 16, 64, 64, 12), (1, 32, 32, 32, 6), (1, 64, 16, 16, 3), (1, 128, 8, 8, 2)]


def test_stem_has_no_mamba_and_each_layer_shares_one_mamba_layer_from_block_2_on():
    enc = build_encoder(TINY, 3, 1)
    assert not any(isinstance(m, (MambaLayer, Mamba)) for m in enc.stem.modules())
    for layer in enc.layers:
        first, *rest = layer
        assert first.mixer is None and first.shortcut is not None  # strided 1x1 conv + BatchNorm
        assert all(b.mixer is rest[0].mixer and b.shortcut is None for b in rest)
        assert isinstance(rest[0].mixer, MambaLayer)
    # three Mamba layers in all, each counted once among the parameters
    assert len({id(m) for m in enc.modules() if isinstance(m, MambaLayer)}) == 3
    n_mixer = sum(p.numel() for layer in enc.layers for p in layer[1].mixer.parameters())
    n_blocks = sum(p.numel() for layer in enc.layers for b in layer for n, p in b.named_parameters()
                   if not n.startswith("mixer."))
    n_stem = sum(p.numel() for p in enc.stem.parameters())
    assert sum(p.numel() for p in enc.parameters()) == n_mixer + n_blocks + n_stem


def test_mamba_layer_averages_four_scan_orders_plus_its_projected_input():
    """out = proj_out(mean of the Mamba outputs for tokens as is, reversed, channels reversed, both,
    each flipped back, + a), a = proj_in(x): written out here with four separate calls."""
    torch.manual_seed(0)
    layer = MambaLayer(3, 6).eval()
    x = torch.randn(2, 6, 4, 3, 2)
    with torch.no_grad():
        a = layer.proj_in(x)
        seq = a.flatten(2).transpose(1, 2)  # [B, N, C]
        m = layer.mamba
        mixed = (m(seq) + m(seq.flip(1)).flip(1) + m(seq.flip(2)).flip(2) + m(seq.flip(1, 2)).flip(1, 2)) / 4
        expected = layer.proj_out(mixed.transpose(1, 2).reshape(a.shape) + a)
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
        # each order matters: dropping any one of them changes the result
        assert not torch.allclose(layer.proj_out((m(seq)).transpose(1, 2).reshape(a.shape) + a), expected)


def test_first_token_sees_the_last_and_samples_stay_apart():
    torch.manual_seed(0)
    layer = MambaLayer(3, 4).eval()
    x = torch.randn(3, 4, 4, 4, 2, requires_grad=True)
    layer(x).flatten(2)[0, :, 0].sum().backward()
    assert x.grad.flatten(2)[0, :, -1].abs().sum() > 0  # the reversed orders carry it backwards
    assert x.grad[1:].abs().sum() == 0


def test_block_adds_the_shared_mixer_of_its_input():
    torch.manual_seed(0)
    mixer = MambaLayer(3, 4)
    block = BasicBlock(3, 4, 4, mixer=mixer).eval()
    x = torch.randn(2, 4, 4, 4, 2)
    with torch.no_grad():
        torch.testing.assert_close(block(x), torch.relu(block.body(x) + x + mixer(x)))


@pytest.mark.parametrize("dims,size", [(3, (32, 32, 8)), (2, (32, 32))])
def test_trains_on_cpu_in_2d_and_3d_with_every_parameter_learning(dims, size):
    torch.manual_seed(0)
    enc = build_encoder(TINY, dims, 2)
    feats = enc(torch.randn(2, 2, *size))
    assert [f.shape[1] for f in feats] == [4, 8, 16, 32]
    assert [f.shape[2:] for f in feats] == [torch.Size(-(-s // 2**k) for s in size) for k in (1, 2, 3, 4)]  # ceil
    sum(f.square().mean() for f in feats).backward()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


@pytest.mark.parametrize("model,key", [
    ({"mixer_stages": [1, 2]}, "config.model.mixer_stages"),  # the stem has no Mamba layer
    ({"encoder_blocks": 1}, "config.model.encoder_blocks"),  # mixing happens in blocks 2..
    ({"encoder_blocks": 0, "mixer_stages": []}, "config.model.encoder_blocks"),
    ({"mamba_d_state": 0}, "config.model.mamba_d_state"),
    ({"scan": "fast"}, "config.model.scan"),
])
def test_bad_res_mamba_settings_name_their_key(model, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        from_dict(ModelConfig, model, "config.model")


def test_one_block_per_layer_without_mixers_is_a_plain_resnet():
    cfg = dataclasses.replace(TINY, encoder_blocks=1, mixer_stages=())
    enc = build_encoder(cfg, 3, 1)
    assert not any(isinstance(m, MambaLayer) for m in enc.modules())
    assert [len(layer) for layer in enc.layers] == [1, 1, 1]


@pytest.mark.parametrize("kwargs,match", [
    ({"dims": 4}, "dims"),
    ({"mixer_stages": (1,)}, "stem"),
    ({"blocks": 1}, "blocks >= 2"),
    ({"width": 0}, ">= 1"),
])
def test_constructor_refuses_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResMambaEncoder(**{"dims": 3, "in_channels": 1, **kwargs})


def test_batch_norm_everywhere_and_no_instance_norm():
    enc = build_encoder(TINY, 3, 1)
    kinds = {type(m) for m in enc.modules()}
    assert nn.BatchNorm3d in kinds and nn.InstanceNorm3d not in kinds
