"""The registered model: retraining the chosen configuration and testing it once (`final`), the
MLflow pyfunc that serves it (`served_model`, its code file `served_model_code`), the model card
(`model_card`) and Grad-CAM / occlusion explanations (`explain`).

May import: every other `tuning` package except `tuning.workflows` and `tuning.cli` (above it), and `cfcml`."""
