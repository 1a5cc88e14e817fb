"""Class probabilities from a CFCML network: the one prediction path shared by validation during
training, the final test evaluation and the registered (served) model.

A batch is what `cfcml.data.dataset` yields (collated): {"images": [B, C, *size] per modality,
"num" [B, F_num], "num_missing" [B, F_num], "cat" [B, F_cat], "label" [B], "index" [B]}.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn


@dataclass
class ModelInputs:
    """The network's inputs of one batch, on one device."""

    images: list[torch.Tensor]  # [B, C, *size] per image modality
    num: torch.Tensor  # float [B, F_num]
    num_missing: torch.Tensor  # bool [B, F_num]
    cat: torch.Tensor  # long [B, F_cat], -1 = missing

    @classmethod
    def from_batch(cls, batch: dict[str, Any], device: torch.device | str) -> ModelInputs:
        def move(x: torch.Tensor) -> torch.Tensor:
            return x.to(device, non_blocking=True)

        return cls([move(x) for x in batch["images"]], move(batch["num"]), move(batch["num_missing"]),
                   move(batch["cat"]))

    def __call__(self, model: nn.Module) -> Any:
        return model(self.images, self.num, self.num_missing, self.cat)


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    batches: Iterable[dict[str, Any]],
    device: torch.device | str,
    num_classes: int,
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> np.ndarray:
    """Softmax probabilities float32 [N, C] over all `batches`, in their order (eval mode)."""
    was_training = model.training
    model.eval()
    probs = []
    try:
        for batch in batches:
            inputs = ModelInputs.from_batch(batch, device)
            with autocast():
                logits = inputs(model).logits
            probs.append(torch.softmax(logits.float(), dim=1).cpu())
    finally:
        model.train(was_training)
    return torch.cat(probs).numpy() if probs else np.zeros((0, num_classes), np.float32)
