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


def test_test_modules_have_unique_basenames() -> None:
    """pytest imports test modules by basename (rootdir-relative packages are not used here): two
    files named test_x.py in different folders stop the whole collection on a fresh clone."""
    from collections import Counter

    root = Path(__file__).resolve().parent
    names = Counter(p.name for p in root.rglob("test_*.py"))
    assert [n for n, count in names.items() if count > 1] == []
