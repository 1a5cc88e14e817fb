# Two commands for a fresh clone: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := data/demo-men

.PHONY: install demo lint test bench clean-demo

# constraints.txt pins every package (torch==2.13.0 takes the local CPU wheel here; on a GPU
# machine the same pin resolves to PyPI's CUDA build).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@test -d $(DEMO) || $(BIN)/python pipelines/make_synthetic.py --dataset men --data-root $(DEMO) --patients 150 --image-size 32 32 8
	$(BIN)/python tuning/search.py --dataset men --search demo --data-root $(DEMO) --name demo-$$(date +%Y%m%d-%H%M%S) --explain-test-patients

# Lint: ruff with the rule set in pyproject.toml ([tool.ruff.lint]), then mypy over cfcml/ and
# tuning/ ([tool.mypy]; its cache in .mypy_cache/ makes reruns take seconds).
lint: install
	$(BIN)/ruff check .
	$(BIN)/mypy

# The unit tests on two pytest workers (pytest-xdist); the end-to-end tests one at a time after them:
# each starts Ray and keeps both cores busy, and two at once took as long as one after the other and
# slowed each other's timings (docs/architecture.md, "Tests"). The end-to-end tests capture Python's
# output only (--capture=sys): a fatal message that Ray's C++ core writes to the process's stderr
# before it exits stays on the console instead of vanishing with pytest's captured file descriptor.
test: lint
	$(BIN)/python -m pytest -q -n 2 -m "not e2e" --durations=8
	$(BIN)/python -m pytest -q -m e2e --durations=12 --capture=sys

bench: install
	$(BIN)/python -m benchmarks.bench_losses
	$(BIN)/python -m benchmarks.bench_loader
	$(BIN)/python -m benchmarks.bench_trial_overhead

clean-demo:
	rm -rf $(DEMO) runs
