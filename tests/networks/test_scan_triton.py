"""The triton scan (cfcml/networks/scan_triton.py): output and all eight gradients against the float64
recurrence, run on CPU under Triton's interpreter at tiny shapes with tiny tiles; CUDA parity tests at
a MEN stage size run only where CUDA is."""
from __future__ import annotations

import pytest
import torch

from cfcml.networks.scan import selective_scan

triton = pytest.importorskip("triton")
from scan_inputs import make_inputs  # noqa: E402

from cfcml.networks.mamba import Mamba  # noqa: E402
from cfcml.networks.res_mamba import MambaLayer  # noqa: E402
from cfcml.networks.scan_triton import scan_reference, selective_scan_triton  # noqa: E402

NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def interpret(monkeypatch):
    """CPU tensors run the kernels under Triton's interpreter, which the backend allows only with this set."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """Relative Frobenius error; absolute where the expected tensor is exactly zero (dA at L = 1)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    diff, scale = (actual - expected).norm(), expected.norm()
    return float(diff / scale) if scale > 0 else float(diff)


def reference_and_grads(inputs64, reverse, seed=1):
    inputs64 = [x.detach().requires_grad_() for x in inputs64]
    ref = scan_reference(*inputs64, reverse=reverse)
    grad_out = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ref.detach(), grad_out.to(ref.device), torch.autograd.grad(ref, inputs64, grad_out.to(ref.device))


def check(out, grads, ref, ref_grads, tol):
    errors = {"out": rel_err(out, ref)} | {f"d{n}": rel_err(g, r) for n, g, r in zip(NAMES, grads, ref_grads)}
    bad = {k: f"{v:.1e}" for k, v in errors.items() if not v < tol}
    assert not bad, f"relative errors above {tol}: {bad}"


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("batch,d,n,length,tile", [
    (1, 4, 4, 1, 4),  # one token
    (2, 4, 4, 5, 8),  # shorter than a tile
    (2, 6, 3, 13, 4),  # 4 tiles, the last partial (the carry); D not a multiple of BD; N not a power of 2
    (1, 8, 4, 16, 4),  # whole tiles only, two channel blocks
])
def test_triton_scan_matches_the_float64_recurrence_forward_and_backward(interpret, batch, d, n, length, tile,
                                                                         reverse):
    inputs64 = make_inputs(batch, d, n, length)
    ref, grad_out, ref_grads = reference_and_grads(inputs64, reverse)
    inputs = [x.float().requires_grad_() for x in inputs64]
    out = selective_scan_triton(*inputs, reverse=reverse, tile=tile, block_d=4)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    grads = torch.autograd.grad(out, inputs, grad_out.float())
    assert [g.shape for g in grads] == [x.shape for x in inputs]
    check(out, grads, ref, ref_grads, tol=1e-5)


