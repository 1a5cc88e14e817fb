"""Evaluation of predicted probabilities, without Ray or MLflow: metrics with bootstrap CIs
(`metrics`), calibration (`calibration`), operating points (`operating_points`), decision curves
(`decision_curves`), subgroups (`subgroups`), missing inputs (`missing_inputs`) and the Bayes oracle
of synthetic cohorts (`oracle`); and the names of every metric key a run reports, logs or reads
(`metric_keys`, their one owner)."""
