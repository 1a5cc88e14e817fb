"""Import MONAI's submodules without `monai/__init__.py` loading all of them.

`import monai.<anything>` first runs `monai/__init__.py`, which walks and imports every MONAI
submodule (`monai.utils.module.load_submodules`; `pkgutil.walk_packages` imports each package to
walk it, whatever the exclude pattern), among them `monai.handlers` (which imports MLflow),
`monai.bundle`, `scikit-learn` users and the Ignite engines: most of a Ray Train worker's start-up
(measured in docs/architecture.md, "What a trial costs besides training"), and MLflow inside
`cfcml/`, whose layering says it knows none. MONAI offers no switch for this (checked on 1.4-1.6.1).

`light()` registers the `monai` package object made from its import spec
(`importlib.util.module_from_spec`, standard Python) without executing its `__init__`, sets the
attributes that `__init__` would (`__version__`, `__revision_id__`, ...), then imports
`monai.apps` first: the same first import `load_submodules` makes (packages in alphabetical
order), which settles MONAI's circular imports between `monai.networks`, `monai.transforms` and
`monai.data` in the order they were written for. After it, `from monai.transforms import ...` and
friends import only what they need. What is skipped: MONAI's warning filters (cosmetic) and its
TF32 notice. If `monai` is already imported (a user's own `import monai`), nothing is done.
`tests/test_imports.py` checks that the used MONAI names import this way and that
`import cfcml.training` pulls in neither MLflow nor Ray.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
from typing import Any, cast


def light() -> None:
    """Make `monai` importable submodule by submodule (idempotent; a no-op if `monai` is loaded)."""
    if "monai" in sys.modules:
        return
    spec = importlib.util.find_spec("monai")
    if spec is None or spec.loader is None:  # not installed: let the real import raise as usual
        return
    module: Any = importlib.util.module_from_spec(spec)  # a bare package: its dunders are set below
    sys.modules["monai"] = module
    try:
        versions = importlib.import_module("monai._version").get_versions()
        module.__version__ = str(versions.get("version", "0+unknown"))
        module.__revision_id__ = str(versions.get("full-revisionid") or "")
        module.__copyright__ = "(c) MONAI Consortium"
        module.__basedir__ = cast(list[str], spec.submodule_search_locations)[0]
        importlib.import_module("monai.apps")  # first, as load_submodules does (see above)
    except BaseException:
        # Leave no half-built package behind: the ordinary import then runs (and reports) as usual.
        for name in [n for n in sys.modules if n == "monai" or n.startswith("monai.")]:
            del sys.modules[name]
        raise
