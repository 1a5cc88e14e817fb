#!/usr/bin/env bash
# One prepared GPU check (docs/gpu.md, "Measured on a GPU"): the CUDA tests, then the benchmark rows,
# within about 8 minutes on one H100 or H200. Run from the repository root:
#
#   bash benchmarks/gpu_wheels.sh          # here, once: MONAI, mambapy, nibabel into .whl/ (about 5 MB)
#   bash benchmarks/gpu_check.sh           # there: with the device tool, carry [".whl"], timeout_s 600
#
# Writes under $OUT (else runs/gpu_check/<date>): gpu_check.log (everything), tests.txt (pytest),
# table.txt (the benchmark tables, with any error lines), <stage>.txt each, env.txt (device, versions). Stages, in order, each
# with a time cap and all within TOTAL_S (default 480 s; a stage whose time is gone is skipped, and
# said so):
#
#   tests    the CUDA tests: tests/networks/test_scan*.py, tests/test_training_step.py (cuda graphs),
#            tests/benchmarks/test_bench_gpu.py                                          (cap 120 s)
#   scan     bench_gpu --sections scan: every scan backend at the three MEN stage shapes  (cap 60 s)
#   men      the MEN step at batch 8/16/32 per scan backend, cuda graphs on/off           (cap 150 s)
#   derm     the Derm7pt step at batch 32/64, cuda graphs on/off                          (cap 75 s)
#   epoch    run_epoch against the bare step on a 400-patient cohort (Derm7pt, then MEN)  (cap 150 s)
#
# Optional, off unless named in STAGES (e.g. STAGES="mamba scan" in a second call):
#   mamba    build mamba-ssm from the sdist that `gpu_wheels.sh --mamba` put in .whl/ (for this
#            GPU's architecture only, capped by MAMBA_BUILD_S, default 420 s), then its scan rows
#   ray      one real Ray Train trial on the GPU (tuning/search.py, smoke search, 1 trial,
#            2 epochs), only when ray, mlflow and optuna import (the GPU image has none of them)
#
# PYTHON (default python3) is the interpreter. GPU_CHECK_ALLOW_CPU=1 runs the same stages without CUDA
# (bench_gpu's tiny CPU rows, the CUDA tests skipped): a check of this script, not of a GPU.
# Exit status: 0 when every stage that ran passed, else 1 (each stage's status is in the log).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
STAGES="${STAGES:-tests scan men derm epoch}"
TOTAL_S="${TOTAL_S:-480}"
out="${OUT:-runs/gpu_check/$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$out"
log="$out/gpu_check.log"
table="$out/table.txt"
began=$SECONDS
status=0
say() { echo "[gpu_check +$((SECONDS - began))s] $*" | tee -a "$log"; }
left() { echo $((TOTAL_S - (SECONDS - began))); }

py="${PYTHON:-python3}"

# Missing wheels (MONAI, mambapy, nibabel) from .whl/, when there is one; nothing is fetched.
export PYTHONPATH="$PWD"
if ! "$py" -c "import monai, mambapy, nibabel" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        >>"$log" 2>&1 || say "warning: installing .whl/*.whl failed (see above)"
    export PYTHONPATH="/tmp/site:$PWD"
fi
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem --format=csv 2>&1
    "$py" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', \
torch.version.cuda, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else None)"
    "$py" -c "import triton; print('triton', triton.__version__)" 2>&1
    for m in monai mambapy nibabel einops timm pandas pyarrow mamba_ssm ray mlflow optuna; do
        "$py" -c "import $m; print('$m', getattr($m, '__version__', '?'))" 2>/dev/null || echo "$m: not importable"
    done
    git log -1 --format='commit %H %s' 2>/dev/null || true
} >"$out/env.txt" 2>&1
cat "$out/env.txt" >>"$log"
if ! "$py" -c "import torch, monai, mambapy, nibabel; assert torch.cuda.is_available() or '${GPU_CHECK_ALLOW_CPU:-}'" \
        >>"$log" 2>&1; then
    say "error: needs CUDA and the model's dependencies (bash benchmarks/gpu_wheels.sh here, carry .whl there)"
    exit 1
fi

# run_stage NAME CAP_S FILE COMMAND...: runs COMMAND under min(CAP_S, time left); its output goes to
# the console, the log and FILE (/dev/null for none). Not in a pipeline: it sets $status.
run_stage() {
    local name=$1 cap=$2 file=$3
    shift 3
    local budget
    budget=$(left)
    ((budget > cap)) && budget=$cap
    if ((budget < 20)); then
        say "stage $name skipped: ${TOTAL_S} s total spent"
        return 0
    fi
    say "stage $name (at most $budget s): $*"
    timeout --signal=INT --kill-after=15 "$budget" "$@" 2>&1 | tee -a "$log" "$file"
    local rc=${PIPESTATUS[0]}
    ((rc == 124)) && say "stage $name: stopped at its cap of $budget s"
    ((rc != 0)) && status=1
    say "stage $name: exit status $rc"
}

