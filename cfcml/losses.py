"""Fine-stage losses of CFCML: hierarchical anchor-based relationship mining (docs/model.md, "The fine stage").

Three contrastive losses on the per-modality features z_{m,i} (all cosines, so only directions
matter), each anchored at a different level of the hierarchy:

- L_sam: sample anchors, pulled towards their class prototypes, pushed from other-class samples;
- L_up:  unimodal prototypes p_{m,c}, pulled towards q_c, pushed from other classes' p;
- L_cp:  crossmodal prototypes q_c, pulled towards the p_{m,c}, pushed from other classes' q.

Everything is batched (no Python loop over samples or classes). `cfcml.reference` holds the
literal loop transcription the tests and the benchmark compare against.

Classes that are not *available* (absent from the batch and, with a `PrototypeBank`, never seen)
drop out of every term that needs their prototype: as anchor, as positive and as negative.
Normalisation constants then are: L_sam sums over the classes present (as the formula says);
L_up divides by M (it sums over classes, as the formula says); L_cp divides by the number of
available classes, so it stays a mean over classes. With every class available all three are
exactly the formulas of docs/model.md. A term whose negative set is empty (one class available)
gives l = -log(1 + 1e-8) ~ -1e-8, never NaN; an absent class is never an anchor, so
`PrototypeBank` and a class-balanced sampler are options, not requirements.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cfcml.config import LossConfig

LOG_EPS = 1e-8  # the "+ 1e-8" inside the log of l(a; P; N)
SUM_EPS = 1e-8  # the "1e-8 +" in front of L_up and L_cp

LOSS_KEYS = ("sam", "up", "cp")


def _as_features(features: Tensor | Sequence[Tensor]) -> Tensor:
    """[B, M, D] floating tensor from a tensor or a list of M [B, D] tensors."""
    if isinstance(features, (list, tuple)):
        if not features:
            raise ValueError("features: empty list of modality features")
        features = torch.stack(list(features), dim=1)
    if not isinstance(features, Tensor) or features.dim() != 3:
        shape = tuple(features.shape) if isinstance(features, Tensor) else type(features).__name__
        raise ValueError(f"features must be [B, M, D] (or a list of M [B, D]); got {shape}")
    if not features.is_floating_point():
        raise ValueError(f"features must be floating point; got {features.dtype}")
    if features.shape[0] == 0:
        raise ValueError("features: empty batch")
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()  # exp((cos + 1) / tau) needs float32 range and precision
    return features


def _check_labels(labels: Tensor, batch: int, num_classes: int) -> Tensor:
    """labels as int64 [B] (gather and cross-entropy need int64), or a ValueError naming the problem."""
    if labels.shape != (batch,) or labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"labels must be an integer tensor of shape [{batch}]; got {labels.dtype} {tuple(labels.shape)}"
        )
    if labels.is_cuda and torch.cuda.is_current_stream_capturing():
        return labels.long()  # a CUDA graph capture cannot read values; the caller checks them on the host
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise ValueError(f"labels out of range [0, {num_classes}): {labels[bad].unique().tolist()}")
    return labels.long()


def batch_prototypes(zn: Tensor, labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """Per-batch prototypes from unit features zn [B, M, D].

    Returns p [M, C, D], q [C, D] and present [C] bool. n(mean) equals n(sum), so the counts
    are not divided out. Absent classes get zero vectors (finite, and masked out downstream).
    """
    onehot = labels[:, None] == torch.arange(num_classes, device=labels.device)  # [B, C]
    sums = torch.einsum("bc,bmd->mcd", onehot.to(zn.dtype), zn)  # [M, C, D]
    p = F.normalize(sums, dim=-1)
    q = F.normalize(sums.sum(0), dim=-1)  # mean over every (m, i) of class c, same count per m
    present = onehot.any(0)
    return p, q, present


def _contrastive(pos: Tensor, neg: Tensor) -> Tensor:
    """l(a; P; N) = -log(S_P / (S_P + S_N) + 1e-8) for each anchor.

    pos [..., K_P] and neg [..., K_N] are cos(a, b) / tau; excluded negatives are -inf. The
    "+ 1" of (cos + 1) / tau scales S_P and S_N alike and cancels in the ratio, and both sums
    share one (detached) max shift, so nothing overflows at any tau (S_P + S_N >= 1 after it).
    With e = 1e-8 (S_P + S_N), the same l is log1p((S_N - e) / (S_P + e)): no 1 - ratio
    cancellation when the ratio is near 1, and finite (with finite gradients) everywhere, also
    for an empty N (l = -log(1 + 1e-8)) and for an S_P that underflows (l = -log(1e-8)).
    """
    shift = torch.maximum(pos.amax(-1), neg.amax(-1)).detach().unsqueeze(-1)  # finite: P non-empty
    s_p = torch.exp(pos - shift).sum(-1)
    s_n = torch.exp(neg - shift).sum(-1)  # exp(-inf) = 0 for excluded negatives
    e = LOG_EPS * (s_p + s_n)
    return torch.log1p((s_n - e) / (s_p + e))


def _hrm_from_prototypes(
    zn: Tensor,
    labels: Tensor,
    p: Tensor,
    q: Tensor,
    available: Tensor,
    tau_sam: float,
    tau_up: float,
    tau_cp: float,
) -> dict[str, Tensor]:
    """L_sam, L_up, L_cp from unit features zn [B, M, D] and unit prototypes p [M, C, D], q [C, D].

    available [C] bool: classes whose prototypes exist (present in the batch or held by a bank);
    every class of `labels` must be available.
    """
    B, M, D = zn.shape
    C = q.shape[0]
    neg_inf = float("-inf")
    other = labels[:, None] != labels[None, :]  # [B, B]: y_i != y_j
    other_cls = ~torch.eye(C, dtype=torch.bool, device=q.device) & available[None, :]  # [C, C']
    protos = torch.cat([q, p.reshape(M * C, D)])  # [(1 + M) * C, D]: q, then p_1 .. p_M

    # L_sam: anchor z_{m,i}; P = {q_y} + {p_{m',y} for all m'}; N = {z_{m,j} : y_j != y_i}.
    zt = zn.transpose(0, 1)  # [M, B, D]
    to_protos = (zt @ protos.T).view(M, B, 1 + M, C)
    pos = to_protos.gather(-1, labels.reshape(1, B, 1, 1).expand(M, B, 1 + M, 1)).squeeze(-1)  # [M, B, 1 + M]
    neg = (zt @ zt.transpose(1, 2)).masked_fill(~other, neg_inf)  # [M, B, B]
    l_sam = _contrastive(pos / tau_sam, neg / tau_sam)  # [M, B]
    # The same integer counts as torch.bincount, which on CUDA reads the largest label on the host
    # (a synchronisation that CUDA graph capture forbids).
    counts = (labels[:, None] == torch.arange(C, device=labels.device)).sum(0).to(zn.dtype)
    loss_sam = (l_sam.sum(0) / counts[labels]).sum()  # sum over m and c of the class mean

    gram = protos @ protos.T  # every prototype cosine, [(1 + M) * C, (1 + M) * C]
    qq = gram[:C, :C]  # [C, C']
    pq = gram[C:, :C].view(M, C, C).diagonal(dim1=1, dim2=2)  # cos(p_{m,c}, q_c), [M, C]
    pp = gram[C:, C:].view(M, C, M, C)
    avail = available.to(zn.dtype)

    # L_up: anchor p_{m,c}; P = {q_c}; N = {p_{m',c'} : c' != c}.
    neg = pp.masked_fill(~other_cls[None, :, None, :], neg_inf).flatten(-2)  # [M, C, M * C']
    l_up = _contrastive(pq[..., None] / tau_up, neg / tau_up)  # [M, C]
    loss_up = SUM_EPS + (l_up * avail).sum() / M

    # L_cp: anchor q_c; P = {p_{m,c} : all m}; N = {q_{c'} : c' != c}.
    l_cp = _contrastive(pq.T / tau_cp, qq.masked_fill(~other_cls, neg_inf) / tau_cp)  # [C]
    loss_cp = SUM_EPS + (l_cp * avail).sum() / avail.sum()
    return {"sam": loss_sam, "up": loss_up, "cp": loss_cp}


def hrm_losses(
    features: Tensor | Sequence[Tensor],
    labels: Tensor,
    num_classes: int,
    tau_sam: float = 0.07,
    tau_up: float = 0.07,
    tau_cp: float = 0.07,
) -> dict[str, Tensor]:
    """Per-batch L_sam, L_up, L_cp (scalars) of docs/model.md.

    features: [B, M, D] or a list of M [B, D]; labels: int [B]. Classes absent from the batch drop
    out of every term that needs their prototype (see the module docstring).
    """
    z = _as_features(features)
    labels = _check_labels(labels, z.shape[0], num_classes)
    zn = F.normalize(z, dim=-1)
    p, q, present = batch_prototypes(zn, labels, num_classes)
    return _hrm_from_prototypes(zn, labels, p, q, present, tau_sam, tau_up, tau_cp)


class PrototypeBank(nn.Module):
    """EMA bank of unit prototypes: P <- n(mu * P_bank + (1 - mu) * P_batch).

    Buffers (so checkpoints carry them): p_bank [M, C, D], q_bank [C, D], filled [C] bool.
    Gradients flow through the batch part only. mu = 0 is exactly the per-batch maths for the
    classes in the batch; an absent class that the bank has seen uses its bank prototype.
    """

    p_bank: Tensor  # buffers registered in __init__
    q_bank: Tensor
    filled: Tensor

    def __init__(self, num_modalities: int, num_classes: int, dim: int, momentum: float = 0.0):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        self.momentum = float(momentum)
        self.register_buffer("p_bank", torch.zeros(num_modalities, num_classes, dim))
        self.register_buffer("q_bank", torch.zeros(num_classes, dim))
        self.register_buffer("filled", torch.zeros(num_classes, dtype=torch.bool))

    def extra_repr(self) -> str:
        M, C, D = self.p_bank.shape
        return f"num_modalities={M}, num_classes={C}, dim={D}, momentum={self.momentum}"

    def blend(self, p_batch: Tensor, q_batch: Tensor, present: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Prototypes to use this step: p [M, C, D], q [C, D] and available [C] bool.

        Present classes: the batch prototype blended with the bank (as-is on first sight);
        absent classes: the bank prototype (zero if never seen, then not available).
        """
        p_bank = self.p_bank.to(p_batch).detach()
        q_bank = self.q_bank.to(q_batch).detach()
        filled = self.filled.to(present.device)
        p, q = p_batch, q_batch
        if self.momentum > 0.0:
            mu = self.momentum
            p_mix = F.normalize(mu * p_bank + (1.0 - mu) * p_batch, dim=-1)
            q_mix = F.normalize(mu * q_bank + (1.0 - mu) * q_batch, dim=-1)
            p = torch.where(filled[None, :, None], p_mix, p_batch)
            q = torch.where(filled[:, None], q_mix, q_batch)
        p = torch.where(present[None, :, None], p, p_bank)
        q = torch.where(present[:, None], q, q_bank)
        return p, q, present | filled

    @torch.no_grad()
    def update(self, p_used: Tensor, q_used: Tensor, present: Tensor) -> None:
        """Write the (blended) prototypes of the classes present into the bank; call after the step."""
        present = present.to(self.filled.device)
        self.p_bank.copy_(torch.where(present[None, :, None], p_used.detach().to(self.p_bank), self.p_bank))
        self.q_bank.copy_(torch.where(present[:, None], q_used.detach().to(self.q_bank), self.q_bank))
        self.filled |= present


