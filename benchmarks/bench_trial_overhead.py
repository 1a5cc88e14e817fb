"""Per-trial overhead of the search: trial wall time minus training compute.

Runs the smoke search (2 trials x 2 folds x 2 epochs, tiny MEN-like data) end to end with real
Ray and a throwaway MLflow store, then prints per trial: the trial function's wall time (Tune's
time_total_s), the time the Ray Train worker spent training/validating, and their difference,
the start-up overhead (TorchTrainer controller + worker group + process group, imports, data
and model set-up).

    python -m benchmarks.bench_trial_overhead [--samples 2] [--epochs 2]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from cfcml.data.synthetic import make_men
from tuning.search import main as search_main


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = make_men(Path(tmp) / "men", patients=60, seed=0, size=(32, 32, 8))
        t0 = time.perf_counter()
        rc = search_main(["--dataset", "men", "--search", "smoke", "--data-root", str(root),
                          "--runs-dir", str(Path(tmp) / "runs"), "--num-samples", str(args.samples),
                          "--max-epochs", str(args.epochs), "--tracking-uri", f"sqlite:///{tmp}/mlflow.db",
                          "--no-final"])
        total = time.perf_counter() - t0
        if rc != 0:
            sys.exit(rc)
        outcome = json.loads((Path(tmp) / "runs" / "ray" / "men-smoke" / "outcome.json").read_text())
    print("\n=== per-trial overhead (smoke search, this machine) ===")
    print(f"{'trial':10s} {'epochs':>6s} {'wall s':>8s} {'compute s':>10s} {'overhead s':>11s}")
    overheads = []
    for t in outcome["trials"]:
        if "wall_s" not in t:
            continue
        over = t["wall_s"] - t["compute_s"]
        overheads.append(over)
        print(f"{t['trial_id']:10s} {t['epochs_run']:6d} {t['wall_s']:8.1f} {t['compute_s']:10.1f} {over:11.1f}")
    print(f"mean overhead per trial: {sum(overheads) / max(len(overheads), 1):.1f} s; "
          f"whole search incl. Ray start and MLflow: {total:.1f} s")


if __name__ == "__main__":
    main()
