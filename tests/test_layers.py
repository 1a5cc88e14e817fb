"""Imports run one way: cfcml (the library) <- tuning (Ray, MLflow) <- entry points (pipelines/,
tuning/search.py, tuning/compare.py). Checked on every import statement of every module, those
inside functions included, by walking the syntax trees."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cfcml.config import PROJECT_ROOT

ENTRY_POINTS = {"tuning.search", "tuning.compare"}  # command-line modules inside tuning/
FRAMEWORKS = ("ray", "mlflow", "optuna")  # what the pure library must not know about


def modules(package: str) -> list[tuple[str, Path]]:
    root = PROJECT_ROOT / package
    return [(".".join(p.relative_to(PROJECT_ROOT).with_suffix("").parts), p) for p in sorted(root.rglob("*.py"))]


def imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def offenders(names: set[str], forbidden: tuple[str, ...] | set[str]) -> list[str]:
    return sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))


@pytest.mark.parametrize("name,path", modules("cfcml"), ids=lambda v: v if isinstance(v, str) else "")
def test_library_imports_no_higher_layer_and_no_framework(name: str, path: Path) -> None:
    assert not offenders(imported(path), ("tuning", "pipelines", "benchmarks", *FRAMEWORKS))


@pytest.mark.parametrize("name,path", [m for m in modules("tuning") if m[0] not in ENTRY_POINTS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_tuning_imports_no_entry_point(name: str, path: Path) -> None:
    assert not offenders(imported(path), ("pipelines", "benchmarks", *ENTRY_POINTS))


@pytest.mark.parametrize("name,path", modules("pipelines") + [m for m in modules("tuning") if m[0] in ENTRY_POINTS],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_entry_points_import_no_other_entry_point(name: str, path: Path) -> None:
    others = {m for m, _ in modules("pipelines") if m != "pipelines.__init__"} | ENTRY_POINTS
    assert not offenders(imported(path), tuple(others - {name}))


def test_the_walk_sees_imports_inside_functions(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from tuning.search import main\n    import ray.train\n")
    assert offenders(imported(source), ("tuning", "ray")) == ["ray.train", "tuning.search", "tuning.search.main"]


def _loaded_after(code: str) -> set[str]:
    """The top-level packages in sys.modules after `code` runs in a fresh interpreter."""
    import json
    import subprocess
    import sys

    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1]).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


@pytest.mark.parametrize("module", ["cfcml.training", "cfcml.networks", "cfcml.predict"])
def test_the_library_at_run_time_loads_neither_mlflow_nor_ray(module: str) -> None:
    # MONAI's own __init__ would load monai.handlers, which imports MLflow (cfcml._monai)
    loaded = _loaded_after(f"import {module}")
    assert "monai" in loaded or module == "cfcml.predict"
    assert not loaded & {"mlflow", "ray", "ignite"}, loaded & {"mlflow", "ray", "ignite"}


def test_the_trial_actor_builds_a_one_cpu_worker_trainer_without_torch() -> None:
    # Tune's trial actor imports the trial function's module and builds the trainer; only the
    # Ray Train workers need torch (tuning.trainer.trainer_class)
    # (tuning.trial's module, the SearchRun it is given, Tune's report callback, the trainer class)
    loaded = _loaded_after("import tuning.trial, tuning.run, tuning.trainer, ray.tune.integration.ray_train\n"
                           "tuning.trainer.trainer_class(1, False)")
    assert "ray" in loaded and "torch" not in loaded


def test_a_comparison_trials_arguments_unpickle_in_the_trial_actor_without_torch(tmp_path: Path) -> None:
    # what tune.with_parameters hands each comparison trial (tuning.trial.compare_trial); the
    # ComparisonPlan itself would import tuning.comparison, and torch with it
    import pickle

    from tuning.comparison import plan_comparison

    plan = plan_comparison("men", tmp_path, search="smoke", runs_dir=tmp_path / "runs", seeds=1)
    path = tmp_path / "trials.pkl"
    path.write_bytes(pickle.dumps(plan.trials(str(tmp_path / "prepared"))))
    loaded = _loaded_after(f"import pickle, tuning.trial, tuning.trainer, ray.tune.integration.ray_train\n"
                           f"trials = pickle.loads(open({str(path)!r}, 'rb').read())\n"
                           f"assert set(trials.variants) == {set(plan.variants)!r}\n"
                           "tuning.trainer.trainer_class(1, False)")
    assert "ray" in loaded and "torch" not in loaded


def test_test_modules_have_unique_basenames() -> None:
    """pytest imports test modules by basename (rootdir-relative packages are not used here): two
    files named test_x.py in different folders stop the whole collection on a fresh clone."""
    from collections import Counter

    root = Path(__file__).resolve().parent
    names = Counter(p.name for p in root.rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []
