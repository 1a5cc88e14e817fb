"""Shared fixtures for the end-to-end tests: one tiny prepared MEN-like dataset and a local Ray
with explicit small resources, shut down when the session ends."""
from __future__ import annotations

from pathlib import Path

import pytest
from probes import E2E_SIZE

from cfcml.config import load_experiment
from cfcml.data.synthetic import make_men


@pytest.fixture(scope="session")
def men_raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_men(tmp_path_factory.mktemp("e2e") / "men", patients=36, seed=1, size=E2E_SIZE)


@pytest.fixture(scope="session")
def men_prepared(men_raw: Path):
    from cfcml.data.prepare import prepare_dataset

    return prepare_dataset("men", men_raw, folds=2, fold_seed=0, image_size=E2E_SIZE)


@pytest.fixture(scope="session")
def tiny_experiment():
    """The smoke search's tiny model on the e2e image size."""
    from tuning.hpo.space import load_search

    base = load_experiment("men")
    search = load_search("smoke", base)
    return base.replace({**search.overrides, "train.image_size": list(E2E_SIZE), "train.folds": 2})


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A local Ray of 2 CPUs, started once and reused (a test may shut it down for its own cluster)."""
    import ray

    from tuning.runtime.ray_cluster import local_init_kwargs

    if not ray.is_initialized():
        ray.init(**local_init_kwargs(num_cpus=2))
    else:
        # A test that stopped a Ray Train run mid-restart (Ctrl-C, a killed driver) may have left
        # its workers' CPUs reserved on this shared Ray; no run is alive between tests.
        from tuning.runtime.placement_groups import PlacementGroupJanitor

        PlacementGroupJanitor().sweep()
    return ray
