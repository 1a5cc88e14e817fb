"""Literal, loop-by-loop transcription of the fine-stage losses (docs/model.md, "The fine stage").

SLOW (one torch call per similarity): it exists only as the ground truth that tests and
`benchmarks/bench_losses.py` compare `cfcml.losses.hrm_losses` against. Do not train with it.

It follows the formulas word for word, looping over m, c and i. Classes absent from the batch are
skipped everywhere (the sums run over the classes present, L_cp divides by their number), which is
the convention of `cfcml.losses`; with every class present this is exactly docs/model.md.
"""
from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor


def _n(v: Tensor) -> Tensor:
    return v / v.norm()


def _s(a: Tensor, b: Tensor, tau: float) -> Tensor:
    return torch.exp((F.cosine_similarity(a, b, dim=0) + 1) / tau)


def _l(a: Tensor, P: list[Tensor], N: list[Tensor], tau: float) -> Tensor:
    s_p = cast(Tensor, sum(_s(a, b, tau) for b in P))  # P is never empty
    s_n = sum(_s(a, b, tau) for b in N)  # 0 when N is empty
    return -torch.log(s_p / (s_p + s_n) + 1e-8)


def reference_hrm_losses(
    features: Tensor,
    labels: Tensor,
    num_classes: int,
    tau_sam: float = 0.07,
    tau_up: float = 0.07,
    tau_cp: float = 0.07,
) -> dict[str, Tensor]:
    """L_sam, L_up, L_cp with plain Python loops. features [B, M, D], labels int [B]."""
    B, M, _ = features.shape
    y = labels.tolist()
    z = [[features[i, m] for m in range(M)] for i in range(B)]  # z[i][m]
    classes = [c for c in range(num_classes) if c in y]
    members = {c: [i for i in range(B) if y[i] == c] for c in classes}

    p = {}  # p[m, c] = n(mean over i with y_i = c of n(z_{m,i}))
    for m in range(M):
        for c in classes:
            p[m, c] = _n(cast(Tensor, sum(_n(z[i][m]) for i in members[c])) / len(members[c]))
    q = {}  # q[c] = n(mean over all m and i with y_i = c of n(z_{m,i}))
    for c in classes:
        q[c] = _n(cast(Tensor, sum(_n(z[i][m]) for m in range(M) for i in members[c])) / (M * len(members[c])))

    loss_sam = torch.zeros((), dtype=features.dtype)
    for m in range(M):
        for c in classes:
            P = [q[c]] + [p[m2, c] for m2 in range(M)]
            N = [z[j][m] for j in range(B) if y[j] != c]
            total = sum(_l(z[i][m], P, N, tau_sam) for i in members[c])
            loss_sam = loss_sam + total / len(members[c])

    loss_up = torch.zeros((), dtype=features.dtype)
    for m in range(M):
        for c in classes:
            N = [p[m2, c2] for m2 in range(M) for c2 in classes if c2 != c]
            loss_up = loss_up + _l(p[m, c], [q[c]], N, tau_up)
    loss_up = 1e-8 + loss_up / M

    loss_cp = torch.zeros((), dtype=features.dtype)
    for c in classes:
        N = [q[c2] for c2 in classes if c2 != c]
        loss_cp = loss_cp + _l(q[c], [p[m, c] for m in range(M)], N, tau_cp)
    loss_cp = 1e-8 + loss_cp / len(classes)
    return {"sam": loss_sam, "up": loss_up, "cp": loss_cp}
