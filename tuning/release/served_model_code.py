"""The registered model's code (MLflow models-from-code).

`tuning.release.served_model.log_and_register` logs this file as the model's `python_model`, with the
`cfcml` and `tuning` packages as its code paths. Loading a registered model runs this file, which
imports `tuning.release.served_model.CFCMLModel` from those packages; no pickled object is loaded
(a cloudpickled model would run whatever code its pickle holds). The weights are tensors
(`torch.load(weights_only=True)`), the rest of the bundle JSON.
"""
import mlflow

from tuning.release.served_model import CFCMLModel

mlflow.models.set_model(CFCMLModel())
