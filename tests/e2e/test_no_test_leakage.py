"""The held-out test split is never read by the search: with every test-split file removed (raw
images and cache), tuning and model selection still run; only the final test evaluation needs them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tuning.search import main as search_main

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def test_search_never_reads_test_split(ray_local, men_raw: Path, tmp_path: Path) -> None:
    from probes import E2E_SIZE

    from cfcml.data.prepare import prepare_dataset

    raw = Path(shutil.copytree(men_raw, tmp_path / "men"))
    prepared = prepare_dataset("men", raw, tmp_path / "prepared", folds=2, fold_seed=0, image_size=E2E_SIZE)
    test = prepared.test_frame()
    assert len(test) > 0
    for pid in test["patient_id"]:
        for m in prepared.spec.modalities:
            prepared.cache_path(pid, m.name).unlink()
    shutil.rmtree(raw / "test")

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    base = ["--dataset", "men", "--search", "smoke", "--data-root", str(prepared.out_dir),
            "--runs-dir", str(tmp_path / "runs"), "--tracking-uri", uri, "--num-samples", "1",
            "--max-epochs", "1"]
    assert search_main(base + ["--no-final"]) == 0  # tuning + fold-ensemble registration

    # Had anything built a dataset over the test rows, it would have failed like this.
    with pytest.raises(FileNotFoundError, match="cache file"):
        prepared.dataset(test, prepared.fit_normalizer(prepared.dev_frame()))
