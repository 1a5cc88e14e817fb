"""cfcml/predict.py, the one prediction path: probabilities in input order, the model's mode left as it was."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from cfcml.networks.cfcml import ModelOutput
from cfcml.predict import ModelInputs, predict_proba


class Echo(nn.Module):
    """Logits = the first numeric field times a class vector: predictable probabilities."""

    def forward(self, images, num, num_missing, cat):
        logits = num[:, :1] * torch.tensor([[1.0, -1.0, 0.0]])
        return ModelOutput(logits, torch.zeros(len(num), 2, 4))


def batch(values: list[float]) -> dict:
    n = len(values)
    return {"images": [torch.zeros(n, 1, 4, 4)], "num": torch.tensor(values)[:, None],
            "num_missing": torch.zeros(n, 1, dtype=torch.bool), "cat": torch.zeros(n, 0, dtype=torch.long),
            "label": torch.zeros(n, dtype=torch.long), "index": torch.arange(n)}


def test_probabilities_follow_the_batches_in_order_and_mode_is_restored():
    model = Echo().train()
    probs = predict_proba(model, [batch([0.0, 2.0]), batch([-2.0])], "cpu", 3)
    want = torch.softmax(torch.tensor([[0.0, 0, 0], [2, -2, 0], [-2, 2, 0]]), 1).numpy()
    np.testing.assert_allclose(probs, want, rtol=1e-6)
    assert model.training  # eval for prediction, then back
    assert predict_proba(model, [], "cpu", 3).shape == (0, 3)


def test_inputs_come_from_a_collated_batch():
    inputs = ModelInputs.from_batch(batch([1.0]), "cpu")
    assert inputs.num.shape == (1, 1) and len(inputs.images) == 1 and inputs.cat.dtype == torch.long
