"""Each command's one function, called by its entry point (which parses the arguments, calls it and
prints what it returns), and how a command says it failed:

- `search.search_and_register(run)` (`tuning/search.py`): the checks before anything expensive, the
  search's lock, the disk reserves and guard, the Ray session, the search, then the final model or
  the fold ensemble (`tuning.release.final`) and the search report; returns a `SearchResult`.
- `compare.compare_variants(plan)` (`tuning/compare.py`): the checks, the prepared data, the Ray
  session and the comparison; returns its `ComparisonResult`.
- `train_final.finish_search(...)` (`pipelines/train_final.py`): a finished search's final step
  under its lock; returns the `Release`.
- `predict.predict_file(...)` (`pipelines/predict.py`): a registered, logged or saved model's class
  probabilities for a CSV of manifest rows, written atomically.
- `errors`: `CommandFailed` and `CommandInterrupted`, the failures a workflow reports in one line;
  `tuning.cli.shell` turns them (and ConfigError, DatasetValidationError, ...) into exit statuses.

May import: every other `tuning` package except `tuning.cli` (the entry points' shell, above it), and
`cfcml`."""
