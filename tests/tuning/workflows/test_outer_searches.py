"""`--outer-folds K` as the search command resolves it: a flag of its own, at least 2, each outer
search named `<name>-outer<k>` without a final model, and a new search refused where an outer
search of its name exists (--resume continues it). The nested run itself: tests/e2e/test_nested_cv.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from cfcml.config import ConfigError
from tuning.search import build_run, parse_args
from tuning.workflows.nested import check_outer_folders, outer_runs, view_dir


def _run(tmp_path: Path, *more: str):
    return build_run(parse_args(["--dataset", "men", "--search", "smoke", "--data-root", str(tmp_path / "data"),
                                 "--runs-dir", str(tmp_path / "runs"), "--name", "s", *more]))


def test_outer_folds_is_off_by_default_and_at_least_two(tmp_path: Path) -> None:
    assert _run(tmp_path).outer_folds is None
    assert _run(tmp_path, "--outer-folds", "3").outer_folds == 3
    with pytest.raises(ConfigError, match="--outer-folds: expected at least 2"):
        _run(tmp_path, "--outer-folds", "1")


def test_each_outer_search_is_the_same_search_under_its_own_name_without_a_final_model(tmp_path: Path) -> None:
    run = _run(tmp_path, "--outer-folds", "2")
    subs = outer_runs(run)
    assert [s.name for s in subs] == ["s-outer0", "s-outer1"]
    assert all(not s.final and s.outer_folds is None and not s.resume for s in subs)
    assert all(s.experiment == run.experiment and s.num_samples == run.num_samples for s in subs)
    assert all(s.settings("f") == run.settings("f") for s in subs)  # --outer-folds is no setting of a search
    assert view_dir(run, 1) == run.runs_dir / "nested" / "s" / "outer1"


def test_a_new_search_finding_an_outer_search_of_its_name_is_refused_and_a_resumed_one_continues_it(
        tmp_path: Path) -> None:
    run = _run(tmp_path, "--outer-folds", "2")
    check_outer_folders(run)
    (run.storage / "s-outer1").mkdir(parents=True)
    with pytest.raises(ConfigError, match="'s-outer1' already exists"):
        check_outer_folders(run)
    resumed = _run(tmp_path, "--outer-folds", "2", "--resume")
    check_outer_folders(resumed)
    assert [s.resume for s in outer_runs(resumed)] == [False, True]
