"""Entry points share one spelling per setting (older spellings still work); train_final finds
the search it should finish."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cfcml.config import PROJECT_ROOT
from pipelines.make_synthetic import parse_args as synthetic_args
from tuning.records.outcome import OUTCOME_FILE, SearchOutcome
from tuning.workflows.train_final import find_outcome


@pytest.mark.parametrize("flags", [["--data-root", "d", "--image-size", "16", "16", "4"],
                                   ["--out", "d", "--size", "16", "16", "4"]])
def test_make_synthetic_takes_the_shared_and_the_old_spelling(flags):
    args = synthetic_args(["--dataset", "men", *flags])
    assert args.data_root == Path("d") and args.image_size == (16, 16, 4)


@pytest.mark.parametrize("under", [False, True])
def test_make_synthetic_refuses_a_data_root_that_is_or_lies_under_a_file(tmp_path: Path, capsys, under: bool):
    from pipelines.make_synthetic import main

    afile = tmp_path / "afile"
    afile.write_text("keep me\n")
    root = afile / "men" if under else afile
    assert main(["--dataset", "men", "--data-root", str(root), "--patients", "6"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: --data-root {root}") and "is a file, not a folder" in err and "\n" not in err
    assert afile.read_text() == "keep me\n"


def _outcome(storage: Path, name: str, dataset: str) -> Path:
    (storage / name).mkdir(parents=True)
    return SearchOutcome(dataset, "cv_auc", [], str(storage / name), "p", "sqlite:///x", "1", "r").save()


def test_train_final_finds_the_named_or_the_newest_search_of_the_dataset(tmp_path: Path):
    old = _outcome(tmp_path, "men-default", "men")
    time.sleep(0.01)
    new = _outcome(tmp_path, "men-smoke", "men")
    os.utime(old, (1, 1))
    _outcome(tmp_path, "derm7pt-smoke", "derm7pt")
    assert find_outcome(tmp_path, "men", None) == new  # --search smoke is no longer missed
    assert find_outcome(tmp_path, "men", "men-default") == old
    assert find_outcome(tmp_path, "men", "nope") is None
    assert find_outcome(tmp_path / "empty", "men", None) is None
    assert new.name == OUTCOME_FILE


@pytest.mark.parametrize("script", ["pipelines/make_synthetic.py", "pipelines/prepare.py",
                                    "pipelines/train_final.py", "pipelines/predict.py", "tuning/search.py",
                                    "tuning/compare.py"])
def test_scripts_run_from_a_checkout_without_path_edits(script):
    out = subprocess.run([sys.executable, script, "--help"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--data-root" in out.stdout or "--runs-dir" in out.stdout or "--model" in out.stdout
