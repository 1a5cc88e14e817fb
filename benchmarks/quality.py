"""Quality benchmark: `compare.py` on synthetic MEN and Derm7pt, the table written into README.md.

    python -m benchmarks.quality                  # about 30 minutes on 2 CPU cores
    python -m benchmarks.quality --quick          # a few minutes: fewer patients, epochs and seeds

Four comparisons, each on the same folds, seeds and epoch budget for every variant (see
tuning/evidence/comparison.py), with the demo search's small model (conf/search/demo.yaml: the smoke model
with D=64) so that it fits a laptop:

1. MEN, class signal split between images (Grade 1 vs 2) and table (invasion): every variant;
2. MEN, interaction mode (Grade 1 iff the image and table latents agree: no modality alone
   carries it): CFCML, its fine-stage ablation and the baselines that could not learn it;
3. Derm7pt with the honest clinical fields (no `management` or `level_of_diagnostic_difficulty`):
   the same variants;
4. Derm7pt with the public code's fields (`derm7pt_public`): how much test AUC the two leaky
   fields carry.

Each comparison shows the oracle (a logistic regression on the generator's latents). The tables
go between the `quality:start` / `quality:end` markers of README.md, with the date and machine.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import re
import time
from pathlib import Path

from cfcml.config import PROJECT_ROOT
from cfcml.evaluation.metrics import format_estimate

START, END = "<!-- quality:start -->", "<!-- quality:end -->"


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{os.cpu_count()} CPU cores ({cpu}), {gpu}, Python {platform.python_version()}, torch {torch.__version__}"


def run(args: argparse.Namespace) -> list[tuple[str, object, float]]:
    from cfcml.data.prepare import prepare_dataset
    from cfcml.data.synthetic import make_derm7pt, make_men
    from tuning.evidence.comparison import plan_comparison, run_comparison
    from tuning.runtime.ray_cluster import ray_session

    work = args.work.resolve()
    men_size, derm_size = (32, 32, 8), (64, 64)
    datasets = {
        "men": (make_men, dict(patients=args.men_patients, size=men_size, signal="split")),
        "men_interaction": (make_men, dict(patients=args.men_patients, size=men_size, signal="interaction")),
        "derm7pt": (make_derm7pt, dict(patients=args.derm_patients, size=derm_size)),
    }
    roots = {}
    for name, (make, kwargs) in datasets.items():
        root = work / "data" / name
        if not root.exists():
            make(root, seed=1, **kwargs)
        roots[name] = root
    some = "cfcml,no_fine,image_only,tabular_only,late_concat"
    runs = [  # (title, dataset config, data, variants)
        ("MEN, split signal", "men", "men", None),
        ("MEN, interaction signal", "men", "men_interaction", some),
        ("Derm7pt, honest fields", "derm7pt", "derm7pt", some),
        ("Derm7pt, public fields (management, diagnostic difficulty)", "derm7pt_public", "derm7pt", "cfcml"),
    ]
    results = []
    with ray_session():
        for title, dataset, data, variants in runs:
            t0 = time.time()
            size = derm_size if dataset.startswith("derm") else men_size
            prepared = prepare_dataset(dataset, roots[data], folds=args.folds, fold_seed=0, image_size=size)
            plan = plan_comparison(dataset, prepared.out_dir, variants=variants, seeds=args.seeds, folds=args.folds,
                                   max_epochs=args.epochs, search=args.search, runs_dir=work / "runs",
                                   name=f"quality-{data}-{dataset}", out=work / "compare" / f"{data}-{dataset}")
            print(f"\n=== {title}: {', '.join(plan.variants)} x {args.seeds} seeds x {args.folds} folds x "
                  f"{args.epochs} epochs ===", flush=True)
            result = run_comparison(plan, prepared)
            results.append((title, result, time.time() - t0))
    return results


def readme_section(results, args: argparse.Namespace, seconds: float) -> str:
    from tuning.evidence.comparison import markdown

    lines = [START, "", f"Measured {dt.date.today().isoformat()} on {machine()} by `python -m benchmarks.quality"
             f"{' --quick' if args.quick else ''}` in {seconds / 60:.0f} min: synthetic cohorts from "
             f"`pipelines/make_synthetic.py` (seed 1; MEN {args.men_patients} patients at 32x32x8, Derm7pt "
             f"{args.derm_patients} cases at 64x64), the `{args.search}` search's small model, {args.folds}-fold CV, "
             f"{args.seeds} seeds, {args.epochs} epochs, no model selection.", ""]
    for title, result, secs in results:
        body = markdown(result).split("\n", 2)[2]  # drop the per-comparison heading
        lines += [f"**{title}** ({secs / 60:.1f} min)", "", body.strip(), ""]
    public = next((r for t, r, _ in results if r.dataset == "derm7pt_public"), None)
    honest = next((r for t, r, _ in results if r.dataset == "derm7pt"), None)
    if public and honest:
        p = public.variants[0].test["auc"]
        h = next(v for v in honest.variants if v.name == "cfcml").test["auc"]
        lines += [f"Leaky fields: CFCML's test AUC is {format_estimate(p)} with `management` and "
                  f"`level_of_diagnostic_difficulty` and {format_estimate(h)} without them "
                  f"(difference {p[0] - h[0]:+.3f}). On this synthetic data `management` is drawn from the "
                  "table's view of the class, as excision follows a suspected melanoma in a clinic.", ""]
    lines.append(END)
    return "\n".join(lines)


def write_readme(section: str, readme: Path) -> None:
    text = readme.read_text(encoding="utf-8")
    if START in text and END in text:
        text = re.sub(re.escape(START) + r".*?" + re.escape(END), lambda _: section, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n## Quality (synthetic data)\n\n" + section + "\n"
    readme.write_text(text, encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a few minutes: fewer patients, epochs and seeds")
    p.add_argument("--men-patients", type=int)
    p.add_argument("--derm-patients", type=int)
    p.add_argument("--epochs", type=int)
    p.add_argument("--seeds", type=int)
    p.add_argument("--folds", type=int, default=2)
    p.add_argument("--search", default="demo", help="search file whose model overrides apply (conf/search/NAME.yaml)")
    p.add_argument("--work", type=Path, default=PROJECT_ROOT / "runs" / "quality")
    p.add_argument("--no-readme", action="store_true", help="print the section instead of writing README.md")
    args = p.parse_args(argv)
    defaults = dict(men_patients=60, derm_patients=80, epochs=4, seeds=1) if args.quick else \
        dict(men_patients=150, derm_patients=160, epochs=12, seeds=2)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    t0 = time.time()
    results = run(args)
    section = readme_section(results, args, time.time() - t0)
    if args.no_readme:
        print(section)
    else:
        write_readme(section, PROJECT_ROOT / "README.md")
        print(f"README.md updated ({time.time() - t0:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
