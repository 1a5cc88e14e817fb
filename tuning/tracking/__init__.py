"""MLflow: the store (`store`: experiments, runs, tags, logging helpers), the end of every run a
command starts (`lifecycle`) and the callbacks that mirror Tune trials and Ray Train runs into
MLflow (`callbacks`).

May import: `cfcml`, `tuning.records`, `tuning.runtime`."""
