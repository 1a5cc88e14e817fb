"""Networks: image encoders, the tabular tokenizer and the CFCML model."""
from cfcml.networks.cfcml import CFCML, ImageInput, ModelOutput, build_model

__all__ = ["CFCML", "ImageInput", "ModelOutput", "build_model"]
