"""The prepared dataset a command is about to train on is checked before Ray starts: a cache file
that is truncated or missing is named (file, patient, modality) in one line, exit 2."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cfcml.config import PROJECT_ROOT, ConfigError
from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.hpo.prepared import check_cache, load_or_prepare


@pytest.fixture(scope="module")
def men_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_men(tmp_path_factory.mktemp("prepared") / "men", patients=12, seed=0, size=(16, 16, 4))


@pytest.fixture
def prepared(men_raw: Path, tmp_path: Path):
    """A fresh prepare of the tiny dataset (its cache is damaged by the tests)."""
    return prepare_dataset("men", men_raw, tmp_path / "prepared", folds=2, fold_seed=0, image_size=(16, 16, 4))


def _damage(prepared, how: str) -> tuple[str, Path]:
    pid = str(prepared.manifest["patient_id"].iloc[3])
    path = prepared.cache_path(pid, prepared.spec.modalities[0].name)
    if how == "truncated":
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size - 100)
    elif how == "emptied":
        path.write_bytes(b"")
    else:
        path.unlink()
    return pid, path


@pytest.mark.parametrize(("how", "reason"), [("truncated", r"is truncated \(\d+ of \d+ bytes\)"),
                                             ("emptied", r"is truncated \(0 of \d+ bytes\)"),
                                             ("deleted", "is missing")])
def test_a_damaged_cache_file_is_named_with_its_patient_before_training(prepared, how: str, reason: str) -> None:
    pid, path = _damage(prepared, how)
    with pytest.raises(ConfigError, match=reason) as info:
        load_or_prepare("men", prepared.out_dir, folds=2, fold_seed=None, image_size=None)
    message = str(info.value)
    assert "\n" not in message and message.startswith(f"--data-root {prepared.out_dir}: ")
    assert f"patient {pid!r}" in message and str(path) in message
    assert "python pipelines/prepare.py --dataset men" in message and "--folds 2 --fold-seed 0" in message


def test_an_intact_cache_passes_and_the_prepare_command_in_the_message_repairs_it(prepared, men_raw: Path) -> None:
    assert check_cache(prepared) is prepared
    _damage(prepared, "truncated")
    with pytest.raises(ConfigError) as info:
        check_cache(prepared)
    command = str(info.value).split("rebuilt): ", 1)[1].split()
    assert command[:2] == ["python", "pipelines/prepare.py"]
    out = subprocess.run([sys.executable, *command[1:]], cwd=PROJECT_ROOT, capture_output=True, text=True,
                         timeout=300, env={**os.environ, "PYTHONPATH": str(PROJECT_ROOT)})
    assert out.returncode == 0, out.stderr
    assert "1 images built" in out.stdout
    check_cache(load_or_prepare("men", prepared.out_dir, folds=2, fold_seed=None, image_size=None))


def test_a_raw_data_root_rebuilds_a_damaged_cache_file_itself(men_raw: Path, tmp_path: Path) -> None:
    root = shutil.copytree(men_raw, tmp_path / "men")
    first = load_or_prepare("men", root, folds=2, fold_seed=None, image_size=(16, 16, 4), log=lambda _: None)
    _damage(first, "deleted")
    again = load_or_prepare("men", root, folds=2, fold_seed=None, image_size=(16, 16, 4), log=lambda _: None)
    assert again.info["cache"]["built"] == 1 and check_cache(again) is again


def test_search_refuses_a_truncated_cache_in_one_line_exit_2_before_ray_starts(prepared, tmp_path: Path) -> None:
    pid, path = _damage(prepared, "truncated")
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path / "ray"), "PYTHONPATH": str(PROJECT_ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, str(PROJECT_ROOT / "tuning" / "search.py"), "--dataset", "men",
                          "--search", "smoke", "--data-root", str(prepared.out_dir), "--runs-dir",
                          str(tmp_path / "runs"), "--image-size", "16", "16", "4", "--folds", "2"],
                         cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr
    (line,) = out.stderr.splitlines()
    assert line.startswith(f"error: --data-root {prepared.out_dir}: the cached ") and f"patient {pid!r}" in line
    assert str(path) in line and "is truncated" in line
    assert not (tmp_path / "ray").exists()  # Ray never started
