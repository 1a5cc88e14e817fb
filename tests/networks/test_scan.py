"""Selective scan backends: each agrees with the plain recurrence, forward and gradients, to 1e-4."""
from __future__ import annotations

import typing

import pytest
import torch
import torch.nn.functional as F
from scan_inputs import make_inputs

from cfcml.config import SCANS, ConfigError, ModelConfig, from_dict
from cfcml.networks import scan
from cfcml.networks.scan import mamba_ssm_available, resolve_scan, selective_scan

CPU_BACKENDS = ["sequential", "pscan", "chunked", "auto"]
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")


def recurrence(u, delta, A, B, C, D, z, delta_bias):
    """The definition, one token at a time, written independently of cfcml (the reference)."""
    delta = F.softplus(delta + delta_bias[:, None])
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=u.dtype, device=u.device)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(delta[:, :, t, None] * A) * h + delta[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, -1) * F.silu(z)


def assert_close_rel(actual: torch.Tensor, expected: torch.Tensor, name: str, rtol: float = 1e-4) -> None:
    err = (actual.double() - expected.double()).norm() / expected.double().norm().clamp_min(1e-30)
    assert err < rtol, f"{name}: relative error {err:.2e}"


def check_against_recurrence(backend: str, length: int, chunk: int | None, device: str = "cpu") -> None:
    ref_in = [x.requires_grad_() for x in make_inputs(2, 6, 4, length, device=device)]
    ref = recurrence(*ref_in)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(device)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    inputs = [x.detach().float().requires_grad_() for x in ref_in]  # the backends' working precision
    out = selective_scan(*inputs, backend=backend, chunk=chunk)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert_close_rel(out, ref, "y")
    for name, g, ref_g in zip(NAMES, torch.autograd.grad(out, inputs, grad_out.float()), ref_grads):
        assert_close_rel(g, ref_g, f"d{name}")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("length,chunk", [
    (1, None),
    (16, None),
    (37, 8),  # five chunks, the last one padded to a power of two
    (64, 16),  # whole chunks only
])
def test_every_cpu_backend_matches_the_recurrence_forward_and_backward(backend, length, chunk):
    check_against_recurrence(backend, length, chunk)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["pscan", "chunked", "auto", "mamba_ssm", "triton"])
@pytest.mark.parametrize("length,chunk", [(37, 8), (300, None), (4100, None)])
def test_every_cuda_backend_matches_the_recurrence_forward_and_backward(backend, length, chunk):
    if backend == "mamba_ssm" and not mamba_ssm_available():
        pytest.skip("mamba-ssm is not installed")
    if backend == "triton" and not scan.triton_available():
        pytest.skip("triton is not installed")
    if backend in ("mamba_ssm", "triton") and chunk is not None:
        pytest.skip("the fused kernels have no chunk setting")
    check_against_recurrence(backend, length, chunk, device="cuda")


def test_chunked_scan_keeps_no_hidden_states_for_backward():
    """The point of `chunked`: autograd keeps its inputs and one state per chunk, not [B, D, L, N]."""
    inputs = [x.float().requires_grad_() for x in make_inputs(2, 6, 4, 256)]
    sequence, hidden = 2 * 6 * 256, 2 * 6 * 256 * 4  # elements of u [B, D, L], of the states [B, D, L, N]

    def saved_elements(backend):
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            selective_scan(*inputs, backend=backend, chunk=64)
        return max(sizes)

    assert saved_elements("pscan") >= hidden
    assert saved_elements("chunked") <= sequence


def test_auto_picks_chunked_on_cpu_mamba_ssm_then_triton_on_cuda_and_names_are_checked():
    assert resolve_scan("auto", torch.device("cpu")) == "chunked"
    assert resolve_scan("pscan", torch.device("cpu")) == "pscan"
    expected = "mamba_ssm" if mamba_ssm_available() else "triton" if scan.triton_available() else "chunked"
    assert resolve_scan("auto", torch.device("cuda")) == expected
    assert resolve_scan("triton", torch.device("cpu")) == "triton"  # checked where it runs (test_scan_triton.py)
    with pytest.raises(ValueError, match="unknown scan backend"):
        resolve_scan("fast", torch.device("cpu"))


def test_mamba_ssm_refuses_cpu_tensors_and_bad_chunks_are_refused():
    inputs = [x.float() for x in make_inputs(1, 2, 2, 4)]
    with pytest.raises(ValueError, match="CUDA"):
        selective_scan(*inputs, backend="mamba_ssm")
    with pytest.raises(ValueError, match="power of two"):
        selective_scan(*inputs, backend="chunked", chunk=6)


def test_scan_names_in_the_config_are_the_backends():
    literal = typing.get_args(typing.get_type_hints(ModelConfig)["scan"])
    assert scan.SCAN_BACKENDS == literal == SCANS
    with pytest.raises(ConfigError, match=r"^config\.scan: "):
        from_dict(ModelConfig, {"scan": "fast"})


@pytest.mark.skipif(mamba_ssm_available(), reason="mamba-ssm is installed here")
def test_requesting_mamba_ssm_without_the_package_is_a_config_error_naming_model_scan():
    with pytest.raises(ConfigError, match=r"^model\.scan: .*mamba-ssm"):
        from_dict(ModelConfig, {"scan": "mamba_ssm"}, "model")


@pytest.mark.skipif(scan.triton_available(), reason="triton is installed here")
def test_requesting_triton_without_the_package_is_a_config_error_naming_model_scan():
    with pytest.raises(ConfigError, match=r"^model\.scan: .*triton"):
        from_dict(ModelConfig, {"scan": "triton"}, "model")


@pytest.mark.parametrize("backend", ["sequential", "chunked"])
def test_reverse_is_the_scan_of_the_flipped_sequence_for_the_pytorch_backends(backend):
    inputs = [x.float() for x in make_inputs(2, 6, 4, 21)]
    flipped = [x.flip(-1) if x.dim() == 3 else x for x in inputs]
    torch.testing.assert_close(selective_scan(*inputs, backend=backend, chunk=8, reverse=True),
                               selective_scan(*flipped, backend=backend, chunk=8).flip(-1), rtol=0, atol=0)
