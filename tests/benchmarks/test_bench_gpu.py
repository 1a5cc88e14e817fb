"""benchmarks/bench_gpu.py's own arithmetic, and its scan table on CPU (the GPU rows need a GPU)."""
from __future__ import annotations

import pytest
import torch

from benchmarks.bench_gpu import main, peak_bandwidth, scan_backends, scan_bytes


def test_scan_bytes_is_the_fused_minimum_of_the_docstring():
    # stage 2 at the public size: 32 sequences x 64 channels x 6144 tokens, 16 states, float32
    bdl, bnl = 32 * 64 * 6144, 32 * 16 * 6144
    assert scan_bytes(32, 64, 6144, 16) == ((4 * bdl + 2 * bnl) * 4, (7 * bdl + 4 * bnl) * 4)
    assert scan_bytes(1, 1, 1, 1, elem=2) == (12, 22)  # bfloat16: half the float32 bytes


@pytest.mark.parametrize("name,tbs", [("NVIDIA H200", 4.8), ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0),
                                      ("NVIDIA GH200 480GB", 4.0), ("NVIDIA A100-SXM4-80GB", 2.039),
                                      ("NVIDIA A100-SXM4-40GB", 1.555)])
def test_peak_bandwidth_by_device_name(name, tbs):
    assert peak_bandwidth(name) == pytest.approx(tbs * 1e12)


def test_peak_bandwidth_unknown_or_given():
    assert peak_bandwidth("Some Future GPU") is None
    assert peak_bandwidth("NVIDIA H200", override=5.0) == pytest.approx(5e12)


def test_scan_table_runs_on_cpu_and_names_what_it_skips(capsys):
    assert main(["--device", "cpu", "--sections", "scan"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.split() and line.split()[0] in
             {"chunked", "pscan", "triton", "mamba_ssm"}}
    assert "tiny" in lines["chunked"] and "tiny" in lines["pscan"]
    skips = dict(scan_backends(torch.device("cpu")))
    assert skips["triton"] and skips["mamba_ssm"]  # neither runs on CPU
    assert "skipped" in lines["triton"] and "skipped" in lines["mamba_ssm"]
