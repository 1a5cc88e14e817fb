"""Fine-stage losses: batched maths against the literal loops, missing classes, the prototype bank."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cfcml.losses import CFCMLLoss, PrototypeBank, batch_prototypes, hrm_losses
from cfcml.reference import reference_hrm_losses

KEYS = ("sam", "up", "cp")
D = 16


def make_batch(B: int, M: int, C: int, balanced: bool = True, seed: int = 0, signal: float = 1.0):
    """Features [B, M, D] float32 with a class signal, labels [B] with every class present."""
    gen = torch.Generator().manual_seed(seed)
    if balanced:
        labels = torch.arange(B) % C
    else:  # every class once, the rest mostly class 0
        extra = torch.multinomial(torch.tensor([0.7] + [0.3 / (C - 1)] * (C - 1)), B - C, True, generator=gen)
        labels = torch.cat([torch.arange(C), extra])
    labels = labels[torch.randperm(B, generator=gen)]
    centres = torch.randn(C, M, D, generator=gen)
    features = torch.randn(B, M, D, generator=gen) + signal * centres[labels]
    return features, labels


def assert_matches_reference(features, labels, C, taus, rtol=1e-5):
    got = hrm_losses(features, labels, C, *taus)
    want = reference_hrm_losses(features.double(), labels, C, *taus)
    for key in KEYS:
        assert got[key].dtype == torch.float32
        torch.testing.assert_close(got[key].double(), want[key], rtol=rtol, atol=1e-9, msg=key)


@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("B", [6, 12, 36])
@pytest.mark.parametrize("C", [2, 3])
@pytest.mark.parametrize("M", [2, 3, 4])
def test_matches_literal_formula(M, C, B, balanced):
    features, labels = make_batch(B, M, C, balanced, seed=M * 100 + C * 10 + B)
    assert_matches_reference(features, labels, C, (0.07, 0.07, 0.07))


@pytest.mark.parametrize("taus", [(0.2, 0.2, 0.2), (1.0, 1.0, 1.0), (0.07, 0.2, 1.0), (1.0, 0.1, 0.05)])
@pytest.mark.parametrize("M,C", [(2, 2), (3, 3), (4, 3)])
@pytest.mark.parametrize("signal", [0.5, 3.0])
def test_matches_literal_formula_temperatures(M, C, taus, signal):
    features, labels = make_batch(12, M, C, balanced=False, seed=7, signal=signal)
    assert_matches_reference(features, labels, C, taus)


def test_gradients_match_literal_formula():
    features, labels = make_batch(9, 3, 3, balanced=False, seed=3)
    taus = (0.07, 0.2, 0.5)
    grads = []
    for fn, x in ((hrm_losses, features.double()), (reference_hrm_losses, features.double())):
        x = x.clone().requires_grad_(True)
        out = fn(x, labels, 3, *taus)
        (out["sam"] + 2 * out["up"] + 3 * out["cp"]).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-6, atol=1e-9)


def test_list_of_modalities_equals_stacked_tensor():
    features, labels = make_batch(6, 3, 2)
    stacked = hrm_losses(features, labels, 2)
    listed = hrm_losses([features[:, m] for m in range(3)], labels, 2)
    for key in KEYS:
        assert torch.equal(stacked[key], listed[key])


@pytest.mark.parametrize("key", KEYS)
def test_every_loss_sends_gradient_to_every_modality(key):
    features, labels = make_batch(12, 4, 3)
    features.requires_grad_(True)
    hrm_losses(features, labels, 3)[key].backward()
    per_modality = features.grad.abs().sum(dim=(0, 2))
    assert torch.isfinite(features.grad).all()
    assert (per_modality > 0).all(), per_modality


def assert_finite_with_grad(out: dict, features: torch.Tensor) -> None:
    """Finite losses and finite feature gradients (CFCMLLoss: through "loss"; the rest are detached)."""
    total = out["loss"] if "loss" in out else sum(out[k] for k in KEYS)
    assert all(torch.isfinite(out[k]) for k in KEYS), out
    total.backward()
    assert torch.isfinite(features.grad).all()


def test_missing_class_per_batch_is_finite_and_drops_the_class():
    features, labels = make_batch(12, 3, 2, seed=5)  # classes 0, 1 of C = 3: class 2 is absent
    x = features.clone().requires_grad_(True)
    out = hrm_losses(x, labels, 3, 0.07, 0.1, 0.2)
    assert_finite_with_grad(out, x)
    want = reference_hrm_losses(features.double(), labels, 3, 0.07, 0.1, 0.2)  # skips absent classes
    for key in KEYS:
        torch.testing.assert_close(out[key].double(), want[key], rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("C", [1, 3])
def test_single_class_batch_is_finite(C):
    features = torch.randn(5, 3, D, requires_grad=True)
    labels = torch.zeros(5, dtype=torch.long)
    out = hrm_losses(features, labels, C)
    assert_finite_with_grad(out, features)
    for key in KEYS:  # every negative set is empty: l = -log(1 + 1e-8) ~ 0
        assert abs(out[key].item()) < 1e-6


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_missing_class_with_filled_bank_is_finite_and_uses_the_bank(momentum):
    loss_fn = CFCMLLoss(3, 3, D, momentum=momentum)
    features, labels = make_batch(9, 3, 3)
    loss_fn(torch.randn(9, 3), features, labels)
    loss_fn.update_bank()
    features, _ = make_batch(6, 3, 3, seed=1)
    for labels in (torch.tensor([0, 1, 0, 1, 0, 1]), torch.zeros(6, dtype=torch.long)):
        x = features.clone().requires_grad_(True)
        out = loss_fn(torch.randn(6, 3), x, labels)
        assert_finite_with_grad(out, x)
        # the absent class takes part through its bank prototype: the loss differs from per-batch
        per_batch = hrm_losses(features, labels, 3)
        assert not torch.isclose(out["cp"], per_batch["cp"])


def test_missing_class_with_empty_bank_matches_per_batch():
    loss_fn = CFCMLLoss(3, 3, D, momentum=0.9)
    features, labels = make_batch(8, 3, 2, seed=2)
    x = features.clone().requires_grad_(True)
    out = loss_fn(torch.randn(8, 3), x, labels)
    assert_finite_with_grad(out, x)
    per_batch = hrm_losses(features, labels, 3)
    for key in KEYS:
        torch.testing.assert_close(out[key], per_batch[key], rtol=0, atol=0)


@pytest.mark.parametrize("tau", [0.01, 0.001])
def test_small_temperature_is_finite(tau):
    features, labels = make_batch(12, 3, 3, signal=0.3)
    x = features.clone().requires_grad_(True)
    out = hrm_losses(x, labels, 3, tau, tau, tau)
    assert_finite_with_grad(out, x)
    if tau == 0.01:  # float64 reference still fits exp(2 / tau); float32 error grows like 1 / tau
        want = reference_hrm_losses(features.double(), labels, 3, tau, tau, tau)
        for key in KEYS:
            torch.testing.assert_close(out[key].double(), want[key], rtol=1e-4, atol=1e-7)


def test_cfcml_loss_momentum_zero_equals_per_batch_losses():
    weights = dict(w_cls=1.0, w_sam=0.06, w_up=0.04, w_cp=0.24)
    loss_fn = CFCMLLoss(4, 3, D, tau_sam=0.07, tau_up=0.1, tau_cp=0.2, momentum=0.0, **weights)
    for seed in (0, 1):  # the second batch meets a filled bank
        features, labels = make_batch(12, 4, 3, balanced=False, seed=seed)
        logits = torch.randn(12, 3)
        out = loss_fn(logits, features, labels)
        loss_fn.update_bank()
        want = hrm_losses(features, labels, 3, 0.07, 0.1, 0.2)
        for key in KEYS:
            assert torch.equal(out[key], want[key]), key
        ce = F.cross_entropy(logits, labels)
        total = ce + 0.06 * want["sam"] + 0.04 * want["up"] + 0.24 * want["cp"]
        torch.testing.assert_close(out["loss"], total)
        assert torch.equal(out["ce"], ce)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True)


def hand_prototypes(features: torch.Tensor, labels: torch.Tensor, C: int):
    """n(mean of n(z)) per modality and class, and over all modalities, written out plainly."""
    zn = unit(features)
    p = torch.stack([torch.stack([unit(zn[labels == c, m].mean(0)) for c in range(C)]) for m in range(zn.shape[1])])
    q = torch.stack([unit(zn[labels == c].reshape(-1, zn.shape[2]).mean(0)) for c in range(C)])
    return p, q


def test_bank_follows_the_ema_and_stays_unit_norm():
    mu = 0.7
    loss_fn = CFCMLLoss(3, 3, D, momentum=mu)
    assert not loss_fn.bank.filled.any()
    f1, y1 = make_batch(9, 3, 3, seed=1)
    loss_fn(torch.randn(9, 3), f1, y1)
    loss_fn.update_bank()
    p1, q1 = hand_prototypes(f1, y1, 3)  # first sight: the batch prototypes as-is
    torch.testing.assert_close(loss_fn.bank.p_bank, p1)
    torch.testing.assert_close(loss_fn.bank.q_bank, q1)
    assert loss_fn.bank.filled.all()

    f2, y2 = make_batch(9, 3, 3, seed=2)
    f2.requires_grad_(True)
    loss_fn(torch.randn(9, 3), f2, y2)["loss"].backward()
    assert torch.isfinite(f2.grad).all()
    assert not any(b.requires_grad for b in loss_fn.bank.buffers())
    loss_fn.update_bank()
    p2, q2 = hand_prototypes(f2.detach(), y2, 3)
    torch.testing.assert_close(loss_fn.bank.p_bank, unit(mu * p1 + (1 - mu) * p2))
    torch.testing.assert_close(loss_fn.bank.q_bank, unit(mu * q1 + (1 - mu) * q2))
    torch.testing.assert_close(loss_fn.bank.p_bank.norm(dim=-1), torch.ones(3, 3))
    torch.testing.assert_close(loss_fn.bank.q_bank.norm(dim=-1), torch.ones(3))

    # a batch without class 2 leaves its bank entry alone
    before = loss_fn.bank.p_bank[:, 2].clone()
    f3, y3 = make_batch(6, 3, 2, seed=3)
    loss_fn(torch.randn(6, 3), f3, y3)
    loss_fn.update_bank()
    assert torch.equal(loss_fn.bank.p_bank[:, 2], before)
    p3, _ = hand_prototypes(f3, y3, 2)
    bank2 = unit(mu * p1 + (1 - mu) * p2)
    torch.testing.assert_close(loss_fn.bank.p_bank[:, :2], unit(mu * bank2[:, :2] + (1 - mu) * p3))


def test_bank_blend_uses_batch_on_first_sight_and_bank_for_absent_classes():
    bank = PrototypeBank(2, 3, D, momentum=0.5)
    features, labels = make_batch(6, 2, 2)
    zn = F.normalize(features, dim=-1)
    p_b, q_b, present = batch_prototypes(zn, labels, 3)
    p, q, available = bank.blend(p_b, q_b, present)
    assert torch.equal(p, p_b) and torch.equal(q, q_b)
    assert available.tolist() == [True, True, False]
    bank.update(p, q, present)
    p2, q2, available = bank.blend(torch.zeros_like(p_b), torch.zeros_like(q_b), torch.tensor([False, False, False]))
    assert torch.equal(p2, bank.p_bank) and torch.equal(q2, bank.q_bank)
    assert available.tolist() == [True, True, False]


def test_eval_mode_never_writes_the_bank():
    loss_fn = CFCMLLoss(2, 2, D, momentum=0.5).eval()
    features, labels = make_batch(6, 2, 2)
    loss_fn(torch.randn(6, 2), features, labels)
    loss_fn.update_bank()
    assert not loss_fn.bank.filled.any()
    assert not loss_fn.bank.p_bank.any()


def test_bank_survives_a_checkpoint_round_trip(tmp_path):
    loss_fn = CFCMLLoss(3, 3, D, momentum=0.5)
    features, labels = make_batch(9, 3, 3)
    loss_fn(torch.randn(9, 3), features, labels)
    loss_fn.update_bank()
    state = loss_fn.state_dict()
    assert {"bank.p_bank", "bank.q_bank", "bank.filled"} <= set(state)
    torch.save(state, tmp_path / "loss.pt")

    restored = CFCMLLoss(3, 3, D, momentum=0.5)
    restored.load_state_dict(torch.load(tmp_path / "loss.pt"))
    for name, buf in loss_fn.bank.named_buffers():
        assert torch.equal(buf, getattr(restored.bank, name)), name
    f2, y2 = make_batch(6, 3, 2, seed=4)
    logits = torch.randn(6, 3)
    assert torch.equal(loss_fn(logits, f2, y2)["loss"], restored(logits, f2, y2)["loss"])


def test_fine_stage_off_is_cross_entropy_only():
    loss_fn = CFCMLLoss(2, 3, D, w_cls=2.0, fine=False)
    features, labels = make_batch(6, 2, 3)
    logits = torch.randn(6, 3)
    out = loss_fn(logits, features, labels)
    torch.testing.assert_close(out["loss"], 2.0 * F.cross_entropy(logits, labels))
    assert all(out[k] == 0 for k in KEYS)


def test_bad_input_names_the_problem():
    features, labels = make_batch(6, 2, 2)
    with pytest.raises(ValueError, match="out of range"):
        hrm_losses(features, labels + 5, 2)
    with pytest.raises(ValueError, match=r"\[B, M, D\]"):
        hrm_losses(features[:, 0], labels, 2)
    with pytest.raises(ValueError, match="M=3"):
        CFCMLLoss(3, 2, D)(torch.randn(6, 2), features, labels)
    with pytest.raises(ValueError, match="tau_up"):
        CFCMLLoss(3, 2, D, tau_up=0.0)
    with pytest.raises(ValueError, match="momentum"):
        PrototypeBank(3, 2, D, momentum=1.0)


def test_int32_labels_are_accepted():
    features, labels = make_batch(6, 2, 3)
    want = hrm_losses(features, labels, 3)
    got = hrm_losses(features, labels.int(), 3)
    assert all(torch.equal(got[k], want[k]) for k in KEYS)
    assert torch.isfinite(CFCMLLoss(2, 3, D)(torch.randn(6, 3), features, labels.int())["loss"])


def test_loss_from_config_uses_every_setting():
    from cfcml.config import LossConfig

    cfg = LossConfig(fine=False, w_cls=2.0, tau_sam=0.2, momentum=0.3)
    loss_fn = CFCMLLoss.from_config(cfg, num_modalities=2, num_classes=3, dim=D)
    assert loss_fn.config == cfg and not loss_fn.fine and loss_fn.weights["ce"] == 2.0
    assert loss_fn.taus[0] == 0.2 and loss_fn.bank.momentum == 0.3


def test_balanced_class_weights_make_every_class_count_alike():
    logits, labels = torch.randn(8, 3), torch.tensor([0, 0, 0, 0, 0, 0, 1, 2])
    counts = [6, 1, 1]
    loss_fn = CFCMLLoss(2, 3, D, fine=False, class_weights="balanced", class_counts=counts)
    torch.testing.assert_close(loss_fn.ce_weight, torch.tensor([8 / 18, 8 / 3, 8 / 3]))
    per_sample = F.cross_entropy(logits, labels, reduction="none")
    w = loss_fn.ce_weight[labels]
    torch.testing.assert_close(loss_fn(logits, torch.randn(8, 2, D), labels)["loss"], (w * per_sample).sum() / w.sum())
    assert "ce_weight" not in loss_fn.state_dict()  # recomputed from the training fold, never stored
    with pytest.raises(ValueError, match="class_counts"):
        CFCMLLoss(2, 3, D, class_weights="balanced")
