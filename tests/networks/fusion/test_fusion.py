"""The fusion baselines (cfcml/networks/fusion/): every method trains at MEN and Derm7pt shapes with
missing clinical values, depends on both image and table, learns the split-signal cohort, and
rejects bad settings naming the key."""
from __future__ import annotations

import dataclasses
import typing

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cfcml.config import (
    FUSION_VARIANTS,
    ConfigError,
    DaftConfig,
    FusionConfig,
    HealnetConfig,
    ModelConfig,
    load_experiment,
)
from cfcml.data.spec import load_dataset_spec
from cfcml.data.synthetic import MEN_CLASSES, men_latents
from cfcml.networks import ImageInput, build_model, build_trained
from cfcml.networks.encoders import build_encoder
from cfcml.networks.fusion import FUSION_MODELS, FusionModel, run_encoder
from cfcml.networks.fusion.tensor_fusion import LowRankFusion, outer_product, with_one

METHODS = list(FUSION_VARIANTS)

# Tiny models of the two datasets' encoders (as tests/networks/test_model.py): MEN's res_mamba with
# one Mamba stage, Derm7pt's Swin shared by both photos. D = 64: at D = 32 the classifier's D/8 = 4
# ReLU units can all die on a batch of 3 (seen for daft on Derm7pt), and no gradient flows back.
MEN_TINY = ModelConfig(encoder_width=4, encoder_blocks=2, mixer_stages=(4,), dim=64, latents_img=4, latents_tab=4)
DERM_TINY = ModelConfig(encoder="swin", encoder_width=12, swin_depths=(1, 1, 1, 1), swin_heads=(3, 3, 3, 3),
                        swin_patch=4, swin_window=7, share_encoder=True, dim=64)
SETUPS = {  # dataset -> (tiny image size, model settings)
    "men": ((32, 32, 8), MEN_TINY),  # three 1-channel volumes; 4 numeric and 2 categorical fields
    "derm7pt": ((64, 64), DERM_TINY),  # two RGB photos; 3 categorical fields
}


def make_inputs(spec, batch: int = 3, seed: int = 0) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor,
                                                                torch.Tensor]:
    """Random images and a table with missing values: NaN numeric values (flagged), -1 categories."""
    g = torch.Generator().manual_seed(seed)
    images = [torch.randn(batch, m.channels, *m.size, generator=g) for m in spec.modalities]
    n_num = len(spec.numeric_fields)
    num = torch.randn(batch, n_num, generator=g)
    num_missing = torch.zeros(batch, n_num, dtype=torch.bool)
    if n_num:
        num_missing[0, 0] = num_missing[1, -1] = True
        num = num.masked_fill(num_missing, float("nan"))  # as pandas hands a blank cell over
    cat = torch.stack([torch.randint(0, len(f.categories), (batch,), generator=g) for f in spec.categorical_fields], 1)
    cat[0, -1] = cat[2, 0] = -1
    return images, num, num_missing, cat


def build(dataset: str, method: str, **fusion_settings) -> tuple[FusionModel, object]:
    size, cfg = SETUPS[dataset]
    spec = load_dataset_spec(dataset, image_size=size)
    fusion = cfg.fusion
    for name, values in fusion_settings.items():
        fusion = dataclasses.replace(fusion, **{name: dataclasses.replace(getattr(fusion, name), **values)})
    torch.manual_seed(0)
    return build_model(spec, dataclasses.replace(cfg, variant=method, fusion=fusion)), spec


def test_every_fusion_variant_has_a_network_and_a_config_name():
    assert list(FUSION_MODELS) == METHODS
    variant = typing.get_type_hints(ModelConfig)["variant"]
    assert set(METHODS) <= set(typing.get_args(variant))
    assert {f.name for f in dataclasses.fields(FusionConfig)} == set(METHODS)


# --- forward and backward at the datasets' shapes ---------------------------------------------------

