"""Tabular tokenizer: one D-dim token per clinical field.

The public code writes the table as sentences for a frozen CLIP text encoder; we tokenise it
directly (as FT-Transformer does): numeric value * learned vector + learned bias, categorical
embedding, and a learned per-field "missing" token wherever a value is absent.
"""
from __future__ import annotations

import torch
from torch import nn


class TabularTokenizer(nn.Module):
    cat_offsets: torch.Tensor  # buffer registered in __init__

    def __init__(self, num_numeric: int, cat_cardinalities: tuple[int, ...], dim: int):
        super().__init__()
        self.num_numeric = num_numeric
        self.num_fields = num_numeric + len(cat_cardinalities)
        if self.num_fields == 0:
            raise ValueError("the tabular modality needs at least one field")
        self.num_weight = nn.Parameter(torch.randn(num_numeric, dim) * 0.1)
        self.num_bias = nn.Parameter(torch.zeros(num_numeric, dim))
        # All categorical vocabularies share one table; each field's rows start at its offset.
        offsets = torch.tensor([0, *cat_cardinalities[:-1]], dtype=torch.long).cumsum(0)
        self.register_buffer("cat_offsets", offsets[: len(cat_cardinalities)], persistent=False)
        self.cat_embed = nn.Embedding(max(sum(cat_cardinalities), 1), dim)
        nn.init.normal_(self.cat_embed.weight, std=0.1)
        self.missing = nn.Parameter(torch.randn(self.num_fields, dim) * 0.1)

    def forward(self, num: torch.Tensor, num_missing: torch.Tensor, cat: torch.Tensor) -> torch.Tensor:
        """num [B, Fn] float, num_missing [B, Fn] bool, cat [B, Fc] long (-1 = missing) -> [B, T, D]."""
        # A missing value may still hold NaN (e.g. straight from pandas): the missing token hides
        # it in the output, but NaN * 0 would still poison num_weight's gradient, so zero it first.
        num = num.masked_fill(num_missing.bool(), 0.0)
        num_tok = num.unsqueeze(-1) * self.num_weight + self.num_bias  # [B, Fn, D]
        cat_missing = cat < 0
        cat_tok = self.cat_embed(cat.clamp(min=0) + self.cat_offsets)  # [B, Fc, D]
        tokens = torch.cat([num_tok, cat_tok], dim=1)
        missing = torch.cat([num_missing.bool(), cat_missing], dim=1).unsqueeze(-1)
        return torch.where(missing, self.missing.expand_as(tokens), tokens)
