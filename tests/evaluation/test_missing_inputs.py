"""Withholding inputs: what the network receives for a withheld modality or field, and training
dropout's rates and guarantees."""
from __future__ import annotations

import pytest
import torch

from cfcml.evaluation.missing_inputs import drop_inputs, withhold
from cfcml.predict import ModelInputs


def inputs(B=4, M=2, F_num=2, F_cat=3):
    g = torch.Generator().manual_seed(0)
    return ModelInputs([torch.rand(B, 1, 4, 4, generator=g) + 1 for _ in range(M)], torch.rand(B, F_num, generator=g),
                       torch.zeros(B, F_num, dtype=torch.bool), torch.randint(0, 3, (B, F_cat), generator=g))


def test_withheld_modality_is_zero_and_the_rest_unchanged():
    x = inputs()
    out = withhold(x, modality=1)
    assert (out.images[1] == 0).all() and torch.equal(out.images[0], x.images[0])
    assert torch.equal(out.num, x.num) and torch.equal(out.cat, x.cat)
    assert (x.images[1] != 0).all()  # the original is not touched


def test_withheld_fields_read_as_missing():
    x = inputs()
    out = withhold(x, numeric=1, categorical=2)
    assert out.num_missing[:, 1].all() and (out.num[:, 1] == 0).all() and not out.num_missing[:, 0].any()
    assert (out.cat[:, 2] == -1).all() and torch.equal(out.cat[:, :2], x.cat[:, :2])
    assert not x.num_missing.any()


@pytest.mark.parametrize("kw", [{"numeric": 2}, {"categorical": 3}, {"categorical": -1}])
def test_a_field_out_of_range_is_refused(kw):
    with pytest.raises(IndexError):
        withhold(inputs(), **kw)


def test_no_dropout_returns_the_inputs():
    x = inputs()
    assert drop_inputs(x, 0.0, 0.0) is x


def test_dropout_rates_are_about_p_and_no_sample_loses_every_modality():
    x = inputs(B=4000, M=2)
    out = drop_inputs(x, 0.3, 0.2, torch.Generator().manual_seed(1))
    dropped = torch.stack([(im == 0).flatten(1).all(1) for im in out.images], 1)
    assert not dropped.all(1).any()
    assert 0.2 < dropped.float().mean() < 0.35
    assert 0.17 < out.num_missing.float().mean() < 0.23
    assert 0.17 < (out.cat == -1).float().mean() < 0.23


@pytest.mark.parametrize("p", [-0.1, 1.0])
def test_a_dropout_probability_outside_0_1_is_refused(p):
    with pytest.raises(ValueError, match="must be in"):
        drop_inputs(inputs(), p, 0.0)
