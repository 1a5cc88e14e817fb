"""The Mamba block: mamba-ssm's layers and maths (checked against mambapy's block), causal, any scan."""
from __future__ import annotations

import pytest
import torch
from mambapy.mamba import MambaBlock, MambaConfig

from cfcml.networks.mamba import Mamba


@pytest.mark.parametrize("d_model,d_state,expand", [(8, 16, 2), (20, 4, 1)])
def test_same_weights_same_output_as_mambapy(d_model, d_state, expand):
    """mambapy's MambaBlock follows mamba-ssm's mamba_simple: its state dict loads into ours unchanged
    and gives the same output and input gradient."""
    torch.manual_seed(0)
    theirs = MambaBlock(MambaConfig(d_model=d_model, n_layers=1, d_state=d_state, expand_factor=expand))
    ours = Mamba(d_model, d_state=d_state, expand=expand)
    ours.load_state_dict(theirs.state_dict())  # strict: same names and shapes
    x = torch.randn(3, 21, d_model, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    expected, out = theirs(x), ours(x2)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    expected.square().sum().backward()
    out.square().sum().backward()
    torch.testing.assert_close(x2.grad, x.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("scan", ["sequential", "pscan", "chunked"])
def test_token_t_sees_only_tokens_up_to_t(scan):
    torch.manual_seed(0)
    block = Mamba(8, scan=scan)
    x = torch.randn(2, 12, 8)
    later = x.clone()
    later[:, 7:] = torch.randn(2, 5, 8)
    with torch.no_grad():
        a, b = block(x), block(later)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_every_scan_gives_the_same_block_output_and_gradients():
    torch.manual_seed(0)
    block = Mamba(12, d_state=16)
    x = torch.randn(2, 50, 12)
    results = {}
    for scan in ("sequential", "pscan", "chunked"):
        block.scan = scan
        block.zero_grad()
        out = block(x)
        out.square().mean().backward()
        results[scan] = (out.detach(), [p.grad.clone() for p in block.parameters()])
    ref_out, ref_grads = results.pop("sequential")
    for out, grads in results.values():
        torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-6)
        for g, ref in zip(grads, ref_grads):
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("kwargs,match", [
    ({"d_model": 0}, "d_model"),
    ({"d_model": 8, "d_state": 0}, "d_state"),
    ({"d_model": 8, "scan": "fast"}, "scan"),
    ({"d_model": 8, "dt_min": 0.2, "dt_max": 0.1}, "dt_min"),
])
def test_bad_arguments_are_refused_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba(**kwargs)
