"""A search in which every trial diverges fails loudly: each trial stops at once naming its fold
and epoch, its MLflow run carries the reason, the search exits non-zero; resuming it without the
setting that diverged is refused (the experiment would change in silence)."""
from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tuning.search import main as search_main
from tuning.tracking.callbacks import FAILURE_TAG

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]


def test_a_search_whose_trials_all_diverge_exits_non_zero_with_the_reason(ray_local, men_prepared, tmp_path: Path,
                                                                          capsys) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = ["--dataset", "men", "--search", "smoke", "--data-root", str(men_prepared.out_dir), "--runs-dir",
            str(tmp_path / "runs"), "--tracking-uri", uri, "--num-samples", "1", "--max-epochs", "1",
            "--name", "lr"]
    assert search_main([*args, "--set", "optim.lr=1e6", "--set", "optim.warmup_epochs=1"]) == 1
    err = capsys.readouterr().err
    assert "error: no trial of search 'lr' produced a score (1 trial(s) failed: training diverged: trial " in err
    assert "fold 0, epoch 1: non-finite training loss" in err

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("cfcml-men")
    (trial,) = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'trial'")
    assert trial.info.status == "FAILED"
    assert trial.data.tags[FAILURE_TAG].startswith(f"training diverged: trial {trial.data.tags['cfcml.trial_id']}, "
                                                   f"fold 0, epoch 1: non-finite training loss")
    (parent,) = client.search_runs([exp.experiment_id], filter_string="tags.`cfcml.kind` = 'search'")
    assert parent.info.status == "FAILED"

    # Resuming without the --set would retrain at another learning rate: refused, nothing run.
    assert search_main([*args, "--set", "optim.warmup_epochs=1", "--resume"]) == 2
    err = capsys.readouterr().err
    assert "optim.lr: 1000000.0 recorded, 0.0005 now" in err and len(err.strip().splitlines()) == 1
    assert len(client.search_runs([exp.experiment_id])) == 2  # no run added