@pytest.mark.parametrize("dataset", list(SETUPS))
@pytest.mark.parametrize("method", METHODS)
def test_forward_and_backward_with_missing_clinical_values(method, dataset):
    model, spec = build(dataset, method)
    assert isinstance(model, FUSION_MODELS[method]) and model.num_modalities == 1
    inputs = make_inputs(spec)
    model.train()
    out = model(*inputs)
    assert out.logits.shape == (3, len(spec.classes)) and out.features.shape == (3, 1, SETUPS[dataset][1].dim)
    loss = F.cross_entropy(out.logits, torch.tensor([0, 1, 1]))
    assert torch.isfinite(loss)
    loss.backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None]
    assert not dead, f"parameters without a gradient (DDP would fail): {dead}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    for enc in model.encoders:  # the image encoders learn
        assert any(p.grad.abs().sum() > 0 for p in enc.parameters())
    tok = model.tokenizer  # and so does the tabular tokenizer, missing tokens included
    for p in (tok.num_weight, tok.cat_embed.weight, tok.missing):
        if p.numel():  # Derm7pt has no numeric field
            assert p.grad.abs().sum() > 0
    # what is served: the state dict rebuilt (without `pretrained`) predicts the same
    model.eval()
    served = build_trained(spec, model.cfg, model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(served(*inputs).logits, model(*inputs).logits)


@pytest.mark.parametrize("method", METHODS)
def test_the_prediction_depends_on_every_image_and_on_the_table(method):
    model, spec = build("men", method)
    model.eval()
    images, num, num_missing, cat = make_inputs(spec)
    with torch.no_grad():
        ref = model(images, num, num_missing, cat).logits
        for m in range(len(images)):
            other = list(images)
            other[m] = torch.randn_like(images[m])
            assert not torch.allclose(model(other, num, num_missing, cat).logits, ref), f"image {m} is ignored"
        assert not torch.allclose(model(images, num + 1.0, num_missing, cat).logits, ref), "the table is ignored"
        # a missing value is the missing token, whatever the cell held
        assert torch.equal(model(images, num.nan_to_num(7.0), num_missing, cat).logits, ref)


# --- where each method acts -----------------------------------------------------------------------

ENCODERS = {  # name -> (settings, dims, channels, size)
    "res_mamba": (MEN_TINY, 3, 1, (32, 32, 8)),
    "res_mamba_one_block": (dataclasses.replace(MEN_TINY, encoder_blocks=1, mixer_stages=()), 3, 1, (32, 32, 8)),
    "mamba_resnet": (dataclasses.replace(MEN_TINY, encoder="mamba_resnet"), 3, 1, (32, 32, 8)),
    "swin": (DERM_TINY, 2, 3, (64, 64)),
}


@pytest.mark.parametrize("name", list(ENCODERS))
def test_run_encoder_is_the_encoder_and_its_last_block_tap_acts_in_stage_4_only(name):
    cfg, dims, channels, size = ENCODERS[name]
    torch.manual_seed(0)
    enc = build_encoder(cfg, dims, channels).eval()
    x = torch.randn(2, channels, *size)
    with torch.no_grad():
        ref = enc(x)
        same = run_encoder(enc, x, after_stage=lambda _s, f: f, before_last_block=lambda f: f)
        moved = run_encoder(enc, x, before_last_block=lambda f: 2 * f + 1)
        film = run_encoder(enc, x, after_stage=lambda s, f: f + 1 if s == 2 else f)
    for a, b in zip(same, ref):
        torch.testing.assert_close(a, b)
    for s in range(3):
        torch.testing.assert_close(moved[s], ref[s])
    assert not torch.allclose(moved[3], ref[3])
    torch.testing.assert_close(film[0], ref[0])
    assert all(not torch.allclose(film[s], ref[s]) for s in (1, 2, 3))  # a stage's change flows on


def test_early_fusion_adds_the_table_as_input_channels():
    tokens, spec = build("men", "early_fusion", early_fusion={"channels": 5})
    raw, _ = build("men", "early_fusion", early_fusion={"source": "raw"})
    first = {name: next(m for m in model.encoders[0].modules() if isinstance(m, nn.Conv3d)).in_channels
             for name, model in (("tokens", tokens), ("raw", raw))}
    # raw: 4 numeric values and their 4 missing flags, 3 + 2 one-hot categories
    assert first == {"tokens": 1 + 5, "raw": 1 + 2 * 4 + 3 + 2}
    assert raw.tokenizer is None
    images, num, num_missing, cat = make_inputs(spec)
    table = raw.table_vector(num, num_missing, cat)
    assert torch.isfinite(table).all()
    assert table[0, 4].item() == 1.0 and table[0, 0].item() == 0.0  # patient 0's first value is missing
    assert table[0, 8:].sum().item() == 1.0  # its last category is missing: one field one-hot


def test_tensor_fusion_is_full_where_small_and_low_rank_where_large():
    derm, _ = build("derm7pt", "tensor_fusion")
    men, _ = build("men", "tensor_fusion")
    assert derm.full and derm.product_size == 17 ** 3  # two photos and the table, hidden 16
    assert not men.full and men.product_size == 17 ** 4  # three volumes and the table: low-rank
    forced, _ = build("derm7pt", "tensor_fusion", tensor_fusion={"max_full": 0})
    assert not forced.full


def test_low_rank_fusion_is_a_linear_map_of_the_outer_product():
    """Liu et al.: sum over r of prod over m of (v_m W_m^(r)) = Z W with W = sum over r of the outer
    products of the factors."""
    torch.manual_seed(0)
    lmf = LowRankFusion([3, 4, 2], dim=5, rank=3)
    vectors = [with_one(torch.randn(6, n - 1)) for n in (3, 4, 2)]
    a, b, c = lmf.factors
    weight = torch.einsum("r,rid,rjd,rkd->ijkd", lmf.rank_weights, a, b, c).reshape(3 * 4 * 2, 5)
    torch.testing.assert_close(lmf(vectors), outer_product(vectors) @ weight + lmf.bias)
    # the flattened outer product holds every product of one entry per vector, the 1s included
    z = outer_product(vectors)
    assert z.shape == (6, 24) and torch.allclose(z[:, -1], torch.ones(6))  # 1 x 1 x 1
    torch.testing.assert_close(z[:, 0], vectors[0][:, 0] * vectors[1][:, 0] * vectors[2][:, 0])


def test_healnet_layer_attends_to_each_modality_then_refines_its_latents_once():
    """The authors' layer order (konst-int-i/healnet): a cross-attention per modality, then one
    latent self-attention per layer, not one after every modality."""
    from cfcml.networks.fusion.healnet import FusionLayer, LatentSelfAttention, ModalityUpdate

    model, _ = build("men", "healnet", healnet={"depth": 2})
    for layer in model.layers:
        assert isinstance(layer, FusionLayer)
        assert sum(isinstance(m, ModalityUpdate) for m in layer.modules()) == len(model.images) + 1
        assert sum(isinstance(m, LatentSelfAttention) for m in layer.modules()) == 1


@pytest.mark.parametrize("scale", [0.1, 10.0, 1e3])
def test_healnet_cross_attention_normalises_its_context_so_token_scale_does_not_matter(scale):
    """Field tokens are not layer-normalised by the tokenizer; each cross-attention normalises its
    context, so a modality whose tokens are 1000x larger does not swamp the latents' update."""
    from cfcml.networks.fusion.healnet import ModalityUpdate

    torch.manual_seed(0)
    step = ModalityUpdate(16, 4).eval()
    s, x = torch.randn(2, 5, 16), torch.randn(2, 7, 16) + 0.5
    torch.testing.assert_close(step(s, x * scale), step(s, x), atol=2e-3, rtol=2e-2)  # LayerNorm eps


def test_healnet_shares_one_layer_of_weights_when_asked():
    separate, _ = build("derm7pt", "healnet", healnet={"depth": 3})
    shared, _ = build("derm7pt", "healnet", healnet={"depth": 3, "share_weights": True})
    assert len(separate.layers) == 3 and len(shared.layers) == 1
    assert len(shared.layers[0].modalities) == 3  # one update per modality: two photos and the table
    n = sum(p.numel() for p in shared.layers.parameters())
    assert sum(p.numel() for p in separate.layers.parameters()) == 3 * n


def test_daft_without_scale_only_shifts():
    model, spec = build("men", "daft", daft={"scale": False})
    transform = model.transforms[0]
    assert transform.aux[-1].out_features == 8 * MEN_TINY.encoder_width  # beta for the stage-4 block's channels
    fmap = torch.randn(2, transform.channels, 2, 2, 1)
    table = torch.randn(2, model.num_fields * MEN_TINY.dim)
    out = transform(fmap, table)
    shift = out - fmap
    torch.testing.assert_close(shift, shift[..., :1, :1, :1].expand_as(shift))  # one offset per channel
    assert not torch.allclose(shift[0], shift[1])  # per patient


# --- learning -------------------------------------------------------------------------------------

LEARN_SIZE = (16, 16, 4)
LEARN_MODEL = ModelConfig(encoder_width=4, encoder_blocks=1, mixer_stages=(), dim=32, dropout=0.0)


def split_signal_cohort(patients: int, seed: int) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor,
                                                            torch.Tensor, torch.Tensor]:
    """The synthetic MEN cohort's split signal (`cfcml.data.synthetic.men_latents`, signal "split"),
    rendered straight to tensors: each volume shows `image_signal` (Grade 2 or not) as a brighter or
    darker centre; the table shows `table_signal` (invasion, a coin for Grade 1) in its second
    numeric field (missing for 10%), next to a noise field (missing for 20%) and two noise categories.
    Images alone tell Grade 1 from Grade 2, the table alone invasion within Grade 2."""
    plan = men_latents(patients, seed, signal="split")
    g = torch.Generator().manual_seed(seed)
    image_signal = torch.tensor(plan["image_signal"].to_numpy(), dtype=torch.float32).view(-1, 1, 1, 1, 1)
    table_signal = torch.tensor(plan["table_signal"].to_numpy(), dtype=torch.float32)
    images = []
    for sign in (-1.0, 1.0, -1.0):  # T1 darker, T2 brighter, ADC darker where the signal is
        x = torch.randn(patients, 1, *LEARN_SIZE, generator=g)
        x[..., 4:12, 4:12, 1:3] += sign * 1.5 * image_signal
        images.append(x)
    num = torch.stack([torch.randn(patients, generator=g), 2 * table_signal - 1], dim=1)
    num_missing = torch.rand(patients, 2, generator=g) < torch.tensor([0.2, 0.1])
    cat = torch.stack([torch.randint(0, 3, (patients,), generator=g), torch.randint(0, 2, (patients,), generator=g)], 1)
    cat[torch.rand(patients, generator=g) < 0.1, 0] = -1
    labels = torch.tensor(plan["label"].map({c: k for k, c in enumerate(MEN_CLASSES)}).to_numpy())
    return images, num.masked_fill(num_missing, float("nan")), num_missing, cat, labels


