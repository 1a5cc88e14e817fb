# Two commands for a fresh clone: `make demo` and `make test` (see README.md).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
DEMO   := data/demo-men

.PHONY: install demo test bench clean-demo

# constraints.txt pins every package (torch==2.13.0 takes the local CPU wheel here; on a GPU
# machine the same pin resolves to PyPI's CUDA build).
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	@test -d $(DEMO) || $(BIN)/python pipelines/make_synthetic.py --dataset men --out $(DEMO) --patients 60 --size 32 32 8
	$(BIN)/python tuning/search.py --dataset men --search smoke --data-root $(DEMO) \
		--num-samples 3 --max-epochs 12 --name demo-$$(date +%Y%m%d-%H%M%S)

test: install
	$(BIN)/python -m pytest -q

bench: install
	$(BIN)/python benchmarks/bench_losses.py
	$(BIN)/python benchmarks/bench_loader.py
	$(BIN)/python benchmarks/bench_trial_overhead.py

clean-demo:
	rm -rf $(DEMO) runs
