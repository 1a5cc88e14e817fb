"""Every test runs torch on one intra-op thread (the Ray workers of e2e tests set their own); leak
tests get `altered_copy`."""
from __future__ import annotations

import shutil
import signal
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
import pandas as pd
import pytest
import torch

if TYPE_CHECKING:
    from cfcml.data.manifest import PreparedDataset


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """One intra-op thread: results that don't depend on the machine's core count, and no OpenMP
    threads spinning against other processes on a busy box (the overfit test ran 2x slower with
    2 threads on a loaded 2-core machine, burning 2.5x the CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def sigint_restored():
    """Each test starts with the SIGINT handler the session had: Ray Tune's `Tuner.fit` installs
    its own (a first Ctrl-C stops the experiment gracefully) and a test that runs one in this
    process may leave it behind, which changed how a later test's Ctrl-C behaved (the prepare
    command's interrupt test failed after the tuning tests in one process)."""
    before = signal.getsignal(signal.SIGINT)
    yield
    if signal.getsignal(signal.SIGINT) is not before:
        signal.signal(signal.SIGINT, before)


def _altered(prepared: PreparedDataset, dest: Path, rows: Callable[[pd.DataFrame], pd.Series]) -> PreparedDataset:
    """A copy of `prepared` whose `rows` (a mask over the manifest) have other labels, other
    clinical values (numeric and categorical, missing ones filled) and other images."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cfcml.data.manifest import MANIFEST_FILE, PreparedDataset

    shutil.copytree(prepared.out_dir, dest)
    path = dest / MANIFEST_FILE
    table = pq.read_table(path)
    manifest = table.to_pandas()
    mask = rows(manifest).to_numpy()
    assert mask.any()
    spec, classes = prepared.spec, list(prepared.spec.classes)
    manifest.loc[mask, "label"] = (manifest.loc[mask, "label"] + 1) % len(classes)
    manifest.loc[mask, "label_name"] = [classes[i] for i in manifest.loc[mask, "label"]]
    for f in spec.numeric_fields:
        manifest.loc[mask, f.name] = manifest.loc[mask, f.name].fillna(1.0) * 3.0 + 50.0
    for f in spec.categorical_fields:
        manifest.loc[mask, f.name] = f.categories[-1]
    rng = np.random.default_rng(0)
    for pid in manifest.loc[mask, "patient_id"]:
        for m in spec.modalities:
            file = prepared.cache_path(pid, m.name).relative_to(prepared.out_dir)
            image = np.load(dest / file)
            np.save(dest / file, rng.normal(5.0, 2.0, image.shape).astype(image.dtype))
    out = pa.Table.from_pandas(manifest, schema=table.schema, preserve_index=False)
    pq.write_table(out.replace_schema_metadata(table.schema.metadata), path)
    return PreparedDataset.load(dest)


@pytest.fixture(scope="session")
def altered_copy() -> Callable[..., PreparedDataset]:
    """altered_copy(prepared, dest, rows): a copy of a prepared dataset in `dest` whose rows
    selected by `rows` (a mask over the manifest) have other labels, clinical values and images:
    for tests that show a fit does not see those rows (no leak)."""
    return _altered
