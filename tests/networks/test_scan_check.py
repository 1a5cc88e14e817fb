"""The triton scan's self-check (cfcml/networks/scan_check.py), tested on CPU with real tensors: its
comparison against candidates that are right, slightly off, deliberately wrong or raising; the
fallback of `auto` and the error of an explicit `triton`; the real kernels under the interpreter."""
from __future__ import annotations

import ast
import warnings

import pytest
import torch

from cfcml.networks import scan, scan_check
from cfcml.networks.mamba import Mamba, model_scan_backend
from cfcml.networks.scan import checked_scan, selective_scan
from cfcml.networks.scan_check import (
    TOLERANCE,
    ScanSelfCheck,
    ScanSelfCheckError,
    ScanSelfCheckWarning,
    check_shape,
    compare_with_chunked,
)

TILE = 4  # the check's length is then 3 * 4 + 2 + 1 = 15 tokens: a ragged fourth tile


def chunked(*args, reverse=False):
    return selective_scan(*args, backend="chunked", reverse=reverse)


def scaled(factor):
    """A candidate off by a relative `factor` in its output (and so in every gradient but dz's share)."""
    def candidate(*args, reverse=False):
        return chunked(*args, reverse=reverse) * (1 + factor)
    return candidate


def ignores_reverse(*args, reverse=False):
    return chunked(*args)


def drops_the_ragged_tile(*args, reverse=False):
    out = chunked(*args, reverse=reverse)
    length = out.shape[-1]
    keep = torch.ones(length, device=out.device)
    keep[length - length % TILE:] = 0  # the last, partial tile reads as zero
    return out * keep


def ignores_strides(*args, reverse=False):
    """Reads each sequence input's storage as if it were contiguous: what a kernel that drops the
    strides would see."""
    def as_contiguous(x):
        if x.dim() != 3 or x.is_contiguous():
            return x
        flat = x.as_strided((x.numel(),), (1,))
        return flat.view(x.shape)
    return chunked(*[as_contiguous(x) for x in args], reverse=reverse)


def nan_gradient_of_b(u, delta, A, B, C, D, z, bias, reverse=False):
    B = B * 1.0
    B.register_hook(lambda g: torch.full_like(g, float("nan")))
    return chunked(u, delta, A, B, C, D, z, bias, reverse=reverse)


def raises_compilation_error(*args, reverse=False):
    triton_errors = pytest.importorskip("triton.compiler.errors")
    raise triton_errors.CompilationError(None, ast.parse("x = 1").body[0], "unsupported op in the kernel")


def raises_launch_error(*args, reverse=False):
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def test_the_check_shape_has_several_tiles_a_ragged_one_and_odd_sizes():
    batch, d, n, length = check_shape(32)
    assert length // 32 >= 3 and length % 32 and d % scan_check.CHECK_BLOCK_D and n & (n - 1)
    assert check_shape(TILE)[3] == 15


def test_a_correct_candidate_passes_and_one_within_the_tolerance_too():
    result = compare_with_chunked(chunked, "cpu", TILE)
    assert result.ok and result.reason == "passed"
    assert len(result.errors) == 18  # out and eight gradients, both directions
    assert max(result.errors.values()) <= 1e-6  # the strided views give the same numbers
    assert compare_with_chunked(scaled(TOLERANCE / 10), "cpu", TILE).ok


@pytest.mark.parametrize("candidate,where", [
    (scaled(1e-2), ""),
    (ignores_reverse, "reverse"),
    (drops_the_ragged_tile, ""),
    (ignores_strides, ""),
    (nan_gradient_of_b, "dB"),
], ids=["off by 1e-2", "ignores reverse", "drops the ragged tile", "ignores strides", "NaN gradient"])
def test_a_deliberately_wrong_candidate_is_a_mismatch_naming_the_largest_error(candidate, where):
    result = compare_with_chunked(candidate, "cpu", TILE)
    assert result.reason == "mismatch" and not result.ok
    name, value = result.largest
    assert value > TOLERANCE and where in name
    assert f"{value:.2e}" in result.describe() and name in result.describe()


@pytest.mark.parametrize("candidate,reason,text", [
    (raises_compilation_error, "compile error", "CompilationError: unsupported op in the kernel"),
    (raises_launch_error, "launch error", "RuntimeError: CUDA error: an illegal memory access"),
])
def test_a_raising_candidate_is_a_compile_or_launch_error(candidate, reason, text):
    result = compare_with_chunked(candidate, "cpu", TILE)
    assert result.reason == reason and result.largest is None
    assert text in result.describe()


class Counting:
    def __init__(self, candidate):
        self.candidate, self.calls = candidate, 0

    def __call__(self, *args, reverse=False):
        self.calls += 1
        return self.candidate(*args, reverse=reverse)


