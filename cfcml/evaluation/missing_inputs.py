"""Missing inputs: withholding a whole image modality or one clinical field, at training time
(dropout, so the model learns to do without) and at test time (to measure what each input is worth
to the trained model).

How an input is withheld, the simplest way faithful to the network (cfcml/networks, docs/model.md):
- a clinical field is set to what the tabular tokenizer reads as missing: a numeric field's
  missing flag on (its value 0), a categorical field's index -1; the tokenizer then uses its
  learned missing token, exactly as for a blank value in the clinical table;
- an image modality is replaced by zeros (after intensity normalisation: the mean intensity of a
  z-scored volume, black for a scaled photo). The network has no missing-image token; a model
  trained with `train.modality_dropout` > 0 has seen zero images stand for an absent sequence, a
  model trained without it has not, which is why a served model accepts a missing modality only
  in the first case (tuning/release/served_model.py).

Training-time dropout draws, per sample, each modality independently with probability
`modality_p` and each field with probability `field_p` (a torch Generator makes it reproducible).
At least one modality is kept for every sample, so no sample is left without an image.
"""
from __future__ import annotations

import torch

from cfcml.predict import ModelInputs


def withhold(inputs: ModelInputs, modality: int | None = None, numeric: int | None = None,
             categorical: int | None = None) -> ModelInputs:
    """A copy of `inputs` with image modality `modality`, numeric field `numeric` and/or
    categorical field `categorical` (indices in the tokenizer's order: numeric fields, then
    categorical, each in spec order) withheld for every sample. Raises IndexError for an index out
    of range."""
    images = list(inputs.images)
    num, num_missing, cat = inputs.num.clone(), inputs.num_missing.clone(), inputs.cat.clone()
    if modality is not None:
        images[modality] = torch.zeros_like(images[modality])
    if numeric is not None:
        if not 0 <= numeric < num.shape[1]:
            raise IndexError(f"numeric field {numeric} out of range 0..{num.shape[1] - 1}")
        num[:, numeric] = 0.0
        num_missing[:, numeric] = True
    if categorical is not None:
        if not 0 <= categorical < cat.shape[1]:
            raise IndexError(f"categorical field {categorical} out of range 0..{cat.shape[1] - 1}")
        cat[:, categorical] = -1
    return ModelInputs(images, num, num_missing, cat)


def drop_inputs(inputs: ModelInputs, modality_p: float, field_p: float,
                generator: torch.Generator | None = None) -> ModelInputs:
    """Training-time dropout of whole inputs, per sample (see the module doc); `inputs` unchanged
    when both probabilities are 0. Probabilities in [0, 1); ValueError otherwise."""
    for name, p in (("modality_p", modality_p), ("field_p", field_p)):
        if not 0.0 <= p < 1.0:
            raise ValueError(f"{name} must be in [0, 1); got {p}")
    if modality_p == 0 and field_p == 0:
        return inputs
    device = inputs.num.device
    B = inputs.num.shape[0]

    images = list(inputs.images)
    if modality_p > 0 and len(images) > 1:
        drop = torch.rand(B, len(images), generator=generator) < modality_p
        keep = torch.randint(len(images), (B,), generator=generator)
        every = drop.all(1)  # never every modality of a sample: keep a random one of those
        drop[torch.arange(B)[every], keep[every]] = False
        drop = drop.to(device)
        for m, x in enumerate(images):
            mask = drop[:, m].view(B, *[1] * (x.ndim - 1))
            images[m] = torch.where(mask, torch.zeros((), dtype=x.dtype, device=device), x)
    num, num_missing, cat = inputs.num, inputs.num_missing, inputs.cat
    if field_p > 0:
        if num.shape[1]:
            d = (torch.rand(num.shape, generator=generator) < field_p).to(device)
            num = torch.where(d, torch.zeros((), dtype=num.dtype, device=device), num)
            num_missing = num_missing | d
        if cat.shape[1]:
            d = (torch.rand(cat.shape, generator=generator) < field_p).to(device)
            cat = torch.where(d, torch.full((), -1, dtype=cat.dtype, device=device), cat)
    return ModelInputs(images, num, num_missing, cat)
