"""Data pipeline: dataset specs, adapters + validation, prepare, folds, cache, torch Datasets."""
