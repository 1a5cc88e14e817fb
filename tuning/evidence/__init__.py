"""What the numbers say: CFCML against its defaults, ablations and baselines (`comparison`),
clinical evidence beyond AUC (`clinical`), the search report (`search_report`), the console summary
(`summary`) and the figures (`plots`).

May import: `cfcml`, `tuning.records`, `tuning.runtime`, `tuning.tracking`, `tuning.hpo`."""