class CFCMLLoss(nn.Module):
    """Total CFCML loss: w_cls * CE + w_sam * L_sam + w_up * L_up + w_cp * L_cp.

    `fine=False` is the "fine stage off" ablation (cross-entropy only). Usage per training step:
    `out = loss_fn(logits, features, labels); out["loss"].backward(); opt.step(); loss_fn.update_bank()`.
    In eval mode the bank is read but never written. Under DDP each worker keeps its own bank
    (built from its own shard of the batch).
    """

    ce_weight: Tensor  # buffer registered in __init__

    def __init__(self, num_modalities: int, num_classes: int, dim: int, *,
                 class_counts: Sequence[int] | None = None, **settings: Any):
        """settings: any `cfcml.config.LossConfig` field (w_cls, w_sam, w_up, w_cp, tau_sam, tau_up,
        tau_cp, momentum, fine, class_weights), checked by LossConfig; the rest keep LossConfig's
        defaults. class_counts: training samples per class, required by class_weights="balanced"."""
        super().__init__()
        cfg = LossConfig(**settings)
        weight = torch.ones(num_classes)
        if cfg.class_weights == "balanced":
            if class_counts is None or len(class_counts) != num_classes:
                raise ValueError(f"class_weights='balanced' needs class_counts for {num_classes} classes")
            counts = torch.as_tensor(class_counts, dtype=torch.float32)
            # N / (C * N_c); a class without training samples gets weight 0 (it never appears as a target)
            weight = torch.where(counts > 0, counts.sum() / (num_classes * counts.clamp(min=1)), torch.zeros(()))
        self.register_buffer("ce_weight", weight, persistent=False)  # recomputed from the fold, not stored
        self.config = cfg
        self.num_classes = num_classes
        self.weights = {"ce": cfg.w_cls, "sam": cfg.w_sam, "up": cfg.w_up, "cp": cfg.w_cp}
        self.taus = (cfg.tau_sam, cfg.tau_up, cfg.tau_cp)
        self.fine = cfg.fine
        self.bank = PrototypeBank(num_modalities, num_classes, dim, cfg.momentum)
        self._cache: tuple[Tensor, Tensor, Tensor] | None = None  # prototypes of the last train forward

    @classmethod
    def from_config(cls, cfg: LossConfig, *, num_modalities: int, num_classes: int, dim: int,
                    class_counts: Sequence[int] | None = None) -> CFCMLLoss:
        return cls(num_modalities, num_classes, dim, class_counts=class_counts, **dataclasses.asdict(cfg))

    def extra_repr(self) -> str:
        return f"weights={self.weights}, taus={self.taus}, fine={self.fine}"

    def forward(self, logits: Tensor, features: Tensor | Sequence[Tensor], labels: Tensor) -> dict[str, Tensor]:
        """{"loss": total (with grad), "ce", "sam", "up", "cp": detached, for logging}."""
        C = self.num_classes
        if logits.dim() != 2 or logits.shape[1] != C:
            raise ValueError(f"logits: expected [B, {C}]; got {tuple(logits.shape)}")
        labels = _check_labels(labels, logits.shape[0], C)
        ce = F.cross_entropy(logits, labels, weight=self.ce_weight.to(logits.dtype))
        loss = self.weights["ce"] * ce
        out = {"ce": ce.detach()}
        if not self.fine:
            zero = ce.new_zeros(())
            return {"loss": loss, **out, "sam": zero, "up": zero, "cp": zero}
        z = _as_features(features)
        M, _, D = self.bank.p_bank.shape
        if z.shape != (logits.shape[0], M, D):
            raise ValueError(f"features: expected [B={logits.shape[0]}, M={M}, D={D}]; got {tuple(z.shape)}")
        zn = F.normalize(z, dim=-1)
        p_batch, q_batch, present = batch_prototypes(zn, labels, C)
        p, q, available = self.bank.blend(p_batch, q_batch, present)
        if self.training:
            self._cache = (p.detach(), q.detach(), present)
        terms = _hrm_from_prototypes(zn, labels, p, q, available, *self.taus)
        for key in LOSS_KEYS:
            loss = loss + self.weights[key] * terms[key]
            out[key] = terms[key].detach()
        return {"loss": loss, **out}

    def update_bank(self) -> None:
        """Move the bank to the prototypes used by the last training forward (after optimizer.step())."""
        if self._cache is not None:
            self.bank.update(*self._cache)
            self._cache = None
