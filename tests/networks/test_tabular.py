"""TabularTokenizer: one token per field, a learned missing token wherever a value is absent."""
from __future__ import annotations

import pytest
import torch

from cfcml.networks.tabular import TabularTokenizer

DIM = 8


@pytest.fixture
def tok() -> TabularTokenizer:
    torch.manual_seed(0)
    return TabularTokenizer(num_numeric=2, cat_cardinalities=(3, 2), dim=DIM)


def encode(tok, num, missing, cat):
    return tok(torch.tensor(num, dtype=torch.float32), torch.tensor(missing), torch.tensor(cat))


def test_one_token_per_field(tok):
    out = encode(tok, [[0.5, -1.0]] * 3, [[False, False]] * 3, [[0, 1]] * 3)
    assert out.shape == (3, 4, DIM)


def test_missing_numeric_uses_the_missing_token_whatever_the_value(tok):
    # the value under a missing flag may be 0 (the data contract), anything else, or NaN (pandas)
    outs = [encode(tok, [[v, 1.0]], [[True, False]], [[0, 0]]) for v in (0.0, 7.0, float("nan"))]
    for out in outs:
        assert torch.equal(out[0, 0], tok.missing[0])
        assert torch.equal(out, outs[0])
    # a NaN hidden by the flag must not poison the gradients either
    outs[-1].sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in tok.parameters() if p.grad is not None)
    # the present field is untouched
    assert not torch.equal(outs[0][0, 1], tok.missing[1])


def test_numeric_token_is_value_times_vector_plus_bias(tok):
    a = encode(tok, [[1.0, 0.0]], [[False, False]], [[0, 0]])
    b = encode(tok, [[3.0, 0.0]], [[False, False]], [[0, 0]])
    torch.testing.assert_close(b[0, 0] - a[0, 0], 2.0 * tok.num_weight[0])
    torch.testing.assert_close(a[0, 1], tok.num_bias[1])


def test_missing_category_uses_the_fields_missing_token(tok):
    out = encode(tok, [[0.0, 0.0]], [[False, False]], [[-1, -1]])
    assert torch.equal(out[0, 2], tok.missing[2])
    assert torch.equal(out[0, 3], tok.missing[3])
    assert not torch.equal(out[0, 2], out[0, 3])  # each field has its own missing token


def test_categories_give_distinct_tokens_within_and_across_fields(tok):
    out = encode(tok, [[0.0, 0.0]] * 3, [[False, False]] * 3, [[0, 0], [1, 1], [2, 1]])
    first = out[:, 2]  # field 0, categories 0, 1, 2
    assert len({tuple(t.tolist()) for t in first}) == 3
    assert torch.equal(out[1, 3], out[2, 3])  # same category, same token
    assert not torch.equal(out[0, 3], out[1, 3])
    # index 0 of field 1 is not index 0 of field 0 (each vocabulary has its own rows)
    assert not torch.equal(out[0, 2], out[0, 3])
    # no category collides with a missing token
    assert not any(torch.equal(out[i, 2], tok.missing[2]) for i in range(3))


def test_categorical_only_and_numeric_only_tables():
    torch.manual_seed(0)
    cat_only = TabularTokenizer(0, (3, 3, 9, 2, 3), DIM)  # Derm7pt: five categorical fields
    out = cat_only(torch.zeros(2, 0), torch.zeros(2, 0, dtype=torch.bool), torch.tensor([[0, 1, 8, 1, 2], [-1] * 5]))
    assert out.shape == (2, 5, DIM)
    assert torch.equal(out[1], cat_only.missing)
    num_only = TabularTokenizer(3, (), DIM)
    out = num_only(torch.randn(2, 3), torch.zeros(2, 3, dtype=torch.bool), torch.zeros(2, 0, dtype=torch.long))
    assert out.shape == (2, 3, DIM)


def test_no_fields_is_rejected():
    with pytest.raises(ValueError, match="at least one field"):
        TabularTokenizer(0, (), DIM)
