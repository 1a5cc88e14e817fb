"""Image encoders: the four stage grids of docs/model.md, and local pretrained weights."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from cfcml.config import ConfigError, ModelConfig
from cfcml.networks import CFCML, ImageInput
from cfcml.networks.encoders import MambaMixer, MambaResEncoder, build_encoder

# Small widths: the grids depend on strides and patch size only.
SWIN_SMALL = ModelConfig(encoder="swin", encoder_width=12, swin_depths=(1, 1, 1, 1),
                         swin_heads=(3, 3, 3, 3), swin_patch=4, swin_window=7)
MAMBA_TINY = ModelConfig(encoder_width=4, encoder_blocks=2, mixer_stages=(3, 4), dim=16, latents_img=4, latents_tab=4)
OLD_TINY = ModelConfig(encoder="mamba_resnet", encoder_width=4, mixer_stages=(3, 4), dim=16, latents_img=4,
                       latents_tab=4)


def stage_shapes(enc, x):
    with torch.no_grad():
        return [tuple(f.shape) for f in enc(x)]


def test_men_default_encoder_public_grids():
    """MEN default (res_mamba, the public encoder) on a 128x128x24 volume: 64x64x12 .. 8x8x2."""
    torch.manual_seed(0)
    enc = build_encoder(ModelConfig(), dims=3, in_channels=1).eval()
    assert type(enc).__name__ == "ResMambaEncoder"
    assert enc.out_channels == (16, 32, 64, 128)
    assert stage_shapes(enc, torch.randn(1, 1, 128, 128, 24)) == [
        (1, 16, 64, 64, 12), (1, 32, 32, 32, 6), (1, 64, 16, 16, 3), (1, 128, 8, 8, 2),
    ]


def test_mamba_resnet_by_name_keeps_its_grids():
    """The earlier encoder, by name: same stage strides and channels (a smaller volume keeps it quick)."""
    torch.manual_seed(0)
    cfg = ModelConfig(encoder="mamba_resnet", mixer_stages=(1, 2, 3, 4))
    enc = build_encoder(cfg, dims=3, in_channels=1).eval()
    assert isinstance(enc, MambaResEncoder) and enc.out_channels == (16, 32, 64, 128)
    assert sum(isinstance(m, MambaMixer) for m in enc.modules()) == 4
    assert stage_shapes(enc, torch.randn(1, 1, 64, 64, 16)) == [
        (1, 16, 32, 32, 8), (1, 32, 16, 16, 4), (1, 64, 8, 8, 2), (1, 128, 4, 4, 1),
    ]


def test_derm7pt_swin_public_grids():
    """Swin with patch 4, window 7 on a 224x224 photo: 56, 28, 14, 7 (swin-T: 96..768 channels)."""
    torch.manual_seed(0)
    enc = build_encoder(SWIN_SMALL, dims=2, in_channels=3).eval()
    assert enc.out_channels == (12, 24, 48, 96)
    assert stage_shapes(enc, torch.randn(1, 3, 224, 224)) == [
        (1, 12, 56, 56), (1, 24, 28, 28), (1, 48, 14, 14), (1, 96, 7, 7),
    ]
    swin_t = dataclasses.replace(SWIN_SMALL, encoder_width=96)
    assert build_encoder(swin_t, 2, 3).out_channels == (96, 192, 384, 768)


def test_swin_3d_grids():
    torch.manual_seed(0)
    cfg = dataclasses.replace(SWIN_SMALL, swin_patch=2, swin_window=4)
    enc = build_encoder(cfg, dims=3, in_channels=1).eval()
    assert stage_shapes(enc, torch.randn(1, 1, 32, 32, 16)) == [
        (1, 12, 16, 16, 8), (1, 24, 8, 8, 4), (1, 48, 4, 4, 2), (1, 96, 2, 2, 1),
    ]


@pytest.mark.parametrize("cfg,dims,size", [
    # 64x64, patch 4: the last grid is 2x2 (a 1x1 grid would starve its position bias of gradient)
    (dataclasses.replace(SWIN_SMALL, swin_depths=(1, 1, 2, 1)), 2, (64, 64)),
    (MAMBA_TINY, 3, (32, 32, 8)),
    (OLD_TINY, 3, (32, 32, 8)),
])
def test_every_encoder_parameter_gets_a_gradient(cfg, dims, size):
    """No dead layer: DDP (find_unused_parameters=False) fails on parameters without a gradient,
    and every layer of the config (e.g. all four swin depths) must shape the stage maps."""
    torch.manual_seed(0)
    enc = build_encoder(cfg, dims, 2)
    feats = enc(torch.randn(2, 2, *size))
    sum(f.square().mean() for f in feats).backward()
    dead = [n for n, p in enc.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead


def test_mamba_mixer_scans_both_ways():
    """Every token sees the whole sequence: the first token depends on the last and vice versa
    (a one-way causal scan gives an exactly zero gradient in one of the two directions)."""
    torch.manual_seed(0)
    mixer = MambaMixer(8).eval()
    for src, dst in ((-1, 0), (0, -1)):
        x = torch.randn(1, 8, 4, 4, 2, requires_grad=True)
        mixer(x).flatten(2)[..., dst].sum().backward()
        assert x.grad.flatten(2)[..., src].abs().sum() > 0


def test_mamba_mixer_keeps_samples_apart():
    torch.manual_seed(0)
    mixer = MambaMixer(8).eval()
    x = torch.randn(3, 8, 4, 4, 2)
    x2 = x.clone()
    x2[1:] = torch.randn_like(x2[1:])
    torch.testing.assert_close(mixer(x)[0], mixer(x2)[0])


# --- pretrained weights from a local file ---------------------------------------------------------

def build_men_tiny(cfg: ModelConfig) -> CFCML:
    return CFCML([ImageInput(3, 1, (32, 32, 8))] * 3, 4, (3, 2), 3, cfg)


def assert_state_equal(module, reference: dict[str, torch.Tensor]) -> None:
    own = module.state_dict()
    assert set(own) == set(reference)
    for key, value in reference.items():
        assert torch.equal(own[key], value), key


def test_pretrained_weights_load_into_every_encoder(tmp_path):
    torch.manual_seed(1)
    source = build_encoder(MAMBA_TINY, 3, 1).state_dict()
    path = tmp_path / "encoder.pt"
    torch.save(source, path)
    torch.manual_seed(2)
    model = build_men_tiny(dataclasses.replace(MAMBA_TINY, pretrained=str(path)))
    for enc in model.encoders:
        assert_state_equal(enc, source)
    # without the file the encoders are freshly initialised, i.e. different
    torch.manual_seed(2)
    fresh = build_men_tiny(MAMBA_TINY)
    assert not torch.equal(fresh.encoders[0].stem[0].weight, model.encoders[0].stem[0].weight)


def test_pretrained_swin_checkpoint_with_wrapper_prefixes(tmp_path):
    """A MONAI SwinUNETR-style checkpoint: {"state_dict": {"swinViT.<key>": ...}}."""
    cfg = dataclasses.replace(SWIN_SMALL, swin_patch=2, swin_window=4)
    torch.manual_seed(1)
    source = build_encoder(cfg, 2, 3).state_dict()
    wrapped = {"epoch": 3, "state_dict": {"swinViT." + k.removeprefix("swin."): v for k, v in source.items()}}
    path = tmp_path / "swin.pth"
    torch.save(wrapped, path)
    torch.manual_seed(2)
    enc = build_encoder(dataclasses.replace(cfg, pretrained=str(path)), 2, 3)
    assert_state_equal(enc, source)


def test_pretrained_missing_file_is_a_config_error(tmp_path):
    cfg = dataclasses.replace(MAMBA_TINY, pretrained=str(tmp_path / "nope.pt"))
    with pytest.raises(ConfigError, match="model.pretrained.*nope.pt"):
        build_men_tiny(cfg)


@pytest.mark.parametrize("content", ["unrelated", "other_width", "not_torch", "tensor"])
def test_pretrained_unusable_file_is_a_config_error(tmp_path, content):
    path = tmp_path / "weights.pt"
    if content == "unrelated":
        torch.save({"classifier.weight": torch.zeros(3, 3), "classifier.bias": torch.zeros(3)}, path)
    elif content == "other_width":  # same keys, no shape in common
        torch.save(build_encoder(dataclasses.replace(MAMBA_TINY, encoder_width=6), 3, 1).state_dict(), path)
    elif content == "not_torch":
        path.write_text("this is not a checkpoint")
    else:
        torch.save(torch.zeros(3), path)
    with pytest.raises(ConfigError, match=r"model\.pretrained.*weights\.pt"):
        build_encoder(dataclasses.replace(MAMBA_TINY, pretrained=str(path)), 3, 1)


@pytest.mark.parametrize("cfg,dims,size", [(SWIN_SMALL, 2, (64, 64)), (MAMBA_TINY, 3, (32, 32, 8)),
                                          (OLD_TINY, 3, (32, 32, 8))])
def test_every_encoder_passes_its_last_stage_through_the_cam_tap(cfg, dims, size):
    """Grad-CAM hooks `cam_tap`: it must see the stage-4 map, channels first."""
    enc = build_encoder(cfg, dims, 1).eval()
    seen = []
    enc.cam_tap.register_forward_hook(lambda m, i, o: seen.append(o))
    with torch.no_grad():
        feats = enc(torch.randn(1, 1, *size))
    assert len(seen) == 1 and seen[0] is feats[-1] and seen[0].shape[1] == enc.out_channels[-1]
