#!/usr/bin/env bash
# Download, here, the wheels that benchmarks/gpu_check.sh installs on a GPU machine that cannot reach
# a package index (docs/gpu.md, "Measured on a GPU"). Run from anywhere; writes <repo>/.whl/ (ignored by git).
#
#   bash benchmarks/gpu_wheels.sh            # MONAI, mambapy, nibabel: about 5 MB
#   bash benchmarks/gpu_wheels.sh --mamba    # + the mamba-ssm source archive (0.2 MB), built there on request
#
# The GPU image (torch 2.11 + CUDA 13, Python 3.12) already has numpy, pandas, pyarrow, scikit-learn,
# pyyaml, matplotlib, pillow, tqdm, einops, timm, triton, packaging, typing-extensions and pytest;
# of the model's dependencies it lacks MONAI, mambapy and nibabel, whose own requirements (torch,
# numpy, packaging, typing-extensions) it has. The versions are constraints.txt's pins.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
pin() { grep -i "^$1==" constraints.txt | head -1; }
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$(pin monai)" "$(pin mambapy)" "$(pin nibabel)"
if [[ "${1:-}" == "--mamba" ]]; then
    # An sdist: its setup.py imports torch to read its metadata, so a Python with torch does the download;
    # MAMBA_SKIP_CUDA_BUILD keeps it from compiling anything here.
    py="${PYTHON:-$root/.venv/bin/python}"
    MAMBA_SKIP_CUDA_BUILD=TRUE "$py" -m pip download -q --no-deps --no-binary :all: --no-build-isolation \
        -d .whl "mamba-ssm==${MAMBA_SSM_VERSION:-2.3.2.post1}"
fi
ls -l .whl
du -sh .whl