def strided_inputs(inputs64, dtype=torch.float32, device="cpu"):
    """The layouts the Mamba block hands over: u and z halves of one [B, L, 2D] projection seen as
    [B, D, L]; delta a transposed [B, L, D]; B and C slices of one [B, L, R + 2N] projection."""
    u, delta, A, B, C, D, z, bias = (x.to(device) for x in inputs64)
    bsz, d, length = u.shape
    n = A.shape[1]
    xz = torch.cat([u, z], 1).transpose(1, 2).contiguous().to(dtype).transpose(1, 2)  # [B, 2D, L] view
    u_v, z_v = xz.chunk(2, dim=1)
    delta_v = delta.transpose(1, 2).contiguous().to(dtype).transpose(1, 2)
    pad = torch.zeros(bsz, 3, length, dtype=torch.float64, device=device)
    dbc = torch.cat([pad, B, C], 1).transpose(1, 2).contiguous().to(dtype).transpose(1, 2)  # [B, 3 + 2N, L] view
    B_v, C_v = dbc[:, 3:3 + n], dbc[:, 3 + n:]
    views = [u_v, delta_v, A.float(), B_v, C_v, D.float(), z_v, bias.float()]
    assert not any(v.is_contiguous() for v in (u_v, delta_v, z_v, B_v, C_v))
    return [v.detach().requires_grad_() for v in views]


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_triton_scan_reads_strided_inputs_without_copies_and_gets_the_same_numbers(interpret, reverse):
    inputs64 = make_inputs(2, 6, 4, 11, seed=3)
    ref, grad_out, ref_grads = reference_and_grads(inputs64, reverse)
    inputs = strided_inputs(inputs64)
    out = selective_scan_triton(*inputs, reverse=reverse, tile=4, block_d=4)
    check(out, torch.autograd.grad(out, inputs, grad_out.float()), ref, ref_grads, tol=1e-5)


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
def test_triton_scan_takes_bfloat16_and_answers_in_it_with_float32_state(interpret, reverse):
    inputs64 = make_inputs(2, 6, 4, 13, seed=4)
    # the reference sees the very values the kernel reads: the bf16-rounded inputs, in float64
    bf16 = [x.to(torch.bfloat16) if i in (0, 1, 3, 4, 6) else x.float() for i, x in enumerate(inputs64)]
    ref, grad_out, ref_grads = reference_and_grads([x.double() for x in bf16], reverse)
    inputs = [x.detach().requires_grad_() for x in bf16]
    out = selective_scan_triton(*inputs, reverse=reverse, tile=4, block_d=4)
    grads = torch.autograd.grad(out, inputs, grad_out.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    assert [g.dtype for g in grads] == [x.dtype for x in inputs]
    check(out, grads, ref, ref_grads, tol=2e-2)  # bf16 output and gradients: 8 bits of mantissa


def test_the_triton_backend_of_selective_scan_matches_sequential_both_ways(interpret):
    inputs = [x.float() for x in make_inputs(2, 6, 4, 10, seed=5)]
    for reverse in (False, True):
        expected = selective_scan(*inputs, backend="sequential", reverse=reverse)
        actual = selective_scan(*inputs, backend="triton", reverse=reverse)
        assert rel_err(actual, expected) < 1e-5
    flipped = [x.flip(-1) if x.dim() == 3 else x for x in inputs]
    assert rel_err(selective_scan(*inputs, backend="chunked", reverse=True),
                   selective_scan(*flipped, backend="chunked").flip(-1)) == 0.0


def test_triton_scan_keeps_one_state_per_tile_not_the_hidden_states(interpret):
    inputs = [x.float().requires_grad_() for x in make_inputs(1, 4, 4, 32)]
    sizes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
        selective_scan_triton(*inputs, tile=8, block_d=4)
    assert max(sizes) == 1 * 4 * 32  # the inputs [B, D, L]; the states are [B, D, N, L / T] = 1 * 4 * 4 * 4
    assert 4 * 4 * 4 in sizes


def test_triton_scan_compiles_into_one_graph_with_its_backward(interpret):
    """The custom op has fake and autograd registrations: torch.compile traces it with no graph break."""
    inputs = [x.float().requires_grad_() for x in make_inputs(1, 4, 2, 6, seed=6)]
    compiled = torch.compile(lambda *xs: selective_scan_triton(*xs, reverse=True, tile=4, block_d=4).sum(),
                             backend="aot_eager", fullgraph=True)
    expected = torch.autograd.grad(selective_scan_triton(*inputs, reverse=True, tile=4, block_d=4).sum(), inputs)
    actual = torch.autograd.grad(compiled(*inputs), inputs)
    for a, e in zip(actual, expected):
        torch.testing.assert_close(a, e)


def test_triton_scan_refuses_what_it_cannot_run(monkeypatch):
    inputs = [x.float() for x in make_inputs(1, 2, 2, 4)]
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        selective_scan(*inputs, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="power of two"):
        selective_scan_triton(*inputs, tile=6)
    with pytest.raises(ValueError, match=r"B and C \[B, N, L\]"):
        selective_scan_triton(*inputs[:3], inputs[3][..., :3], *inputs[4:])


@pytest.mark.parametrize("kernel,reverse,dtype", [("fwd", False, "bf16"), ("bwd", True, "fp32")])
def test_the_kernels_compile_for_a_hopper_gpu_without_one(kernel, reverse, dtype):
    """Triton compiles down to a cubin on the CPU (ptxas ships with it): type errors, globals and
    unsupported ops that the interpreter lets through fail here. Between the two cases every
    constexpr branch is compiled."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from cfcml.networks.scan_triton import _kernels

    fn = getattr(_kernels(False), f"selective_scan_{kernel}_kernel")
    fp32_pointers = {"A_ptr", "D_ptr", "bias_ptr", "states_ptr", "dB_ptr", "dC_ptr", "dA_ptr", "dD_ptr", "dbias_ptr"}
    signature = {name: ("*fp32" if name in fp32_pointers else f"*{dtype}") if name.endswith("_ptr") else "i32"
                 for name in fn.arg_names}
    constants = {"REVERSE": reverse, "NP": 16, "T": 32, "BD": 2, "n_tiles": 24}
    signature.update(dict.fromkeys(constants, "constexpr"))
    compiled = triton.compile(ASTSource(fn, signature, constants), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": 4})
    assert compiled.asm["cubin"]


def test_mamba_block_reverse_is_the_block_on_flipped_tokens_for_every_backend(interpret):
    torch.manual_seed(0)
    x = torch.randn(2, 7, 8)
    for scan in ("sequential", "chunked", "triton"):
        block = Mamba(8, d_state=4, scan=scan)
        torch.testing.assert_close(block(x, reverse=True), block(x.flip(1)).flip(1), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("layer", ["res_mamba", "mixer"])
def test_mamba_layers_with_the_triton_scan_match_sequential_outputs_and_gradients(interpret, layer):
    """The res_mamba layer's four orders (two of them through the reverse flag) and mamba_resnet's
    two-way mixer give the numbers of the sequential scan, with the same weights."""
    from cfcml.networks.encoders import MambaMixer

    torch.manual_seed(0)

    def build(scan):
        torch.manual_seed(1)
        return MambaLayer(2, 4, d_state=4, scan=scan) if layer == "res_mamba" else MambaMixer(4, scan=scan)

    reference, fused = build("sequential").eval(), build("triton").eval()
    fused.load_state_dict(reference.state_dict())
    assert fused.mamba.native_reverse(torch.device("cpu")) and not reference.mamba.native_reverse(torch.device("cpu"))
    x = torch.randn(2, 4, 3, 4)  # [B, C, H, W]: 12 tokens
    outs, grads = [], []
    for module in (reference, fused):
        xi = x.clone().requires_grad_()
        out = module(xi)
        out.square().sum().backward()
        outs.append(out)
        grads.append([xi.grad] + [p.grad for p in module.parameters()])
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
    for g_fused, g_ref in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fused, g_ref, rtol=1e-4, atol=1e-6)


# --- CUDA: the compiled kernels at a MEN size against the chunked scan (run on a GPU machine) --------


@cuda
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)], ids=["fp32", "bf16"])
def test_triton_scan_on_cuda_matches_chunked_at_the_men_stage3_size(dtype, tol, reverse):
    """The stage-3 size of public MEN (768 tokens, 128 inner channels, N 16), 8 sequences."""
    inputs64 = make_inputs(8, 128, 16, 768, seed=7, device="cuda")
    ref_in = [x.float().requires_grad_() for x in inputs64]
    ref = selective_scan(*ref_in, backend="chunked", reverse=reverse)
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    cast = [x.to(dtype) if i in (0, 1, 3, 4, 6) else x.float() for i, x in enumerate(inputs64)]
    inputs = [x.detach().requires_grad_() for x in cast]
    out = selective_scan(*inputs, backend="triton", reverse=reverse)
    assert out.dtype == dtype
    check(out, torch.autograd.grad(out, inputs, grad_out.to(dtype)), ref, ref_grads, tol=tol)


@cuda
def test_triton_scan_on_cuda_handles_strided_inputs_and_long_sequences():
    inputs64 = make_inputs(2, 64, 16, 6144 + 37, seed=8)
    ref_in = [x.float().cuda().requires_grad_() for x in inputs64]
    ref = selective_scan(*ref_in, backend="chunked")
    grad_out = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out)
    inputs = strided_inputs(inputs64, device="cuda")
    out = selective_scan(*inputs, backend="triton")
    check(out, torch.autograd.grad(out, inputs, grad_out), ref, ref_grads, tol=1e-4)
