"""Tiny synthetic datasets, generated once per session and copied per test that changes them."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cfcml.data.synthetic import make_derm7pt, make_men

MEN_SIZE = (12, 12, 6)  # prepared size for tests; raw volumes are 16x16x6, jittered per patient
DERM_SIZE = (16, 16)
FOLDS = 3


@pytest.fixture(scope="session")
def men_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_men(tmp_path_factory.mktemp("men") / "men", patients=18, seed=0, size=(16, 16, 6), vary_size=True)


@pytest.fixture(scope="session")
def derm_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_derm7pt(tmp_path_factory.mktemp("derm") / "derm7pt", patients=30, seed=0, size=(24, 24))


@pytest.fixture
def men_root(men_base: Path, tmp_path: Path) -> Path:
    """A private copy of the MEN dataset, free to corrupt."""
    return Path(shutil.copytree(men_base, tmp_path / "men"))


@pytest.fixture
def derm_root(derm_base: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(derm_base, tmp_path / "derm7pt"))


@pytest.fixture(scope="session")
def men_prepared(men_base: Path, tmp_path_factory: pytest.TempPathFactory):
    from cfcml.data.prepare import prepare_dataset

    return prepare_dataset("men", men_base, tmp_path_factory.mktemp("men_out"), folds=FOLDS, fold_seed=0,
                           image_size=MEN_SIZE, workers=2)


@pytest.fixture(scope="session")
def derm_prepared(derm_base: Path, tmp_path_factory: pytest.TempPathFactory):
    from cfcml.data.prepare import prepare_dataset

    return prepare_dataset("derm7pt", derm_base, tmp_path_factory.mktemp("derm_out"), folds=FOLDS, fold_seed=0,
                           image_size=DERM_SIZE, workers=2)
