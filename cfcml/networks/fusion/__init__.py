"""The established image+table fusion methods, as networks of this platform (docs/model.md,
"Fusion baselines").

Each method shares the project's image encoders and tabular tokenizer (`base.FusionModel`), so
that only the fusion differs from CFCML and from each other; each is written from its paper (cited
in its module) and returns the same `ModelOutput` as CFCML, so training, metrics and serving work
unchanged. `FUSION_MODELS` maps a `model.variant` to its network class; each method's own settings
are `model.fusion.<variant>` (`cfcml.config.FusionConfig`). Trained with cross-entropy only
(`loss.fine: false`): the comparison's `BASELINES` set it.

| variant        | module            | fuses                                                          |
| -------------- | ----------------- | -------------------------------------------------------------- |
| early_fusion   | early_fusion.py   | the table as extra image channels at the encoder's input       |
| film           | film.py           | table-generated scale and shift of the encoder's stage maps     |
| daft           | daft.py           | image+table affine transform in the last residual block        |
| tab_attention  | tab_attention.py  | table tokens attend over the image tokens (MCAT style)         |
| tensor_fusion  | tensor_fusion.py  | outer product of the modality vectors (low-rank when large)    |
| healnet        | healnet.py        | a shared latent array attends to each modality in turn         |
"""
from __future__ import annotations

from cfcml.networks.fusion.base import FusionModel, run_encoder
from cfcml.networks.fusion.daft import DAFT
from cfcml.networks.fusion.early_fusion import EarlyFusion
from cfcml.networks.fusion.film import FiLM
from cfcml.networks.fusion.healnet import HEALNet
from cfcml.networks.fusion.tab_attention import TabAttention
from cfcml.networks.fusion.tensor_fusion import TensorFusion

FUSION_MODELS: dict[str, type[FusionModel]] = {
    "early_fusion": EarlyFusion,
    "film": FiLM,
    "daft": DAFT,
    "tab_attention": TabAttention,
    "tensor_fusion": TensorFusion,
    "healnet": HEALNet,
}

__all__ = ["DAFT", "FUSION_MODELS", "EarlyFusion", "FiLM", "FusionModel", "HEALNet", "TabAttention", "TensorFusion",
           "run_encoder"]
