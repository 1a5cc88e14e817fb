"""The registered model: an MLflow pyfunc wrapping preprocessing, the tabular normaliser(s) and
one or more CFCML state dicts.

Why pyfunc and not the pytorch flavour: the network takes several image tensors plus three
tabular tensors, and a user holds manifest rows (file paths + clinical fields), not tensors.
The pyfunc takes a DataFrame of manifest rows, reads and preprocesses the images exactly as
`prepare` does, normalises the table with the training statistics shipped inside the model,
and returns class probabilities; its signature describes those columns. A fold ensemble (the
best trial's K models, each with its own fold's normaliser) averages probabilities.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from cfcml.config import PROJECT_ROOT, ExperimentConfig
from tuning.checkpoints import FoldWeights

BUNDLE_STATE = "models.pt"
BUNDLE_META = "bundle.json"


def input_columns(spec: Any) -> list[str]:
    return ["patient_id"] + [f"path_{m.name}" for m in spec.modalities] + [f.name for f in spec.fields]


class CFCMLModel(mlflow.pyfunc.PythonModel):
    def load_context(self, context: Any) -> None:
        from cfcml.config import ExperimentConfig, from_dict
        from cfcml.data.normalize import TabularNormalizer
        from cfcml.data.spec import spec_from_dict
        from cfcml.networks import build_model

        bundle = Path(context.artifacts["bundle"])
        meta = json.loads((bundle / BUNDLE_META).read_text())
        self.spec = spec_from_dict(meta["spec"], "model bundle spec")
        self.root = meta["root"]
        cfg = from_dict(ExperimentConfig, meta["experiment"], "model bundle experiment")
        states = torch.load(bundle / BUNDLE_STATE, map_location="cpu", weights_only=True)
        self.members = []
        for state in states:
            model = build_model(self.spec, cfg.model)
            model.load_state_dict(state["model"])
            model.eval()
            self.members.append((model, TabularNormalizer.from_state(self.spec, state["normalizer"])))

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        from torch.utils.data import DataLoader

        from cfcml.data.dataset import RawDataset
        from cfcml.predict import predict_proba

        frame = model_input.reset_index(drop=True).copy()
        missing = [c for c in input_columns(self.spec) if c not in frame.columns and c != "patient_id"]
        if missing:
            raise ValueError(f"input rows lack column(s) {missing}; "
                             f"expected manifest rows with {input_columns(self.spec)}")
        if "label" not in frame:
            frame["label"] = 0  # unused at inference
        root = Path((params or {}).get("root") or self.root)
        probs = np.zeros((len(frame), len(self.spec.classes)))
        for model, normalizer in self.members:
            loader = DataLoader(RawDataset(frame, self.spec, root, normalizer), batch_size=8)
            probs += predict_proba(model, loader, "cpu", len(self.spec.classes)) / len(self.members)
        return pd.DataFrame(probs, columns=list(self.spec.classes))


def log_and_register(
    *,
    tracking_uri: str,
    run_id: str,
    prepared: Any,
    experiment: ExperimentConfig,
    members: list[FoldWeights],
    model_name: str,
    tags: dict[str, str],
) -> Any:
    """Log the bundle (`members`: one network per fold, averaged) as a pyfunc model on `run_id`
    and register it as `model_name`."""
    from mlflow.models import infer_signature

    from cfcml.data.spec import spec_to_dict

    spec = prepared.spec
    example = prepared.dev_frame()[input_columns(spec)].head(2).reset_index(drop=True)
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        bundle.mkdir()
        torch.save([{"model": m.model, "normalizer": m.normalizer} for m in members], bundle / BUNDLE_STATE)
        (bundle / BUNDLE_META).write_text(json.dumps({
            "spec": spec_to_dict(spec), "experiment": experiment.to_dict(), "root": str(prepared.root),
        }, default=str))
        probe = CFCMLModel()  # the example's output, through exactly what serving will run
        probe.load_context(type("Ctx", (), {"artifacts": {"bundle": str(bundle)}})())
        output = probe.predict(None, example)
        signature = infer_signature(example, output, params={"root": str(prepared.root)})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=CFCMLModel(),
                artifacts={"bundle": str(bundle)},
                signature=signature,
                input_example=example,
                code_paths=[str(PROJECT_ROOT / "cfcml"), str(PROJECT_ROOT / "tuning")],
                registered_model_name=model_name,
            )
    client = mlflow.MlflowClient(tracking_uri)
    version = info.registered_model_version
    for key, value in tags.items():
        client.set_model_version_tag(model_name, str(version), key, value)
    return info