@pytest.fixture(scope="module")
def cohorts():
    return split_signal_cohort(96, seed=1), split_signal_cohort(96, seed=2)


def macro_auc(y: torch.Tensor, probs: torch.Tensor) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y.numpy(), probs.numpy(), multi_class="ovr"))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_learns_the_split_signal_cohort(method, cohorts):
    """40 Adam steps of 16 patients (2.5 to 5.5 CPU seconds): held-out macro AUC well above chance
    (0.5; one modality alone reaches about 0.67 to 0.83). Measured on one thread, torch seed 0 (the
    test's): early_fusion 0.80, film 0.89, daft 0.89, tab_attention 0.81, tensor_fusion 0.90,
    healnet 0.93 (late_concat 0.76, cfcml 0.91); seeds 0 to 2: lowest 0.69 (tensor_fusion, seed 1)."""
    (images, num, num_missing, cat, y), held_out = cohorts
    torch.manual_seed(0)
    spec_images = [ImageInput(3, 1, LEARN_SIZE)] * 3
    model = FUSION_MODELS[method](spec_images, 2, (3, 2), len(MEN_CLASSES), dataclasses.replace(LEARN_MODEL,
                                                                                                variant=method))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(40):
        idx = torch.randperm(len(y), generator=g)[:16]
        out = model([x[idx] for x in images], num[idx], num_missing[idx], cat[idx])
        loss = F.cross_entropy(out.logits, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        probs = model(*held_out[:4]).logits.softmax(1)
    assert macro_auc(held_out[4], probs) >= 0.65


# --- settings -------------------------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [
    ("early_fusion.source", "table"),
    ("early_fusion.channels", 0),
    ("film.stages", [0, 2]),
    ("film.stages", []),
    ("film.stages", [2, 2]),
    ("film.hidden", 0),
    ("daft.bottleneck", 0),
    ("daft.scale_activation", "relu"),
    ("tab_attention.stages", [3]),  # without stage 4 the encoder's last stage would not learn
    ("tab_attention.heads", 3),  # 128 is not divisible by 3
    ("tab_attention.layers", 0),
    ("tensor_fusion.hidden", 0),
    ("tensor_fusion.rank", 0),
    ("tensor_fusion.max_full", -1),
    ("healnet.latents", 0),
    ("healnet.depth", 0),
    ("healnet.stages", [1, 2]),
    ("healnet.heads", 5),
    ("healnet.bogus", 1),
])
def test_a_bad_setting_names_its_key(key, value):
    with pytest.raises(ConfigError, match=rf"model\.fusion\.{key}: "):
        load_experiment("men", {f"model.fusion.{key}": value})


def test_settings_built_in_code_are_checked_too():
    with pytest.raises(ValueError, match=r"^scale: scale and shift are both off"):
        DaftConfig(scale=False, shift=False)
    with pytest.raises(ValueError, match=r"^fusion\.healnet\.heads: dim 32 is not divisible by 3 heads"):
        ModelConfig(dim=32, fusion=FusionConfig(healnet=HealnetConfig(heads=3)))
    with pytest.raises(ValueError, match=r"model\.fusion\.early_fusion\.source raw: the table has no field"):
        FUSION_MODELS["early_fusion"]([ImageInput(2, 3, (64, 64))], 0, (), 2,
                                      dataclasses.replace(DERM_TINY, variant="early_fusion",
                                                          fusion=FusionConfig(early_fusion=dataclasses.replace(
                                                              FusionConfig().early_fusion, source="raw"))))
    with pytest.raises(ValueError, match="needs at least one image modality"):
        FUSION_MODELS["film"]([], 2, (3,), 2, dataclasses.replace(MEN_TINY, variant="film"))
