"""The platform around the CFCML library: searching, tracking, evidence and release.

Stages, in the order a search runs them (each a subpackage; a package imports only the ones
above it in this list, and `cfcml`; `tests/test_layers.py` enforces it):

- `tuning.records`: the written contracts between stages (epoch reports, checkpoints,
  `outcome.json`, the state files a resume reads). No Ray, no MLflow.
- `tuning.runtime`: keeping Ray healthy: starting or joining it, checks before anything
  expensive, the search-folder lock, freeing orphaned placement groups, the stall watchdog.
- `tuning.tracking`: MLflow: the store (experiments, runs, tags, logging), every run's end, and the
  callbacks that mirror Tune and Ray Train into it.
- `tuning.hpo`: the hyper-parameter search: the search space, the resolved `SearchRun`, the
  Tune driver, the trainable, the Ray Train worker loop and the prepared dataset it trains on.
- `tuning.evidence`: what the numbers say: comparisons against defaults, ablations and
  baselines, clinical evidence, the search report, the console summary and plots.
- `tuning.release`: the registered model: final training, the served model and its code file,
  the model card and explanations.
- `tuning.workflows`: each command's one function (run a search, run a comparison), called by
  the entry points.
- `tuning.cli`: flags and the error shell shared by every entry point.

Entry points (`tuning/search.py`, `tuning/compare.py`, `pipelines/*.py`) parse arguments, call one
function and print.
"""
