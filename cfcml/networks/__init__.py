"""Networks: image encoders, the tabular tokenizer, the CFCML model and the fusion baselines
(`cfcml.networks.fusion`); `build_model` builds the one `model.variant` names."""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

from cfcml.networks.cfcml import CFCML, ImageInput, ModelOutput, build_model

if TYPE_CHECKING:
    from cfcml.config import ModelConfig
    from cfcml.data.spec import DatasetSpec
    from cfcml.networks.fusion import FusionModel

__all__ = ["CFCML", "ImageInput", "ModelOutput", "build_model", "build_trained"]


def build_trained(spec: DatasetSpec, model_cfg: ModelConfig, state: dict[str, Any]) -> CFCML | FusionModel:
    """The trained network in eval mode: built for `spec` and loaded with `state` (a state dict).
    Built without `model.pretrained`: the state holds every weight, and the pretrained file need
    not exist where the model is served."""
    model = build_model(spec, dataclasses.replace(model_cfg, pretrained=None))
    model.load_state_dict(state)
    return model.eval()