# bench NAME CAP_S ARGS...: one bench_gpu run, its table appended to table.txt (stage budget - 15 s
# for bench_gpu's own --budget-s, so it stops adding rows before the hard cap)
bench() {
    local name=$1 cap=$2
    shift 2
    local budget
    budget=$(left)
    ((budget > cap)) && budget=$cap
    echo "## $name: bench_gpu $*" >>"$table"
    run_stage "$name" "$cap" "$out/$name.txt" \
        "$py" benchmarks/bench_gpu.py --budget-s $((budget > 30 ? budget - 15 : 15)) "$@"
    cat "$out/$name.txt" >>"$table" 2>/dev/null
    echo >>"$table"
}

for stage in $STAGES; do
    case $stage in
    tests)
        # -rs lists every skip with its reason: a CUDA test skipped on the GPU is a finding
        run_stage tests 120 "$out/tests.txt" "$py" -m pytest -q -rs -p no:cacheprovider tests/networks/test_scan*.py \
            tests/test_training_step.py tests/benchmarks/test_bench_gpu.py
        ;;
    scan) bench scan 60 --sections scan ;;
    men) bench men 150 --datasets men --sections step --batches 8 16 32 --steps 5 ;;
    derm) bench derm 75 --datasets derm7pt --sections step --batches 32 64 ;;
    epoch) bench epoch 150 --datasets derm7pt men --sections epoch --patients 400 --steps 5 ;;
    mamba)
        sdist=$(compgen -G ".whl/mamba_ssm-*.tar.gz" | head -1)
        if [[ -z "$sdist" ]]; then
            say "stage mamba skipped: no .whl/mamba_ssm-*.tar.gz (bash benchmarks/gpu_wheels.sh --mamba)"
            continue
        fi
        arch=$("$py" -c "import torch; print(''.join(map(str, torch.cuda.get_device_capability())))")
        rm -rf /tmp/mamba_src && mkdir -p /tmp/mamba_src && tar xzf "$sdist" -C /tmp/mamba_src --strip-components 1
        # only this GPU's architecture (the sdist builds for ten): minutes instead of an hour
        "$py" - "$arch" <<'EOF'
import re, sys
arch = sys.argv[1]
path = "/tmp/mamba_src/setup.py"
text = open(path).read()
anchor = "    ext_modules.append("
patch = (f"    cc_flag = [f for f in cc_flag if f != '-gencode' and not f.startswith('arch=')]"
         f" + ['-gencode', 'arch=compute_{arch},code=sm_{arch}']\n")
assert anchor in text, "mamba-ssm's setup.py changed: no ext_modules.append"
open(path, "w").write(text.replace(anchor, patch + anchor, 1))
EOF
        MAMBA_FORCE_BUILD=TRUE MAX_JOBS=$(nproc) TORCH_CUDA_ARCH_LIST="${arch:0:-1}.${arch: -1}" \
            run_stage mamba-build "${MAMBA_BUILD_S:-420}" /dev/null "$py" -m pip install -q --no-index --no-deps \
            --no-build-isolation --no-cache-dir --target /tmp/site /tmp/mamba_src
        if "$py" -c "from mamba_ssm.ops.selective_scan_interface import selective_scan_fn" >>"$log" 2>&1; then
            bench mamba-scan 60 --sections scan
        else
            say "stage mamba: mamba_ssm does not import after the build; its rows are not measured"
            status=1
        fi
        ;;
    ray)
        if ! "$py" -c "import ray, mlflow, optuna" >>"$log" 2>&1; then
            say "stage ray skipped: ray, mlflow or optuna is not importable here"
            continue
        fi
        data="/tmp/gpu_check_men"
        run_stage ray 240 /dev/null bash -c "$py -c \"from pathlib import Path; from cfcml.data.synthetic import make_men; \
make_men(Path('$data'), patients=40, seed=0, overwrite=True)\" && $py tuning/search.py --dataset men \
--search smoke --data-root $data --num-samples 1 --max-epochs 2 --gpus-per-worker 1 --no-final \
--set train.cuda_graphs=true --runs-dir $out/ray_runs"
        ;;
    *) say "unknown stage $stage (known: tests scan men derm epoch mamba ray)"; status=1 ;;
    esac
done
say "done in $((SECONDS - began)) s, exit status $status; tables in $table, log in $log"
exit $status