def test_auto_falls_back_to_chunked_with_one_warning_and_the_verdict_is_kept():
    candidate = Counting(scaled(1e-2))
    checker = ScanSelfCheck(candidate, tile=TILE)
    with pytest.warns(ScanSelfCheckWarning, match=r"mismatch on cpu: largest error 1\.0\de-02 \("):
        assert checker.backend("auto", torch.device("cpu")) == "chunked"
    assert candidate.calls == 2  # both directions, once
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no second warning
        assert checker.backend("auto", "cpu") == "chunked"
    assert candidate.calls == 2 and list(checker.verdicts) == ["cpu"]


def test_a_compile_error_falls_back_for_auto_and_fails_loudly_for_an_explicit_triton():
    checker = ScanSelfCheck(raises_compilation_error, tile=TILE)
    with pytest.raises(ScanSelfCheckError, match=r"model\.scan: triton failed its self-check .*compile error on cpu"):
        checker.backend("triton", "cpu")
    with pytest.warns(ScanSelfCheckWarning, match="compile error on cpu: largest error: none measured"):
        assert checker.backend("auto", "cpu") == "chunked"
    with pytest.raises(ScanSelfCheckError):  # every time, not only the first
        checker.backend("triton", "cpu")


def test_a_mismatch_fails_an_explicit_triton_naming_the_largest_error():
    checker = ScanSelfCheck(drops_the_ragged_tile, tile=TILE)
    with pytest.raises(ScanSelfCheckError, match=r"mismatch on cpu: largest error \d\.\d\de\+?-?\d\d \("):
        checker.backend("triton", "cpu")


def test_a_passing_check_keeps_triton():
    checker = ScanSelfCheck(chunked, tile=TILE)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert checker.backend("auto", "cpu") == checker.backend("triton", "cpu") == "triton"
    with pytest.raises(ValueError, match="auto or triton"):
        checker.backend("chunked", "cpu")


def test_on_cpu_auto_is_chunked_without_a_check_and_models_report_what_runs(monkeypatch):
    monkeypatch.setattr(scan_check, "CHECKER", None)  # any use of the checker would fail
    assert checked_scan("auto", torch.device("cpu")) == "chunked"
    assert checked_scan("triton", torch.device("cpu")) == "triton"  # the interpreter path, as before
    assert model_scan_backend(torch.nn.Sequential(Mamba(4, d_state=2, scan="pscan")), "cpu") == "pscan"
    assert model_scan_backend(torch.nn.Linear(2, 2), "cpu") == "none"
    mixed = torch.nn.Sequential(Mamba(4, d_state=2, scan="pscan"), Mamba(4, d_state=2))
    assert model_scan_backend(mixed, "cpu") == "chunked,pscan"


def test_on_cuda_auto_and_triton_go_through_the_process_checker(monkeypatch):
    """The wiring: where `auto` resolves to triton on a CUDA device, what runs is the checker's
    answer (a checker whose candidate fails, so that it answers chunked; no CUDA needed, as the
    verdict for the device is taken from a check run on CPU)."""
    monkeypatch.setattr(scan, "mamba_ssm_available", lambda: False)
    monkeypatch.setattr(scan, "triton_available", lambda: True)
    checker = ScanSelfCheck(raises_launch_error, tile=TILE)
    checker.verdicts["cuda:0"] = compare_with_chunked(raises_launch_error, "cpu", TILE)
    monkeypatch.setattr(scan_check, "CHECKER", checker)
    cuda0 = torch.device("cuda", 0)
    with pytest.warns(ScanSelfCheckWarning, match="launch error"):
        assert checked_scan("auto", cuda0) == "chunked"
    block = Mamba(4, d_state=2)
    assert not block.native_reverse(cuda0)
    assert model_scan_backend(torch.nn.Sequential(block), cuda0) == "chunked"
    with pytest.raises(ScanSelfCheckError, match="launch error"):
        checked_scan("triton", cuda0)


def test_the_real_triton_kernels_pass_the_check_under_the_interpreter(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    checker = ScanSelfCheck()  # the default candidate: the Triton scan, its interpreter tile (8)
    result = checker.verdict("cpu")
    assert result.ok, result.describe()
    assert check_shape(8)[3] == 29 and max(result.errors.values()) < 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_compiled_triton_kernels_pass_the_check_on_this_gpu():
    """What `auto` does on first use on a GPU: the compiled kernels against chunked (never run yet)."""
    pytest.importorskip("triton")
    import time

    checker = ScanSelfCheck()
    t0 = time.perf_counter()
    result = checker.verdict("cuda")
    first = time.perf_counter() - t0
    print(f"self-check on {result.device}: {result.describe()}; first check {first:.2f} s")
    assert result.ok, result.describe()
    assert checked_scan("auto", torch.device("cuda")) in ("triton", "mamba_ssm")
