"""Imports run one way: cfcml (the library) <- tuning (Ray, MLflow) <- entry points (pipelines/,
tuning/search.py, tuning/compare.py); inside `tuning`, its packages in the order of `TUNING_ORDER`
(the map in tuning/__init__.py); and no module imports itself back through others (no cycles).
Checked on every import statement of every module, those inside functions and under `if TYPE_CHECKING:`
included (a type-only import of a higher layer is refused too), by walking the syntax trees."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from cfcml.config import PROJECT_ROOT

ENTRY_POINTS = {"tuning.search", "tuning.compare"}  # command-line modules inside tuning/
# tuning's packages, lowest first: each may import only the ones before it (and cfcml)
TUNING_ORDER = ("records", "runtime", "tracking", "hpo", "evidence", "release", "workflows", "cli")
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


def test_the_walk_sees_imports_made_for_type_checking_only(tmp_path: Path) -> None:
    source = tmp_path / "m.py"
    source.write_text("from typing import TYPE_CHECKING\n\nif TYPE_CHECKING:\n    from tuning.release.final import x\n")
    assert offenders(imported(source), ("tuning",)) == ["tuning.release.final", "tuning.release.final.x"]


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


@pytest.mark.parametrize("entry", ["tuning.search", "tuning.compare", "pipelines.train_final", "pipelines.prepare",
                                   "pipelines.predict"])
def test_an_entry_point_and_its_error_shell_load_neither_torch_nor_sklearn_ray_or_mlflow_before_the_work(
        entry: str) -> None:
    """A command refused for a bad flag or a full disk answers in the time Python takes to start
    (10 s on a loaded 2-core machine while the shell's imports pulled torch and scikit-learn)."""
    loaded = _loaded_after(f"import {entry}, tuning.cli.shell")
    assert not loaded & {"torch", "sklearn", "ray", "mlflow"}, loaded & {"torch", "sklearn", "ray", "mlflow"}


def test_the_trial_actor_builds_a_one_cpu_worker_trainer_without_torch() -> None:
    # Tune's trial actor imports the trial function's module and builds the trainer; only the
    # Ray Train workers need torch (tuning.hpo.trainer.trainer_class)
    # (tuning.hpo.trial's module, the SearchRun it is given, Tune's report callback, the trainer class)
    loaded = _loaded_after("import tuning.hpo.trial, tuning.hpo.run, tuning.hpo.trainer\n"
                           "import ray.tune.integration.ray_train\n"
                           "tuning.hpo.trainer.trainer_class(1, False)")
    assert "ray" in loaded and "torch" not in loaded


def test_a_comparison_trials_arguments_unpickle_in_the_trial_actor_without_torch(tmp_path: Path) -> None:
    # what tune.with_parameters hands each comparison trial (tuning.hpo.trial.compare_trial); the
    # ComparisonPlan itself would import tuning.evidence.comparison, and torch with it
    import pickle

    from tuning.evidence.comparison import plan_comparison

    plan = plan_comparison("men", tmp_path, search="smoke", runs_dir=tmp_path / "runs", seeds=1)
    path = tmp_path / "trials.pkl"
    path.write_bytes(pickle.dumps(plan.trials(str(tmp_path / "prepared"))))
    loaded = _loaded_after(f"import pickle, tuning.hpo.trial, tuning.hpo.trainer, ray.tune.integration.ray_train\n"
                           f"trials = pickle.loads(open({str(path)!r}, 'rb').read())\n"
                           f"assert set(trials.variants) == {set(plan.variants)!r}\n"
                           "tuning.hpo.trainer.trainer_class(1, False)")
    assert "ray" in loaded and "torch" not in loaded


def test_test_modules_have_unique_basenames() -> None:
    """pytest imports test modules by basename (rootdir-relative packages are not used here): two
    files named test_x.py in different folders stop the whole collection on a fresh clone."""
    from collections import Counter

    root = Path(__file__).resolve().parent
    names = Counter(p.name for p in root.rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []


def _module_names() -> set[str]:
    return {m for package in ("cfcml", "tuning", "pipelines") for m, _ in modules(package)}


def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports (anywhere in it; `from a import b` counts `a.b` when
    that is a module, else `a`); a package's `__init__` is named by the package."""
    known = {m.removesuffix(".__init__") for m in _module_names()}
    graph: dict[str, set[str]] = {}
    for package in ("cfcml", "tuning", "pipelines"):
        for name, path in modules(package):
            name = name.removesuffix(".__init__")
            graph[name] = {n for n in imported(path) if n in known and n != name}
    for name, targets in graph.items():  # `from a import b`: the module a.b when there is one, not also a
        graph[name] = {n for n in targets if not any(o.startswith(n + ".") and o in targets for o in targets)
                       or n in {"cfcml", "tuning", "pipelines"}} - {"cfcml", "tuning", "pipelines"}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_module_imports_itself_back_through_others() -> None:
    assert cycles(import_graph()) == []


def test_the_cycle_check_sees_a_circle_closed_inside_a_function() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def _tuning_package(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "tuning" else None


@pytest.mark.parametrize("name,path", [m for m in modules("tuning") if _tuning_package(m[0])],
                         ids=lambda v: v if isinstance(v, str) else "")
def test_a_tuning_package_imports_only_the_packages_below_it(name: str, path: Path) -> None:
    own = TUNING_ORDER.index(_tuning_package(name))
    higher = tuple(f"tuning.{p}" for p in TUNING_ORDER[own + 1:])
    assert not offenders(imported(path), higher)


def test_every_tuning_package_is_in_the_order_and_says_what_it_may_import() -> None:
    packages = {p.name for p in (PROJECT_ROOT / "tuning").iterdir() if (p / "__init__.py").is_file()}
    assert packages == set(TUNING_ORDER) - {"workflows"} or packages == set(TUNING_ORDER)
    for package in packages:
        assert "May import" in (PROJECT_ROOT / "tuning" / package / "__init__.py").read_text(), package


# ------------------------------------------------------------------- the owner of metric names

METRIC_KEYS_MODULE = Path("cfcml/evaluation/metric_keys.py")  # the one module that spells metric keys
# a metric prefix at the start of a string or after a non-name character ("{variant}.cv_{k}"), a
# fold suffix before a number or a placeholder, a CI bound's suffix
METRIC_SPELLING = re.compile(r"(?<![A-Za-z0-9_])(?:cv|val|train|test|selected|last_epoch|diff|nested)_[A-Za-z0-9_]*\*?"
                             r"|(?<![A-Za-z0-9_])system/|_fold(?=[{(\d])|_ci_(?:low|high)")
# names that share a prefix with metric keys but are none: settings, files, fields of results
NOT_METRIC_KEYS = {
    "test_fraction",  # the synthetic cohorts' test split share (cfcml/data)
    "test_rows",  # the MLflow dataset profile's count of test rows
    "test_predictions",  # a checkpoint's file name (test_predictions.csv)
    "test_probs", "test_ci", "test_evaluation", "cv_sd", "diff_vs_cfcml",  # fields of a comparison's results
    "last_epoch_metrics",  # the TrialResult field
    "nested_outer", "nested_heldout", "nested_cv",  # nested CV's files (tuning/workflows/nested.py, evidence/nested.py)
}


def _strings(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, text) of every string literal that is not a docstring; an f-string's text has `{}`
    where its placeholders are."""
    docstrings, parts = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
        if isinstance(node, ast.JoinedStr):
            parts.update(id(v) for v in node.values)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr) and id(node) not in parts:
            text = "".join(v.value if isinstance(v, ast.Constant) else "{}" for v in node.values)
            out.append((node.lineno, text))
        elif (isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
              and id(node) not in parts):
            out.append((node.lineno, node.value))
    return sorted(out)


def metric_spellings(path: Path, source: str | None = None) -> list[str]:
    """"file:line: 'text'" per string literal of `path` that spells a metric key's prefix or suffix.
    Not counted: docstrings; a family named in prose with a wildcard (`selected_cv_*`); the
    platform's own MLflow tags (`cfcml.<name>`); `NOT_METRIC_KEYS`."""
    found = []
    for line, text in _strings(ast.parse(source if source is not None else path.read_text(), str(path))):
        for m in METRIC_SPELLING.finditer(text):
            word = m.group(0)
            if word.endswith("*") or word in NOT_METRIC_KEYS or text[:m.start()].endswith("cfcml."):
                continue
            found.append(f"{path}:{line}: {text!r}")
            break
    return found


def test_metric_keys_are_spelt_only_by_their_owner() -> None:
    """A renamed metric must fail loudly: every key is built or parsed by cfcml.evaluation.metric_keys."""
    found = [hit for package in ("cfcml", "tuning", "pipelines") for _, path in modules(package)
             if path.relative_to(PROJECT_ROOT) != METRIC_KEYS_MODULE
             for hit in metric_spellings(path.relative_to(PROJECT_ROOT), path.read_text())]
    assert found == [], "metric keys spelt outside cfcml/evaluation/metric_keys.py:\n" + "\n".join(found)


def test_the_metric_name_scan_sees_every_spelling(tmp_path: Path) -> None:
    source = ('"""cv_auc in a docstring is prose."""\n'
              'a = f"cv_{name}"\n'
              'b = "val_" + name\n'
              'c = f"{key}_fold{k}"\n'
              'd = f"{variant}.test_{k}"\n'
              'e = key + "_ci_low"\n'
              'f = "system/cpu"\n'
              'g = "selected_epoch"\n'
              'h = "`selected_cv_*`: the maximum over epochs"\n'
              'i = "cfcml.selected_cv_score"\n'
              'j = "test_fraction"\n'
              'k = "empty_fold"\n'
              'm = "train.selection_metric"\n')
    lines = [int(hit.split(":")[1]) for hit in metric_spellings(tmp_path / "m.py", source)]
    assert lines == [2, 3, 4, 5, 6, 7, 8]
