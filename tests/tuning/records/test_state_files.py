"""A resumed search checks the state files Ray will read: a Ray Train snapshot a full disk cut
short is named and moved aside (the trial continues from its checkpoint folders); a damaged search
or Tune state is one line, exit 2."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from cfcml.config import ConfigError
from tuning.records.state_files import TRAIN_SNAPSHOT, check_resume_state, trial_ids


def _search(tmp_path: Path, trials: tuple[str, ...] = ("ab12cd34", "9f8e7d6c")) -> tuple[Path, Path]:
    search_dir, train_dir = tmp_path / "ray" / "men-smoke", tmp_path / "ray" / "train"
    for n, tid in enumerate(trials):
        (search_dir / f"run_trial_{tid}_{n + 1}_loss.tau_sam=0.0700_2026-11-30_09-00-00").mkdir(parents=True)
        (train_dir / f"trial_{tid}" / "checkpoint_2026-11-30_09-00-01.000000").mkdir(parents=True)
        (train_dir / f"trial_{tid}" / TRAIN_SNAPSHOT).write_text(json.dumps({"ray_version": "2.60.0"}))
    (search_dir / "experiment_state-2026-11-30_09-00-00.json").write_text("{}")
    (search_dir / "cfcml_search.json").write_text(json.dumps({"parent_run_id": "x"}))
    return search_dir, train_dir


def test_trial_ids_are_read_from_tunes_folder_names(tmp_path: Path) -> None:
    search_dir, _ = _search(tmp_path, ("ab12cd34", "5e3f1_00002"))
    assert {"ab12cd34", "5e3f1_00002"} <= set(trial_ids(search_dir))


@pytest.mark.parametrize("damage", ["truncated", "empty", "binary"])
def test_a_damaged_ray_train_snapshot_is_named_and_moved_aside(damage: str, tmp_path: Path) -> None:
    search_dir, train_dir = _search(tmp_path)
    snapshot = train_dir / "trial_9f8e7d6c" / TRAIN_SNAPSHOT
    text = json.dumps({"ray_version": "2.60.0", "checkpoint_results": [{"x": 1}]})
    snapshot.write_bytes({"truncated": text[:17].encode(), "empty": b"", "binary": b"\xff\xfe\x00"}[damage])
    said: list[str] = []
    assert check_resume_state(search_dir, train_dir, "cfcml_search.json", log=said.append) == [snapshot]
    assert not snapshot.exists()
    (aside,) = snapshot.parent.glob(f"{TRAIN_SNAPSHOT}.damaged-*")
    assert aside.read_bytes() != b"" or damage == "empty"  # kept for inspection, not deleted
    assert len(said) == 1 and said[0].startswith(f"warning: {snapshot} is damaged (")
    assert "continues from its newest intact checkpoint" in said[0]
    assert (train_dir / "trial_ab12cd34" / TRAIN_SNAPSHOT).exists()  # the intact one is left alone
    assert check_resume_state(search_dir, train_dir, "cfcml_search.json", log=said.append) == []  # once


def test_a_damaged_search_state_is_refused_naming_the_file(tmp_path: Path) -> None:
    search_dir, train_dir = _search(tmp_path)
    (search_dir / "cfcml_search.json").write_text('{"parent_run_id": "ab')
    with pytest.raises(ConfigError, match=rf"^--resume: {search_dir / 'cfcml_search.json'} is damaged "
                                          rf"\(JSONDecodeError"):
        check_resume_state(search_dir, train_dir, "cfcml_search.json")


def test_a_damaged_tune_state_is_moved_aside_and_the_search_restarts_its_trials(tmp_path: Path) -> None:
    from ray.tune import Tuner

    search_dir, train_dir = _search(tmp_path)
    state = search_dir / "experiment_state-2026-11-30_09-00-00.json"
    state.write_text('{"trial_data": ["{\\"trial_id')  # cut short mid-save, as a full disk leaves it
    for name in ("tuner.pkl", "search_gen_state-2026-11-30_09-00-00.json", "searcher-state-2026-11-30_09-00-00.pkl"):
        (search_dir / name).write_bytes(b"x")
    assert Tuner.can_restore(str(search_dir))
    said: list[str] = []
    check_resume_state(search_dir, train_dir, "cfcml_search.json", log=said.append)
    assert len(said) == 1 and said[0].startswith(f"warning: {state} is damaged (JSONDecodeError")
    assert "the search restarts its trials" in said[0]
    (aside,) = search_dir.glob("damaged-*")
    assert sorted(p.name for p in aside.iterdir()) == ["experiment_state-2026-11-30_09-00-00.json",
                                                       "search_gen_state-2026-11-30_09-00-00.json",
                                                       "searcher-state-2026-11-30_09-00-00.pkl", "tuner.pkl"]
    assert not Tuner.can_restore(str(search_dir))  # the driver starts a new Tune experiment of that name
    assert (search_dir / "cfcml_search.json").exists()  # the same MLflow parent run continues


def test_search_resume_with_a_damaged_state_file_is_one_line_exit_2(tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    from tuning.search import main as search_main

    search_dir = tmp_path / "runs" / "ray" / "men-smoke"
    search_dir.mkdir(parents=True)
    (search_dir / "cfcml_search.json").write_text('{"parent_run_id": "ab')  # cut short by a full disk
    assert search_main(["--dataset", "men", "--search", "smoke", "--data-root", str(tmp_path / "no-data"),
                        "--runs-dir", str(tmp_path / "runs"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: --resume: {search_dir / 'cfcml_search.json'} is damaged")
